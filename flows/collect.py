"""Collection partitions as Prefect tasks on Dask (``prefect-dask``'s ``DaskTaskRunner``).

The collect stage (``pipeline.collect_workers``) hands its partitions to ``dask_partition_runner``: each becomes
a ``collect-partition`` task run on a Dask worker (a local cluster of ``[collect] workers`` processes, or the
scheduler at ``[collect] dask_address``, whose workers need this project installed and ``PREFECT_API_URL``), and
the stage registers each partition's shards in the catalog as its task finishes. Partitions are never cached by
Prefect (the catalog knows what is stored) and their parameters are never stored by Prefect (task runs record
references to upstream results only), so the API key a job carries stays in memory.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from pipeline.collect_workers import PartitionJob, PartitionOutcome, PartitionRunner, gather, run_partition
from pipeline.config import CollectSettings


@task(name="collect-partition", cache_policy=NO_CACHE, persist_result=False)
def partition_task(job: PartitionJob) -> PartitionOutcome:
    return run_partition(job)


def dask_partition_runner(options: CollectSettings) -> PartitionRunner:
    """A runner submitting each partition as a Prefect task to a ``DaskTaskRunner``."""

    def run(jobs: list[PartitionJob], on_done: Callable[[PartitionOutcome], None]) -> None:
        from prefect_dask import DaskTaskRunner

        if options.dask_address:
            runner = DaskTaskRunner(address=options.dask_address)
        else:
            runner = DaskTaskRunner(
                cluster_kwargs={
                    "n_workers": options.workers, "threads_per_worker": 1, "processes": True,
                    "dashboard_address": ":0", "host": "127.0.0.1",
                }
            )  # fmt: skip
        with runner:
            futures = [
                runner.submit(
                    partition_task.with_options(task_run_name=f"collect-partition-{job.index}"), {"job": job}
                )
                for job in jobs
            ]
            gather(as_completed(futures), on_done)

    return run
