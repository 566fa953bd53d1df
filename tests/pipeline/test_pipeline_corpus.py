"""The embedded corpus: deterministic file list and split, per-file splits, stable sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, CorpusSettings
from pipeline.corpus import (
    assign_split,
    file_items,
    read_items,
    split_counts,
    stdlib_files,
    stdlib_items,
    stdlib_root,
    write_items,
)


def test_stdlib_corpus_is_deterministic_and_split_per_file(tmp_path: Path) -> None:
    settings = CorpusSettings(max_files=30, chunk_chars=400, max_samples=10_000, test_fraction=0.3)
    first, second = stdlib_items(settings, seed=3), stdlib_items(settings, seed=3)
    assert first == second and len(first) > 30
    files = [p.relative_to(stdlib_root()).as_posix() for p in stdlib_files(30)]
    assert len(files) == 30 and files == sorted(files) and len(set(files)) == 30
    assert not any(part in ("test", "tests") for f in files for part in f.split("/"))
    by_file: dict[str, set[str]] = {}
    for item in first:
        by_file.setdefault(item.source_id.split("#")[0], set()).add(item.split)
    assert all(len(splits) == 1 for splits in by_file.values())  # no file on both sides of the split
    assert split_counts(first)["test"] > 0
    assert stdlib_items(settings, seed=4) != first  # the seed moves files between splits
    path = tmp_path / "items.jsonl"
    write_items(first, path)
    assert read_items(path) == first
    assert all(i.split == "test" for i in read_items(path, ["test"]))


def test_max_samples_keeps_choice_stable_when_source_grows(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(40)))
    settings = CorpusSettings(source="files", paths=[prompts], max_samples=10)
    before = {i.prompt for i in file_items(settings, 1, "fail")}
    with prompts.open("a") as f:
        f.write(json.dumps({"prompt": "p-new"}) + "\n")
    after = {i.prompt for i in file_items(settings, 1, "fail")}
    assert len(before) == len(after) == 10
    assert len(before & after) >= 9  # at most the one new prompt displaces one old


def test_files_without_splits_get_hashed_splits_and_bad_lines_name_the_line(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"text {i}"}) + "\n" for i in range(200)))
    items = file_items(CorpusSettings(source="files", paths=[prompts], test_fraction=0.2), 0, "fail")
    counts = split_counts(items)
    assert 20 < counts["test"] < 60 and counts["train"] > 100
    assert assign_split("x", 0, 0.1, 0.2) == assign_split("x", 0, 0.1, 0.2)
    prompts.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2"):
        file_items(CorpusSettings(source="files", paths=[prompts]), 0, "fail")
    with pytest.raises(ConfigError, match=r"missing\.jsonl"):
        file_items(CorpusSettings(source="files", paths=[tmp_path / "missing.jsonl"]), 0, "fail")
