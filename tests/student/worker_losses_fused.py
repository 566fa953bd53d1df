"""torchrun worker: the fused output layer + loss against the unfused path and the dense float64 reference.

``torchrun --nproc-per-node=TP worker_losses_fused.py --out FILE``. Every rank holds the same hidden states
``[N, h]`` and its vocabulary shard of the same output weight ``[V_padded, h]`` (the last columns are vocabulary
padding, ``V_padded > V``). Per loss setting it writes the largest relative error, over ranks, of the loss, the
metric sums, the hidden-state gradient and the weight gradient of

- ``fused``: ``fused_distillation_loss`` (small row blocks and vocabulary tiles, so that every loop runs more
  than once and ends on a partial block), against
- ``unfused``: ``distillation_loss`` of the logits ``hidden @ W.T`` (padding columns at ``PAD_LOGIT``), and
- ``reference``: ``ref_distill`` (tests/student/worker_losses.py: full-vocabulary ``log_softmax``, loops over
  rows, plain autograd) on the full logits, through which the full weight's gradient is sliced per rank.

Plus a gradcheck through the shards, and a case where whole vocabulary tiles are negligible (skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.student.worker_losses import ToShard, make_batch, ref_distill, rel_err, shard

VOCAB = 60
PADDED = 64
HIDDEN = 8
BLOCK_ROWS = 5
TILE = 6

SETTINGS: dict[str, dict] = {
    **{
        f"{tail}-tau{tau}-alpha{alpha}": dict(
            kind="soft",
            tail=tail,
            temperature=tau,
            alpha=alpha,
            no_teacher="hard" if alpha < 1 else "mask",
        )
        for tail in ("none", "renormalize", "tail_bucket", "actual_bin")
        for tau in (1.0, 0.7, 2.5)
        for alpha in (1.0, 0.6)
    },
    "hard": dict(kind="hard"),
    "sampled-tau2-alpha0.7": dict(kind="sampled", temperature=2.0, alpha=0.7, no_teacher="hard"),
    "sampled-mask": dict(kind="sampled", no_teacher="mask"),
    "mse-alpha0.5": dict(kind="mse", alpha=0.5, no_teacher="hard"),
}


def make_head(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Hidden states [N, h], a full output weight [PADDED, h] (float64) and a batch over ``VOCAB`` ids."""
    _, batch = make_batch(seed=seed, vocab=VOCAB)
    g = torch.Generator().manual_seed(seed + 17)
    hidden = torch.randn(batch["labels"].shape[0], HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(PADDED, HIDDEN, generator=g, dtype=torch.float64)
    return hidden, weight, batch


def _ref_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    from student.model import PAD_LOGIT

    logits = hidden @ weight.t()
    return logits.masked_fill(torch.arange(PADDED) >= VOCAB, PAD_LOGIT)


def _errors(name: str, got: tuple, want: tuple, rank: int, world: int) -> dict[str, float]:
    """Relative errors of (loss, metrics, hidden grad, weight-shard grad); ``want``'s weight grad is full when
    it comes from the reference."""
    (loss, metrics, gh, gw), (ref_loss, ref_metrics, ref_gh, ref_gw) = got, want
    if ref_gw.shape[0] == PADDED and gw.shape[0] != PADDED:
        ref_gw = shard(ref_gw, rank, world, 0)
    errors = {
        f"{name}_loss": rel_err(loss, ref_loss),
        f"{name}_grad_hidden": rel_err(gh, ref_gh),
        f"{name}_grad_weight": rel_err(gw, ref_gw),
    }
    for key, expected in ref_metrics.items():
        expected = float(expected)
        errors[f"{name}_{key}"] = abs(float(metrics[key]) - expected) / max(abs(expected), 1e-30)
    return errors


def run_setting(settings: dict, rank: int, world: int) -> dict[str, float]:
    from student.losses import distillation_loss
    from student.losses.distill import METRIC_SUMS
    from student.losses.fused import OutputHead, fused_distillation_loss, head_logits
    from student.settings import LossSettings

    hidden, weight, batch = make_head()
    s = LossSettings(**settings)
    results = {}
    for name in ("fused", "unfused"):
        h = hidden.clone().requires_grad_()
        w = shard(weight, rank, world, 0).clone().requires_grad_()
        head = OutputHead(h, w, VOCAB)
        if name == "fused":
            loss, metrics = fused_distillation_loss(head, batch, s, block_rows=BLOCK_ROWS, tile_columns=TILE)
        else:
            loss, metrics = distillation_loss(head_logits(head), batch, s)
        (loss * 1.7).backward()
        results[name] = (loss, {k: metrics[k] for k in METRIC_SUMS}, h.grad, w.grad)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    ref_loss, ref_metrics = ref_distill(_ref_logits(h, w), batch, s.model_dump())
    (ref_loss * 1.7).backward()
    reference = (ref_loss, ref_metrics, h.grad, w.grad)
    return {
        **_errors("vs_unfused", results["fused"], results["unfused"], rank, world),
        **_errors("vs_reference", results["fused"], reference, rank, world),
        **_errors("unfused_vs_reference", results["unfused"], reference, rank, world),
    }


def _gradcheck(rank: int, world: int) -> float:
    """gradcheck in hidden and the full weight (sliced per rank; the slice's backward all-reduces)."""
    from student.losses.fused import OutputHead, fused_distillation_loss
    from student.settings import LossSettings

    _, batch = make_batch(seed=7, rows=4, vocab=6, k=3)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ok = True
    for settings in (
        dict(kind="soft", tail="tail_bucket", alpha=0.7, temperature=1.6, no_teacher="hard"),
        dict(kind="soft", tail="actual_bin", alpha=0.7, temperature=0.8, no_teacher="hard"),
        dict(kind="hard"),
    ):
        s = LossSettings(**settings)
        ok &= torch.autograd.gradcheck(
            lambda h, w, s=s: fused_distillation_loss(
                OutputHead(h, ToShard.apply(w, rank, world, 0), 6),
                batch,
                s,
                inplace=False,
                block_rows=3,
                tile_columns=2,
            )[0],
            (hidden, weight),
        )
    return float(ok)


def _skipped_tiles(rank: int, world: int) -> dict[str, float]:
    """Half the vocabulary far below the rest (a constant hidden feature times -90 in its weight column): its
    tiles are negligible for every row and skipped (their gradient, ~1e-40, is left 0); the result still
    equals the unfused path relative to the whole gradient."""
    from student.losses import distillation_loss
    from student.losses.fused import OutputHead, fused_distillation_loss, head_logits
    from student.settings import LossSettings

    hidden, weight, batch = make_head(seed=2)
    hidden[:, 0] = 1.0
    weight[:, 0] = 0.0
    weight[VOCAB // 2 :, 0] = -90.0
    batch["topk_ids"] = batch["topk_ids"].where(batch["topk_ids"] < VOCAB // 2, -1)
    batch["labels"] = batch["labels"] % (VOCAB // 2)
    s = LossSettings(kind="soft", tail="tail_bucket", alpha=0.8, temperature=1.0, no_teacher="hard")
    grads = []
    stats: list = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_()
        w = shard(weight, rank, world, 0).clone().requires_grad_()
        head = OutputHead(h, w, VOCAB)
        if fused:
            loss, _ = fused_distillation_loss(
                head, batch, s, block_rows=BLOCK_ROWS, tile_columns=TILE, stats=stats
            )
        else:
            loss, _ = distillation_loss(head_logits(head), batch, s)
        loss.backward()
        grads.append((loss, h.grad, w.grad))
    (lf, hf, wf), (lu, hu, wu) = grads
    # absolute differences and scales (each MAX-reduced over ranks): rank 1's weight gradient is all ~1e-40
    return {
        "skipped_fraction": stats[0].skipped / stats[0].tiles,
        "loss": rel_err(lf, lu),
        "grad_hidden": rel_err(hf, hu),
        "grad_weight_diff": float((wf - wu).abs().max()),
        "grad_weight_scale": float(wu.abs().max()),
    }


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
    results: dict[str, dict[str, float]] = {name: run_setting(s, rank, world) for name, s in SETTINGS.items()}
    results["gradcheck"] = {"passed": _gradcheck(rank, world)}
    results["skipped-tiles"] = _skipped_tiles(rank, world)
    # the worst over ranks (the lowest for gradcheck and the skipped fraction)
    lowest = ("passed", "skipped_fraction")
    flat = [(case, key) for case in sorted(results) for key in sorted(results[case])]
    values = torch.tensor([results[c][k] * (-1 if k in lowest else 1) for c, k in flat], dtype=torch.float64)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    for (case, key), value in zip(flat, values.tolist(), strict=True):
        results[case][key] = -value if key in lowest else value
    if rank == 0:
        Path(args.out).write_text(json.dumps({"tp": world, "results": results}, indent=1))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
