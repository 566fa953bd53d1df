"""Dense float64 references for the losses, and the torchrun worker that checks them at TP=1 and TP=2.

The references below know nothing about tensor parallelism or the fused Function: full logits ``[N, V]``, a plain
``log_softmax``, Python loops over rows, and ordinary autograd. The worker (``torchrun --nproc-per-node=TP
worker_losses.py --out FILE``) gives each rank its vocabulary shard of the same random logits, runs every case of
``CASES`` through ``student.losses`` and the reference, and writes, per case, the largest relative error of the
forward values and of the input gradient over all ranks.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

K = 6
N = 14
VOCAB = 64
DRAWS = 5
SENTINEL = -9999.0


# ---------------------------------------------------------------- references (dense, float64, per row) ----------
def _on_cpu(fn: Callable) -> Callable:
    """Run a reference on the CPU (its row loops build CPU tensors) whatever its inputs' device, and hand the
    results back on that device; ``.cpu()`` / ``.to()`` are differentiable, so gradients reach the inputs."""

    def move(value: Any, device: torch.device) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {key: move(item, device) for key, item in value.items()}
        if isinstance(value, tuple):
            return tuple(move(item, device) for item in value)
        return value

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        cpu = torch.device("cpu")
        result = fn(*move(args, cpu), **move(kwargs, cpu))
        return move(result, device)

    return wrapper


def _row_teacher(ids: torch.Tensor, logp: torch.Tensor) -> tuple[list[int], torch.Tensor, float]:
    keep = [
        j for j in range(len(ids)) if ids[j] >= 0 and math.isfinite(float(logp[j])) and logp[j] > SENTINEL
    ]
    p = logp[keep].double().exp()
    return [int(ids[j]) for j in keep], p, max(0.0, 1.0 - float(p.sum()))


def _log_tail(logq: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log of the student's mass outside ``ids``, as a log-sum-exp over the other entries."""
    others = torch.ones(logq.shape[0], dtype=torch.bool)
    others[ids] = False
    return torch.logsumexp(logq[others], dim=0)


