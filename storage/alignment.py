"""Alignment of teacher tokens to a student vocabulary by their bytes, and the coverage it achieves.

A teacher token maps to the student token with exactly the same bytes (``TokenMap.single``). An *actual* teacher
token without one is spelled as several student tokens (``TokenMap.expand``); a top-k *candidate* without one is
dropped from its position and counted as lost coverage (see ``storage.records.TokenMap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from storage.records import TokenMap

EncodeBytes = Callable[[bytes], list[int] | None]


class ByteTokenizer(Protocol):
    def vocab_bytes(self) -> list[bytes]: ...
    def encode(self, text: str) -> list[int]: ...


def greedy_spelling(student_token_bytes: Sequence[bytes]) -> EncodeBytes:
    """Spell bytes with student tokens by longest match first; None if some byte has no token."""
    by_bytes: dict[bytes, int] = {}
    for i, data in enumerate(student_token_bytes):
        if data:
            by_bytes.setdefault(data, i)
    longest = max((len(b) for b in by_bytes), default=0)

    def encode(data: bytes) -> list[int] | None:
        out, pos = [], 0
        while pos < len(data):
            for size in range(min(longest, len(data) - pos), 0, -1):
                found = by_bytes.get(data[pos : pos + size])
                if found is not None:
                    out.append(found)
                    pos += size
                    break
            else:
                return None
        return out

    return encode


def build_token_map(
    teacher_vocab_bytes: Sequence[bytes | None],
    student_token_bytes: Sequence[bytes],
    encode_bytes: EncodeBytes | None = None,
) -> TokenMap:
    """Map teacher ids (indices of ``teacher_vocab_bytes``; None or empty for ids not in use) to student ids.

    ``encode_bytes`` spells a teacher token with no single student token (default: ``greedy_spelling``); a
    spelling whose bytes differ from the token's is refused.
    """
    encode_bytes = encode_bytes or greedy_spelling(student_token_bytes)
    student_id: dict[bytes, int] = {}
    for i, data in enumerate(student_token_bytes):
        student_id.setdefault(data, i)
    single = np.full(len(teacher_vocab_bytes), -1, dtype=np.int64)
    expand: dict[int, np.ndarray] = {}
    for t, data in enumerate(teacher_vocab_bytes):
        if not data:
            continue
        found = student_id.get(data)
        if found is not None:
            single[t] = found
            continue
        spelled = encode_bytes(data)
        if spelled and b"".join(student_token_bytes[i] for i in spelled) == data:
            expand[t] = np.asarray(spelled, dtype=np.int64)
    return TokenMap(single=single, expand=expand)


@dataclass
class Coverage:
    """How much of the teacher's top-k survives the mapping: share of entries, and share of probability mass."""

    entries: int = 0
    mapped_entries: int = 0
    mass: float = 0.0
    mapped_mass: float = 0.0

    def add(self, topk_ids: np.ndarray, topk_logprobs: np.ndarray, token_map: TokenMap) -> None:
        """Accumulate one record's top-k (teacher ids, -1 padding)."""
        valid = topk_ids >= 0
        ids = np.where(valid, topk_ids, 0)
        in_range = valid & (ids < len(token_map.single))
        mapped = in_range & (token_map.single[np.where(in_range, ids, 0)] >= 0)
        weights = np.where(valid, np.exp(topk_logprobs.astype(np.float64)), 0.0)
        self.entries += int(valid.sum())
        self.mapped_entries += int(mapped.sum())
        self.mass += float(weights.sum())
        self.mapped_mass += float(weights[mapped].sum())

    @property
    def entry_share(self) -> float:
        return self.mapped_entries / self.entries if self.entries else 1.0

    @property
    def mass_share(self) -> float:
        return self.mapped_mass / self.mass if self.mass else 1.0

    def as_dict(self) -> dict[str, float]:
        return {
            "entries": self.entries,
            "mapped_entries": self.mapped_entries,
            "entry_share": self.entry_share,
            "mass_share": self.mass_share,
        }


def tokenizer_spelling(tokenizer: ByteTokenizer, student_token_bytes: Sequence[bytes]) -> EncodeBytes:
    """Spell with the tokenizer's own encoding when the bytes are valid UTF-8, else byte by byte (greedy)."""
    greedy = greedy_spelling(student_token_bytes)

    def encode(data: bytes) -> list[int] | None:
        try:
            return tokenizer.encode(data.decode("utf-8"))
        except UnicodeDecodeError:
            return greedy(data)

    return encode


def vocab_mapper(student_tokenizer: ByteTokenizer) -> Callable[[list[bytes]], TokenMap]:
    """The ``map_vocab`` callable the storage reader takes: teacher vocab bytes -> ``TokenMap``."""
    student_bytes = student_tokenizer.vocab_bytes()
    spelling = tokenizer_spelling(student_tokenizer, student_bytes)

    def map_vocab(teacher_vocab_bytes: list[bytes]) -> TokenMap:
        return build_token_map(teacher_vocab_bytes, student_bytes, spelling)

    return map_vocab
