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
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.codec import concat_ranges, segment_starts
from storage.kernels import gather_ranges

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
    """Token bytes <-> teacher id. Grows as a collector meets new tokens; ``add`` pins a server-given id.

    Single lookups and additions are dict operations. For whole tables the bytes are also kept in one growing
    byte array with an offset and a length per id (-1: no such id), appended to lazily, so a shard writer takes
    the bytes of tens of thousands of ids with a few numpy gathers (``table``), and a collector pins a batch of
    new ids with one call (``add_many``), without a Python step per token. Not for concurrent use by threads
    (``table`` and ``add_many`` update the arrays).
    """

    def __init__(self) -> None:
        self._bytes_by_id: dict[int, bytes] = {}
        self._id_by_bytes: dict[bytes, int] = {}
        self._next = 0
        self._data = np.zeros(0, np.uint8)  # bytes of every id in the arrays, in order of arrival
        self._size = 0  # bytes used in ``_data`` (its capacity grows by doubling)
        self._offsets = np.zeros(0, np.int64)  # indexed by id
        self._lengths = np.zeros(0, np.int64)  # indexed by id; -1: not (yet) in the arrays
        self._pending: list[int] = []  # ids added one at a time since the arrays were last brought up to date

    def __len__(self) -> int:
        return len(self._bytes_by_id)

    def add(self, token_id: int, token_bytes: bytes) -> int:
        known = self._bytes_by_id.get(token_id)
        if known is not None:
            if known != token_bytes:
                raise ValueError(
                    f"teacher token id {token_id} seen with two byte strings: {known!r} and {token_bytes!r}"
                )
            return token_id
        if token_id < 0:
            raise ValueError(f"teacher token id {token_id} is negative")
        self._bytes_by_id[token_id] = token_bytes
        self._id_by_bytes.setdefault(token_bytes, token_id)
        self._next = max(self._next, token_id + 1)
        self._pending.append(token_id)
        return token_id

    def add_many(self, ids: np.ndarray, token_bytes: list[bytes]) -> None:
        """``add(ids[i], token_bytes[i])`` for every ``i`` in order, without a Python step per id. On a conflict
        it raises ``add``'s ValueError for the first conflicting ``i`` and adds nothing."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(token_bytes):
            raise ValueError(f"add_many: {len(ids)} ids but {len(token_bytes)} byte strings")
        if not len(ids):
            return
        if ids.min() < 0:
            raise ValueError(f"teacher token id {int(ids.min())} is negative")
        self._sync(int(ids.max()) + 1)
        lengths = np.fromiter(map(len, token_bytes), np.int64, count=len(token_bytes))
        starts = segment_starts(lengths)
        batch = np.frombuffer(b"".join(token_bytes), np.uint8)
        known = self._lengths[ids] >= 0
        order = np.argsort(ids, kind="stable")
        repeated = np.zeros(len(ids), np.bool_)  # an id already met earlier in the batch
        repeated[order[1:]] = ids[order[1:]] == ids[order[:-1]]
        if known.any() or repeated.any():
            self._check_many(ids, token_bytes, lengths, starts, batch, known, order, repeated)
        new = np.flatnonzero(~known & ~repeated)
        if not len(new):
            return
        if len(new) < len(ids):  # (the usual caller passes only new ids: then the batch goes in as it is)
            token_bytes = [token_bytes[i] for i in new.tolist()]
            ids, lengths, batch = ids[new], lengths[new], batch[concat_ranges(starts[new], lengths[new])]
        self._append(ids, lengths, batch)
        id_list = ids.tolist()
        self._bytes_by_id.update(zip(id_list, token_bytes, strict=True))
        deque(map(self._id_by_bytes.setdefault, token_bytes, id_list), maxlen=0)
        self._next = max(self._next, max(id_list) + 1)

    def _check_many(
        self,
        ids: np.ndarray,
        token_bytes: list[bytes],
        lengths: np.ndarray,
        starts: np.ndarray,
        batch: np.ndarray,
        known: np.ndarray,
        order: np.ndarray,
        repeated: np.ndarray,
    ) -> None:
        """``add_many``'s conflict check: each entry's bytes against the vocabulary's for a known id, else
        against the id's first entry in the batch."""
        first = np.empty(len(ids), np.int64)  # index of each id's first entry in the batch
        group = np.cumsum(~repeated[order]) - 1
        first[order] = order[~repeated[order]][group]
        ref_start = np.where(known, self._offsets[ids], starts[:-1][first])
        ref_length = np.where(known, self._lengths[ids], lengths[first])
        check = known | repeated
        conflict = check & (ref_length != lengths)
        same_length = np.flatnonzero(check & ~conflict)
        if len(same_length):
            n = lengths[same_length]
            where = concat_ranges(ref_start[same_length], n)
            in_vocab = np.repeat(known[same_length], n)
            ref = np.empty(len(where), np.uint8)
            ref[in_vocab] = self._data[where[in_vocab]]
            ref[~in_vocab] = batch[where[~in_vocab]]
            mine = batch[concat_ranges(starts[same_length], n)]
            differs = np.bincount(np.repeat(np.arange(len(n)), n), weights=mine != ref, minlength=len(n))
            conflict[same_length[differs > 0]] = True
        if conflict.any():
            i = int(np.argmax(conflict))
            known_bytes = self._bytes_by_id[int(ids[i])] if known[i] else token_bytes[int(first[i])]
            raise ValueError(
                f"teacher token id {int(ids[i])} seen with two byte strings: {known_bytes!r} and {token_bytes[i]!r}"
            )

    def _reserve(self, ids_end: int, data_end: int) -> None:
        """Grow the arrays (at least doubling) to cover ids below ``ids_end`` and ``data_end`` bytes."""
        if ids_end > len(self._lengths):
            grow = max(ids_end, 2 * len(self._lengths), 1024) - len(self._lengths)
            self._offsets = np.concatenate([self._offsets, np.zeros(grow, np.int64)])
            self._lengths = np.concatenate([self._lengths, np.full(grow, -1, np.int64)])
        if data_end > len(self._data):
            grown = np.zeros(max(data_end, 2 * len(self._data), 1 << 16), np.uint8)
            grown[: self._size] = self._data[: self._size]
            self._data = grown

    def _append(self, ids: np.ndarray, lengths: np.ndarray, data: np.ndarray) -> None:
        """Put ids new to the arrays and their bytes (``data``: concatenated in the order of ``ids``) there."""
        end = self._size + len(data)
        self._reserve(int(ids.max()) + 1, end)
        self._data[self._size : end] = data
        self._offsets[ids] = self._size + segment_starts(lengths)[:-1]
        self._lengths[ids] = lengths
        self._size = end

    def _sync(self, ids_end: int = 0) -> None:
        """Bring the arrays up to date with ``add``'s ids and make them cover ids below ``ids_end``."""
        if self._pending:
            ids, self._pending = self._pending, []
            pending = list(map(self._bytes_by_id.__getitem__, ids))
            lengths = np.fromiter(map(len, pending), np.int64, count=len(pending))
            self._append(np.array(ids, np.int64), lengths, np.frombuffer(b"".join(pending), np.uint8))
        self._reserve(ids_end, 0)

    def id_of(self, token_bytes: bytes) -> int:
        """The id of these bytes, assigning the next free id the first time they are seen."""
        found = self._id_by_bytes.get(token_bytes)
        return self.add(self._next, token_bytes) if found is None else found

    def bytes_of(self, token_id: int) -> bytes:
        return self._bytes_by_id[token_id]

    def table(self, ids: np.ndarray) -> tuple[np.ndarray, bytes]:
        """(lengths int64 [n], the concatenated bytes) of ``ids``, as ``bytes_of`` of each would give them;
        KeyError (the first unknown id) when one is not in the vocabulary."""
        self._sync()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        lengths = np.full(len(ids), -1, np.int64)
        inside = (ids >= 0) & (ids < len(self._lengths))
        lengths[inside] = self._lengths[ids[inside]]
        missing = lengths < 0
        if missing.any():
            raise KeyError(int(ids[np.argmax(missing)]))
        data = np.empty(int(lengths.sum()), np.uint8)
        gather_ranges(self._data, self._offsets[ids], lengths, data)
        return lengths, data.tobytes()

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
