"""``distill run CONFIG``: the whole pipeline without a Prefect server; the last line printed is the report path."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from pipeline.config import load_config


def _run(args: argparse.Namespace) -> int:
    from pipeline.runner import StageError, run_pipeline

    for noisy in ("httpx", "httpx2"):  # one INFO line per teacher request
        logging.getLogger(noisy).setLevel(logging.WARNING)

    config_path = Path(args.config)
    try:
        report = run_pipeline(load_config(config_path), config_path)
    except StageError as exc:
        if args.verbose:
            traceback.print_exception(exc.__cause__)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report, flush=True)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run",
        help="Run the pipeline (stages whose inputs did not change are reused); prints the report path.",
    )
    parser.add_argument("config", help="Config file (TOML), e.g. configs/default.toml.")
    parser.set_defaults(handler=_run)
