"""The distill and refresh flows through Prefect (test harness, real stages, real torchrun, real teacher server).

One sequence on one tiny project, each step checked against the task-run states Prefect recorded:
1. first run: every stage runs;  2. same config again: every stage Cached;  3. a stage output deleted: that
stage runs again, nothing else;  4. only a [train] knob changed: train/evaluate/report run, nothing upstream;
5. `distill run` (no Prefect) on the same config: every stage reused, summary.json, last line the report;
6. the prompt source grows, refresh flow: collect asks the teacher for the new prompts only;
7. the same config with another work dir: no stage Cached (Prefect caches are keyed by the work dir too).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pipeline.tiny_project import TinyProject
from tests.support import PYTHON, ROOT, recorded, test_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STAGES = {
    "prepare_corpus",
    "tokenizer",
    "bootstrap_teacher",
    "collect",
    "snapshot",
    "train_soft",
    "train_hard",
    "evaluate",
    "report",
}
DOWNSTREAM_OF_TRAIN = {"train_soft", "train_hard", "evaluate", "report"}
REFRESH_STAGES = {"prepare_corpus", "tokenizer", "bootstrap_teacher", "collect"}


def task_states(state, expected: set[str] = STAGES) -> dict[str, str]:
    """{task run name: final state name} of the flow run that ended in ``state``, once every ``expected`` task
    run is recorded in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def read() -> dict:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        return {run.name: run.state for run in runs}

    states = recorded(read, lambda s: set(s) >= expected and all(x.is_final() for x in s.values()))
    return {name: s.name for name, s in states.items()}


def summary_of(report: str) -> dict:
    return json.loads((Path(report).parent / "summary.json").read_text())


def test_distill_flow_caching_and_refresh(prefect_harness: Path, tiny_project: TinyProject) -> None:
    from flows.distill import distill, refresh

    config = tiny_project.config()

    # 1. every stage runs
    state = distill(config=str(config), return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state)
    assert set(states) == STAGES
    assert set(states.values()) == {"Completed"}, states
    report = state.result()
    assert Path(report).is_file() and Path(report).name == "report.html"
    summary = summary_of(report)
    assert summary["status"] == "completed" and set(summary["stages"]) == STAGES
    assert {s["status"] for s in summary["stages"].values()} == {"ran"}
    assert all(Path(s["path"]).is_dir() for s in summary["stages"].values())

    # 2. same config: every stage Cached (no work, no teacher, no torchrun)
    state = distill(config=str(config), return_state=True)
    states = task_states(state)
    assert set(states.values()) == {"Cached"}, sorted(name for name, s in states.items() if s != "Cached")
    statuses = {name: s["status"] for name, s in summary_of(state.result())["stages"].items()}
    assert set(statuses.values()) == {"cached"}, statuses

    # 3. an output gone: that stage runs again, the others stay Cached
    shutil.rmtree(summary["stages"]["report"]["path"])
    state = distill(config=str(config), return_state=True)
    states = task_states(state)
    assert states.pop("report") == "Completed", states
    assert set(states.values()) == {"Cached"}, sorted(name for name, s in states.items() if s != "Cached")

    # 4. only a training knob: train/evaluate/report run, nothing upstream
    knob = tiny_project.config("tiny-lr.toml", train={"lr": 0.002})
    state = distill(config=str(knob), return_state=True)
    states = task_states(state)
    assert {n for n, s in states.items() if s == "Completed"} == DOWNSTREAM_OF_TRAIN, states
    assert {s for n, s in states.items() if n not in DOWNSTREAM_OF_TRAIN} == {"Cached"}

    # 5. the CLI without Prefect on the same config: all reused; the last line is this run's report
    out = subprocess.run(
        [PYTHON, "-m", "pipeline.cli", "run", str(knob)],
        cwd=ROOT,
        env=test_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert Path(last).is_file() and Path(last).parent.parent == tiny_project.root / "runs"
    cli_summary = summary_of(last)
    statuses = {name: s["status"] for name, s in cli_summary["stages"].items()}
    assert set(statuses.values()) == {"cached"}, statuses
    assert set(cli_summary["stages"]) == STAGES and cli_summary["report"] == last

    # 6. the prompt source grows: the refresh flow asks the teacher for exactly the new prompts
    before = json.loads((Path(summary["stages"]["collect"]["path"]) / "selection.json").read_text())
    stored_before = sum(len(ids) for ids in before["samples"].values())
    grown = tiny_project.grown([f"def added_{i}(x):\n    return x * {i} + {i}\n" for i in range(3)])
    state = refresh(config=str(grown), return_state=True)
    assert state.is_completed(), state.message
    counts = state.result()
    assert counts["requested"] == 3 and counts["collected"] == 3 and counts["failed"] == 0, counts
    # every earlier prompt is skipped: stored already (or a repeat of one that is: stdlib chunks can repeat)
    assert counts["skipped"] == len(tiny_project.prompts.read_text().splitlines())
    (refresh_summary,) = [
        summary
        for path in (tiny_project.root / "runs").glob("*/summary.json")
        if (summary := json.loads(path.read_text())).get("flow") == "refresh"
    ]
    after = json.loads((Path(refresh_summary["stages"]["collect"]["path"]) / "selection.json").read_text())
    assert sum(len(ids) for ids in after["samples"].values()) == stored_before + 3
    states = task_states(state, REFRESH_STAGES)
    assert states["collect"] == "Completed" and states["prepare_corpus"] == "Completed", states
    assert states["tokenizer"] == states["bootstrap_teacher"] == "Cached", states

    # 7. the same config with another work dir shares no cached stage: Prefect's cache records are global,
    #    but a result made for another work dir must not be reused (its outputs live elsewhere)
    elsewhere = tiny_project.root / "work-elsewhere"
    moved = tiny_project.config("tiny-elsewhere.toml", run={"work_dir": str(elsewhere)})
    state = refresh(config=str(moved), return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state, REFRESH_STAGES)
    assert "Cached" not in states.values(), states
    moved_runs = [
        summary
        for path in (tiny_project.root / "runs").glob("*/summary.json")
        if (summary := json.loads(path.read_text())).get("config") == str(moved)
    ]
    (moved_summary,) = moved_runs
    assert all(Path(s["path"]).is_relative_to(elsewhere) for s in moved_summary["stages"].values())
