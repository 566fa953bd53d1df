"""Single-process (TP=1, no torch.distributed) checks of the losses: numerics, gradients, inputs, contracts.

The reference comparisons at TP=1 and TP=2 with megatron-core's parallel state are in test_losses_tp.py.
"""

from __future__ import annotations

import pytest
import torch

from student.losses import distillation_loss, logit_mse, soft_cross_entropy
from student.losses.distill import METRIC_SUMS
from student.settings import LossSettings
from tests.student.worker_losses import make_batch, ref_distill, ref_metrics, ref_soft, rel_err

TAILS = ("none", "renormalize", "tail_bucket")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("tau", [1.0, 0.6, 3.0])
def test_soft_ce_gradcheck(tail, tau, device):
    z, b = make_batch(seed=11, rows=5, vocab=10, k=4, device=device)
    assert torch.autograd.gradcheck(
        lambda x: soft_cross_entropy(
            x, b["topk_ids"], b["topk_logprobs"], tail=tail, temperature=tau, inplace=False
        ),
        (z.requires_grad_(),),
    )


@pytest.mark.parametrize("center", [True, False])
def test_logit_mse_gradcheck(center, device):
    z, b = make_batch(seed=12, rows=5, vocab=10, k=4, device=device)
    assert torch.autograd.gradcheck(
        lambda x: logit_mse(x, b["topk_ids"], b["topk_logits"], center=center), (z.requires_grad_(),)
    )


def test_logit_mse_ignores_a_per_row_shift_when_centred():
    z, b = make_batch(seed=13)
    shifted = z + torch.linspace(-50, 50, z.shape[0], dtype=z.dtype).unsqueeze(-1)
    centred = logit_mse(z, b["topk_ids"], b["topk_logits"])
    assert rel_err(logit_mse(shifted, b["topk_ids"], b["topk_logits"]), centred) < 1e-12
    assert not torch.allclose(logit_mse(shifted, b["topk_ids"], b["topk_logits"], center=False), centred)


def _near_one_batch(gap: float):
    """Student logits that put all but ~``gap`` of the mass on the teacher's top-k (Σ_j q_tj → 1)."""
    z, b = make_batch(seed=21, rows=8, vocab=512, k=6)
    ids = b["topk_ids"]
    boost = torch.zeros_like(z).scatter_(-1, ids.clamp(min=0), 1.0) * (ids >= 0).any(-1, keepdim=True)
    boost[:, 0] *= (ids == 0).any(-1).to(z.dtype)  # clamp(min=0) hit column 0 on padded rows: undo
    return z + boost * (-torch.log(torch.tensor(gap)) + 6.0), b


def test_tail_bucket_float32_accurate_when_topk_mass_near_one():
    """Σ_j q_tj = 1 − ~1e-12: in float32, 1 − Σ q is 0 (or noise); the tail sum taken directly is not."""
    z64, b = _near_one_batch(gap=1e-12)
    ids, logp = b["topk_ids"], b["topk_logprobs"]
    q32 = torch.softmax(z64.float(), -1)
    naive_tail = 1.0 - torch.where(ids >= 0, q32.gather(-1, ids.clamp(min=0)), 0.0).sum(-1)
    rows = (ids >= 0).any(-1)
    assert (naive_tail[rows] <= 1e-7).all()  # the naive float32 form has lost the tail entirely

    full = z64.clone().requires_grad_()
    ref = ref_soft(full, ids, logp, "tail_bucket", 1.0)
    ref.sum().backward()
    x = z64.float().requires_grad_()
    ours = soft_cross_entropy(x.clone(), ids, logp.float(), tail="tail_bucket")
    ours.sum().backward()
    assert torch.isfinite(ours).all() and torch.isfinite(x.grad).all()
    assert rel_err(ours, ref) < 2e-5
    assert rel_err(x.grad, full.grad) < 2e-5


def test_leading_dims_are_flattened_and_restored():
    z, b = make_batch(seed=14, rows=12)
    flat = soft_cross_entropy(z.clone(), b["topk_ids"], b["topk_logprobs"])
    shaped = soft_cross_entropy(
        z.clone().view(3, 4, -1), b["topk_ids"].view(3, 4, -1), b["topk_logprobs"].view(3, 4, -1)
    )
    assert shaped.shape == (3, 4)
    assert torch.equal(shaped.reshape(-1), flat)


def test_bfloat16_logits_give_bfloat16_gradients_close_to_reference(device):
    z, b = make_batch(seed=15, device=device)
    x = z.to(torch.bfloat16).requires_grad_()
    ours = soft_cross_entropy(x, b["topk_ids"], b["topk_logprobs"].float(), tail="tail_bucket")
    assert ours.dtype == torch.float32
    ours.sum().backward()
    full = x.detach().double().requires_grad_()
    ref = ref_soft(full, b["topk_ids"], b["topk_logprobs"], "tail_bucket", 1.0)
    ref.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert rel_err(ours, ref) < 1e-5  # the loss is computed in float32 from the bf16 values
    assert rel_err(x.grad, full.grad) < 1e-2  # bf16 rounding of the gradient


