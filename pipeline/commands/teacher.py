"""``distill teacher check URL``: probe a teacher endpoint before a big collection."""

from __future__ import annotations

import argparse
import os

from pipeline.errors import UserError


def _check(args: argparse.Namespace) -> int:
    from teacher.check import TeacherUnreachable, check_endpoint

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is empty or unset")
    try:
        report = check_endpoint(args.url, args.model, api_key, timeout_s=args.timeout)
    except TeacherUnreachable as exc:
        raise UserError(str(exc)) from None
    print(report.render())
    return 0 if report.usable else 1


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("teacher", help="Teacher endpoint tools.")
    actions = parser.add_subparsers(dest="action", required=True)
    check = actions.add_parser(
        "check",
        help="Probe an OpenAI-compatible endpoint: modes, max top-k, ids/bytes, whether scores line up.",
    )
    check.add_argument("url", help="Base URL, e.g. http://127.0.0.1:8000/v1")
    check.add_argument("--model", help="Model name (default: the first one /models lists).")
    check.add_argument("--api-key-env", help="Environment variable holding the API key (none by default).")
    check.add_argument("--timeout", type=float, default=60.0, help="Per-request timeout in seconds.")
    check.set_defaults(handler=_check)
