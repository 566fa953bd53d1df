"""The embedded default corpus: the Python standard library's own source, every Python install has it.

Deterministic for a given Python: the file list is the sorted list of stdlib ``.py`` files (tests and
site-packages excluded), thinned to ``max_files`` evenly spaced entries; each file is cut into chunks of about
``chunk_chars`` characters at line boundaries (``teacher.inputs.chunk_text``); the split is assigned per *file* (a hash of the seed and the
relative path), so no file has chunks on both sides of the train/test line.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Literal

from pipeline.config import ConfigError, CorpusSettings
from storage.records import SPLITS
from teacher.inputs import WorkItem, chunk_text, read_inputs

EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(max_files: int, root: Path | None = None) -> list[Path]:
    """Sorted stdlib source files, thinned to ``max_files`` evenly spaced ones (deterministic)."""
    root = root or stdlib_root()
    files = sorted(
        (p for p in root.rglob("*.py") if not EXCLUDED_PARTS & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if len(files) <= max_files:
        return files
    return [files[i * len(files) // max_files] for i in range(max_files)]


def assign_split(name: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A stable split for a document: uniform hash of (seed, name) against the fractions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _take(items: list[WorkItem], max_samples: int, seed: int) -> list[WorkItem]:
    """At most ``max_samples`` items, chosen by a seeded hash of their text (stable when the source grows)."""
    if len(items) <= max_samples:
        return items

    def rank(item: WorkItem) -> bytes:
        return hashlib.sha256(f"{seed}:{item.prompt_text()}".encode()).digest()

    keep = {id(item) for item in sorted(items, key=rank)[:max_samples]}
    return [item for item in items if id(item) in keep]


def stdlib_items(settings: CorpusSettings, seed: int) -> list[WorkItem]:
    """Chunks of the standard library's source, split per file."""
    root = stdlib_root()
    items = []
    for path in stdlib_files(settings.max_files, root):
        name = path.relative_to(root).as_posix()
        split = assign_split(name, seed, settings.val_fraction, settings.test_fraction)
        text = path.read_text(encoding="utf-8", errors="replace")
        items += [
            WorkItem(prompt=chunk, split=split, source_id=f"stdlib/{name}#{i}")
            for i, chunk in enumerate(chunk_text(text, settings.chunk_chars))
        ]
    return _take(items, settings.max_samples, seed)


def file_items(settings: CorpusSettings, seed: int, on_bad_line: Literal["fail", "skip"]) -> list[WorkItem]:
    """Work items from the user's files (JSONL, Parquet, plain text: see ``teacher.inputs``).

    Splits given in the files are kept. If the files name no val/test split at all, the split is assigned per
    item by a seeded hash of its text, with the configured fractions, so there is always held-out data.
    """
    for path in settings.paths:
        if not path.is_file():
            raise ConfigError(f"corpus.paths: input file {path} not found")
    items = list(read_inputs(list(settings.paths), settings.chunk_chars, on_bad_line))
    if all(item.split == "train" for item in items):
        items = [
            replace(
                item,
                split=assign_split(item.prompt_text(), seed, settings.val_fraction, settings.test_fraction),
            )
            for item in items
        ]
    return _take(items, settings.max_samples, seed)


def source_fingerprint(settings: CorpusSettings) -> dict[str, str]:
    """What the corpus is read from, for the cache key: the Python version for stdlib, file contents otherwise."""
    if settings.source == "stdlib":
        return {"stdlib": f"{sys.version}|{stdlib_root()}"}
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "missing"
        for p in settings.paths
    }


def write_items(items: Iterable[WorkItem], path: Path) -> int:
    """One JSON object per line (the fields of ``WorkItem``), in order."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(asdict(item), ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_items(path: Path, splits: Iterable[str] | None = None) -> list[WorkItem]:
    wanted = set(splits) if splits is not None else None
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("messages") is not None:
                row["messages"] = tuple(row["messages"])
            item = WorkItem(**row)
            if wanted is None or item.split in wanted:
                out.append(item)
    return out


def split_counts(items: Iterable[WorkItem]) -> dict[str, int]:
    counts = {split: 0 for split in SPLITS}
    for item in items:
        counts[item.split] += 1
    return counts
