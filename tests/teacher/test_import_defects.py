"""Import defects, through the real ``distill`` CLI as a subprocess: idempotent re-import (checked on the raw
shards), no invented prompts or ids, out-of-range values and malformed lines refused with FILE:LINE and no
traceback, and nothing of a refused file stored."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from storage.catalog import Catalog
from storage.records import TeacherVocab
from storage.shards import shard_dir
from teacher.collect import build_record
from teacher.parsing import ResponseShapeError, parse_prompt_logprobs
from tests.support import PYTHON, test_env
from tests.teacher.conftest import stored_records

FIXTURES = Path(__file__).parent / "fixtures"
BATCH_OUT = FIXTURES / "openai_batch_output.jsonl"
BATCH_IN = FIXTURES / "openai_batch_input.jsonl"
METASEQ = FIXTURES / "metaseq_distillation.jsonl"


def distill(*args: str) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "pipeline.cli", *args]
    return subprocess.run(cmd, env=test_env(), capture_output=True, text=True, timeout=120)


def test_importing_twice_stores_each_row_and_failure_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for _ in range(2):
        done = distill(
            "import", "openai-batch", str(BATCH_OUT), "--requests", str(BATCH_IN), "--data-dir", str(data)
        )
        assert done.returncode == 0, done.stderr
    assert "(2 already stored)" in done.stdout
    records = stored_records(data)  # every row of every raw shard, not the catalog's de-duplicated view
    assert sorted(r.text for r in records) == ["Hi 🙂", "Paris."]
    done = distill("import", "metaseq", str(METASEQ), "--data-dir", str(data))
    done = distill("import", "metaseq", str(METASEQ), "--data-dir", str(data))
    assert done.returncode == 0 and "(2 already stored)" in done.stdout
    assert len(stored_records(data)) == 4
    with Catalog(data) as catalog:
        assert [key for key, _, _ in catalog.failures()] == ["req-3"]


def test_batch_without_requests_invents_no_prompt(tmp_path: Path) -> None:
    done = distill("import", "openai-batch", str(BATCH_OUT), "--data-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "2 records stored completion-only" in done.stdout and "prompts are unknown" in done.stdout
    records = stored_records(tmp_path)
    assert [r.prompt for r in records] == ["", ""]
    assert all("req-" not in r.prompt and r.params["prompt"] == "unknown" for r in records)


def test_prompt_logprobs_without_ids_invent_no_id() -> None:
    body = json.loads((FIXTURES / "vllm_prompt_logprobs.json").read_text(encoding="utf-8"))
    parsed = parse_prompt_logprobs(body, k=2, prompt="The cat sat")
    with pytest.raises(ResponseShapeError, match="never invented"):
        build_record(parsed, "The cat sat", "train", "t", "score", {"mode": "score"}, TeacherVocab())
    # with the id of the first prompt token named by the answer itself, the record is built with it
    body["choices"][0]["prompt_token_ids"] = [791, 8415, 7731]
    parsed = parse_prompt_logprobs(body, k=2, prompt="The cat sat")
    vocab = TeacherVocab()
    record = build_record(parsed, "The cat sat", "train", "t", "score", {"mode": "score"}, vocab)
    assert record.tokens.tolist() == [791, 8415, 7731]


def _metaseq_line(score: object = -0.02, token: str = " Paris", token_id: object = 6342) -> str:
    line = json.loads(METASEQ.read_text(encoding="utf-8").splitlines()[0])
    line["beam_results"][0]["top_logprobs"][0] = {token: {"token_id": token_id, "logprob_score": score}}
    line["beam_results"][0]["generated_text"] = None
    return json.dumps(line)


def _batch_line(body: object) -> str:
    line = json.loads(BATCH_OUT.read_text(encoding="utf-8").splitlines()[0])
    line["response"]["body"] = body
    return json.dumps(line)


def _batch_logprob(value: str) -> str:
    return (
        BATCH_OUT.read_text(encoding="utf-8")
        .splitlines()[0]
        .replace('"logprob": -0.1,', f'"logprob": {value},', 1)
    )


GOOD_METASEQ = METASEQ.read_text(encoding="utf-8").splitlines()[0]
GOOD_BATCH = BATCH_OUT.read_text(encoding="utf-8").splitlines()[0]
CASES = {
    "positive logprob": ("metaseq", _metaseq_line(0.5), "<= 0"),
    "+inf logprob": (
        "metaseq",
        _metaseq_line(score=1).replace('"logprob_score": 1', '"logprob_score": Infinity'),
        "<= 0",
    ),
    "NaN logprob": (
        "metaseq",
        _metaseq_line(score=1).replace('"logprob_score": 1', '"logprob_score": NaN'),
        "<= 0",
    ),
    "null logprob": ("metaseq", _metaseq_line(None), "logprob_score None"),
    "text logprob": ("metaseq", _metaseq_line("low"), "logprob_score 'low'"),
    "bad token id": ("metaseq", _metaseq_line(token_id="x"), "token_id 'x'"),
    "bad bytes escape": ("metaseq", _metaseq_line(token="bytes:\\xZZ"), "not followed by"),
    "batch body null": ("openai-batch", _batch_line(None), "response.body"),
    "batch positive logprob": ("openai-batch", _batch_logprob("0.3"), "<= 0"),
    "batch infinite logprob": ("openai-batch", _batch_logprob("Infinity"), "<= 0"),
    "json error": ("metaseq", '{"src": "x", "beam_results": [}', "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_line_names_file_and_line_without_traceback(case: str, tmp_path: Path) -> None:
    fmt, line, expected = CASES[case]
    good = GOOD_METASEQ if fmt == "metaseq" else GOOD_BATCH
    path = tmp_path / "input.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    done = distill("import", fmt, str(path), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"{path}:2: " in done.stderr and expected in done.stderr, done.stderr
    assert not list(shard_dir(tmp_path / "data").glob("*.parquet*"))  # nothing of the file is stored


def test_json_error_reports_the_column_of_the_wrong_line(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_text(GOOD_METASEQ + "\n" + '{"src": "x",, "beam_results": []}\n', encoding="utf-8")
    done = distill("import", "metaseq", str(path), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2 and f"{path}:2: not valid JSON" in done.stderr
    assert "column 13" in done.stderr, done.stderr
