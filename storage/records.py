"""The in-memory contract between the teacher side and storage: one ``TopKRecord`` per sample.

Positions: ``text`` is split by the teacher into ``n`` tokens ``tokens[0..n-1]``. Row ``i`` of ``topk_ids`` /
``topk_logprobs`` is the teacher's distribution over token ``i`` given everything before it (the prompt, then
``tokens[:i]``). In score mode the first position has no prediction (k = 0 there); in generate mode every
completion token has one and the prompt carries none.

Ids are **teacher-vocabulary ids**: indices into a ``TeacherVocab`` (token bytes <-> id) that travels with the
records. Ids from a server that reports them (the local teacher, vLLM) are the server's own; otherwise the
collector assigns them as it meets new token byte strings. A varying k is padding: ``-1`` ids and ``-inf``
logprobs, rows sorted by decreasing logprob. OpenAI's ``-9999`` "not returned" sentinel never reaches a record.

Optional per-position extras (None when the teacher gave none): ``token_logprobs[i]``, the teacher's logprob of
the actual token ``tokens[i]`` (NaN where unknown, e.g. the first position in score mode); and tail samples,
``sample_ids[i]`` / ``sample_counts[i]``: the distinct teacher ids drawn (with replacement) from the teacher's
distribution restricted to outside position ``i``'s top-k, and how often each was drawn (``-1`` / ``0``
padding; a position's counts sum to the number of draws S, or to 0 where nothing was drawn).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
MODES = ("generate", "score")


@dataclass
class TopKRecord:
    sample_id: str
    split: str
    teacher: str
    mode: str
    prompt: str
    text: str
    tokens: np.ndarray  # int32 [n]
    topk_ids: np.ndarray  # int32 [n, K], -1 = no entry
    topk_logprobs: np.ndarray  # float32 [n, K], -inf = no entry
    params: dict[str, Any] = field(default_factory=dict)  # request parameters, JSON-able, never a secret
    created_at: float = 0.0  # unix seconds
    prompt_tokens: int = 0  # usage reported by the API
    completion_tokens: int = 0
    finish_reason: str | None = None
    topk_logits: np.ndarray | None = None  # float32 [n, K] raw teacher logits (local teacher only)
    token_logprobs: np.ndarray | None = None  # float32 [n] teacher logprob of tokens[i], NaN: unknown
    sample_ids: np.ndarray | None = None  # int32 [n, M] distinct tail samples, -1 = no entry
    sample_counts: np.ndarray | None = None  # int32 [n, M] draws of each, 0 = no entry

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if self.split not in SPLITS:
            raise ValueError(f"sample {self.sample_id}: split must be one of {SPLITS}, got {self.split!r}")
        if self.mode not in MODES:
            raise ValueError(f"sample {self.sample_id}: mode must be one of {MODES}, got {self.mode!r}")
        if (
            self.topk_ids.ndim != 2
            or self.topk_ids.shape[0] != n
            or self.topk_logprobs.shape != self.topk_ids.shape
        ):
            raise ValueError(
                f"sample {self.sample_id}: expected topk_ids/topk_logprobs of shape [{n}, K], "
                f"got {self.topk_ids.shape} and {self.topk_logprobs.shape}"
            )
        if self.token_logprobs is not None and self.token_logprobs.shape != (n,):
            raise ValueError(
                f"sample {self.sample_id}: expected token_logprobs of shape [{n}], got {self.token_logprobs.shape}"
            )
        if (self.sample_ids is None) != (self.sample_counts is None):
            raise ValueError(f"sample {self.sample_id}: sample_ids and sample_counts go together")
        if self.sample_ids is not None and (
            self.sample_ids.ndim != 2
            or self.sample_ids.shape[0] != n
            or self.sample_counts.shape != self.sample_ids.shape
        ):
            raise ValueError(
                f"sample {self.sample_id}: expected sample_ids/sample_counts of shape [{n}, M], "
                f"got {self.sample_ids.shape} and {self.sample_counts.shape}"
            )


def sample_id(prompt: str, teacher: str, params: dict[str, Any]) -> str:
    """Stable id of a request: a hash of the prompt (or text), the teacher model and the request parameters."""
    payload = json.dumps(
        {"prompt": prompt, "teacher": teacher, "params": params}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


class TeacherVocab:
    """Token bytes <-> teacher id. Grows as a collector meets new tokens; ``add`` pins a server-given id."""

    def __init__(self) -> None:
        self._bytes_by_id: dict[int, bytes] = {}
        self._id_by_bytes: dict[bytes, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._bytes_by_id)

    def add(self, token_id: int, token_bytes: bytes) -> int:
        known = self._bytes_by_id.get(token_id)
        if known is not None and known != token_bytes:
            raise ValueError(
                f"teacher token id {token_id} seen with two byte strings: {known!r} and {token_bytes!r}"
            )
        self._bytes_by_id[token_id] = token_bytes
        self._id_by_bytes.setdefault(token_bytes, token_id)
        self._next = max(self._next, token_id + 1)
        return token_id

    def id_of(self, token_bytes: bytes) -> int:
        """The id of these bytes, assigning the next free id the first time they are seen."""
        found = self._id_by_bytes.get(token_bytes)
        return self.add(self._next, token_bytes) if found is None else found

    def bytes_of(self, token_id: int) -> bytes:
        return self._bytes_by_id[token_id]

    def items(self) -> list[tuple[int, bytes]]:
        return sorted(self._bytes_by_id.items())


@dataclass
class TokenMap:
    """How one teacher vocabulary maps onto the student's, built by ``storage.alignment`` from token bytes.

    ``single[t]`` is the student id whose bytes equal teacher token ``t``'s, or -1. For a teacher token with no
    single student token, ``expand[t]`` spells its bytes as several student ids: an *actual* token is replaced by
    that spelling (teacher top-k attached to its first piece only), while a top-k *candidate* without a single
    student id is dropped from that position's top-k and counted as lost coverage.
    """

    single: np.ndarray  # int64 [V_teacher]
    expand: dict[int, np.ndarray]  # teacher id -> int64 student ids
