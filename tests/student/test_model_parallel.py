"""Tensor and data parallelism change nothing but speed: TP=2 and DP=2 equal TP=1, and checkpoints cross TP sizes.

Three real torchrun jobs (gloo, fresh processes) run ``worker_model_equivalence.py`` on the same global batch:
4 packed rows, grouped-query attention (4 heads, 2 key/value groups), soft targets (W < 1, varying k, positions
without teacher) and the soft+hard mix loss. The jobs: TP=2 (which also saves a checkpoint after its step),
TP=1 (which also loads the TP=2 checkpoint), and TP=1 x DP=2 with 2 accumulated micro-batches of 1 row per rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support import torchrun

pytestmark = pytest.mark.timeout(900)  # module fixtures run several torchrun jobs on a shared machine

WORKER = str(Path(__file__).with_name("worker_model_equivalence.py"))


def _run(out: Path, tp: int, dp: int, micro: int, accum: int = 1, *extra: str) -> dict:
    args = [WORKER, "--out", str(out), "--tp", str(tp), "--dp", str(dp), "--micro", str(micro)]
    proc = torchrun(tp * dp, [*args, "--accum", str(accum), *extra], timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("equivalence")
    ckpt = tmp / "ckpt_tp2"
    tp2 = _run(tmp / "tp2.pt", 2, 1, 4, 1, "--save", str(ckpt))
    tp1 = _run(tmp / "tp1.pt", 1, 1, 4, 1, "--load", str(ckpt))
    dp2 = _run(tmp / "dp2.pt", 1, 2, 1, 2)
    return {"tp1": tp1, "tp2": tp2, "dp2": dp2}


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err:.3g} > {atol}"


def test_tp2_logits_equal_tp1(runs):
    assert runs["tp1"]["logits_before"].shape == (4, 32, 512)
    _close(runs["tp2"]["logits_before"], runs["tp1"]["logits_before"], 1e-5)


def test_packed_documents_do_not_see_each_other(runs):
    """The block-diagonal mask from ``doc_ids``: a document's logits are the same packed after another one."""
    for name in ("tp1", "tp2"):
        assert runs[name]["packing_error"] < 1e-5, name


def test_tp2_loss_and_metrics_equal_tp1(runs):
    a, b = runs["tp2"]["step"], runs["tp1"]["step"]
    assert a["step_tokens"] == b["step_tokens"] > 0
    assert 0 < a["soft_tokens"] < a["step_tokens"], (
        "the batch mixes soft positions and hard fallback positions"
    )
    for key in ("loss", "hard_ce", "kl", "teacher_entropy", "top1_agreement", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_tp2_optimizer_step_equals_tp1(runs):
    before = runs["tp1"]["logits_before"]
    after = runs["tp1"]["logits_after"]
    assert (after - before).abs().max() > 1e-3, "the step must move the model for the comparison to mean much"
    assert runs["tp1"]["step"]["grad_norm"] > 0.5, "grad_norm above grad_clip: clipping is exercised"
    _close(runs["tp2"]["logits_after"], after, 2e-5)


def test_dp2_with_accumulation_equals_tp1(runs):
    a, b = runs["dp2"]["step"], runs["tp1"]["step"]
    assert a["step_tokens"] == b["step_tokens"]
    for key in ("loss", "hard_ce", "kl", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    _close(runs["dp2"]["logits_before"], runs["tp1"]["logits_before"], 1e-5)
    _close(runs["dp2"]["logits_after"], runs["tp1"]["logits_after"], 2e-5)


def test_checkpoint_written_at_tp2_loads_at_tp1(runs):
    meta = runs["tp1"]["loaded_meta"]
    assert (meta["tp"], meta["vocab_size"], meta["padded_vocab_size"]) == (2, 500, 512)
    _close(runs["tp1"]["logits_loaded"], runs["tp2"]["logits_after"], 1e-5)
