"""The student's byte-level BPE: lossless on any text, exact token bytes, stable through save/load."""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from pipeline.corpus import stdlib_files
from student.tokenizer import EOS, StudentTokenizer

SAMPLES = [
    "def f(x):\n    return x ** 2  # square\n",
    "naïve café — ünïcödé ✓ 日本語 🐍\n\t tabs and  double  spaces",
    "",
    "\x00\x7f control bytes and a lone \ud7ff codepoint",
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(8)]


@pytest.fixture(scope="module")
def tokenizer(texts) -> StudentTokenizer:
    return StudentTokenizer.train(texts, 600)


def test_training_is_deterministic_and_sized(texts, tokenizer):
    assert tokenizer.vocab_size == 600
    assert tokenizer.eos_id == 0 and tokenizer.token_bytes(0) == EOS.encode()
    again = StudentTokenizer.train(texts, 600)
    assert again.vocab_bytes() == tokenizer.vocab_bytes()


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_round_trip_and_token_bytes(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_every_byte_is_a_token_and_merges_compress(tokenizer, texts):
    vocab = tokenizer.vocab_bytes()
    assert len(set(vocab)) == len(vocab), "no two ids share bytes"
    assert {bytes([b]) for b in range(256)} <= set(vocab)
    sample = texts[0][:5000]
    assert len(tokenizer.encode(sample)) < 0.6 * len(sample.encode())


def test_multibyte_characters_split_into_byte_fragments(tokenizer):
    ids = tokenizer.encode("🐍")
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == "🐍".encode()
    assert len(pieces) > 1, "a rare 4-byte character is spelled by fragments that are not valid UTF-8 alone"


def test_save_load_and_transformers_agree(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "sub" / "tokenizer.json")
    assert not list(path.parent.glob("*.tmp"))
    loaded = StudentTokenizer.load(path)
    assert loaded.vocab_bytes() == tokenizer.vocab_bytes()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text) == hf.encode(text, add_special_tokens=False)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json: tokenizer file not found"):
        StudentTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(ValueError, match=r"bad\.json: not a Hugging Face tokenizer\.json"):
        StudentTokenizer.load(bad)
    with pytest.raises(ValueError, match="vocab_size must be at least 257"):
        StudentTokenizer.train(["abc"], 100)