def test_inplace_overwrites_float32_logits_and_inplace_false_keeps_them(device):
    z, b = make_batch(seed=16, device=device)
    kept = z.float()
    before = kept.clone()
    soft_cross_entropy(kept, b["topk_ids"], b["topk_logprobs"], inplace=False)
    assert torch.equal(kept, before)
    soft_cross_entropy(kept, b["topk_ids"], b["topk_logprobs"])
    assert not torch.equal(kept, before)  # megatron-core style: the logits are the working buffer


def test_soft_ce_is_kl_plus_teacher_entropy(device):
    """With tail_bucket at τ = 1 the soft CE is the cross-entropy over the k+1 bins = KL + H(teacher)."""
    z, b = make_batch(seed=17, device=device)
    settings = LossSettings(kind="soft", tail="tail_bucket", alpha=1.0, temperature=1.0, no_teacher="mask")
    loss, metrics = distillation_loss(z.clone(), b, settings)
    assert float(metrics["soft_tokens"]) == float(metrics["tokens"]) > 0
    assert abs(loss.item() - float(metrics["kl"] + metrics["teacher_entropy"])) < 1e-12
    ref = ref_metrics(z, b["topk_ids"], b["topk_logprobs"])
    assert (ref["kl"] >= -1e-12).all()


@pytest.mark.parametrize("kind", ["soft", "mse"])  # "hard" needs megatron-core's TP state: test_losses_tp
def test_padding_and_masked_positions_never_contribute(kind: str, device):
    z, b = make_batch(seed=18, device=device)
    settings = LossSettings(kind=kind, tail="tail_bucket", alpha=0.5, temperature=2.0, no_teacher="mask")
    outside = ~(b["soft_mask"] & (b["loss_mask"] > 0))
    assert outside.any()
    x = z.clone().requires_grad_()
    loss, metrics = distillation_loss(x.clone(), b, settings)
    loss.backward()
    assert (x.grad[outside] == 0).all()
    noisy = dict(b, labels=torch.where(outside, 0, b["labels"]))
    for seed in range(64):  # huge logits off the loss make the per-row KL there inf; none of it may leak
        garbage = z.clone()
        noise = torch.randn(
            garbage[outside].shape, generator=torch.Generator().manual_seed(seed), dtype=z.dtype
        )
        garbage[outside] = 1e4 * noise.to(device)
        y = garbage.requires_grad_()
        loss2, metrics2 = distillation_loss(y.clone(), noisy, settings)
        loss2.backward()
        assert abs(float(loss2) - loss.item()) < 1e-12
        for key in METRIC_SUMS:
            assert float(metrics2[key]) == pytest.approx(float(metrics[key]), rel=1e-12), (seed, key)
        assert (y.grad[outside] == 0).all()
        torch.testing.assert_close(y.grad[~outside], x.grad[~outside], rtol=1e-12, atol=0)
    assert abs(loss.item() - float(ref_distill(z, b, settings.model_dump())[0])) < 1e-12


def test_no_contributing_token_gives_zero_loss_not_nan(device):
    z, b = make_batch(seed=19, device=device)
    b = dict(b, loss_mask=torch.zeros_like(b["loss_mask"]))
    x = z.clone().requires_grad_()
    loss, metrics = distillation_loss(x.clone(), b, LossSettings())
    loss.backward()
    assert loss.item() == 0.0 and float(metrics["tokens"]) == 0.0 and (x.grad == 0).all()


def test_duplicate_topk_ids_are_rejected():
    z, b = make_batch(seed=20)
    ids = b["topk_ids"].clone()
    ids[0, 1] = ids[0, 0]
    with pytest.raises(ValueError, match="repeats an id within position 0"):
        distillation_loss(z, dict(b, topk_ids=ids), LossSettings())


def test_missing_or_misshaped_batch_keys_are_named():
    z, b = make_batch(seed=20)
    with pytest.raises(KeyError, match="topk_logits"):
        distillation_loss(z, {k: v for k, v in b.items() if k != "topk_logits"}, LossSettings(kind="mse"))
    with pytest.raises(ValueError, match="loss_mask"):
        distillation_loss(z, dict(b, loss_mask=b["loss_mask"][:-1]), LossSettings())


def test_bad_tail_and_temperature_are_rejected():
    z, b = make_batch(seed=20)
    with pytest.raises(ValueError, match="tail"):
        soft_cross_entropy(z, b["topk_ids"], b["topk_logprobs"], tail="bucket")
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(z, b["topk_ids"], b["topk_logprobs"], temperature=0.0)


