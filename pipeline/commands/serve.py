"""``distill serve``: the Prefect deployments ``distill/default`` and ``refresh/nightly`` in one process.

The deployments live in ``flows/``, the layer above ``pipeline/``: this command imports nothing of it (nor of
Prefect) and replaces itself with that program, ``python -m flows.deployments`` (the same process id, so
signals reach the server as before), the way the stages start ``torchrun``.
"""

from __future__ import annotations

import argparse
import os
import sys

SERVE_MODULE = "flows.deployments"


def _serve(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-m", SERVE_MODULE, "--config", args.config, "--cron", args.cron]
    argv += ["--timezone", args.timezone]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached: execv replaces this process


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
