"""Collection spread over workers: the pending prompts split into partitions, each asked by one worker process (a
Dask worker) that writes its own shards; the calling process, the catalog's only writer, registers them as the
partitions finish.

Exactly once, even when a worker is killed: a partition's shards are named after it (``p<key>-<uuid>.parquet``,
the key a hash of its sample ids), and a partition that starts again (Dask reruns a task whose worker died; a
rerun of the stage makes new partitions of what the catalog still lacks) first reads the sample ids of the shards
named after it and asks only for the rest. A killed worker loses at most the records it had not yet written.

``run_partitions`` runs on a Dask cluster (a local one of ``workers`` processes, or the scheduler at
``dask_address``); ``flows`` passes its own runner that makes each partition a Prefect task on Dask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.settings import StorageSettings
from teacher.collect import CollectResult, pending_items
from teacher.inputs import WorkItem
from teacher.settings import TeacherSettings

if TYPE_CHECKING:
    from pipeline.config import CollectSettings
    from storage.catalog import Catalog


class PartitionError(RuntimeError):
    """One or more partitions failed for good (their completed shards are kept; a rerun asks for the rest)."""


class HiddenKey:
    """An API key handed to workers in memory; never shown by ``repr`` (logs, task parameters, tracebacks)."""

    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "HiddenKey(***)"


@dataclass(frozen=True)
class PartitionJob:
    """Everything one worker needs to ask for one partition and write its shards."""

    index: int
    key: str
    items: tuple[WorkItem, ...]
    teacher: TeacherSettings
    storage: StorageSettings
    base_url: str | list[str]
    api_key: HiddenKey = field(repr=False)

    @property
    def prefix(self) -> str:
        return f"p{self.key}-"


@dataclass
class PartitionOutcome:
    index: int
    result: CollectResult
    shards: list[str]
    resumed: int  # records this attempt found already written by an earlier attempt of the same partition


PartitionRunner = Callable[[list[PartitionJob], Callable[[PartitionOutcome], None]], None]


def make_partitions(pending: list[tuple[str, WorkItem]], parts: int, **common) -> list[PartitionJob]:
    """``parts`` partitions of about equal size (round robin over the pending ``(sample id, item)`` pairs)."""
    parts = max(1, min(parts, len(pending)))
    jobs = []
    for index in range(parts):
        chunk = pending[index::parts]
        key = hashlib.sha256("\n".join(sorted(sid for sid, _ in chunk)).encode()).hexdigest()[:16]
        jobs.append(PartitionJob(index, key, tuple(item for _, item in chunk), **common))
    return jobs


def _written_ids(job: PartitionJob) -> set[str]:
    """Sample ids in the shards an earlier attempt of this partition completed."""
    from storage.filesystem import file_sizes
    from storage.shards import SHARD_SUFFIX, read_shard_table, shard_dir

    directory = shard_dir(job.storage.location())
    names = [n for n in file_sizes(directory, SHARD_SUFFIX) if n.startswith(job.prefix)]
    ids: set[str] = set()
    for name in names:
        ids.update(read_shard_table(directory / name, columns=["sample_id"]).column("sample_id").to_pylist())
    return ids


def run_partition(job: PartitionJob) -> PartitionOutcome:
    """Ask the teacher for one partition's items not yet in its own shards; runs in a worker process."""
    from storage.shards import ShardWriter
    from teacher.collect import collect

    resolve = None
    if job.teacher.tokenizer_path is not None:
        from student.tokenizer import StudentTokenizer

        resolve = StudentTokenizer.load(job.teacher.tokenizer_path).token_bytes
    written = _written_ids(job)
    writer = ShardWriter(job.storage.location(), job.storage, name_prefix=job.prefix)
    result = collect(
        job.items,
        job.teacher,
        job.base_url,
        job.api_key.value,
        written,
        writer,
        progress=False,
        resolve=resolve,
    )
    writer.close()
    return PartitionOutcome(job.index, result, [info.name for info in writer.written], len(written))