# ---------------------------------------------------------------- hardening (issue 12) ---------------------------
@pytest.mark.parametrize("tail", TAILS)
def test_openai_sentinel_logprob_is_not_a_teacher_token(tail):
    """Guards: an entry with a real id and OpenAI's -9999 "not returned" logprob used to count as a teacher
    token (renormalize gave 2.97 instead of 0: the two sentinels became weights 1/2 each)."""
    z = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).unsqueeze(0)
    ids = torch.tensor([[3, 5]])
    logp = torch.full((1, 2), -9999.0, dtype=torch.float64)
    loss = soft_cross_entropy(z.clone(), ids, logp, tail=tail)
    assert loss.item() == 0.0
    batch = {
        "labels": torch.tensor([2]),
        "loss_mask": torch.ones(1),
        "soft_mask": torch.ones(1, dtype=torch.bool),
        "topk_ids": ids,
        "topk_logprobs": logp,
    }
    _, metrics = distillation_loss(z.clone(), batch, LossSettings(alpha=1.0, no_teacher="mask"))
    assert float(metrics["kl"]) == 0.0 and float(metrics["teacher_entropy"]) == 0.0
    assert float(metrics["top1_agreement"]) == 0.0


def _underflow_batch(tau: float):
    """float32 logits [0, −130τ, …] and a teacher top-1 {0: log 0.8}: the student's tail mass at τ is about
    e^-130, below float32's smallest number, while the true loss is ≈ 0.2·(130 − log 7) ≈ 25.6 (at τ = 1)."""
    z = torch.full((2, 8), -130.0 * tau, dtype=torch.float64)
    z[:, 0] = 0.0
    z[1, 5] = -3.0  # a second row whose tail does not underflow
    ids = torch.tensor([[0, -1], [0, 2]])
    logp = torch.tensor([[0.8, 0.0], [0.5, 0.3]], dtype=torch.float64).log()
    logp[0, 1] = float("-inf")
    return z, ids, logp


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_tail_bucket_stays_finite_and_exact_when_the_student_tail_underflows(tau, device):
    """Guards: the tail sum Σ_{v∉K} exp(z_v − max) underflowed to 0 in float32 (tail log-mass below about
    −104τ), so log R = −inf: the loss was inf, the gradient all NaN and the k+1-bin KL inf."""
    z64, ids, logp = (t.to(device) for t in _underflow_batch(tau))
    full = z64.clone().requires_grad_()
    ref = ref_soft(full, ids, logp, "tail_bucket", tau)
    ref.sum().backward()
    assert 20.0 < ref[0].item() < 200.0  # ≈ 25.6 at τ = 1
    x = z64.float().requires_grad_()
    ours = soft_cross_entropy(x.clone(), ids, logp.float(), tail="tail_bucket", temperature=tau)
    ours.sum().backward()
    assert torch.isfinite(ours).all() and torch.isfinite(x.grad).all()
    assert rel_err(ours, ref) < 1e-6
    assert rel_err(x.grad, full.grad) < 1e-6
    bf16 = z64.to(torch.bfloat16)  # exactly representable: the same numbers through the bf16 path
    assert rel_err(soft_cross_entropy(bf16, ids, logp.float(), temperature=tau), ref) < 1e-6

    batch = {
        "labels": torch.tensor([0, 1], device=device),
        "loss_mask": torch.ones(2, device=device),
        "soft_mask": torch.ones(2, dtype=torch.bool, device=device),
        "topk_ids": ids,
        "topk_logprobs": logp.float(),
    }
    _, metrics = distillation_loss(z64.float(), batch, LossSettings(temperature=tau))
    expected = ref_metrics(z64, ids, logp)
    assert torch.isfinite(metrics["kl_sum"])
    assert abs(float(metrics["kl_sum"]) - float(expected["kl"].sum())) < 1e-5 * float(expected["kl"].sum())


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_zero_rows_give_empty_losses_at_any_temperature(tau):
    """Guards: an empty micro-batch with τ != 1 raised ``torch.cat(): expected a non-empty list``."""
    x = torch.zeros(0, 16, requires_grad=True)
    ids, logp = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    loss = soft_cross_entropy(x.clone(), ids, logp, temperature=tau)
    loss.sum().backward()
    assert loss.shape == (0,) and x.grad.shape == (0, 16)
    batch = {
        "labels": torch.zeros(0, dtype=torch.long),
        "loss_mask": torch.zeros(0),
        "soft_mask": torch.zeros(0, dtype=torch.bool),
        "topk_ids": ids,
        "topk_logprobs": logp,
    }
    total, metrics = distillation_loss(x.clone(), batch, LossSettings(temperature=tau, alpha=0.5))
    assert total.item() == 0.0 and float(metrics["tokens"]) == 0.0
