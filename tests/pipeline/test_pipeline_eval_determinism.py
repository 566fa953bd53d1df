"""Two ``distill run`` of the same tiny config and seeds, in separate folders and at the same time (new teacher
answers, new shard names, interleaved timing), give identical metrics: record order comes from sample ids, not
from when the teacher answered. Two seeds per student: the report shows the spread and follows the interval
rule."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.pipeline.tiny_project import make_tiny_project
from tests.support import PYTHON, start_logged, stop_group, test_env

SEEDS = [3, 4]


def _start(root: Path) -> subprocess.Popen:
    config = make_tiny_project(root, n_prompts=30).config(evaluate={"seeds": SEEDS})
    return start_logged([PYTHON, "-m", "pipeline.cli", "run", str(config)], root / "run.log", test_env())


def _finish(root: Path, proc: subprocess.Popen) -> tuple[dict, str]:
    proc.wait(timeout=900)
    assert proc.returncode == 0, (root / "run.log").read_text()[-4000:]
    run_dir = next((root / "runs").iterdir())
    return json.loads((run_dir / "metrics.json").read_text()), (run_dir / "report.md").read_text()


def _numbers(document: dict) -> dict:
    """Everything measured (no paths, no snapshot hash: those name this run's folder and shard files)."""
    held = {k: v for k, v in document["held_out"].items() if k not in ("data", "snapshot_hash")}
    models = {
        m: {k: v for k, v in document[m].items() if k not in ("runs", "train_log")}
        for m in document["models"]
    }
    return {"held_out": held, "models": models, "differences": document["differences"]}


@pytest.mark.slow
def test_same_config_and_seeds_give_identical_metrics(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    procs = [_start(root) for root in roots]  # at the same time: the two collections' timings interleave
    try:
        (first, report), (second, _) = (_finish(root, proc) for root, proc in zip(roots, procs, strict=True))
    finally:
        for proc in procs:
            stop_group(proc)
    assert first["schema"] == "distill-eval/2" and first["seeds"] == SEEDS
    assert _numbers(first) == _numbers(second)
    soft = first["soft"]
    assert [r["seed"] for r in soft["runs"]] == SEEDS and len(soft["ce"]["seeds"]) == 2
    assert soft["ce"]["spread"] is not None and soft["full_kl_teacher_student"]["value"] > 0
    teacher = first["teacher"]
    assert teacher["full_kl_teacher_student"]["value"] == 0.0
    assert teacher["kl_teacher_student"]["value"] < 1e-4  # no context cut: down to the storage floor
    diff = first["differences"]["soft-hard"]["ce"]
    excludes = diff["ci_low"] > 0 or diff["ci_high"] < 0
    line = next(x for x in report.splitlines() if x.startswith("- hard CE, nats/token: soft − hard"))
    assert ("is better" in line) == excludes and ("no difference shown" in line) != excludes
