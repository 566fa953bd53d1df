"""The student tokenizer: lossless on any text, exact token bytes, stable through save/load.

Byte-level BPE (trained here) and SentencePiece-style tokenizer.json files (Metaspace + byte fallback, built
here with ``tokenizers``); EOS/BOS and the chat template from tokenizer_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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


SP_SPECIALS = ["<unk>", "<s>", "</s>"]


def sentencepiece_style_tokenizer(texts: list[str], merges: int = 200) -> Tokenizer:
    """Llama-2 style: ``▁`` for spaces, BPE learned on ASCII text, every other byte as ``<0xNN>``."""
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    alphabet = sorted({c for t in texts for c in t.replace(" ", "▁")})
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, limit_alphabet=len(alphabet)
    )
    base.train_from_iterator(texts, trainer)
    learned = json.loads(base.to_str())["model"]
    vocab = {t: i for i, t in enumerate([*SP_SPECIALS, *(f"<0x{b:02X}>" for b in range(256))])}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(SP_SPECIALS)
    return tok


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory, texts) -> Path:
    ascii_texts = [t.encode("ascii", errors="ignore").decode() for t in texts]
    path = tmp_path_factory.mktemp("sp") / "tokenizer.json"
    sentencepiece_style_tokenizer(ascii_texts).save(str(path))
    return path


def test_sentencepiece_token_bytes_are_exact(sp_file):
    tok = StudentTokenizer.load(sp_file)
    raw = json.loads(sp_file.read_text())["model"]["vocab"]
    assert tok.eos_id == raw["</s>"] and tok.bos_id == raw["<s>"]
    assert tok.token_bytes(raw["<0x0A>"]) == b"\n" and tok.token_bytes(raw["<0xE6>"]) == b"\xe6"
    assert tok.token_bytes(raw["<s>"]) == b"<s>"
    for token, index in raw.items():
        if token.startswith("▁") and len(token) > 1:
            assert tok.token_bytes(index) == b" " + token[1:].replace("▁", " ").encode()
    assert {bytes([b]) for b in range(256)} <= set(tok.vocab_bytes())


@pytest.mark.parametrize("text", [SAMPLES[1], SAMPLES[3], "Grüße aus Köln — 東京 🐍, naïve\tcafé"])
def test_sentencepiece_round_trip_non_ascii(sp_file, text):
    tok = StudentTokenizer.load(sp_file)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Metaspace prepends "▁" to the text: the joined token bytes are the text's bytes after one space.
    assert b"".join(tok.token_bytes(i) for i in ids) == b" " + text.encode("utf-8")
    fallback = [i for i in ids if len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80]
    assert fallback, "non-ASCII characters are spelled by byte-fallback tokens"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(sp_file))
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(ids) == tok.decode(ids)


TEMPLATE = (
    "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_config_names_eos_bos_and_chat_template(sp_file, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(sp_file.read_bytes())
    config = {"eos_token": {"content": "<unk>"}, "bos_token": None, "chat_template": TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = StudentTokenizer.load(folder / "tokenizer.json")
    assert tok.eos_id == 0 and tok.bos_id is None and tok.chat_template == TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tok.render_chat(messages, add_generation_prompt=True)
    assert rendered == "user: hi<unk>\nassistant: yo<unk>\nassistant:"
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<unk>")
    assert rendered == hf.apply_chat_template(
        messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    saved = tok.save(tmp_path / "copy" / "tokenizer.json")
    assert json.loads((saved.parent / "tokenizer_config.json").read_text()) == config
    again = StudentTokenizer.load(saved)
    assert (again.eos_id, again.bos_id, again.chat_template) == (0, None, TEMPLATE)


def test_eos_fallback_names_and_config_errors(sp_file, tokenizer, tmp_path):
    assert StudentTokenizer.load(sp_file).eos_id == 2, "</s> without a tokenizer_config.json"
    assert tokenizer.bos_id is None and tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no chat_template"):
        tokenizer.render_chat([{"role": "user", "content": "x"}])
    (tmp_path / "tokenizer.json").write_bytes(sp_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json: field eos_token: token '<\|nope\|>' is not"
    ):
        StudentTokenizer.load(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: line 1: not valid JSON"):
        StudentTokenizer.load(tmp_path / "tokenizer.json")
    bare = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    (tmp_path / "bare").mkdir()
    bare.save(str(tmp_path / "bare" / "bare.json"))
    with pytest.raises(ValueError, match=r"bare\.json: tokenizer has no end-of-sequence token"):
        StudentTokenizer.load(tmp_path / "bare" / "bare.json")
