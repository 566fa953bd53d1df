"""The pipeline DAG, defined once and run by an ``Executor``: in-process here (``distill run``), or as Prefect
tasks (``flows.distill``), which supply an executor that submits each stage as a cached task.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from pipeline import stages
from pipeline.cache import StageResult, StageSpec, new_run_id, run_stage, write_summary
from pipeline.config import ConfigError, DistillConfig
from pipeline.launch import quiet_known_warnings


class StageError(RuntimeError):
    """A stage failed; the message names the stage and carries the cause (chained as ``__cause__``)."""


class Executor(Protocol):
    def run(self, spec: StageSpec) -> StageResult: ...

    def run_parallel(self, specs: list[StageSpec]) -> list[StageResult]: ...


@dataclass
class LocalExecutor:
    """Runs stages in this process, one after the other, and announces each as it finishes."""

    work_dir: Path
    announce: Callable[[StageResult], None] = lambda result: None
    results: list[StageResult] = field(default_factory=list)

    def run(self, spec: StageSpec) -> StageResult:
        try:
            result = run_stage(spec, self.work_dir)
        except Exception as exc:
            raise StageError(f"stage {spec.name} failed: {exc}") from exc
        self.results.append(result)
        self.announce(result)
        return result

    def run_parallel(self, specs: list[StageSpec]) -> list[StageResult]:
        return [self.run(spec) for spec in specs]


def _check_local_teacher(config: DistillConfig) -> None:
    model = config.local_teacher.model
    if model in ("bootstrap", *stages.BUNDLED_TEACHERS):
        if model == "bootstrap" and config.tokenizer.source == "teacher":
            raise ConfigError(
                "tokenizer.source: 'teacher' cannot be used with local_teacher.model = 'bootstrap' (the bootstrap "
                "teacher is trained on the student tokenizer); use source = 'train'"
            )
        return
    path = Path(model)
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"local_teacher.model: GGUF file {path} not found")
    elif not (path / "config.json").is_file() and not path.is_dir():
        raise ConfigError(
            f"local_teacher.model: {path} not found; expected 'smollm2', 'bootstrap', a .gguf file, a Hugging "
            "Face Llama directory (with config.json) or a student.train checkpoint directory"
        )


def preflight(config: DistillConfig) -> None:
    """Everything that can be checked before any work starts; raises ConfigError naming the key."""
    teacher = config.teacher
    if teacher.base_url != "local":
        for base_url in [teacher.base_url] if isinstance(teacher.base_url, str) else teacher.base_url:
            url = urlparse(base_url)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ConfigError(
                    f"teacher.base_url: expected 'local' or an http(s) URL such as https://api.openai.com/v1, "
                    f"got {base_url!r}"
                )
        from teacher.secrets import SecretError, resolve_api_key

        try:
            resolve_api_key(teacher, required=False)
        except SecretError as exc:
            raise ConfigError(f"teacher.api_key_secret_block: {exc}") from None
    else:
        _check_local_teacher(config)
    if config.corpus.source == "files":
        if not config.corpus.paths:
            raise ConfigError("corpus.paths: source = 'files' needs at least one input file")
        for path in config.corpus.paths:
            if not Path(path).is_file():
                raise ConfigError(f"corpus.paths: input file {path} not found")
    init = config.model.init
    if init is not None and not (Path(init).is_file() if init.endswith(".gguf") else Path(init).is_dir()):
        raise ConfigError(
            f"model.init: {init} not found; expected a Hugging Face Llama directory or a .gguf file"
        )
    if config.tokenizer.path is not None and not Path(config.tokenizer.path).is_file():
        raise ConfigError(f"tokenizer.path: {config.tokenizer.path} not found")
    if not config.students:
        raise ConfigError("students: at least one student is needed (e.g. [students.soft] kind = 'soft')")
    if stages.uses_bootstrap_teacher(config):
        heads, tp = config.bootstrap.model.num_attention_heads, config.train.tensor_parallel
        if heads % tp:
            raise ConfigError(
                f"bootstrap.model.num_attention_heads ({heads}) must be divisible by train.tensor_parallel ({tp}): "
                "the local teacher is evaluated beside the students at their TP size"
            )
    for section, model, train in (
        ("model/train", config.model, config.train),
        ("bootstrap.model/bootstrap.train", config.bootstrap.model, config.bootstrap.train),
    ):
        tp = train.tensor_parallel
        if model.num_attention_heads % tp or model.hidden_size % model.num_attention_heads:
            raise ConfigError(
                f"{section}: num_attention_heads ({model.num_attention_heads}) must divide hidden_size "
                f"({model.hidden_size}) and be divisible by tensor_parallel ({tp})"
            )


def teacher_stages(
    ctx: stages.Context, executor: Executor, corpus: StageResult
) -> tuple[StageResult, StageResult | None]:
    """(tokenizer, local teacher) results: a GGUF teacher is converted before the tokenizer (which may be the
    teacher's own), the bootstrap teacher is trained after it (on its tokens); other teachers have no stage."""
    config = ctx.config
    converted = executor.run(stages.teacher_model(ctx)) if stages.local_teacher_gguf(config) else None
    tokenizer = executor.run(stages.tokenizer(ctx, corpus, converted))
    if stages.uses_bootstrap_teacher(config):
        return tokenizer, executor.run(stages.bootstrap_teacher(ctx, corpus, tokenizer))
    return tokenizer, converted


def execute(ctx: stages.Context, executor: Executor) -> StageResult:
    """The whole DAG; returns the report stage's result."""
    config = ctx.config
    corpus = executor.run(stages.prepare_corpus(ctx))
    tokenizer, teacher = teacher_stages(ctx, executor, corpus)
    collected = executor.run(stages.collect(ctx, corpus, teacher))
    snapshot = executor.run(stages.snapshot(ctx, collected))
    init_gguf = stages.student_init_gguf(config)
    init = executor.run(stages.converted_gguf(ctx, init_gguf, "student_init")) if init_gguf else None
    students, sweep = train_students(ctx, executor, snapshot, tokenizer, init)
    evaluated = executor.run(
        stages.evaluate(ctx, students, snapshot, tokenizer, teacher, corpus, collected, init)
    )
    return executor.run(stages.report(ctx, collected, snapshot, students, evaluated, sweep))


def _final_val_loss(result: StageResult) -> float:
    """A sweep run's score: its final validation loss on its own objective; a diverged run (NaN) never wins."""
    loss = result.info["summary"].get("val_loss")
    return float(loss) if loss is not None and math.isfinite(loss) else math.inf


def train_students(
    ctx: stages.Context,
    executor: Executor,
    snapshot: StageResult,
    tokenizer: StageResult,
    init: StageResult | None,
) -> tuple[stages.Trained, stages.Sweep]:
    """Every student once per seed. With ``[sweep] lrs``, first every student at every learning rate with the
    first seed; the run with the lowest final validation loss is that student's first-seed run (not trained
    again), and its learning rate trains the other seeds."""
    config = ctx.config
    seeds = config.evaluate.seeds
    sweep: stages.Sweep = {name: [] for name in config.students} if config.sweep.lrs else {}
    best: dict[str, StageResult] = {}
    if sweep:
        if json.loads(snapshot.file("val.json").read_text(encoding="utf-8"))["samples"] == 0:
            raise StageError(
                "sweep.lrs: the learning-rate sweep needs a validation split, and it is empty "
                "(set corpus.val_fraction > 0, or give prompts with split 'val')"
            )
        grid = [(name, lr) for name in config.students for lr in config.sweep.lrs]
        results = executor.run_parallel(
            [stages.train(ctx, name, snapshot, tokenizer, seeds[0], init, lr) for name, lr in grid]
        )
        for (name, lr), result in zip(grid, results, strict=True):
            sweep[name].append((lr, result))
        for name, tried in sweep.items():
            _, result = min(tried, key=lambda pair: _final_val_loss(pair[1]))
            if not math.isfinite(_final_val_loss(result)):
                raise StageError(
                    f"sweep: every learning rate of student {name!r} diverged ({config.sweep.lrs})"
                )
            best[name] = result
    done = {(name, seeds[0]): result for name, result in best.items()}
    runs = [(name, seed) for seed in seeds for name in config.students if (name, seed) not in done]
    chosen_lr = {name: result.info["lr"] for name, result in best.items()}
    trained = executor.run_parallel(
        [stages.train(ctx, name, snapshot, tokenizer, seed, init, chosen_lr.get(name)) for name, seed in runs]
    )
    done |= {run: result for run, result in zip(runs, trained, strict=True)}
    students: stages.Trained = {
        name: [(seed, done[name, seed]) for seed in seeds] for name in config.students
    }
    return students, sweep


def publish_report(report: StageResult, run_dir: Path) -> Path:
    """Copy the report files into the run directory; returns the path printed last (the HTML report)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in report.hashes:
        target = run_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(report.file(name), target)
    return (run_dir / "report.html").resolve()


def _announce(result: StageResult) -> None:
    print(f"{result.stage:<20} {result.status:<6} {result.seconds:8.1f}s  {result.path}", flush=True)


def run_pipeline(config: DistillConfig, config_path: Path | None = None) -> Path:
    """``distill run``: preflight, every stage (reused when cached), summary.json, the report; returns its path."""
    preflight(config)
    quiet_known_warnings()
    run_id = new_run_id(config.run.name)
    run_dir = Path(config.run.runs_dir) / run_id
    ctx = stages.Context(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    executor = LocalExecutor(ctx.work_dir, announce=_announce)
    print(f"run {run_id} (work dir {os.path.abspath(ctx.work_dir)})", flush=True)
    extra = {"config": str(config_path) if config_path else None, "status": "failed"}
    try:
        report = execute(ctx, executor)
        report_path = publish_report(report, run_dir)
        extra.update(status="completed", report=str(report_path))
    finally:
        write_summary(run_dir, run_id, executor.results, extra)
    return report_path
