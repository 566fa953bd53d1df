"""Work items from input files: JSONL prompts, plain text chunked for score mode, Parquet.

JSONL: one object per line, ``{"prompt": str}`` or ``{"messages": [{"role", "content"}...]}``, optional ``id``
and ``split``. Parquet: columns ``prompt`` or ``text`` (optional ``id``, ``split``). Plain text: split into
chunks of about ``chunk_chars`` characters at line boundaries. A bad line raises ``InputError`` naming
file:line, or (``on_bad_line="skip"``) is skipped and counted.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from storage.records import SPLITS


class InputError(ValueError):
    """A malformed input line or file; the message is ``file:line: what was expected``."""


@dataclass(frozen=True)
class WorkItem:
    """One request to make: a prompt (or text to score), or chat messages; its split; the input's own id."""

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    split: str = "train"
    source_id: str | None = None

    def prompt_text(self) -> str:
        """The prompt as stored in records and hashed into the sample id (messages as canonical JSON)."""
        if self.messages is not None:
            return json.dumps(list(self.messages), ensure_ascii=False, sort_keys=True)
        return self.prompt or ""


@dataclass
class ReadStats:
    items: int = 0
    skipped_lines: list[str] = field(default_factory=list)  # "file:line: reason" of each skipped line


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InputError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def decode_json_line(raw: bytes, where: str) -> Any:
    """One JSONL line as an object; a line that is not UTF-8 or not JSON is an ``InputError`` at ``where``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text (byte {exc.start} of the line)") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def item_from_object(obj: Any, where: str) -> WorkItem:
    """A work item from one decoded JSON object (or Parquet row); ``where`` names it in errors."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    split = obj.get("split") or "train"
    if split not in SPLITS:
        raise InputError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
    source_id = obj.get("id")
    source_id = None if source_id is None else str(source_id)
    if "messages" in obj:
        return WorkItem(messages=_messages(obj["messages"], where), split=split, source_id=source_id)
    prompt = obj.get("prompt", obj.get("text"))
    if not isinstance(prompt, str) or not prompt:
        raise InputError(f"{where}: expected a non-empty string 'prompt' (or 'text'), or 'messages'")
    return WorkItem(prompt=prompt, split=split, source_id=source_id)


def _accepted(
    entries: Iterable[tuple[str, Callable[[], Any]]], on_bad_line: Literal["fail", "skip"], stats: ReadStats
) -> Iterator[WorkItem]:
    """Work items from ``(where, load)`` entries; a bad entry fails the read or is skipped and counted."""
    for where, load in entries:
        try:
            item = item_from_object(load(), where)
        except InputError as exc:
            if on_bad_line == "fail":
                raise
            stats.skipped_lines.append(str(exc))
            continue
        stats.items += 1
        yield item


def read_jsonl(
    path: Path, on_bad_line: Literal["fail", "skip"] = "fail", stats: ReadStats | None = None
) -> Iterator[WorkItem]:
    stats = stats if stats is not None else ReadStats()
    with path.open("rb") as handle:  # decoded line by line, so a bad byte is reported on its own line
        lines = ((f"{path}:{n}", raw) for n, raw in enumerate(handle, start=1) if raw.strip())
        entries = ((where, functools.partial(decode_json_line, raw, where)) for where, raw in lines)
        yield from _accepted(entries, on_bad_line, stats)


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Chunks of about ``chunk_chars`` characters, cut after a newline when one is near (never mid-line
    unless a single line is longer than a chunk)."""
    chunks, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n", start + chunk_chars // 2, end)
            end = cut + 1 if cut >= 0 else end
        chunks.append(text[start:end])
        start = end
    return [c for c in chunks if c.strip()]


def read_text(path: Path, chunk_chars: int, split: str = "train") -> Iterator[WorkItem]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    for chunk in chunk_text(text, chunk_chars):
        yield WorkItem(prompt=chunk, split=split)


def read_parquet(
    path: Path, on_bad_line: Literal["fail", "skip"] = "fail", stats: ReadStats | None = None
) -> Iterator[WorkItem]:
    import pyarrow.parquet as pq

    stats = stats if stats is not None else ReadStats()
    rows = (obj for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for obj in batch.to_pylist())
    entries = ((f"{path}: row {n}", lambda obj=obj: obj) for n, obj in enumerate(rows, start=1))
    yield from _accepted(entries, on_bad_line, stats)


def read_inputs(
    paths: list[Path],
    chunk_chars: int,
    on_bad_line: Literal["fail", "skip"] = "fail",
    stats: ReadStats | None = None,
) -> Iterator[WorkItem]:
    """Work items from every path, by extension: ``.jsonl``, ``.parquet``, anything else is plain text."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: input file not found")
        if path.suffix == ".jsonl":
            yield from read_jsonl(path, on_bad_line, stats)
        elif path.suffix == ".parquet":
            yield from read_parquet(path, on_bad_line, stats)
        else:
            yield from read_text(path, chunk_chars)
