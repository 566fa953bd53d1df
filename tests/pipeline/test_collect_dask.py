"""Collection spread over Dask workers: the collect stage on a local cluster of 2 worker processes with one worker
SIGKILLed mid-run, then run again (every prompt stored exactly once, counted in the raw Parquet shards, not only
in the catalog's deduplicated view); ``distill collect --workers 2`` without Prefect; and the Prefect ``refresh``
flow running the partitions as Prefect tasks on ``prefect-dask``'s ``DaskTaskRunner``."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipeline import stages
from pipeline.cache import run_stage
from pipeline.config import load_config
from pipeline.corpus import read_items
from storage.shards import SHARD_SUFFIX, TMP_SUFFIX, read_shard_table, shard_dir
from student.settings import ModelSettings
from student.tokenizer import StudentTokenizer
from teacher.server import RunningServer, local_teacher_server
from teacher.settings import LocalTeacherSettings
from tests.flows.conftest import prefect_harness  # noqa: F401 (a fixture)
from tests.pipeline.tiny_project import TinyProject, make_tiny_project
from tests.support import PYTHON, ROOT, recorded, test_env

MODEL = "random-teacher"


@dataclass
class Served:
    """One local teacher server (a seeded random model, 40 ms per answer) for the module's projects."""

    server: RunningServer
    tokenizer: Path

    def config(self, project: TinyProject, **sections: dict[str, Any]) -> Path:
        return project.config(
            teacher={
                "base_url": self.server.base_url, "model": MODEL, "tokenizer_path": str(self.tokenizer),
                "concurrency": 1, "max_retries": 1,
            },
            storage={"shard_max_records": 2},
            corpus={"max_samples": 100},
            **sections,
        )  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("teacher")
    texts = (
        make_tiny_project(folder / "corpus", n_prompts=64).prompts.read_text(encoding="utf-8").splitlines()
    )
    tokenizer = StudentTokenizer.train(texts, vocab_size=300).save(folder / "tokenizer.json")
    model = ModelSettings(
        num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=512
    )
    settings = LocalTeacherSettings(max_batch_size=4, batch_wait_ms=1, inject_latency_ms=40)
    with local_teacher_server(
        settings, random_init=model, tokenizer=tokenizer, seed=3, model_name=MODEL
    ) as server:
        yield Served(server, tokenizer)


def _dask_workers() -> list[psutil.Process]:
    """Worker processes of a local Dask cluster of this process: spawned children (the nannies live here)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any(
                "spawn_main" in part for part in child.cmdline()
            ):  # not multiprocessing's resource tracker
                found.append(child)
        except psutil.Error:
            continue
    return found


def _raw_sample_ids(data_dir: Path) -> Counter:
    """How often each sample id occurs in the complete shard files themselves."""
    return Counter(
        sid
        for path in sorted(shard_dir(data_dir).glob(f"*{SHARD_SUFFIX}"))
        for sid in read_shard_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    )


def _assert_each_prompt_once(data_dir: Path, prompts: set[str]) -> None:
    counts = _raw_sample_ids(data_dir)
    duplicates = {sid: n for sid, n in counts.items() if n > 1}
    assert duplicates == {}, f"stored more than once in the raw shards: {duplicates}"
    assert len(counts) == len(prompts)
    # every shard was written by a partition (named after it): none by the process that owns the catalog
    assert all(p.name.startswith("p") for p in shard_dir(data_dir).glob(f"*{SHARD_SUFFIX}"))


@pytest.mark.timeout(240)
def test_killed_dask_worker_then_rerun_stores_every_prompt_exactly_once(
    served: Served, tmp_path: Path
) -> None:
    config_path = served.config(
        make_tiny_project(tmp_path, n_prompts=64), collect={"workers": 2, "partitions": 4}
    )
    ctx = stages.Context(load_config(config_path), log=lambda line: print(line, flush=True))
    corpus = run_stage(stages.prepare_corpus(ctx), ctx.work_dir)
    data_dir = tmp_path / "data"
    outcome: dict[str, object] = {}

    def first_run() -> None:
        try:
            outcome["result"] = run_stage(stages.collect(ctx, corpus, None), ctx.work_dir)
        except Exception as exc:  # a partition may fail for good: the rerun must make up for it
            outcome["error"] = exc

    thread = threading.Thread(target=first_run, daemon=True)
    thread.start()
    deadline, victim = time.monotonic() + 150, None
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        workers = _dask_workers()
        if len(workers) >= 2 and sum(_raw_sample_ids(data_dir).values()) >= 4:
            victim = workers[0]
            os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.05)
    assert victim is not None, f"no worker killed mid-run (first run ended: {outcome})"
    thread.join(timeout=180)
    assert not thread.is_alive(), "the first run did not end after its worker was killed"

    rerun = run_stage(stages.collect(ctx, corpus, None), ctx.work_dir)
    assert rerun.info["failed"] == 0
    _assert_each_prompt_once(
        data_dir, {item.prompt_text() for item in read_items(corpus.file("samples.jsonl"))}
    )
    assert not list(
        shard_dir(data_dir).glob(f"*{TMP_SUFFIX}")
    )  # the killed writer's unfinished shard is gone


@pytest.mark.timeout(200)
def test_cli_collect_with_workers(served: Served, tmp_path: Path) -> None:
    project = make_tiny_project(tmp_path, n_prompts=24)
    config = served.config(project)
    command = [PYTHON, "-m", "pipeline.cli", "collect", str(config), "--workers", "2", "--no-progress"]
    first = subprocess.run(command, cwd=ROOT, env=test_env(), capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "in 4 partition(s) on a local Dask cluster of 2 worker(s)" in first.stderr
    prompts = {line for line in project.prompts.read_text(encoding="utf-8").splitlines()}
    assert first.stdout.startswith(f"collected {len(prompts)}, already stored 0, failed 0")
    _assert_each_prompt_once(tmp_path / "data", prompts)
    bad = subprocess.run([*command[:-3], "--workers", "-1"], cwd=ROOT, env=test_env(), capture_output=True)
    assert bad.returncode == 2 and b"--workers: expected a positive number" in bad.stderr


@pytest.mark.timeout(240)
@pytest.mark.usefixtures("prefect_harness")
def test_refresh_flow_runs_partitions_as_prefect_tasks_on_dask(served: Served, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.distill import refresh

    project = make_tiny_project(tmp_path, n_prompts=24)
    config = served.config(  # the teacher's tokenizer: no tokenizer stage to train
        project, collect={"workers": 2, "partitions": 3}, tokenizer={"path": str(served.tokenizer)}
    )
    counts = refresh(config=str(config))
    prompts = {line for line in project.prompts.read_text(encoding="utf-8").splitlines()}
    assert counts["failed"] == 0 and counts["collected"] == len(prompts)
    _assert_each_prompt_once(tmp_path / "data", prompts)

    def read() -> list:
        with get_client(sync_client=True) as client:
            return client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="collect-partition-"))
            )

    runs = recorded(read, lambda runs: len(runs) >= 3 and all(r.state and r.state.is_final() for r in runs))
    assert sorted(r.name for r in runs) == [f"collect-partition-{i}" for i in range(3)]
    assert all(r.state.is_completed() for r in runs)
