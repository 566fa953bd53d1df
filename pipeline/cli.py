"""The ``distill`` command line. Each sub-command group lives in ``pipeline/commands/<name>.py`` and exposes
``register(subparsers)``; handlers return an exit code. Errors a user can act on are printed without a traceback.

The heavy imports (the config model, the command modules) happen inside ``main``, so that Ctrl-C during
start-up also prints "interrupted" and exits 130."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from pipeline.errors import UserError

__all__ = ["UserError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from pipeline import commands

    parser = argparse.ArgumentParser(
        prog="distill", description="Top-k soft distillation of language models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"pipeline.commands.{info.name}").register(sub)
    return parser


def _run(argv: list[str] | None) -> int:
    from pipeline.config import ConfigError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, UserError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
