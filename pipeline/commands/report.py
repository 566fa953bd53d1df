"""``distill report build RUN_DIR`` and ``distill report compare RUN_A RUN_B``."""

from __future__ import annotations

import argparse
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    from pipeline.cli import UserError
    from pipeline.report import ReportError, build_report

    try:
        paths = build_report(Path(args.run_dir))
    except ReportError as exc:
        raise UserError(str(exc)) from None
    print(paths.html)
    print(paths.markdown)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pipeline.cli import UserError
    from pipeline.report import ReportError, compare_runs

    try:
        print(compare_runs(Path(args.run_a), Path(args.run_b)), end="")
    except ReportError as exc:
        raise UserError(str(exc)) from None
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="Build a run's report, or compare two runs.")
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser(
        "build",
        help="Write RUN_DIR/report.html and report.md from its metrics.json (and config.toml, "
        "data_stats.json, training logs when present); prints their paths.",
    )
    build.add_argument("run_dir")
    build.set_defaults(handler=_build)
    compare = actions.add_parser(
        "compare", help="Markdown table of two runs' metrics.json, metric by metric."
    )
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    compare.set_defaults(handler=_compare)
