"""Sampled targets (kind "sampled") and the actual-token bin (tail "actual_bin") against float64 references.

The sampled estimator is checked for what makes it worth having: over the teacher's draws its loss and gradient
average to the full-distribution cross-entropy H(p, q) and to q − p, exactly (by enumerating every outcome of the
draws) and empirically (Monte Carlo error shrinking like 1/sqrt(draws)). TP=2 equals TP=1 is in
test_losses_tp.py (cases ``sampled-*``, ``soft-actual_bin-*``, ``distill-sampled-*``, ``distill-soft-actualbin-*``).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student.losses import distillation_loss, sampled_cross_entropy, sampled_targets, soft_cross_entropy
from student.settings import LossSettings
from tests.student.worker_losses import make_batch, ref_distill, ref_sampled, ref_soft, rel_err

V = 50
HEAD = 5


def _teacher_and_student(seed: int, tau: float = 1.0):
    """A random teacher distribution p over V (as sampled: at temperature τ), its top-HEAD head, student logits."""
    g = torch.Generator().manual_seed(seed)
    p = F.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, dim=0)
    z = torch.randn(V, generator=g, dtype=torch.float64) * 2.0
    head = p.topk(HEAD).indices
    return p, z, head


def _dense_truth(p: torch.Tensor, z: torch.Tensor, tau: float) -> tuple[float, torch.Tensor]:
    """τ²·H(p, softmax(z/τ)) and its gradient τ·(softmax(z/τ) − p), by plain autograd in float64."""
    x = z.clone().requires_grad_()
    loss = -tau * tau * (p * F.log_softmax(x / tau, dim=0)).sum()
    loss.backward()
    return loss.item(), x.grad


def _targets_from_draws(p: torch.Tensor, head: torch.Tensor, draws: torch.Tensor):
    """``sampled_targets`` rows from tail draws [n, S] (ids outside the head); head [k] (k may be 0)."""
    n = draws.shape[0]
    counts = torch.zeros(n, V, dtype=torch.long).scatter_add_(-1, draws, torch.ones_like(draws))
    tail_ids = torch.where(counts > 0, torch.arange(V).expand(n, V), -1)
    head_ids = head.expand(n, head.numel())
    head_logp = p[head].log().expand(n, head.numel())
    return sampled_targets(head_ids, head_logp, tail_ids, counts, dtype=torch.float64)


def _loss_and_grads(z: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, tau: float):
    """Per-draw loss [n] and gradient [n, V] of the sampled CE (rows are independent draws)."""
    x = z.expand(ids.shape[0], V).clone().requires_grad_()
    loss = sampled_cross_entropy(x.clone(), ids, weights, temperature=tau)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("head_size", [HEAD, 0])
def test_expectation_over_every_outcome_is_the_full_cross_entropy(tau, head_size):
    """E over the draws, summed over every outcome with its probability: E[L] = τ²·H(p, q^τ) and
    E[grad] = τ·(q^τ − p), to rounding (S = 2 tail draws; head_size 0: plain i.i.d. samples)."""
    p, z, head = _teacher_and_student(seed=1)
    head = head[:head_size]
    outside = torch.ones(V, dtype=torch.bool)
    outside[head] = False
    tail = outside.nonzero().squeeze(-1)
    tail_p = p[tail] / p[tail].sum()
    pairs = torch.tensor(list(itertools.product(range(len(tail)), repeat=2)))
    prob = tail_p[pairs[:, 0]] * tail_p[pairs[:, 1]]
    ids, weights = _targets_from_draws(p, head, tail[pairs])
    assert rel_err(weights.sum(-1), torch.ones(len(pairs), dtype=torch.float64)) < 1e-14
    loss, grads = _loss_and_grads(z, ids, weights, tau)
    expected_loss, expected_grad = _dense_truth(p, z, tau)
    assert abs(float((prob * loss).sum()) - expected_loss) < 1e-12 * abs(expected_loss)
    assert rel_err((prob.unsqueeze(-1) * grads).sum(0), expected_grad) < 1e-12
    assert rel_err(loss, ref_sampled(z.expand(len(pairs), V), ids, weights, tau)) < 1e-12


def _monte_carlo_errors(p, z, head, tau, draws: int, replicates: int, seed: int):
    """Root-mean-square over replicates of (mean over ``draws`` draws − truth), for loss and gradient, and the
    per-draw standard deviations σ (so that the error of a mean of D draws is σ/sqrt(D))."""
    outside = torch.ones(V, dtype=torch.bool)
    outside[head] = False
    tail_p = torch.where(outside, p, 0.0)
    g = torch.Generator().manual_seed(seed)
    samples = torch.multinomial(tail_p.expand(replicates * draws, V), 4, replacement=True, generator=g)
    loss, grads = _loss_and_grads(z, *_targets_from_draws(p, head, samples), tau)
    truth_loss, truth_grad = _dense_truth(p, z, tau)
    mean_loss = loss.view(replicates, draws).mean(-1)
    mean_grad = grads.view(replicates, draws, V).mean(1)
    err_loss = float(((mean_loss - truth_loss) ** 2).mean().sqrt())
    err_grad = float(((mean_grad - truth_grad) ** 2).sum(-1).mean().sqrt())
    sd_loss = float(loss.std())
    sd_grad = float(((grads - truth_grad) ** 2).sum(-1).mean().sqrt())
    return err_loss, err_grad, sd_loss, sd_grad


def test_monte_carlo_error_shrinks_like_one_over_sqrt_draws():
    """Means of 200 and of 3200 draws (48 independent replicates each, seeded): the error is σ/sqrt(draws)
    (no bias floor) and so the ratio of the two errors is near sqrt(16) = 4. At τ = 1 only: since Σ_j w_j = 1,
    a draw's deviation is −τ·Σ_v (w_v − p_v)·z_v for the loss and −τ·(w − p) for the gradient, so τ merely
    scales both errors (measured: ratios 3.94 and 3.81, errors 0.97–1.09 σ/sqrt(draws))."""
    tau = 1.0
    p, z, head = _teacher_and_student(seed=2)
    small = _monte_carlo_errors(p, z, head, tau, draws=200, replicates=48, seed=10)
    large = _monte_carlo_errors(p, z, head, tau, draws=3200, replicates=48, seed=11)
    for (err_s, sd_s), (err_l, sd_l) in ((small[0::2], large[0::2]), (small[1::2], large[1::2])):
        assert 0.7 < err_s * math.sqrt(200) / sd_s < 1.3
        assert 0.7 < err_l * math.sqrt(3200) / sd_l < 1.3
        assert 3.0 < err_s / err_l < 5.3


def test_sampled_targets_weights():
    """Head exact, tail r·count/S, weights summing to 1; S = 0 renormalises the head; nothing: no targets."""
    ids = torch.tensor([[4, 1, -1], [4, 1, -1], [-1, -1, -1], [-1, -1, -1]])
    logp = torch.tensor([[0.5, 0.2, 0.0], [0.5, 0.2, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]).log()
    logp[:, 2] = float("-inf")
    tail_ids = torch.tensor([[7, 2], [-1, -1], [3, 9], [-1, -1]])
    tail_counts = torch.tensor([[3, 1], [0, 0], [1, 1], [0, 0]])
    out_ids, w = sampled_targets(ids, logp, tail_ids, tail_counts)
    assert out_ids.tolist() == [[4, 1, -1, 7, 2], [4, 1, -1, -1, -1], [-1, -1, -1, 3, 9], [-1] * 5]
    expected = [
        [0.5, 0.2, 0, 0.3 * 3 / 4, 0.3 / 4],
        [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0],
        [0, 0, 0, 0.5, 0.5],
        [0] * 5,
    ]
    assert torch.allclose(w, torch.tensor(expected), atol=1e-7)
    assert w.dtype == torch.float32


def test_sampled_targets_reject_a_tail_sample_inside_the_head_and_negative_counts():
    ids, logp = torch.tensor([[4, 1]]), torch.tensor([[0.5, 0.2]]).log()
    with pytest.raises(ValueError, match="position 0 has a tail sample inside its top-k"):
        sampled_targets(ids, logp, torch.tensor([[1]]), torch.tensor([[2]]))
    with pytest.raises(ValueError, match="tail_counts must be >= 0"):
        sampled_targets(ids, logp, torch.tensor([[3]]), torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="same leading dims"):
        sampled_targets(ids, logp, torch.tensor([[3, 2]]), torch.tensor([[1]]))


@pytest.mark.parametrize("tau", [1.0, 0.6, 2.5])
def test_gradcheck_sampled_and_actual_bin(tau):
    z, b = make_batch(seed=31, rows=6, vocab=10, k=3)
    assert torch.autograd.gradcheck(
        lambda x: sampled_cross_entropy(
            x, b["sample_ids"], b["sample_weights"], temperature=tau, inplace=False
        ),
        (z.clone().requires_grad_(),),
    )
    assert torch.autograd.gradcheck(
        lambda x: soft_cross_entropy(
            x,
            b["topk_ids"],
            b["topk_logprobs"],
            tail="actual_bin",
            temperature=tau,
            inplace=False,
            labels=b["labels"],
            actual_logprob=b["actual_logprob"],
        ),
        (z.clone().requires_grad_(),),
    )
    for extra in (dict(kind="sampled"), dict(kind="soft", tail="actual_bin")):
        settings = LossSettings(alpha=0.6, temperature=tau, no_teacher="hard", **extra)
        assert torch.autograd.gradcheck(
            lambda x, s=settings: distillation_loss(x, b, s, inplace=False)[0], (z.clone().requires_grad_(),)
        )


def test_actual_bin_is_tail_bucket_where_the_actual_token_is_unknown_or_in_the_top_k():
    z, b = make_batch(seed=32)
    labels, actual = b["labels"], b["actual_logprob"]
    in_topk = (b["topk_ids"] == labels.unsqueeze(-1)).any(-1)
    plain = soft_cross_entropy(z.clone(), b["topk_ids"], b["topk_logprobs"], temperature=1.5)
    split = soft_cross_entropy(
        z.clone(),
        b["topk_ids"],
        b["topk_logprobs"],
        tail="actual_bin",
        temperature=1.5,
        labels=labels,
        actual_logprob=actual,
    )
    same = in_topk | actual.isnan()
    assert same.any() and (~same).any()
    assert torch.equal(split[same], plain[same])
    assert (split[~same] != plain[~same]).all()
    ref = ref_soft(z, b["topk_ids"], b["topk_logprobs"], "actual_bin", 1.5, labels, actual)
    assert rel_err(split, ref) < 1e-12


def test_actual_bin_with_the_underflowing_tail_stays_finite():
    """The label's bin and the rest of the tail in float32 when the student's tail mass is below e^-120."""
    z = torch.full((1, 8), -130.0, dtype=torch.float64)
    z[0, 0], z[0, 3] = 0.0, -125.0
    ids, logp = torch.tensor([[0]]), torch.tensor([[math.log(0.8)]], dtype=torch.float64)
    labels, actual = torch.tensor([3]), torch.tensor([math.log(0.05)], dtype=torch.float64)
    full = z.clone().requires_grad_()
    ref = ref_soft(full, ids, logp, "actual_bin", 1.0, labels, actual)
    ref.sum().backward()
    x = z.float().requires_grad_()
    ours = soft_cross_entropy(
        x.clone(), ids, logp.float(), tail="actual_bin", labels=labels, actual_logprob=actual
    )
    ours.sum().backward()
    assert rel_err(ours, ref) < 1e-6 and rel_err(x.grad, full.grad) < 1e-6


def test_distillation_loss_sampled_matches_reference_and_checks_its_keys():
    z, b = make_batch(seed=33)
    settings = LossSettings(kind="sampled", alpha=0.5, temperature=1.3, no_teacher="hard")
    x = z.clone().requires_grad_()
    loss, metrics = distillation_loss(x.clone(), b, settings)
    loss.backward()
    full = z.clone().requires_grad_()
    ref_loss, ref_sums = ref_distill(full, b, settings.model_dump())
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-12 * abs(ref_loss.item())
    assert rel_err(x.grad, full.grad) < 1e-12
    for key, value in ref_sums.items():
        assert float(metrics[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), key
    with pytest.raises(KeyError, match="sample_weights"):
        distillation_loss(z, {k: v for k, v in b.items() if k != "sample_weights"}, settings)
    with pytest.raises(ValueError, match="sample_weights"):
        distillation_loss(z, dict(b, sample_weights=-b["sample_weights"]), settings)
    repeated = b["sample_ids"].clone()
    row = int((repeated[:, 1] >= 0).nonzero()[0, 0])
    repeated[row, 1] = repeated[row, 0]
    with pytest.raises(ValueError, match=f"sample_ids repeats an id within position {row}"):
        distillation_loss(z, dict(b, sample_ids=repeated), settings)
    with pytest.raises(KeyError, match="actual_logprob"):
        distillation_loss(
            z, {k: v for k, v in b.items() if k != "actual_logprob"}, LossSettings(tail="actual_bin")
        )


def test_sampled_targets_equal_the_readers_compiled_kernel():
    """The reader builds ``sample_ids``/``sample_weights`` with its numba kernel; both implement one estimator."""
    from storage.kernels import sample_targets

    g = torch.Generator().manual_seed(41)
    rows, k, m = 30, 4, 3
    teacher = F.log_softmax(torch.randn(rows, V, generator=g, dtype=torch.float64) * 2.0, dim=-1)
    order = teacher.argsort(dim=-1, descending=True)
    head_ids, tail_ids = order[:, :k].clone(), order[:, k : k + m].clone()
    head_logp = teacher.gather(-1, head_ids).float()
    tail_counts = torch.randint(0, 4, (rows, m), generator=g)
    head_ids[::5, 2:] = -1  # a varying k
    head_logp[::5, 2:] = float("-inf")
    head_ids[1::7] = -1  # plain i.i.d. samples
    head_logp[1::7] = float("-inf")
    ids, weights = sampled_targets(
        head_ids, head_logp, torch.where(tail_counts > 0, tail_ids, -1), tail_counts
    )

    keep_head, keep_tail = head_ids >= 0, tail_counts > 0
    entry_offsets = np.concatenate([[0], keep_head.sum(-1).cumsum(0).numpy()]).astype(np.int64)
    sample_offsets = np.concatenate([[0], keep_tail.sum(-1).cumsum(0).numpy()]).astype(np.int64)
    out_ids = np.full((rows, k + m), -1, np.int32)
    out_weights = np.zeros((rows, k + m), np.float32)
    sample_targets(
        entry_offsets,
        head_ids[keep_head].numpy().astype(np.int32),
        head_logp[keep_head].numpy(),
        sample_offsets,
        tail_ids[keep_tail].numpy().astype(np.int32),
        tail_counts[keep_tail].numpy().astype(np.int32),
        out_ids,
        out_weights,
    )
    for i in range(rows):
        ours = {int(t): float(w) for t, w in zip(ids[i], weights[i], strict=True) if t >= 0}
        theirs = {int(t): float(w) for t, w in zip(out_ids[i], out_weights[i], strict=True) if t >= 0}
        assert ours.keys() == theirs.keys(), i
        assert all(abs(ours[t] - theirs[t]) < 1e-6 for t in ours), (i, ours, theirs)
