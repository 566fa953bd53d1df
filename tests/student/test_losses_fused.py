"""The fused output layer + loss (``student.losses.fused``) equals the unfused path, in float64, at TP=1 and TP=2.

The worker (tests/student/worker_losses_fused.py) runs every loss setting (each tail x τ x α, the hard CE, the
sampled kind, and mse, which takes the unfused path) fused, unfused (``distillation_loss`` of the logits) and
through the dense float64 reference, and reports the worst relative error of the loss, every metric sum and both
gradients (hidden states, weight shard). The in-process tests cover leading dims, padding rows, zero rows,
no-grad evaluation and the single-use backward.
"""

from __future__ import annotations

import pytest
import torch

from student.losses import distillation_loss
from student.losses.fused import OutputHead, fused_distillation_loss, head_logits
from student.settings import LossSettings
from tests.student.worker_losses_fused import PADDED, SETTINGS, VOCAB, make_head
from tests.support import torchrun, torchrun_worker

WORKER = "tests/student/worker_losses_fused.py"
TOL = 1e-6


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def worker_results(request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(f"fused_tp{request.param}") / "results.json"
    return torchrun_worker(WORKER, request.param, out, timeout=240)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fused_equals_unfused_and_the_reference(worker_results, setting):
    errors = worker_results[setting]
    for against in ("vs_unfused", "vs_reference"):
        for what in (
            "loss",
            "grad_hidden",
            "grad_weight",
            "tokens",
            "hard_ce_sum",
            "kl_sum",
            "top1_agree_sum",
        ):
            assert f"{against}_{what}" in errors
    assert all(value <= TOL for value in errors.values()), errors


def test_gradcheck_in_hidden_and_weight_through_the_shards(worker_results):
    assert worker_results["gradcheck"]["passed"] == 1.0


def test_negligible_vocabulary_tiles_are_skipped_exactly(worker_results):
    result = worker_results["skipped-tiles"]
    assert result["skipped_fraction"] > 0.1, result
    grad_weight = result["grad_weight_diff"] / result["grad_weight_scale"]
    assert max(result["loss"], result["grad_hidden"], grad_weight) <= TOL, result


# ---------------------------------------------------------------- single process (TP=1, no torch.distributed) ---
SOFT = LossSettings(kind="soft", tail="tail_bucket", alpha=0.7, temperature=1.5, no_teacher="hard")


def _grads(fused: bool, hidden, weight, batch, settings=SOFT, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    head = OutputHead(h, w, VOCAB)
    if fused:
        loss, metrics = fused_distillation_loss(head, batch, settings, **kwargs)
    else:
        loss, metrics = distillation_loss(head_logits(head), batch, settings)
    loss.backward()
    return loss, metrics, h.grad, w.grad


def test_leading_dims_and_padding_rows_as_unfused():
    hidden, weight, batch = make_head(seed=4)
    rows = hidden.shape[0] // 2 * 2
    shaped = {k: v[:rows].reshape(2, rows // 2, *v.shape[1:]) for k, v in batch.items()}
    shaped["loss_mask"][:, -2:] = 0.0  # padding rows: no loss, no gradient
    h3 = hidden[:rows].reshape(2, rows // 2, -1)
    fused = _grads(True, h3, weight, shaped, block_rows=3, tile_columns=16)
    unfused = _grads(False, h3, weight, shaped)
    assert torch.allclose(fused[0], unfused[0], rtol=1e-12, atol=0)
    assert torch.allclose(fused[2], unfused[2], rtol=1e-10, atol=1e-14)
    assert torch.allclose(fused[3], unfused[3], rtol=1e-10, atol=1e-14)
    assert fused[2][:, -2:].abs().max() == 0, "padding rows get no hidden-state gradient"
    assert fused[3][VOCAB:].abs().max() == 0, "vocabulary padding columns get no weight gradient"
    for key, value in unfused[1].items():
        assert float(fused[1][key]) == pytest.approx(float(value), rel=1e-12, abs=1e-12), key


def test_float32_matches_unfused_to_float32_precision():
    hidden, weight, batch = make_head(seed=5)
    fused = _grads(True, hidden.float(), weight.float(), batch, block_rows=4, tile_columns=7)
    unfused = _grads(False, hidden.float(), weight.float(), batch)
    for got, want in zip(fused[::2] + fused[3:], unfused[::2] + unfused[3:], strict=True):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_zero_rows_and_no_grad():
    hidden, weight, batch = make_head(seed=6)
    empty = {k: v[:0] for k, v in batch.items()}
    loss, metrics = fused_distillation_loss(OutputHead(hidden[:0], weight, VOCAB), empty, SOFT)
    assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0
    with torch.no_grad():
        loss, _ = fused_distillation_loss(OutputHead(hidden, weight, VOCAB), batch, SOFT)
    want, _ = distillation_loss(head_logits(OutputHead(hidden, weight, VOCAB)), batch, SOFT)
    assert float(loss) == pytest.approx(float(want), rel=1e-12)


def test_the_backward_runs_once_in_place_and_again_when_not():
    hidden, weight, batch = make_head(seed=8)
    assert weight.shape[0] == PADDED
    h = hidden.clone().requires_grad_()
    loss, _ = fused_distillation_loss(OutputHead(h, weight, VOCAB), batch, SOFT, inplace=False)
    (first,) = torch.autograd.grad(loss, h, retain_graph=True)
    (second,) = torch.autograd.grad(2 * loss, h)
    assert torch.allclose(second, 2 * first, rtol=1e-14, atol=0)


# ---------------------------------------------------------------- training: fused vs unfused loss curve --------
CURVE_STEPS = 8
CURVE_TRAIN = {
    "tensor_parallel": 2,
    "micro_batch_size": 4,
    "steps": CURVE_STEPS,
    "lr": 3e-3,
    "warmup_steps": 2,
    "log_every": 1,
    "eval_every": 4,
    "eval_batches": 2,
    "checkpoint_every": 1000,
    "seed": 5,
}
# a padded vocabulary (multiple 384 x TP 2: rank 1 holds padding columns) and tied embeddings, mixed loss at τ 2
CURVE_MODEL = {"vocab_multiple": 384, "tie_embeddings": True}
CURVE_LOSS = {"kind": "soft", "tail": "tail_bucket", "alpha": 0.7, "temperature": 2.0}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_loss_curve_fused_equals_unfused(tmp_path):
    """The same TP=2 training run with ``fused_output_loss`` on and off: train and validation curves (loss, KL,
    hard CE, agreement, grad norm) agree to float32 noise; the output layer's matmuls are blocked differently."""
    from tests.student.worker_model_corpus import prepare, read_metrics, write_spec

    data = prepare(tmp_path / "data", files=6)
    curves = {}
    for fused in (True, False):
        out = tmp_path / f"out-{fused}"
        train = {**CURVE_TRAIN, "fused_output_loss": fused}
        spec = write_spec(tmp_path / f"spec-{fused}.json", data, out, train, CURVE_LOSS, CURVE_MODEL)
        proc = torchrun(2, ["-m", "student.train", str(spec)], timeout=280)
        assert proc.returncode == 0, proc.stdout[-4000:]
        curves[fused] = read_metrics(out)
    fused, unfused = curves[True], curves[False]
    assert [(r["step"], r["split"]) for r in fused] == [(r["step"], r["split"]) for r in unfused]
    assert len([r for r in fused if r["split"] == "train"]) == CURVE_STEPS
    worst = 0.0
    for a, b in zip(fused, unfused, strict=True):
        for key in ("loss", "kl", "hard_ce", "top1_agreement", "grad_norm"):
            if key in a and a[key] is not None:
                worst = max(worst, abs(a[key] - b[key]) / max(abs(b[key]), 1e-6))
    print(f"fused vs unfused training curves: worst relative difference {worst:.2e}")
    assert worst < 1e-4
    assert fused[-1]["loss"] < fused[0]["loss"], "and the run trains"
