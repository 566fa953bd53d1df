"""``distill config show|init``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import DistillConfig, load_config, render_config


def _show(args: argparse.Namespace) -> int:
    config = load_config(args.config) if args.config else DistillConfig()
    print(render_config(config, commented=False), end="")
    return 0


def _init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_config(DistillConfig()), encoding="utf-8")
    tmp.replace(path)
    print(path)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="Show or write the config.")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="Print the effective config (defaults filled in).")
    show.add_argument("config", nargs="?", help="Config file (default: built-in defaults).")
    show.set_defaults(handler=_show)
    init = actions.add_parser("init", help="Write a commented default config file.")
    init.add_argument("path", nargs="?", default="distill.toml")
    init.add_argument("--force", action="store_true", help="Overwrite an existing file.")
    init.set_defaults(handler=_init)
