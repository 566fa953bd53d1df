"""Deployments served from one long-running process (``distill serve``): ``distill/default`` (run on demand,
``prefect deployment run 'distill/default' --param config=...``) and ``refresh/nightly`` (cron-scheduled).

    python -m flows.deployments --config configs/default.toml --cron "0 3 * * *" --timezone UTC

This is the program ``distill serve`` starts: the CLI in ``pipeline/`` sits below ``flows/`` and never imports
it (nor Prefect). Needs a Prefect API (``prefect server start``; ``prefect.toml`` in the repository root points
at it). Runs start within the runner's poll interval (``PREFECT_RUNNER_POLL_FREQUENCY``); SIGTERM stops the
process.
"""

from __future__ import annotations

import argparse
import sys

import httpx
from prefect import serve
from prefect.schedules import Cron

from flows.distill import distill, refresh

DEFAULT_CONFIG = "configs/default.toml"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"


def serve_deployments(
    config: str = DEFAULT_CONFIG, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Default config path of both deployments.")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="Schedule of refresh/nightly (cron).")
    parser.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="Time zone of the cron schedule.")
    args = parser.parse_args(argv)
    try:
        serve_deployments(config=args.config, cron=args.cron, timezone=args.timezone)
    except httpx.ConnectError as exc:
        from prefect.settings import PREFECT_API_URL

        print(
            f"error: no Prefect API at {PREFECT_API_URL.value()} ({exc}): start one with `prefect server start`",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
