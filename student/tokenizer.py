"""The student tokenizer: a byte-level BPE (Hugging Face ``tokenizers``), trained here or loaded from JSON.

Public API (stable):

- ``StudentTokenizer.train(texts, vocab_size, min_frequency=2) -> StudentTokenizer``: GPT-2 style byte-level
  BPE over an iterable of strings; every byte is a token, so any text encodes and decodes losslessly.
  Id 0 is the special end-of-document token ``<|endoftext|>`` (``eos_id``).
- ``StudentTokenizer.load(path)`` / ``.save(path)``: a standard ``tokenizer.json`` (also readable by
  ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``); ``save`` writes atomically.
- ``encode(text) -> list[int]``, ``encode_batch(texts) -> list[list[int]]``, ``decode(ids) -> str``.
- ``token_bytes(id) -> bytes``: the exact bytes a token stands for (a token may be part of a multi-byte
  UTF-8 character); special tokens give their UTF-8 text. ``vocab_bytes() -> list[bytes]``, indexed by id:
  what ``teacher.alignment`` matches teacher tokens against.
- ``vocab_size`` (ids ``0 .. vocab_size-1``), ``eos_id``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS = "<|endoftext|>"


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable character standing for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class StudentTokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        eos = tokenizer.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"tokenizer has no {EOS} token")
        self.eos_id = eos
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self._bytes = [self._decode_token(i) for i in range(self.vocab_size)]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> StudentTokenizer:
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + {EOS}), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> StudentTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: not a Hugging Face tokenizer.json: {exc}") from None
        return cls(tok)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, path)
        return path

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]

    def vocab_bytes(self) -> list[bytes]:
        return list(self._bytes)

    def _decode_token(self, token_id: int) -> bytes:
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise ValueError(f"tokenizer has no token with id {token_id} (ids must be contiguous)")
        if token in self._special:
            return token.encode("utf-8")
        table = _unicode_to_byte()
        return bytes(table[c] for c in token)
