"""Fixtures of the evaluation tests: small random checkpoints saved at TP=1 and TP=2 by a real torchrun, and
headless chromium for the HTML report."""

from pathlib import Path

import pytest

from tests.evaluation.evalsupport import write_eval_spec
from tests.support import ROOT, run_bounded, torchrun

WORKER = ROOT / "tests" / "evaluation" / "make_checkpoint.py"


def make_checkpoint(out: Path, tp: int, *extra: str) -> Path:
    """torchrun the worker: OUT/checkpoint (at TP=tp), OUT/tokenizer.json, OUT/reference.npz (our logits), and
    what ``extra`` flags ask for (see the worker's docstring)."""
    result = torchrun(tp, [str(WORKER), str(out), *extra], timeout=240)
    assert result.returncode == 0, result.stdout[-4000:]
    return out


@pytest.fixture(scope="session")
def checkpoint_tp1(tmp_path_factory) -> Path:
    """Seed 7 at TP=1, plus ``other/`` (seed 8) and ``heldout.npz`` whose teacher top-k is the seed-7 model's."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_tp1"), 1, "--other-seed", "8", "--heldout", "12")


@pytest.fixture(scope="session")
def checkpoint_tp2(tmp_path_factory) -> Path:
    """Seed 7 at TP=2: another model than ``checkpoint_tp1`` (its vocabulary is padded to 512, not 384, so the
    seeded initialisation draws differently)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_tp2"), 2)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed by scripts/install-chromium.sh when it is missing (idempotent)."""
    result = run_bounded(["bash", str(ROOT / "scripts" / "install-chromium.sh")], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def evaluated_run(checkpoint_tp1, checkpoint_tp2, tmp_path_factory) -> Path:
    """A TP=2 evaluation of: the teacher (the TP=1 checkpoint whose top-k the held-out data carries), 'soft'
    (a TP=2 checkpoint of another model) and 'hard' (seed 8, TP=1)."""
    tmp = tmp_path_factory.mktemp("evaluated")
    models = {
        "soft": {"checkpoint": str(checkpoint_tp2 / "checkpoint")},
        "hard": {"checkpoint": str(checkpoint_tp1 / "other")},
        "teacher": {"checkpoint": str(checkpoint_tp1 / "checkpoint"), "role": "teacher"},
    }
    result = torchrun(
        2, ["-m", "student.evaluate", str(write_eval_spec(tmp, checkpoint_tp1, models))], timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return tmp / "run"
