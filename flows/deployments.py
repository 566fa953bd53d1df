"""Deployments served from one long-running process (``distill serve``): ``distill/default`` (run on demand,
``prefect deployment run 'distill/default' --param config=...``) and ``refresh/nightly`` (cron-scheduled).

Needs a Prefect API (``prefect server start``; ``prefect.toml`` in the repository root points at it). Runs
start within the runner's poll interval (``PREFECT_RUNNER_POLL_FREQUENCY``); SIGTERM stops the process.
"""

from __future__ import annotations

from prefect import serve
from prefect.schedules import Cron

from flows.distill import distill, refresh


def serve_deployments(
    config: str = "configs/default.toml", cron: str = "0 3 * * *", timezone: str = "UTC"
) -> None:
    serve(
        distill.to_deployment(name="default", parameters={"config": config}, tags=["distill"]),
        refresh.to_deployment(
            name="nightly",
            parameters={"config": config},
            schedule=Cron(cron, timezone=timezone),
            tags=["distill", "refresh"],
        ),
        limit=2,
    )


if __name__ == "__main__":
    serve_deployments()
