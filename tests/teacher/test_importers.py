"""Importers: metaseq and OpenAI Batch files become the same records as collection, through real shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from storage.catalog import Catalog
from storage.records import TeacherVocab, TopKRecord
from storage.shards import ShardWriter, read_records, shard_dir
from teacher.importers import import_metaseq, import_openai_batch
from teacher.inputs import InputError
from tests.teacher.conftest import stored_records

FIXTURES = Path(__file__).parent / "fixtures"


def write_and_read(records: list[TopKRecord], vocab: TeacherVocab, data_dir: Path) -> list[TopKRecord]:
    with ShardWriter(data_dir) as writer:
        writer(records, vocab)
    (shard,) = sorted(shard_dir(data_dir).glob("*.parquet"))
    return read_records(shard)


def test_metaseq_import(tmp_path: Path) -> None:
    vocab = TeacherVocab()
    records = list(import_metaseq(FIXTURES / "metaseq_distillation.jsonl", vocab, teacher="davinci"))
    assert [r.text for r in records] == [" Paris.", " café ☕"]
    assert records[0].prompt.startswith("Question: What is the capital")
    # teacher ids are the file's token ids; the emoji token is raw bytes
    assert vocab.bytes_of(6342) == b" Paris" and vocab.bytes_of(24601) == "☕".encode()
    assert records[1].tokens.tolist() == [19945, 2634, 220, 24601]
    assert b"".join(vocab.bytes_of(int(t)) for t in records[1].tokens) == " café ☕".encode()
    assert records[1].topk_ids[2].tolist() == [198, 220]  # sorted: the actual token ranks second
    back = write_and_read(records, vocab, tmp_path)
    assert [r.sample_id for r in back] == [r.sample_id for r in records]
    np.testing.assert_array_equal(back[1].topk_ids, records[1].topk_ids)


def test_openai_batch_import(tmp_path: Path) -> None:
    vocab = TeacherVocab()
    out = list(
        import_openai_batch(
            FIXTURES / "openai_batch_output.jsonl", vocab, FIXTURES / "openai_batch_input.jsonl"
        )
    )
    records = [r for r in out if isinstance(r, TopKRecord)]
    failures = [r for r in out if not isinstance(r, TopKRecord)]
    assert [r.text for r in records] == ["Hi 🙂", "Paris."]
    assert json.loads(records[0].prompt) == [{"content": "Say hi", "role": "user"}]
    assert records[0].params["temperature"] == 0.7 and records[0].teacher == "gpt-4o-mini-2024-07-18"
    assert failures[0][0] == "req-3" and "server had an error" in failures[0][1]
    back = write_and_read(records, vocab, tmp_path)
    assert [r.text for r in back] == ["Hi 🙂", "Paris."]


def test_both_formats_share_one_schema(tmp_path: Path) -> None:
    vocab_a, vocab_b = TeacherVocab(), TeacherVocab()
    metaseq = list(import_metaseq(FIXTURES / "metaseq_distillation.jsonl", vocab_a))
    batch = [
        r
        for r in import_openai_batch(FIXTURES / "openai_batch_output.jsonl", vocab_b)
        if isinstance(r, TopKRecord)
    ]
    write_and_read(metaseq, vocab_a, tmp_path / "a")
    write_and_read(batch, vocab_b, tmp_path / "b")
    (a,) = shard_dir(tmp_path / "a").glob("*.parquet")
    (b,) = shard_dir(tmp_path / "b").glob("*.parquet")
    assert pq.read_schema(a).remove_metadata() == pq.read_schema(b).remove_metadata()


def test_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    good = (FIXTURES / "metaseq_distillation.jsonl").read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        good[0] + "\n\n" + '{"src": "x", "beam_results": [{"top_logprobs": [{"a": {"token_id": 1}}]}]}\n'
    )
    with pytest.raises(InputError, match=rf"{bad}:3: .*top_logprobs\[0\]\['a'\]: expected"):
        list(import_metaseq(bad, TeacherVocab()))
    bad.write_text(good[0] + "\n" + good[1][:40] + "\n")
    with pytest.raises(InputError, match=rf"{bad}:2: not valid JSON"):
        list(import_metaseq(bad, TeacherVocab()))
    lines = (FIXTURES / "openai_batch_output.jsonl").read_text(encoding="utf-8").splitlines()
    broken = json.loads(lines[1])
    del broken["response"]["body"]["choices"][0]["logprobs"]
    bad.write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(InputError, match=rf"{bad}:2: choices\[0\].logprobs.content: missing"):
        list(import_openai_batch(bad, TeacherVocab()))


def test_distill_import_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = FIXTURES / "metaseq_distillation.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text(encoding="utf-8") + '{"src": 1}\n', encoding="utf-8")
    assert main(["import", "metaseq", str(good), str(bad), "--data-dir", str(tmp_path / "data")]) == 2
    assert f"{bad}:3: expected a string 'prompt_text' or 'src'" in capsys.readouterr().err
    assert not list(shard_dir(tmp_path / "data").glob("*.parquet*"))  # nothing half-imported
    args = ["import", "openai-batch", str(FIXTURES / "openai_batch_output.jsonl")]
    args += ["--requests", str(FIXTURES / "openai_batch_input.jsonl"), "--data-dir", str(tmp_path / "data")]
    assert main(args) == 0
    assert len(stored_records(tmp_path / "data")) == 2
    with Catalog(tmp_path / "data") as catalog:
        assert [key for key, _, _ in catalog.failures()] == ["req-3"]
