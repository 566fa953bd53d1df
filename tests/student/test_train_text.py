"""A short CPU training run on real text lowers the validation loss for soft CE, hard CE and their mix.

Data: Python standard-library source, a byte-level BPE trained by ``student.tokenizer``, soft targets from a
fixed bigram teacher counted on the train split (``worker_model_corpus``). Each student is a real
``torchrun -m student.train`` job (the soft one at TP=2); its ``metrics.jsonl`` holds the validation loss
before the first step and after the last.
"""

from __future__ import annotations

import json

import pytest

from tests.student.worker_model_corpus import prepare, read_metrics, write_spec
from tests.support import torchrun

pytestmark = pytest.mark.timeout(900)  # module fixtures run several torchrun jobs on a shared machine

TRAIN = {
    "micro_batch_size": 8,
    "steps": 40,
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 4,
    "log_every": 10,
    "eval_every": 40,
    "eval_batches": 4,
    "checkpoint_every": 1000,
    "seed": 7,
}
STUDENTS = {
    "soft": ({"kind": "soft", "tail": "tail_bucket"}, 2),
    "hard": ({"kind": "hard"}, 1),
    "mix": ({"kind": "soft", "tail": "tail_bucket", "alpha": 0.5}, 1),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("stdlib"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STUDENTS))
def test_training_lowers_validation_loss(name, data, tmp_path):
    loss, tp = STUDENTS[name]
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "spec.json", data, out, {**TRAIN, "tensor_parallel": tp}, loss)
    proc = torchrun(tp, ["-m", "student.train", str(spec)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]

    val = [r for r in read_metrics(out) if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, TRAIN["steps"]]
    first, last = val
    print(
        f"{name}: val loss {first['loss']:.4f} -> {last['loss']:.4f}, hard CE {first['hard_ce']:.4f} -> "
        f"{last['hard_ce']:.4f}, KL {first['kl']} -> {last['kl']}"
    )
    assert last["loss"] < 0.9 * first["loss"], (first["loss"], last["loss"])
    assert last["hard_ce"] < first["hard_ce"] - 0.3
    if loss["kind"] == "soft":
        assert first["soft_tokens"] > 0.9 * first["eval_tokens"], (
            "nearly every val position has teacher targets"
        )
        assert last["kl"] < first["kl"], "the student moves toward the teacher"
        assert last["top1_agreement"] > first["top1_agreement"]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == TRAIN["steps"] and summary["tensor_parallel"] == tp
    assert summary["val_loss"] == pytest.approx(last["loss"])
    assert (out / "final" / "meta.json").is_file() and (out / "final" / "tokenizer.json").is_file()
