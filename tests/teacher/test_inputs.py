"""Input files: JSONL prompts/messages, plain text chunking, Parquet; bad lines reported with file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher.inputs import InputError, ReadStats, WorkItem, chunk_text, read_inputs


def test_jsonl_prompts_messages_and_splits(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    rows = [
        {"prompt": "héllo", "split": "val", "id": 7},
        {"messages": [{"role": "user", "content": "hi"}]},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    items = list(read_inputs([path], chunk_chars=100))
    assert items[0] == WorkItem(prompt="héllo", split="val", source_id="7")
    assert items[1].messages == ({"role": "user", "content": "hi"},) and items[1].split == "train"
    assert json.loads(items[1].prompt_text()) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"prompt": "ok"', "not valid JSON"),
        ('{"prompt": ""}', "expected a non-empty string 'prompt'"),
        ('{"prompt": "x", "split": "dev"}', "'split' must be one of"),
        ('{"messages": [{"role": "user"}]}', "messages\\[0\\] must be an object"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_fails_with_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path}:2: {expected}"):
        list(read_inputs([path], chunk_chars=100))


def test_bad_lines_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n{"prompt": "b"}\n{"split": "x"}\n', encoding="utf-8")
    stats = ReadStats()
    items = list(read_inputs([path], chunk_chars=100, on_bad_line="skip", stats=stats))
    assert [i.prompt for i in items] == ["a", "b"]
    assert stats.items == 2 and len(stats.skipped_lines) == 2
    assert stats.skipped_lines[0].startswith(f"{path}:2:") and stats.skipped_lines[1].startswith(f"{path}:4:")
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n' + b'{"prompt": "long"}\n' * 5000)
    with pytest.raises(InputError, match=rf"{path}:2: not UTF-8 text"):
        list(read_inputs([path], chunk_chars=100))


def test_text_chunks_and_parquet(tmp_path: Path) -> None:
    text = "".join(f"line {i} ☕\n" for i in range(50))
    chunks = chunk_text(text, 60)
    assert "".join(chunks) == text and all(c.endswith("\n") for c in chunks)
    assert max(len(c) for c in chunks) <= 60
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    pq.write_table(pa.table({"text": ["a", "b"], "split": ["test", None]}), tmp_path / "p.parquet")
    items = list(read_inputs([tmp_path / "doc.txt", tmp_path / "p.parquet"], chunk_chars=60))
    assert [i.prompt for i in items[: len(chunks)]] == chunks
    assert [(i.prompt, i.split) for i in items[len(chunks) :]] == [("a", "test"), ("b", "train")]
    (tmp_path / "bad.parquet").write_bytes(b"")
    pq.write_table(pa.table({"other": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet: row 1: expected a non-empty string"):
        list(read_inputs([tmp_path / "bad.parquet"], chunk_chars=60))
