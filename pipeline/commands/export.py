"""``distill export CHECKPOINT OUT_DIR``: the student as a Hugging Face ``LlamaForCausalLM`` directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from pipeline.cli import UserError
    from student.export import ExportError, export_checkpoint

    try:
        out = export_checkpoint(Path(args.checkpoint), Path(args.out_dir), args.tokenizer)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="Export a student checkpoint for transformers (AutoModelForCausalLM).",
        description="Writes safetensors + config.json + tokenizer files; loads at any source TP size.",
    )
    parser.add_argument("checkpoint", help="A checkpoint directory (with meta.json) saved by training.")
    parser.add_argument("out_dir", help="Output directory (replaced atomically).")
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer.json (default: the checkpoint's)."
    )
    parser.set_defaults(handler=_export)
