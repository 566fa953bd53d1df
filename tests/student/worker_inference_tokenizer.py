"""The small tokenizer the inference and server tests share (no megatron import: cheap in the test process)."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from student.tokenizer import StudentTokenizer


def train_tokenizer(path: Path) -> Path:
    """A byte-level BPE of 400 tokens trained on ASCII-only source, so non-ASCII characters split into bytes."""
    texts = [Path(inspect.getfile(m)).read_text(encoding="utf-8") for m in (argparse, json)]
    ascii_only = [t.encode("ascii", errors="ignore").decode() for t in texts]
    return StudentTokenizer.train(ascii_only, vocab_size=400).save(path)
