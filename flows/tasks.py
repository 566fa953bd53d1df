"""Pipeline stages as Prefect tasks: cache keys from the stage's input hash, logs and progress into the run.

One generic task runs any ``StageSpec``; each submission is renamed after its stage. Its Prefect cache key is
the stage's own key and the work dir, so a re-run with unchanged inputs shows as ``Cached``; when the stage's output directory
is gone (deleted by hand, or a shard it relies on disappeared) the submission refreshes the cache and runs.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture

from pipeline.cache import StageResult, StageSpec, read_complete, run_stage


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The stage key plus the work dir: Prefect's cache records are global (one results folder for every flow
    run), and a result found for another config's work dir points at outputs this run must not share."""
    spec: StageSpec = parameters["spec"]
    where = hashlib.sha256(str(Path(parameters["work_dir"]).resolve()).encode()).hexdigest()[:12]
    return f"{spec.name}-{spec.key}-{where}"


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="pickle")
def stage_task(spec: StageSpec, work_dir: str) -> StageResult:
    return run_stage(spec, Path(work_dir))


def log_line(line: str) -> None:
    """The stage log: into the current flow or task run's logs."""
    get_run_logger().info(line)


class ProgressArtifacts:
    """One Prefect progress artifact per tracked step (collection, each training), updated as it advances."""

    def __init__(self, min_step: float = 5.0) -> None:
        self.ids: dict[str, Any] = {}
        self.last: dict[str, float] = {}
        self.min_step = min_step

    def __call__(self, what: str, percent: float) -> None:
        percent = max(0.0, min(100.0, percent))
        if what not in self.ids:
            key = "progress-" + "".join(c if c.isalnum() else "-" for c in what.lower())
            self.ids[what] = create_progress_artifact(percent, key=key, description=f"{what} progress")
        elif percent - self.last.get(what, 0.0) >= self.min_step or percent >= 100.0 > self.last[what]:
            update_progress_artifact(self.ids[what], percent)
        else:
            return
        self.last[what] = percent


class PrefectExecutor:
    """Runs the DAG (``pipeline.runner.execute``) as Prefect tasks; parallel stages are submitted together."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir)
        self.results: list[StageResult] = []

    def _submit(self, spec: StageSpec) -> tuple[PrefectFuture, float]:
        complete = read_complete(spec, self.work_dir) is not None
        runner = stage_task.with_options(name=spec.name, task_run_name=spec.name, refresh_cache=not complete)
        return runner.submit(spec, str(self.work_dir)), time.perf_counter()

    def _finish(self, future: PrefectFuture, started: float) -> StageResult:
        result: StageResult = future.result()
        cached = future.state.name == "Cached" or result.status == "cached"
        result = replace(result, status="cached" if cached else "ran", seconds=time.perf_counter() - started)
        self.results.append(result)
        get_run_logger().info(
            f"stage {result.stage}: {result.status} in {result.seconds:.1f}s -> {result.path}"
        )
        return result

    def run(self, spec: StageSpec) -> StageResult:
        return self._finish(*self._submit(spec))

    def run_parallel(self, specs: list[StageSpec]) -> list[StageResult]:
        submitted = [self._submit(spec) for spec in specs]
        return [self._finish(*pair) for pair in submitted]