@_on_cpu
def ref_soft(
    z: torch.Tensor,
    ids: torch.Tensor,
    logp: torch.Tensor,
    tail: str,
    tau: float,
    labels: torch.Tensor | None = None,
    actual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row ``τ²·(−Σ_j w~_j log q^τ_{t_j} − r~ log(1 − Σ_j q^τ_{t_j}))`` with the teacher's bins tempered.

    ``actual_bin``: where the label y is outside the top-k and its log-probability is known, the bins are
    ``(p_1..p_k, p_y, r − p_y)`` with ``p_y = min(exp(actual), r)`` against ``(q_t.., q_y, 1 − Σ q_t − q_y)``.
    """
    rows = []
    for i in range(z.shape[0]):
        logq = F.log_softmax(z[i].double() / tau, dim=0)
        t, p, r = _row_teacher(ids[i], logp[i])
        if tail == "actual_bin":
            y, a = int(labels[i]), float(actual[i])
            if y >= 0 and y not in t and math.isfinite(a) and a > SENTINEL and r > 0:
                p_y = min(math.exp(a), r)
                t, p, r = [*t, y], torch.cat([p, torch.tensor([p_y], dtype=torch.float64)]), r - p_y
        bins = p if tail == "renormalize" else torch.cat([p, torch.tensor([r], dtype=torch.float64)])
        tempered = bins ** (1.0 / tau)
        tempered = tempered / tempered.sum() if tempered.sum() > 0 else tempered
        loss = -(tempered[: len(t)] * logq[t]).sum()
        if tail in ("tail_bucket", "actual_bin") and tempered[-1] > 0:
            loss = loss - tempered[-1] * _log_tail(logq, t)
        rows.append(tau * tau * loss)
    return torch.stack(rows)


def ref_sampled(z: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row ``τ²·(−Σ_j w_j log q^τ_{s_j})``: the soft CE against the sampled weights (ids -1 skipped)."""
    rows = []
    for i in range(z.shape[0]):
        logq = F.log_softmax(z[i].double() / tau, dim=0)
        keep = [j for j in range(ids.shape[1]) if ids[i, j] >= 0]
        rows.append(-tau * tau * (weights[i, keep].double() * logq[ids[i, keep]]).sum())
    return torch.stack(rows)


def ref_hard(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.stack([-F.log_softmax(z[i].double(), 0)[labels[i]] for i in range(z.shape[0])])


def ref_mse(z: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor, center: bool) -> torch.Tensor:
    rows = []
    for i in range(z.shape[0]):
        keep = [
            j for j in range(ids.shape[1]) if ids[i, j] >= 0 and math.isfinite(float(teacher_logits[i, j]))
        ]
        if not keep:
            rows.append(z[i, 0].double() * 0.0)
            continue
        diff = z[i, ids[i, keep]].double() - teacher_logits[i, keep].double()
        if center:
            diff = diff - diff.mean()
        rows.append((diff**2).mean())
    return torch.stack(rows)


@_on_cpu
def ref_metrics(z: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL(teacher‖student) and teacher entropy over the k+1 bins, top-1 agreement, at τ = 1."""
    kl, ent, agree = [], [], []
    for i in range(z.shape[0]):
        logq = F.log_softmax(z[i].double(), 0)
        t, p, r = _row_teacher(ids[i], logp[i])
        lp = p.log()
        k_i = (p * (lp - logq[t])).sum()
        h_i = -(p * lp).sum()
        if r > 0:
            k_i = k_i + r * (math.log(r) - _log_tail(logq, t))
            h_i = h_i - r * math.log(r)
        kl.append(k_i)
        ent.append(h_i)
        top1 = t[int(torch.argmax(p))] if t else -1
        agree.append(float(t != [] and z[i, top1] == z[i].max()))
    return {
        "kl": torch.stack(kl).detach(),
        "teacher_entropy": torch.stack(ent).detach(),
        "agree": torch.tensor(agree),
    }


@_on_cpu
def ref_distill(
    z: torch.Tensor, batch: dict[str, torch.Tensor], s: dict
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over contributing tokens of the configured per-token loss, and the metric sums."""
    has_loss = batch["loss_mask"] > 0
    soft = batch["soft_mask"] & has_loss
    ce = ref_hard(z, batch["labels"])
    if s["kind"] == "hard":
        per_token, contributing = ce, has_loss
    else:
        if s["kind"] == "sampled":
            soft = soft & (batch["sample_weights"] > 0).any(-1)
        fallback = has_loss & ~soft if s["no_teacher"] == "hard" else torch.zeros_like(has_loss)
        contributing = soft | fallback
        if s["kind"] == "soft":
            teacher = ref_soft(
                z,
                batch["topk_ids"],
                batch["topk_logprobs"],
                s["tail"],
                s["temperature"],
                batch["labels"],
                batch["actual_logprob"],
            )
        elif s["kind"] == "sampled":
            teacher = ref_sampled(z, batch["sample_ids"], batch["sample_weights"], s["temperature"])
        else:
            teacher = ref_mse(z, batch["topk_ids"], batch["topk_logits"], s.get("mse_center", True))
        per_token = torch.where(soft, s["alpha"] * teacher + (1 - s["alpha"]) * ce, ce)
    loss = per_token[contributing].sum() / max(int(contributing.sum()), 1)
    m = ref_metrics(z, batch["topk_ids"], batch["topk_logprobs"])
    metrics = {
        "tokens": float(contributing.sum()),
        "soft_tokens": float(soft.sum()),
        "hard_ce_sum": float(ce[contributing].sum()),
        "kl_sum": float(m["kl"][soft].sum()),
        "teacher_entropy_sum": float(m["teacher_entropy"][soft].sum()),
        "top1_agree_sum": float(m["agree"][soft].sum()),
    }
    return loss, metrics


# ---------------------------------------------------------------- data -------------------------------------------
def make_batch(
    seed: int = 0, rows: int = N, vocab: int = VOCAB, k: int = K, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, dict]:
    """Random student logits and a teacher top-k with W < 1, a varying k (-1 / -inf pads) and masks; drawn
    on the CPU (the same numbers everywhere), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2.0
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3.0
    z[::2] = teacher[::2] + torch.randn(z[::2].shape, generator=g, dtype=torch.float64)  # some top-1 agree
    logp_full = F.log_softmax(teacher, dim=-1)
    ids = teacher.topk(k, dim=-1).indices
    logits = teacher.gather(-1, ids)
    logprobs = logp_full.gather(-1, ids)
    ids = ids[:, torch.randperm(k, generator=g)]  # teacher order need not be sorted
    logprobs, logits = logp_full.gather(-1, ids), teacher.gather(-1, ids)
    counts = torch.randint(0, k + 1, (rows,), generator=g)
    counts[:3] = torch.tensor([k, 1, 0])
    pad = torch.arange(k).unsqueeze(0) >= counts.unsqueeze(1)
    ids = ids.masked_fill(pad, -1)
    logprobs = logprobs.masked_fill(pad, float("-inf"))
    logits = logits.masked_fill(pad, float("-inf"))
    labels = torch.randint(0, vocab, (rows,), generator=g)
    loss_mask = (torch.rand(rows, generator=g) > 0.2).float()
    loss_mask[:3] = 1.0
    soft_mask = (counts > 0) & (torch.rand(rows, generator=g) > 0.15)
    if k > 1:  # an entry with a real id and OpenAI's -9999 sentinel: no teacher token (row 1 has k = 1)
        spare = int(next(v for v in range(vocab) if v not in ids[1].tolist()))
        ids[1, 1], logprobs[1, 1], logits[1, 1] = spare, SENTINEL, float("-inf")
    g2 = torch.Generator().manual_seed(seed + 1000)  # the extras draw from their own stream
    labels[3::4] = torch.where(ids[3::4, 0] >= 0, ids[3::4, 0], labels[3::4])  # some labels in the top-k
    actual = logp_full.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float().double()
    actual[torch.rand(rows, generator=g2) < 0.25] = float("nan")
    sample_ids, sample_weights = draw_sampled_targets(logp_full, ids, logprobs, DRAWS, g2)
    no_samples = ~soft_mask
    no_samples[3] = True  # a soft position without samples: a fallback position for kind "sampled"
    sample_ids = sample_ids.masked_fill(no_samples.unsqueeze(-1), -1)
    sample_weights = sample_weights.masked_fill(no_samples.unsqueeze(-1), 0.0)
    batch = {
        "labels": labels,
        "loss_mask": loss_mask,
        "soft_mask": soft_mask,
        "topk_ids": ids,
        "topk_logprobs": logprobs.float().double(),
        "topk_logits": logits,
        "actual_logprob": actual,
        "sample_ids": sample_ids,
        "sample_weights": sample_weights.double(),
    }
    return z.to(device), {key: value.to(device) for key, value in batch.items()}


def draw_sampled_targets(
    logp_full: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, draws: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sampled_targets`` of ``draws`` samples per row from the teacher's full distribution restricted to
    outside each row's valid top-k (plain i.i.d. samples where the row has no top-k)."""
    from student.losses.targets import sampled_targets, valid_entries

    rows, vocab = logp_full.shape
    tail_ids = torch.full((rows, draws), -1, dtype=torch.long)
    tail_counts = torch.zeros(rows, draws, dtype=torch.long)
    valid = valid_entries(ids, logprobs)
    head = torch.zeros(rows, vocab).scatter_reduce_(-1, ids.clamp(min=0), valid.float(), reduce="amax") > 0
    probs = logp_full.exp().masked_fill(head, 0.0)
    for i in range(rows):
        drawn = torch.multinomial(probs[i], draws, replacement=True, generator=g)
        distinct, counts = drawn.unique(return_counts=True)
        tail_ids[i, : len(distinct)], tail_counts[i, : len(distinct)] = distinct, counts
    return sampled_targets(ids, logprobs, tail_ids, tail_counts)


# ---------------------------------------------------------------- worker -----------------------------------------
def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest reference magnitude."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _cases() -> dict[str, tuple[Callable, Callable]]:
    """name -> (ours(shard, full_batch) -> value, reference(full_logits, full_batch) -> value)."""
    from student.losses import (
        distillation_loss,
        hard_cross_entropy,
        logit_mse,
        sampled_cross_entropy,
        soft_cross_entropy,
    )
    from student.settings import LossSettings

    cases: dict[str, tuple[Callable, Callable]] = {}
    for tau in (1.0, 0.7, 2.5):
        cases[f"soft-actual_bin-tau{tau}"] = (
            lambda zs, b, tau=tau: soft_cross_entropy(
                zs,
                b["topk_ids"],
                b["topk_logprobs"],
                tail="actual_bin",
                temperature=tau,
                labels=b["labels"],
                actual_logprob=b["actual_logprob"],
            ),
            lambda z, b, tau=tau: ref_soft(
                z, b["topk_ids"], b["topk_logprobs"], "actual_bin", tau, b["labels"], b["actual_logprob"]
            ),
        )
        cases[f"sampled-tau{tau}"] = (
            lambda zs, b, tau=tau: sampled_cross_entropy(
                zs, b["sample_ids"], b["sample_weights"], temperature=tau
            ),
            lambda z, b, tau=tau: ref_sampled(z, b["sample_ids"], b["sample_weights"], tau),
        )
    for tail in ("none", "renormalize", "tail_bucket"):
        for tau in (1.0, 0.7, 2.5):
            cases[f"soft-{tail}-tau{tau}"] = (
                lambda zs, b, tail=tail, tau=tau: soft_cross_entropy(
                    zs, b["topk_ids"], b["topk_logprobs"], tail=tail, temperature=tau
                ),
                lambda z, b, tail=tail, tau=tau: ref_soft(z, b["topk_ids"], b["topk_logprobs"], tail, tau),
            )
    cases["hard-megatron"] = (
        lambda zs, b: hard_cross_entropy(zs, b["labels"]),
        lambda z, b: ref_hard(z, b["labels"]),
    )
    for center in (True, False):
        cases[f"mse-center{center}"] = (
            lambda zs, b, c=center: logit_mse(zs, b["topk_ids"], b["topk_logits"], center=c),
            lambda z, b, c=center: ref_mse(z, b["topk_ids"], b["topk_logits"], c),
        )
    for name, s in DISTILL_SETTINGS.items():
        cases[f"distill-{name}"] = (
            lambda zs, b, s=s: distillation_loss(zs, b, LossSettings(**s)),
            lambda z, b, s=s: ref_distill(z, b, s),
        )
    return cases


DISTILL_SETTINGS: dict[str, dict] = {
    "soft-tailbucket-mix-tau2-fallback": dict(
        kind="soft", tail="tail_bucket", alpha=0.6, temperature=2.0, no_teacher="hard"
    ),
    "soft-renormalize-mask": dict(
        kind="soft", tail="renormalize", alpha=1.0, temperature=1.0, no_teacher="mask"
    ),
    "soft-none-mix-tau0.5-mask": dict(
        kind="soft", tail="none", alpha=0.3, temperature=0.5, no_teacher="mask"
    ),
    "hard": dict(kind="hard", tail="tail_bucket", alpha=1.0, temperature=1.0, no_teacher="hard"),
    "mse-mix-fallback": dict(kind="mse", tail="none", alpha=0.5, temperature=1.0, no_teacher="hard"),
    "soft-actualbin-mix-tau1.5-fallback": dict(
        kind="soft", tail="actual_bin", alpha=0.8, temperature=1.5, no_teacher="hard"
    ),
    "sampled-mix-tau2-fallback": dict(
        kind="sampled", tail="tail_bucket", alpha=0.7, temperature=2.0, no_teacher="hard"
    ),
    "sampled-mask": dict(kind="sampled", tail="tail_bucket", alpha=1.0, temperature=1.0, no_teacher="mask"),
}


def shard(full: torch.Tensor, rank: int, world: int, dim: int = -1) -> torch.Tensor:
    """This rank's slice of ``full`` along ``dim`` (a view)."""
    width = full.shape[dim] // world
    return full.narrow(dim, rank * width, width)


class ToShard(torch.autograd.Function):
    """``full`` -> this rank's slice along ``dim``; the backward all-reduces the slices' gradients into the full
    one, so every rank's gradcheck sees the same function of the full input."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, rank: int, world: int, dim: int) -> torch.Tensor:
        ctx.shape, ctx.rank, ctx.world, ctx.dim = full.shape, rank, world, dim
        return shard(full, rank, world, dim).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist
        from megatron.core import parallel_state

        out = grad.new_zeros(ctx.shape)
        shard(out, ctx.rank, ctx.world, ctx.dim).copy_(grad)
        if ctx.world > 1:
            dist.all_reduce(out, group=parallel_state.get_tensor_model_parallel_group())
        return out, None, None, None


def run_case(ours: Callable, ref: Callable, z: torch.Tensor, batch: dict, rank: int, world: int) -> dict:
    """Forward values and the input gradient of ``sum(loss · g)`` (random g) against the reference."""
    leaf = shard(z, rank, world).clone().requires_grad_()
    out = ours(leaf.clone(), batch)
    value, metrics = out if isinstance(out, tuple) else (out, None)
    full = z.clone().requires_grad_()
    ref_out = ref(full, batch)
    ref_value, ref_metrics_ = ref_out if isinstance(ref_out, tuple) else (ref_out, None)
    g = torch.linspace(0.5, 1.5, value.numel(), dtype=torch.float64).view_as(ref_value)
    (value * g).sum().backward()
    (ref_value * g).sum().backward()
    errors = {
        "forward": rel_err(value, ref_value),
        "grad": rel_err(leaf.grad, shard(full.grad, rank, world)),
    }
    if metrics is not None:
        for key, expected in ref_metrics_.items():
            errors[key] = abs(float(metrics[key]) - expected) / max(abs(expected), 1e-30)
    return errors


def _gradcheck(rank: int, world: int) -> bool:
    """gradcheck of soft CE (tail bucket, τ != 1) and the α-mixed loss through the full logits.

    Each rank takes its shard of the same full input; the backward all-reduces the shard gradients into the
    full gradient, so every rank's numerical and analytical Jacobians are of the same function.
    """
    from student.losses import distillation_loss, soft_cross_entropy
    from student.settings import LossSettings

    z, batch = make_batch(seed=7, rows=4, vocab=8, k=3)
    settings = LossSettings(kind="soft", tail="tail_bucket", alpha=0.7, temperature=1.6, no_teacher="hard")
    soft_ok = torch.autograd.gradcheck(
        lambda full: soft_cross_entropy(
            ToShard.apply(full, rank, world, -1),
            batch["topk_ids"],
            batch["topk_logprobs"],
            tail="tail_bucket",
            temperature=1.6,
            inplace=False,
        ),
        (z.clone().requires_grad_(),),
    )
    mixed_ok = torch.autograd.gradcheck(
        lambda full: distillation_loss(ToShard.apply(full, rank, world, -1), batch, settings, inplace=False)[
            0
        ],
        (z.clone().requires_grad_(),),
    )
    more_ok = True
    for extra in (dict(kind="soft", tail="actual_bin"), dict(kind="sampled")):
        s = LossSettings(**(dict(alpha=0.7, temperature=1.6, no_teacher="hard") | extra))
        more_ok &= torch.autograd.gradcheck(
            lambda full, s=s: distillation_loss(
                ToShard.apply(full, rank, world, -1), batch, s, inplace=False
            )[0],
            (z.clone().requires_grad_(),),
        )
    return bool(soft_ok and mixed_ok and more_ok)


def _seed_gradient_gap(rank: int, world: int) -> dict[str, float]:
    """Our gradient vs the reference and vs the seed's ``softmax − w`` (tail none, W < 1)."""
    from student.losses import soft_cross_entropy

    z, batch = make_batch(seed=3)
    ids, logp = batch["topk_ids"], batch["topk_logprobs"]
    leaf = shard(z, rank, world).clone().requires_grad_()
    soft_cross_entropy(leaf.clone(), ids, logp, tail="none").sum().backward()
    seed = F.softmax(z, dim=-1)
    w = torch.where(ids >= 0, logp.exp(), 0.0)
    seed.scatter_add_(-1, ids.clamp(min=0), -w)
    full = z.clone().requires_grad_()
    ref_soft(full, ids, logp, "none", 1.0).sum().backward()
    return {
        "ours_vs_reference": rel_err(leaf.grad, shard(full.grad, rank, world)),
        "ours_vs_seed": rel_err(leaf.grad, shard(seed, rank, world)),
        "min_topk_mass": float(w.sum(-1)[w.sum(-1) > 0].min()),
    }


def _k1_equals_hard(rank: int, world: int) -> dict[str, float]:
    """k = 1 with weight 1 (log-prob 0) at the label: soft CE (every tail) equals megatron-core's hard CE."""
    from student.losses import hard_cross_entropy, soft_cross_entropy

    z, batch = make_batch(seed=5)
    labels = batch["labels"]
    ids, logp = labels.unsqueeze(-1), torch.zeros(labels.shape[0], 1, dtype=torch.float64)
    local = shard(z, rank, world)
    hard_leaf = local.clone().requires_grad_()
    hard = hard_cross_entropy(hard_leaf.clone(), labels)
    hard.sum().backward()
    errors = {}
    for tail in ("none", "renormalize", "tail_bucket"):
        leaf = local.clone().requires_grad_()
        soft = soft_cross_entropy(leaf.clone(), ids, logp, tail=tail)
        soft.sum().backward()
        errors[tail] = max(rel_err(soft, hard), rel_err(leaf.grad, hard_leaf.grad))
    return errors


def main() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    z, batch = make_batch(seed=0)
    results: dict[str, dict[str, float]] = {}
    for name, (ours, ref) in _cases().items():
        results[name] = run_case(ours, ref, z, batch, rank, world)
    results["seed-gradient"] = _seed_gradient_gap(rank, world)
    results["k1-equals-hard"] = _k1_equals_hard(rank, world)
    results["gradcheck"] = {"passed": float(_gradcheck(rank, world))}
    # every rank's errors; keep the worst (and the lowest gradcheck verdict) over ranks
    flat = [(case, key) for case in sorted(results) for key in sorted(results[case])]
    values = torch.tensor([results[c][k] * (-1 if k in ("passed", "ours_vs_seed") else 1) for c, k in flat])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    for (case, key), value in zip(flat, values.tolist(), strict=True):
        results[case][key] = -value if key in ("passed", "ours_vs_seed") else value
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"tp": world, "results": results}, f, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