def merge(outcomes: list[PartitionOutcome]) -> CollectResult:
    """One ``CollectResult`` of all partitions (a partition's resumed records count as collected)."""
    total = CollectResult()
    for outcome in outcomes:
        r = outcome.result
        total.requested += r.requested
        total.collected += r.collected + outcome.resumed
        total.failures += r.failures
        total.prompt_tokens += r.prompt_tokens
        total.completion_tokens += r.completion_tokens
        total.seconds = max(total.seconds, r.seconds)
        total.fragments.add(r.fragments)
        for url, stats in r.endpoints.items():  # per-endpoint counts summed over the partitions
            if url not in total.endpoints:
                total.endpoints[url] = dataclasses.replace(stats)
            else:
                for name, value in dataclasses.asdict(stats).items():
                    setattr(total.endpoints[url], name, getattr(total.endpoints[url], name) + value)
    return total


def dask_runner(workers: int, address: str = "") -> PartitionRunner:
    """Run partitions on Dask: the scheduler at ``address``, else a local cluster of ``workers`` processes
    (one thread each) that lives as long as the call."""

    def run(jobs: list[PartitionJob], on_done: Callable[[PartitionOutcome], None]) -> None:
        from distributed import Client, LocalCluster, as_completed

        with contextlib.ExitStack() as stack:
            if address:
                client = stack.enter_context(Client(address))
            else:
                cluster = LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                    host="127.0.0.1",
                )  # fmt: skip
                stack.enter_context(cluster)
                client = stack.enter_context(Client(cluster))
            futures = client.map(run_partition, jobs, pure=False)
            gather(as_completed(futures), on_done)

    return run


def gather(finished, on_done: Callable[[PartitionOutcome], None]) -> None:
    """Hand each finished partition to ``on_done``; failed ones are collected and raised together at the end,
    after every other partition was registered."""
    errors = []
    for future in finished:
        try:
            outcome = future.result()
        except Exception as exc:  # a partition's failure must not lose the others' shards
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        on_done(outcome)
    if errors:
        raise PartitionError(
            f"{len(errors)} collection partition(s) failed (their completed shards are kept; run again to ask "
            "for the rest): " + "; ".join(errors[:3])
        )


def collect_partitioned(
    items: list[WorkItem],
    settings: TeacherSettings,
    base_url: str | list[str],
    api_key: str | None,
    stored: set[str],
    catalog: Catalog,
    storage: StorageSettings,
    options: CollectSettings,
    runner: PartitionRunner | None = None,
    log: Callable[[str], Any] = print,
    progress: Callable[[int, int], None] | None = None,
) -> CollectResult:
    """Ask for the items not in ``stored`` in partitions run by ``runner`` (default ``dask_runner``); this
    process registers each partition's shards in ``catalog`` as it finishes, and those of failed partitions
    before raising ``PartitionError``, so a rerun asks only for what is missing."""
    seen = CollectResult()
    pending = list(pending_items(items, settings, stored, seen))
    jobs = make_partitions(
        pending, options.partitions or 2 * options.workers, teacher=settings, storage=storage,
        base_url=base_url, api_key=HiddenKey(api_key),
    )  # fmt: skip
    where = options.dask_address or f"a local Dask cluster of {options.workers} worker(s)"
    log(f"collect: {len(pending)} samples in {len(jobs)} partition(s) on {where}")
    outcomes: list[PartitionOutcome] = []

    def on_done(outcome: PartitionOutcome) -> None:
        outcomes.append(outcome)
        catalog.sync()
        log(
            f"collect: partition {outcome.index} done: {outcome.result.collected} collected, "
            f"{outcome.resumed} written by an earlier attempt, {len(outcome.result.failures)} failed"
        )
        if progress is not None:
            progress(len(outcomes), len(jobs))

    try:
        if jobs and pending:
            (runner or dask_runner(options.workers, options.dask_address))(jobs, on_done)
    finally:
        catalog.sync()  # the shards of failed partitions too
    result = merge(outcomes)
    result.skipped = seen.skipped
    return result
