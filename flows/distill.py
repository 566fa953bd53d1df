"""The Prefect flows: ``distill`` (the whole DAG) and ``refresh`` (re-collect new or stale teacher data).

Both only compose ``pipeline`` stages (``pipeline.runner.execute``); the stage logic lives there. Soft and hard
students train as parallel branches (one thread each; each branch is a torchrun process group).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.collect import dask_partition_runner
from flows.tasks import PrefectExecutor, ProgressArtifacts, log_line
from pipeline import stages
from pipeline.cache import StageResult, new_run_id, write_summary
from pipeline.config import load_config
from pipeline.launch import quiet_known_warnings
from pipeline.runner import execute, preflight, publish_report, teacher_stages


def _context(config_path: str) -> stages.Context:
    config = load_config(config_path)
    preflight(config)
    quiet_known_warnings()
    runner = None
    if config.collect.workers > 1 or config.collect.dask_address:  # partitions as Prefect tasks on Dask
        runner = dask_partition_runner(config.collect)
    return stages.Context(config, log=log_line, progress=ProgressArtifacts(), partition_runner=runner)


def _publish_tables(results: dict[str, StageResult]) -> None:
    """Metric tables: training (final losses per student) and evaluation (metrics.json rows)."""
    rows = []
    for name, result in results.items():
        if name.startswith("train_"):  # train_<student>[_s<seed>][_lr<lr>] (stages.train_stage_name)
            summary = result.info.get("summary", {})
            student = result.info.get("student", name.removeprefix("train_"))
            seed, lr = result.info.get("seed"), result.info.get("lr")
            rows.append(
                {
                    "student": student,
                    "seed": seed,
                    "lr": lr,
                    **{k: v for k, v in summary.items() if _scalar(v)},
                }
            )
    if rows:
        create_table_artifact(rows, key="training-summary", description="Training: final figures per student")
    evaluated = results.get("evaluate")
    if evaluated is not None and evaluated.file("metrics.json").is_file():
        metrics = json.loads(evaluated.file("metrics.json").read_text(encoding="utf-8"))
        table = [
            {"model": model, "metric": metric, **{k: v for k, v in value.items() if _scalar(v)}}
            for model, block in metrics.items()
            if isinstance(block, dict)
            for metric, value in block.items()
            if isinstance(value, dict) and "value" in value
        ]
        if table:
            create_table_artifact(
                table, key="evaluation-metrics", description="Held-out metrics with intervals"
            )


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


@flow(name="distill", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def distill(config: str = "configs/default.toml") -> str:
    """The whole pipeline; returns the report path. Unchanged stages show as Cached."""
    ctx = _context(config)
    run_id = new_run_id(ctx.config.run.name)
    run_dir = Path(ctx.config.run.runs_dir) / run_id
    executor = PrefectExecutor(ctx.work_dir)
    extra: dict[str, Any] = {"config": config, "status": "failed", "orchestrator": "prefect"}
    try:
        report = execute(ctx, executor)
        report_path = publish_report(report, run_dir)
        extra.update(status="completed", report=str(report_path))
    finally:
        write_summary(run_dir, run_id, executor.results, extra)
    _publish_tables({r.stage: r for r in executor.results})
    markdown = report.file("report_artifact.md")
    if markdown.is_file():
        create_markdown_artifact(
            markdown.read_text(encoding="utf-8"), key="distill-report", description=run_id
        )
    get_run_logger().info(f"report: {report_path}")
    return str(report_path)


@flow(name="refresh", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def refresh(config: str = "configs/default.toml") -> dict[str, Any]:
    """Re-collect teacher data: new lines in the prompt source, and records older than teacher.max_age_days
    (a retrained local teacher has a new identity, so its data is new too). Never cached."""
    ctx = _context(config)
    run_id = new_run_id(f"{ctx.config.run.name}-refresh")
    executor = PrefectExecutor(ctx.work_dir)
    extra: dict[str, Any] = {
        "config": config,
        "status": "failed",
        "orchestrator": "prefect",
        "flow": "refresh",
    }
    try:
        corpus = executor.run(stages.prepare_corpus(ctx))
        _, teacher = teacher_stages(ctx, executor, corpus)
        collected = executor.run(stages.collect(ctx, corpus, teacher, refresh=True))
        extra["status"] = "completed"
    finally:
        write_summary(Path(ctx.config.run.runs_dir) / run_id, run_id, executor.results, extra)
    counts = {k: collected.info.get(k) for k in ("requested", "collected", "skipped", "failed")}
    create_table_artifact([counts], key="refresh-collection", description="Teacher requests of this refresh")
    return counts
