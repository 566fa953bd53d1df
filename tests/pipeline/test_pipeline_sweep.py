"""The learning-rate sweep: every student at every ``[sweep] lrs`` with the first seed, the lowest final
validation loss kept (that run is the student's first-seed run, not trained again), the other seeds trained at
the kept rate; the report shows the sweep and whether validation loss flattened. Checked against the training
stages' own files (train_spec.json, train_summary.json), not against what the report says."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from pipeline.config import ConfigError, parse_config, render_config
from pipeline.report import tail_change
from tests.pipeline.test_pipeline_run import distill
from tests.pipeline.tiny_project import make_tiny_project

LRS = [1e-4, 2e-2]
SEEDS = [3, 4]


def _stage_dir(work: Path, name: str) -> Path:
    (folder,) = [p for p in (work / name).iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sweep_keeps_the_lowest_validation_loss_and_trains_other_seeds_at_it(tmp_path: Path) -> None:
    project = make_tiny_project(tmp_path, n_prompts=30)
    path = project.config(sweep={"lrs": LRS}, evaluate={"seeds": SEEDS})
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    del data["students"]["hard"]  # one student keeps the test short
    path.write_text(render_config(parse_config(data, str(path)), commented=False), encoding="utf-8")

    out = distill("run", str(path), timeout=540)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    work = tmp_path / "work"
    base = tomllib.loads(path.read_text(encoding="utf-8"))["train"]
    val_loss = {}
    for lr in LRS:
        folder = _stage_dir(work, f"train_soft_lr{lr:g}")
        spec = json.loads((folder / "train_spec.json").read_text())["train"]
        assert spec["lr"] == lr and spec["seed"] == SEEDS[0]
        assert math.isclose(spec["min_lr"], base.get("min_lr", 3e-4) * lr / base.get("lr", 3e-3))
        val_loss[lr] = json.loads((folder / "train_summary.json").read_text())["val_loss"]
    best = min(LRS, key=val_loss.__getitem__)
    assert val_loss[LRS[0]] != val_loss[LRS[1]]

    other = json.loads(
        (_stage_dir(work, f"train_soft_s{SEEDS[1]}_lr{best:g}") / "train_spec.json").read_text()
    )
    assert other["train"]["lr"] == best and other["train"]["seed"] == SEEDS[1]
    assert not (work / "train_soft").exists()  # the kept sweep run is the first-seed run

    run_dir = next((tmp_path / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["seed"] for r in metrics["soft"]["runs"]] == SEEDS
    training = json.loads((run_dir / "training.json").read_text())
    assert training["students"]["soft"]["lr"] == best
    assert {e["lr"]: e["val_loss"] for e in training["sweep"]["soft"]} == val_loss
    report = (run_dir / "report.md").read_text()
    assert "Learning-rate sweep (* kept)" in report and f"{val_loss[best]:.4f} *" in report
    assert "Validation loss" in report and "each student's best of the sweep" in report

    again = distill("run", str(path), timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [line for line in again.stdout.splitlines() if " ran " in line], again.stdout


def test_tail_change_measures_the_last_quarter() -> None:
    curve = [(0, 10.0), (50, 6.0), (100, 5.0), (150, 4.5), (200, 4.4)]
    assert tail_change(curve, 0.25) == {"tail_from_step": 150, "tail_change": pytest.approx(-0.1 / 4.5)}
    assert tail_change([(0, 3.0), (8, 2.0)], 0.25) == {
        "tail_from_step": 0,
        "tail_change": pytest.approx(-1 / 3),
    }
    assert tail_change([(8, 2.0)], 0.25) == {"tail_from_step": None, "tail_change": None}


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"sweep": {"lrs": [1e-3, 1e-3]}}, "sweep.lrs"),
        ({"sweep": {"lrs": [-1e-3]}}, "sweep.lrs"),
        ({"sweep": {"lr": [1e-3]}}, "unknown key 'sweep.lr'"),
        ({"students": {"soft": {"lr": 0}}}, "students.soft.lr"),
    ],
)
def test_bad_sweep_or_student_lr_names_the_key(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse_config(sections, "my.toml")
