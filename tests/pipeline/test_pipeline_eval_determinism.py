"""Two ``distill run`` of the same tiny config and seeds, in separate folders (new teacher answers, new shard
names, new timing), give identical metrics: record order comes from sample ids, not from when the teacher
answered. Two seeds per student: the report shows the spread and follows the interval rule."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.pipeline.tiny_project import make_tiny_project
from tests.support import PYTHON, ROOT, test_env

SEEDS = [3, 4]


def _run(root: Path) -> tuple[dict, str]:
    config = make_tiny_project(root, n_prompts=30).config(evaluate={"seeds": SEEDS})
    result = subprocess.run(
        [PYTHON, "-m", "pipeline.cli", "run", str(config)],
        cwd=ROOT,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
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
    first, report = _run(tmp_path / "a")
    second, _ = _run(tmp_path / "b")
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
