"""Stage cache: keys, reuse, atomic outputs, rebuild when an output (or a file it relies on) is gone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.cache import (
    MANIFEST,
    StageResult,
    StageSpec,
    code_version,
    hash_value,
    read_complete,
    run_stage,
    stage_key,
    write_summary,
)
from pipeline.config import CorpusSettings


def _writer(calls: list[str], text: str = "hello"):
    def build(out: Path, resume: bool) -> dict:
        calls.append(f"resume={resume}")
        (out / "data.txt").write_text(text)
        return {"n": len(text)}

    return build


def test_second_run_reuses_output_and_missing_output_rebuilds(tmp_path: Path) -> None:
    calls: list[str] = []
    spec = StageSpec("demo", "k1", _writer(calls))
    first = run_stage(spec, tmp_path)
    assert first.status == "ran" and calls == ["resume=False"]
    assert Path(first.path) == tmp_path / "demo" / "k1"
    assert first.info == {"n": 5} and set(first.hashes) == {"data.txt"}

    second = run_stage(spec, tmp_path)
    assert second.status == "cached" and len(calls) == 1
    assert second.hashes == first.hashes

    (Path(first.path) / "data.txt").unlink()  # the output file is gone: not complete any more
    assert read_complete(spec, tmp_path) is None
    third = run_stage(spec, tmp_path)
    assert (
        third.status == "ran" and len(calls) == 2 and (Path(third.path) / "data.txt").read_text() == "hello"
    )


def test_external_file_gone_makes_stage_incomplete(tmp_path: Path) -> None:
    shard = tmp_path / "shard.parquet"
    shard.write_bytes(b"x")
    calls: list[str] = []
    spec = StageSpec("collect", "k", _writer(calls), external=lambda info: [str(shard)])
    run_stage(spec, tmp_path / "work")
    assert run_stage(spec, tmp_path / "work").status == "cached"
    shard.unlink()
    assert run_stage(spec, tmp_path / "work").status == "ran"


def test_failed_build_leaves_nothing_visible(tmp_path: Path) -> None:
    def build(out: Path, resume: bool) -> None:
        (out / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_stage(StageSpec("bad", "k", build), tmp_path)
    assert list((tmp_path / "bad").iterdir()) == []


def test_resumable_stage_keeps_partial_and_resumes(tmp_path: Path) -> None:
    seen: list[bool] = []

    def build(out: Path, resume: bool) -> None:
        seen.append(resume)
        progress = out / "checkpoint.txt"
        if not progress.exists():
            progress.write_text("step 5")
            raise KeyboardInterrupt  # killed mid-training
        (out / "final.txt").write_text(progress.read_text())

    spec = StageSpec("train", "k", build, resumable=True)
    with pytest.raises(KeyboardInterrupt):
        run_stage(spec, tmp_path)
    assert (tmp_path / "train" / ".partial-k" / "checkpoint.txt").is_file()
    assert not (tmp_path / "train" / "k").exists()
    result = run_stage(spec, tmp_path)
    assert seen == [False, True]
    assert (Path(result.path) / "final.txt").read_text() == "step 5"
    assert not (tmp_path / "train" / ".partial-k").exists()


def test_key_depends_on_settings_inputs_and_code() -> None:
    base = stage_key("s", CorpusSettings(), {"a": "1"}, ["pipeline.corpus"])
    assert base == stage_key("s", CorpusSettings(), {"a": "1"}, ["pipeline.corpus"])
    assert base != stage_key("s", CorpusSettings(max_files=3), {"a": "1"}, ["pipeline.corpus"])
    assert base != stage_key("s", CorpusSettings(), {"a": "2"}, ["pipeline.corpus"])
    assert base != stage_key("s", CorpusSettings(), {"a": "1"}, ["pipeline.cache"])
    assert base != stage_key("t", CorpusSettings(), {"a": "1"}, ["pipeline.corpus"])
    assert hash_value({"x": 1, "y": [1, 2]}) == hash_value({"y": [1, 2], "x": 1})
    assert code_version("pipeline") != code_version("pipeline.corpus")


def test_result_hash_of_names_missing_file() -> None:
    result = StageResult("s", "k", "/nowhere", {"a.json": "h1", "b.json": "h2"})
    assert result.hash_of("a.json") != result.hash_of("b.json")
    assert result.hash_of() == result.hash_of("a.json", "b.json")
    with pytest.raises(KeyError, match=r"no file 'c\.json'"):
        result.hash_of("c.json")


def test_summary_lists_each_stage(tmp_path: Path) -> None:
    results = [
        StageResult("a", "k1", "/w/a/k1", {}, status="ran", seconds=1.5),
        StageResult("b", "k2", "/w/b/k2", {}, status="cached", seconds=0.01),
    ]
    path = write_summary(tmp_path / "runs" / "r1", "r1", results, {"status": "completed"})
    summary = json.loads(path.read_text())
    assert summary["stages"]["a"] == {"status": "ran", "seconds": 1.5, "path": "/w/a/k1", "key": "k1"}
    assert summary["stages"]["b"]["status"] == "cached"
    assert summary["run_id"] == "r1" and summary["status"] == "completed"
    assert not list(path.parent.glob("*.tmp"))
    assert MANIFEST == "_stage.json"
