"""``distill serve``: the Prefect deployments ``distill/default`` and ``refresh/nightly`` in one process."""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    serve_deployments(config=args.config, cron=args.cron, timezone=args.timezone)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="Serve the Prefect deployments distill/default and refresh/nightly (needs a Prefect API, "
        "e.g. `prefect server start`); runs until interrupted.",
    )
    parser.add_argument(
        "--config", default="configs/default.toml", help="Default config path of both deployments."
    )
    parser.add_argument(
        "--cron", default="0 3 * * *", help="Schedule of refresh/nightly (cron, default 03:00)."
    )
    parser.add_argument("--timezone", default="UTC", help="Time zone of the cron schedule.")
    parser.set_defaults(handler=_serve)
