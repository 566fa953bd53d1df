"""Split characters, collapsed keys, over-long tokens, shifted echo scores and out-of-range logprobs, from
recorded bodies in the shapes servers send (fixtures/): nothing wrong is stored, and a shard holding a repaired
record trains through the real reader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from storage.catalog import Catalog
from storage.reader import PackedReader, identity_token_map
from storage.records import TeacherVocab
from storage.settings import StorageSettings
from storage.shards import ShardWriter, read_records
from storage.snapshot import create_snapshot
from teacher.collect import build_record
from teacher.fragments import FragmentStats
from teacher.parsing import ResponseShapeError, ShiftedScoresError, parse_chat, parse_completion

FIXTURES = Path(__file__).parent / "fixtures"
DASHES = b"-" * 40
PARAMS = {"mode": "generate", "top_k": 3}


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def spelled(record, vocab: TeacherVocab) -> list[bytes]:
    return [vocab.bytes_of(int(t)) for t in record.tokens]


def test_chat_split_characters_are_recovered_or_marked_never_stored_empty() -> None:
    body = load("chat_split_characters.json")
    parsed = parse_chat(body, k=3)
    assert [t.data for t in parsed.tokens].count(None) == 4  # "", lone space, "" (☕), "" (40 bytes)
    vocab, stats = TeacherVocab(), FragmentStats()
    record = build_record(parsed, "p", "train", "served-llama", "generate", PARAMS, vocab, stats)
    pieces = spelled(record, vocab)
    assert pieces == [b"caf", "é".encode(), b" ", "☕".encode(), b" ", DASHES, b"!"]
    assert b"".join(pieces).decode() == body["choices"][0]["message"]["content"]
    assert b"" not in [data for _, data in vocab.items()]
    # é came as two pieces whose boundary is unknown: one token, no soft target there
    assert (record.topk_ids[1] == -1).all()
    # ☕: its collapsed "" candidate with the actual token's logprob got the recovered bytes; the other "" left
    row = [vocab.bytes_of(int(i)) for i in record.topk_ids[3] if i >= 0]
    assert row == ["☕".encode(), b"tea"]
    assert np.allclose(record.topk_logprobs[3, :2], [-1.2, -2.2])
    assert [vocab.bytes_of(int(i)) for i in record.topk_ids[5] if i >= 0] == [DASHES, b"--"]
    assert (stats.recovered_tokens, stats.unknown_positions) == (2, 2)
    assert stats.dropped_candidates == 1


def test_echo_split_characters_with_collapsed_keys() -> None:
    parsed = parse_completion(load("completions_echo_split_characters.json"), k=2, echo_prompt="café ☕")
    vocab = TeacherVocab()
    record = build_record(parsed, "café ☕", "train", "t", "score", {"mode": "score"}, vocab)
    assert spelled(record, vocab) == [b"caf", "é".encode(), b" ", "☕".encode()]
    assert (record.topk_ids[1] == -1).all()  # the é pieces: no soft target
    assert [vocab.bytes_of(int(i)) for i in record.topk_ids[3] if i >= 0] == ["☕".encode(), b"."]


def test_tokens_that_do_not_spell_the_text_are_refused() -> None:
    body = load("chat_split_characters.json")
    body["choices"][0]["message"]["content"] = "cafe ☕ " + DASHES.decode() + "!"  # not what the tokens spell
    with pytest.raises(ResponseShapeError, match=r"spell|continue"):
        build_record(parse_chat(body, 3), "p", "train", "t", "generate", PARAMS, TeacherVocab())
    body = load("openai_chat_logprobs.json")
    body["choices"][0]["message"]["content"] = "Hi 🙂!"
    with pytest.raises(ResponseShapeError, match="spell"):
        build_record(parse_chat(body, 3), "p", "train", "t", "generate", PARAMS, TeacherVocab())


def test_shifted_echo_is_refused_naming_the_server_behaviour() -> None:
    body = load("completions_echo_shifted.json")
    with pytest.raises(
        ShiftedScoresError, match=r"listed 5 echoed tokens.*usage accounts for 4.*one position late"
    ):
        parse_completion(body, k=2, echo_prompt="The cat sat")
    del body["usage"]  # the text_offset alone also gives it away: the last token starts at the text's end
    with pytest.raises(ShiftedScoresError, match=r"text_offset.*one position late"):
        parse_completion(body, k=2, echo_prompt="The cat sat")


@pytest.mark.parametrize("value", [0.5, math.inf, math.nan])
def test_out_of_range_logprobs_are_refused(value: float) -> None:
    body = load("openai_chat_logprobs.json")
    body["choices"][0]["logprobs"]["content"][1]["top_logprobs"][1]["logprob"] = value
    with pytest.raises(ResponseShapeError, match=r"content\[1\]\.top_logprobs\[1\]\.logprob: "):
        parse_chat(body, 3)
    echo = load("openai_completions_echo.json")
    echo["choices"][0]["logprobs"]["token_logprobs"][2] = value
    with pytest.raises(ResponseShapeError, match=r"token_logprobs\[2\]"):
        parse_completion(echo, 2, echo_prompt="café ☕")


def test_rounding_above_zero_is_stored_as_zero() -> None:
    body = load("openai_chat_logprobs.json")
    body["choices"][0]["logprobs"]["content"][2]["top_logprobs"][0]["logprob"] = 5e-5
    assert parse_chat(body, 3).candidates[2][0].logprob == 0.0


def test_a_shard_with_a_repaired_record_trains(tmp_path: Path) -> None:
    """The split-character record beside a clean one, through shards, catalog, snapshot and PackedReader."""
    vocab = TeacherVocab()
    clean = parse_chat(load("openai_chat_logprobs.json"), 3)
    split = parse_chat(load("chat_split_characters.json"), 3)
    records = [
        build_record(p, f"prompt {i}", "train", "served-llama", "generate", PARAMS, vocab)
        for i, p in enumerate([clean, split])
    ]
    with Catalog(tmp_path) as catalog:
        with ShardWriter(tmp_path, StorageSettings(data_dir=tmp_path), catalog) as writer:
            writer(records, vocab)
        snapshot = create_snapshot(catalog, "all")
    (shard,) = (tmp_path / "shards").glob("*.parquet")
    stored = {r.text: r for r in read_records(shard)}
    assert set(stored) == {"Hi 🙂", "café ☕ " + DASHES.decode() + "!"}
    student = [bytes([b]) for b in range(256)]
    reader = PackedReader(
        snapshot, 256, 1, identity_token_map(student), encode=lambda s: list(s.encode()), shuffle=False
    )
    batches = list(reader)
    text = b"".join(bytes(b["tokens"][0][b["doc_ids"][0] >= 0].tolist()) for b in batches)
    assert "Hi 🙂".encode() in text and ("café ☕ " + DASHES.decode()).encode() in text
    soft = np.concatenate([b["soft_mask"][0].numpy() for b in batches])
    assert soft.any() and not soft.all()
