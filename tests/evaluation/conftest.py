"""Fixtures of the evaluation tests: small random checkpoints saved at TP=1 and TP=2 by a real torchrun."""

from pathlib import Path

import pytest

from tests.support import ROOT, torchrun

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
    """Seed 7 at TP=2: the same weights as ``checkpoint_tp1`` (CPU initialisation slices full matrices)."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_tp2"), 2)
