"""``PackedReader``: stream a snapshot's shards into fixed-length packed rows of torch tensors.

How rows are made (numpy, and the compiled loops of ``storage.kernels`` for the per-entry work; no Python loop
per token):

1. Each epoch orders the shards by a permutation of ``(seed, epoch)`` and reads them ``shuffle_window`` shards
   at a time (memory: one window of decoded shards plus one row of carry-over).
2. Each shard is mapped to the student's vocabulary with ``map_vocab(shard vocab bytes)``: an actual token with
   a single student id becomes it; one without is spelled as several student tokens (the teacher's top-k stays
   on the first piece); a top-k candidate without a single student id is dropped (counted in ``coverage``).
   Generate-mode records are prefixed by ``encode(prompt)`` (no teacher targets on prompt positions).
3. The window's documents are put in the order of a hash of their tokens, then shuffled by ``(seed, epoch)``
   (so a seed gives the same order of the same content whichever shard each record landed in, as long as the
   snapshot's shards fit in one window), and appended to one token stream; row ``r`` takes stream tokens
   ``[rS, rS + S]`` (inputs ``[rS, rS + S)``, labels shifted by one), so a document longer than a row continues
   in the next one. Positions and ``doc_ids`` restart at each document and at each row (attention never crosses
   a row). The teacher's top-k attached to a token is the target of the label that is that token.
4. Data parallelism: global batch ``b`` holds rows ``[b·B·D, (b+1)·B·D)``; rank ``i`` takes the ``B`` rows
   starting at ``b·B·D + i·B``. The last batch of an epoch is padded with empty rows (``loss_mask`` 0) so every
   rank sees the same number of batches. Every rank decodes each shard (cheap next to training) but gathers
   only its own rows. Epochs are independent (no carry between them), which makes the data
   position ``(epoch, batch)`` an exact resume point (``state_dict`` / ``load_state_dict``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from storage.codec import concat_ranges, segment_ids, segment_starts
from storage.kernels import equal_strings, fill_rows, gather_rows, lookup, pack_rows, sample_targets
from storage.records import TokenMap
from storage.schema import (
    META_HAS_LOGITS,
    META_HAS_TOKEN_LOGPROB,
    META_MAX_K,
    META_MAX_SAMPLES,
    SAMPLE_COLUMNS,
    TOKEN_COLUMNS,
    TOPK_COLUMNS,
    ShardArrays,
    binary_buffers,
)
from storage.shards import open_shard, read_shard_arrays
from storage.snapshot import Snapshot, load_snapshot

MapVocab = Callable[[list[bytes]], TokenMap]
Encode = Callable[[str], list[int]]


def identity_token_map(student_vocab: list[bytes]) -> MapVocab:
    """A ``map_vocab`` for a student whose tokens are byte strings (``student_vocab[id]``): a teacher token maps
    to the student id with the same bytes (the last such id); one without is spelled greedily (longest known
    prefix first), so a student vocabulary containing all 256 single bytes spells everything."""

    reversed_vocab = pa.array(student_vocab[::-1], pa.binary())  # index_in finds the first: the last id

    @cache
    def index() -> tuple[dict[bytes, int], int]:
        """Student id of every byte string and the longest one (built on the first token to spell)."""
        return {b: i for i, b in enumerate(student_vocab)}, max((len(b) for b in student_vocab), default=1)

    def spell(data: bytes) -> np.ndarray:
        ids, longest = index()
        pieces, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + longest), start, -1):
                if data[start:end] in ids:
                    pieces.append(ids[data[start:end]])
                    start = end
                    break
            else:
                raise ValueError(
                    f"teacher token {data!r}: byte {data[start : start + 1]!r} has no student token"
                )
        return np.array(pieces, dtype=np.int64)

    def map_vocab(teacher_vocab: list[bytes]) -> TokenMap:
        found = pc.index_in(pa.array(teacher_vocab, pa.binary()), value_set=reversed_vocab)
        found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        single = np.where(found >= 0, len(student_vocab) - 1 - found, -1)
        expand = {int(t): spell(teacher_vocab[t]) for t in np.flatnonzero(single < 0) if teacher_vocab[t]}
        return TokenMap(single=single, expand=expand)

    return map_vocab


class _StudentSpellings:
    """The student spelling of every teacher token this reader has met, in slots (one per token met).

    ``map_vocab`` sees each token once per reader, not once per shard: the shards of one teacher share most of
    their vocabulary. A shard's table finds its tokens' slots by teacher id, and a slot counts only if its bytes
    equal the table's (ids are the server's, or assigned by each collector run in its own order), checked in one
    compiled comparison; the rest are mapped as new. ``map_vocab`` must map each token on its bytes alone (it
    gets only the new ones). Memory grows with the teacher's vocabulary, not with the data.
    """

    def __init__(self, map_vocab: MapVocab) -> None:
        self.map_vocab = map_vocab
        self.known = pa.array([], pa.binary())  # slot -> token bytes
        self.single = np.zeros(0, np.int64)  # slot -> student id or -1
        self.expand: dict[int, np.ndarray] = {}  # slot -> student spelling
        self.slot_of_id = np.zeros(0, np.int64)  # teacher id -> latest slot with that id, -1: none

    def token_map(self, table: pa.BinaryArray, teacher_ids: np.ndarray, source: str) -> TokenMap:
        """The ``TokenMap`` of a shard's vocabulary table (its ranks -> student ids)."""
        if len(teacher_ids) and teacher_ids.max() >= len(self.slot_of_id):
            grown = np.full(int(teacher_ids.max()) + 1, -1, np.int64)
            grown[: len(self.slot_of_id)] = self.slot_of_id
            self.slot_of_id = grown
        slot = self.slot_of_id[teacher_ids]
        seen = np.flatnonzero(slot >= 0)
        if len(seen):
            same = np.empty(len(seen), bool)
            equal_strings(*binary_buffers(table), seen, *binary_buffers(self.known), slot[seen], same)
            slot[seen[~same]] = -1
        new = np.flatnonzero(slot < 0)
        if len(new):
            tokens = table.take(pa.array(new))
            mapped = self.map_vocab(tokens.to_pylist())
            if len(mapped.single) != len(new):
                raise ValueError(
                    f"{source}: map_vocab returned {len(mapped.single)} ids for {len(new)} tokens"
                )
            base = len(self.known)
            self.known = pa.concat_arrays([self.known, tokens])
            self.single = np.concatenate([self.single, np.asarray(mapped.single, dtype=np.int64)])
            self.expand.update({base + int(t): np.asarray(p, np.int64) for t, p in mapped.expand.items()})
            slot[new] = base + np.arange(len(new))
            self.slot_of_id[teacher_ids[new]] = slot[new]
        expand = {}
        if self.expand:
            expanded = np.flatnonzero(np.isin(slot, np.fromiter(self.expand, np.int64, len(self.expand))))
            expand = {int(t): self.expand[int(slot[t])] for t in expanded}
        return TokenMap(single=self.single[slot], expand=expand)


@dataclass
class Coverage:
    """Teacher candidates kept / dropped by the vocabulary mapping, and actual tokens spelled in pieces."""

    kept: int = 0
    dropped: int = 0
    expanded_tokens: int = 0

    @property
    def fraction_kept(self) -> float:
        total = self.kept + self.dropped
        return self.kept / total if total else 1.0


@dataclass
class _Table:
    """A dense top-k table: row ``r`` holds one token's K teacher entries (-1 / -inf padding), in student ids,
    and, when the reader wants them, its sampled target (M entries) and the actual token's teacher logprob."""

    ids: np.ndarray  # int32 or int64 [R, K]
    logprobs: np.ndarray  # float32 [R, K]
    logits: np.ndarray | None = None  # float32 [R, K]
    sample_ids: np.ndarray | None = None  # int32 or int64 [R, M], -1 pad
    sample_weights: np.ndarray | None = None  # float32 [R, M]
    actual_logprob: np.ndarray | None = None  # float32 [R, 1], NaN: unknown


# the optional per-label tables: (fill value where a label has none, dtype)
_EXTRAS = {
    "sample_ids": (-1, np.int64),
    "sample_weights": (0.0, np.float32),
    "actual_logprob": (np.nan, np.float32),
}


def _gather_extras(tables: list[_Table], rows: np.ndarray, widths: dict[str, int]) -> dict[str, np.ndarray]:
    """Like ``_gather`` for the optional tables named in ``widths`` (name -> width): ``rows.shape + (width,)``
    arrays, the fill value of ``_EXTRAS`` on rows without targets and on tables without that extra."""
    flat = rows.reshape(-1)
    out = {}
    for name, width in widths.items():
        fill, dtype = _EXTRAS[name]
        values = np.full((len(flat), width), fill, dtype)
        first = 0
        for table in tables:
            part = getattr(table, name)
            if part is not None:
                gather_rows(part, first, flat, values)
            first += len(table.ids)
        out[name] = values.reshape(*rows.shape, width)
    return out


def _gather(tables: list[_Table], rows: np.ndarray, k: int, with_logits: bool):
    """Rows of the tables laid end to end (``rows`` index that concatenation; -1: no targets) as dense arrays
    ``rows.shape + (k,)``: (ids int64, logprobs float32, logits float32 or None). The tables are never
    concatenated (a window's tables are tens of MB): each fills the rows it holds."""
    flat = rows.reshape(-1)
    shape = (*rows.shape, k)
    ids, logprobs = np.empty((len(flat), k), np.int64), np.empty((len(flat), k), np.float32)
    fill_rows(flat, ids, -1)
    fill_rows(flat, logprobs, -np.inf)
    logits = np.full((len(flat), k), np.nan, np.float32) if with_logits else None
    first = 0
    for table in tables:
        gather_rows(table.ids, first, flat, ids)
        gather_rows(table.logprobs, first, flat, logprobs)
        if logits is not None and table.logits is not None:
            gather_rows(table.logits, first, flat, logits)
        first += len(table.ids)
    return ids.reshape(shape), logprobs.reshape(shape), None if logits is None else logits.reshape(shape)


@dataclass
class _Docs:
    """Documents in the student's vocabulary: tokens, each pointing at a row of the top-k tables.

    ``row[t]`` indexes the rows of ``tables`` laid end to end (-1: a token without targets). Reordering
    documents only reorders the per-token arrays, and a batch gathers whole table rows (the decoded shard
    arrays themselves when every position has k entries).
    """

    doc_offsets: np.ndarray  # [D + 1] into the tokens
    tokens: np.ndarray  # int64 [L]
    row: np.ndarray  # int64 [L] into the tables, -1: no targets
    tables: list[_Table]

    def take(self, order: np.ndarray) -> _Docs:
        lengths = np.diff(self.doc_offsets)[order]
        index = concat_ranges(self.doc_offsets[:-1][order], lengths)
        return _Docs(segment_starts(lengths), self.tokens[index], self.row[index], self.tables)

    def content_order(self, first: int) -> np.ndarray:
        """Indices of documents ``first..D-1`` sorted by a hash of their tokens: an order that depends on what
        the documents hold, not on which shard (or position in it) the collector happened to put them."""
        starts, ends = self.doc_offsets[first:-1], self.doc_offsets[first + 1 :]
        keys = [
            hashlib.blake2b(self.tokens[a:b].tobytes(), digest_size=16).digest()
            for a, b in zip(starts, ends, strict=True)
        ]
        return first + np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)

    def tail(self, start: int, k: int, with_logits: bool, extras: dict[str, int]) -> _Docs:
        """Tokens from ``start`` on, as one document, with their table rows copied into one compact table."""
        rows = self.row[start:]
        present = rows >= 0
        table = _Table(*_gather(self.tables, rows[present], k, with_logits))
        for name, values in _gather_extras(self.tables, rows[present], extras).items():
            setattr(table, name, values)
        return _Docs(
            np.array([0, len(rows)]),
            self.tokens[start:],
            np.where(present, np.cumsum(present) - 1, -1),
            [table],
        )

    @staticmethod
    def concat(parts: list[_Docs]) -> _Docs:
        """The parts' documents in order (their tables are listed, not copied)."""
        doc_offsets, rows, doc_base, row_base = [np.zeros(1, np.int64)], [], 0, 0
        for p in parts:
            doc_offsets.append(p.doc_offsets[1:] + doc_base)
            rows.append(np.where(p.row >= 0, p.row + row_base, -1))
            doc_base += len(p.tokens)
            row_base += sum(len(t.ids) for t in p.tables)
        return _Docs(
            np.concatenate(doc_offsets),
            np.concatenate([p.tokens for p in parts]),
            np.concatenate(rows),
            [t for p in parts for t in p.tables],
        )


def _spelling_table(token_map: TokenMap) -> tuple[np.ndarray, np.ndarray]:
    """Every teacher rank's student spelling as (offsets [V+1], values): one id, or the expansion."""
    lengths = np.ones(len(token_map.single), dtype=np.int64)
    for t, pieces in token_map.expand.items():
        if token_map.single[t] < 0:
            lengths[t] = len(pieces)
    offsets = segment_starts(lengths)
    values = np.repeat(token_map.single.astype(np.int64), lengths)
    for t, pieces in token_map.expand.items():
        if token_map.single[t] < 0:
            values[offsets[t] : offsets[t + 1]] = pieces
    return offsets, values


def _dense_topk(shard: ShardArrays, single: np.ndarray, top_k: int, coverage: Coverage):
    """The shard's top-k in student ids as dense ``[max(P, 1), top_k]`` tables (-1 / -inf padding).

    Candidates without a single student id are dropped (and counted); the rest keep their order (decreasing
    logprob), so truncating to ``top_k`` keeps the most likely. Returns (ids int32, logprobs, logits or None).
    """
    k = shard.k
    positions = len(k)
    mapped = np.empty(len(shard.topk_ids), np.int32)
    lookup(single, shard.topk_ids, mapped)
    every_id_maps = bool((single >= 0).all())  # (checked on the vocabulary, not on every entry)
    kept = len(mapped) if every_id_maps else int((mapped >= 0).sum())
    coverage.kept += kept
    coverage.dropped += len(mapped) - kept
    width = int(k.max()) if positions else 0
    if every_id_maps and positions and k.min() == width >= top_k:  # fixed k, nothing dropped: views

        def view(a):
            return None if a is None else a.reshape(positions, width)[:, :top_k]

        return view(mapped), view(shard.topk_logprobs), view(shard.topk_logits)
    rows = max(positions, 1)
    ids = np.full((rows, top_k), -1, dtype=np.int32)
    logprobs = np.full((rows, top_k), -np.inf, dtype=np.float32)
    logits = None if shard.topk_logits is None else np.full((rows, top_k), np.nan, np.float32)
    keep = mapped >= 0
    position = segment_ids(k)
    kept_start = segment_starts(np.bincount(position[keep], minlength=positions))[:-1]
    column = np.cumsum(keep) - keep - kept_start[position]
    keep &= column < top_k
    target = (position[keep], column[keep])
    ids[target] = mapped[keep]
    logprobs[target] = shard.topk_logprobs[keep]
    if logits is not None:
        logits[target] = shard.topk_logits[keep]
    return ids, logprobs, logits


def _sampled_targets(shard: ShardArrays, single: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per position, the unbiased sparse estimate of the teacher's distribution in student ids (``[P, width]``
    ids and weights; see ``storage.kernels.sample_targets``): every stored top-k entry (not truncated to the
    reader's ``top_k``, whose dropped entries would otherwise lose their mass) plus the residual mass spread
    over the tail samples. Candidates without a single student id are left out and the rest renormalised."""
    positions = max(len(shard.tokens), 1)
    ids = np.full((positions, width), -1, np.int32)
    weights = np.zeros((positions, width), np.float32)
    if shard.sample_offsets is None:
        return ids, weights
    mapped_topk = np.empty(len(shard.topk_ids), np.int32)
    lookup(single, shard.topk_ids, mapped_topk)
    mapped_samples = np.empty(len(shard.sample_ids), np.int32)
    lookup(single, shard.sample_ids, mapped_samples)
    sample_targets(
        shard.entry_offsets, mapped_topk, shard.topk_logprobs, shard.sample_offsets, mapped_samples,
        shard.sample_counts, ids, weights,
    )  # fmt: skip
    return ids, weights


def shard_to_docs(
    shard: ShardArrays,
    token_map: TokenMap,
    encode: Encode | None,
    top_k: int,
    coverage: Coverage,
    source: str,
    sample_width: int | None = None,
    with_actual: bool = False,
) -> _Docs:
    """Map one decoded shard to student-vocabulary documents (one per row); ``sample_width`` (M) adds the
    sampled targets, ``with_actual`` the actual tokens' teacher logprobs."""
    if len(token_map.single) != len(shard.vocab_table):
        raise ValueError(
            f"{source}: map_vocab returned {len(token_map.single)} ids for {len(shard.vocab_table)} tokens"
        )
    single = np.asarray(token_map.single, dtype=np.int64)
    ids, logprobs, logits = _dense_topk(shard, single.astype(np.int32), top_k, coverage)
    row = np.arange(len(shard.tokens), dtype=np.int64)  # position p -> table row p
    table = _Table(ids, logprobs, logits)
    if sample_width is not None:
        table.sample_ids, table.sample_weights = _sampled_targets(
            shard, single.astype(np.int32), sample_width
        )
    if with_actual:
        table.actual_logprob = np.full((max(len(shard.tokens), 1), 1), np.nan, np.float32)
        if shard.token_logprobs is not None:
            table.actual_logprob[: len(shard.tokens), 0] = shard.token_logprobs

    # actual tokens: spell in student ids; the top-k stays on the first piece
    tokens = single[shard.tokens]
    row_offsets = shard.row_offsets
    unmapped = np.flatnonzero(tokens < 0)
    if len(unmapped):
        missing = {int(t) for t in np.unique(shard.tokens[unmapped]) if int(t) not in token_map.expand}
        if missing:
            sample = sorted(shard.vocab_table[t].as_py() for t in missing)[:5]
            raise ValueError(f"{source}: teacher tokens with no student spelling: {sample}")
        spell_offsets, spell_values = _spelling_table(token_map)
        pieces = np.diff(spell_offsets)[shard.tokens]
        coverage.expanded_tokens += int((pieces > 1).sum())
        if table.actual_logprob is not None:  # the label is the first piece, not the teacher's whole token
            table.actual_logprob[: len(pieces), 0][pieces > 1] = np.nan
        tokens = spell_values[concat_ranges(spell_offsets[:-1][shard.tokens], pieces)]
        first = segment_starts(pieces)
        spread = np.full(len(tokens), -1, dtype=np.int64)  # later pieces: no targets
        spread[first[:-1]] = row
        row, row_offsets = spread, first[row_offsets]

    modes = shard.table.column("mode").to_pylist()
    if "generate" in modes:  # prefix the prompt's student tokens, which carry no teacher targets
        if encode is None:
            raise ValueError(f"{source}: generate-mode records need `encode` for their prompts")
        prompts = shard.table.column("prompt").to_pylist()
        prefix = [
            np.asarray(encode(p), np.int64) if m == "generate" else np.zeros(0, np.int64)
            for p, m in zip(prompts, modes, strict=True)
        ]
        prefix_lengths = np.array([len(p) for p in prefix], dtype=np.int64)
        doc_offsets = segment_starts(prefix_lengths + np.diff(row_offsets))
        is_prefix = np.zeros(int(doc_offsets[-1]), bool)
        is_prefix[concat_ranges(doc_offsets[:-1], prefix_lengths)] = True
        merged = np.full((2, len(is_prefix)), -1, dtype=np.int64)
        merged[0, is_prefix] = np.concatenate(prefix) if prefix else np.zeros(0, np.int64)
        merged[:, ~is_prefix] = np.stack([tokens, row])
        tokens, row = merged
    else:
        doc_offsets = row_offsets - row_offsets[0]
    return _Docs(doc_offsets, tokens, row, [table])


@dataclass
class _Stream:
    """Tokens waiting to be cut into rows, with a document id per token (-1: padding)."""

    docs: _Docs
    doc_of_token: np.ndarray


def _pad_docs(n: int) -> _Docs:
    """``n`` padding tokens (no targets)."""
    return _Docs(np.array([0, n]), np.zeros(n, np.int64), np.full(n, -1, np.int64), [])


@dataclass
class ReaderState:
    epoch: int = 0
    batch: int = 0  # batches already yielded in this epoch


@dataclass
class PackedReader:
    """Packed training batches from a snapshot; see the module docstring for the layout.

    ``epochs=None`` repeats forever. ``top_k`` fixes K (default: the largest k of the snapshot's shards).
    Yields dicts of tensors: tokens, labels, loss_mask, soft_mask, topk_ids, topk_logprobs, position_ids,
    doc_ids (+ topk_logits when any shard holds raw logits; + sample_ids / sample_weights [B, S, M] when any
    shard holds tail samples, M = largest stored k + most distinct samples at a position; + actual_logprob
    [B, S] when any shard holds the actual tokens' logprobs).
    """

    snapshot: Snapshot | str | Path
    seq_len: int
    micro_batch_size: int
    map_vocab: MapVocab
    encode: Encode | None = None
    seed: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    epochs: int | None = 1
    shuffle: bool = True
    shuffle_window: int = 4
    top_k: int | None = None
    pad_id: int = 0
    coverage: Coverage = field(default_factory=Coverage)

    def __post_init__(self) -> None:
        if not isinstance(self.snapshot, Snapshot):
            self.snapshot = load_snapshot(self.snapshot)
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} outside [0, {self.dp_size})")
        if self.seq_len < 1 or self.micro_batch_size < 1 or self.shuffle_window < 1:
            raise ValueError("seq_len, micro_batch_size and shuffle_window must be positive")
        max_k, max_samples, self.with_logits, self.with_actual = 0, None, False, False
        for shard in self.snapshot.shards:
            shard.check()
            metadata = open_shard(shard.path).schema_arrow.metadata or {}
            max_k = max(max_k, int(metadata.get(META_MAX_K, b"0")))
            self.with_logits |= metadata.get(META_HAS_LOGITS) == b"1"
            self.with_actual |= metadata.get(META_HAS_TOKEN_LOGPROB) == b"1"
            if META_MAX_SAMPLES in metadata:
                max_samples = max(max_samples or 0, int(metadata[META_MAX_SAMPLES]))
        self.k = max(1, self.top_k if self.top_k is not None else max_k)
        self.sample_width = None if max_samples is None else max(1, max_k + max_samples)
        self._columns = ["mode", "prompt", *TOKEN_COLUMNS, *TOPK_COLUMNS]
        if self.with_logits:
            self._columns.append("topk_logits")
        if self.sample_width is not None:
            self._columns += SAMPLE_COLUMNS
        if self.with_actual:
            self._columns.append("token_logprob")
        self._extras = {}
        if self.sample_width is not None:
            self._extras.update(sample_ids=self.sample_width, sample_weights=self.sample_width)
        if self.with_actual:
            self._extras["actual_logprob"] = 1
        self._state = ReaderState()
        self._spellings = _StudentSpellings(self.map_vocab)

    # --- data position -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int | str]:
        """The data position after the last yielded batch; ``load_state_dict`` resumes exactly there."""
        return {"epoch": self._state.epoch, "batch": self._state.batch, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        expected = self._layout()
        differs = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        if differs:
            raise ValueError(f"reader state was saved with another data layout (saved, now): {differs}")
        self._state = ReaderState(int(state["epoch"]), int(state["batch"]))

    def _layout(self) -> dict[str, int | str | bool]:
        """What fixes the batch sequence: resuming is exact only if all of it is unchanged."""
        return {
            "snapshot": self.snapshot.content_hash,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
            "top_k": self.k,
        }

    # --- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self.epochs is None or self._state.epoch < self.epochs:
            skip, produced = self._state.batch, 0
            for batch in self._epoch(self._state.epoch, skip):
                produced += 1
                self._state.batch = skip + produced
                yield batch
            self._state = ReaderState(self._state.epoch + 1, 0)
            if produced == 0 and skip == 0:
                return  # no tokens at all: an endless reader would spin forever

    def _docs_of(self, shard_index: int) -> _Docs:
        shard = self.snapshot.shards[shard_index]
        arrays = read_shard_arrays(shard.path, shard.rows, columns=self._columns)
        token_map = self._spellings.token_map(arrays.vocab_table, arrays.vocab_ids, str(shard.path))
        return shard_to_docs(
            arrays, token_map, self.encode, self.k, self.coverage, str(shard.path), self.sample_width,
            self.with_actual,
        )  # fmt: skip

    def _epoch(self, epoch: int, skip_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.snapshot.shards)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        rows_per_batch = self.micro_batch_size * self.dp_size
        own_start = self.dp_rank * self.micro_batch_size
        carry = _Stream(_pad_docs(0), np.zeros(0, np.int64))
        next_doc, row, pending = 0, 0, []
        batch_index = 0
        for w in range(0, n, self.shuffle_window):
            rng = np.random.default_rng([self.seed, epoch, 1, w])  # the same whatever the number of shards
            parts = [self._docs_of(i) for i in order[w : w + self.shuffle_window]]
            count = sum(len(p.doc_offsets) - 1 for p in parts)
            docs = _Docs.concat([carry.docs, *parts])
            if self.shuffle:  # the carry (document 0 here) stays first; a seed gives one order of the content
                docs = docs.take(np.concatenate([[0], docs.content_order(1)[rng.permutation(count)]]))
            new_lengths = np.diff(docs.doc_offsets)[1:]
            doc_of_token = np.repeat(np.arange(next_doc, next_doc + count), new_lengths)
            stream = _Stream(docs, np.concatenate([carry.doc_of_token, doc_of_token]))
            next_doc += count
            full = (len(stream.docs.tokens) - 1) // self.seq_len if len(stream.docs.tokens) else 0
            starts = np.arange(full, dtype=np.int64) * self.seq_len
            for start in starts:
                if (row % rows_per_batch) - own_start in range(self.micro_batch_size):
                    pending.append(start)
                row += 1
                if row % rows_per_batch == 0:
                    if batch_index >= skip_batches:
                        yield self._batch(stream, pending)
                    pending, batch_index = [], batch_index + 1
            cut = full * self.seq_len
            carry = self._slice(stream, cut)
            # rows of the unfinished batch refer to this window's stream: materialise them now
            pending = [p if isinstance(p, dict) else self._materialize(stream, [p]) for p in pending]
        # the rest of the epoch: one padded row from the carry, then pad the last batch
        if len(carry.docs.tokens) > 1:
            padded = self._pad(carry)
            if (row % rows_per_batch) - own_start in range(self.micro_batch_size):
                pending.append(self._materialize(padded, [0]))
            row += 1
            if row % rows_per_batch == 0:
                if batch_index >= skip_batches:
                    yield self._batch(None, pending)
                pending, batch_index = [], batch_index + 1
        if row % rows_per_batch and batch_index >= skip_batches:
            yield self._batch(None, pending)

    def _pad(self, carry: _Stream) -> _Stream:
        """The carry followed by padding up to one row (``seq_len + 1`` tokens)."""
        n = self.seq_len + 1 - len(carry.docs.tokens)
        docs = _Docs.concat([carry.docs, _pad_docs(n)])
        return _Stream(docs, np.concatenate([carry.doc_of_token, np.full(n, -1, np.int64)]))

    def _slice(self, stream: _Stream, start: int) -> _Stream:
        docs = stream.docs.tail(start, self.k, self.with_logits, self._extras)
        return _Stream(docs, stream.doc_of_token[start:])

    def _materialize(self, stream: _Stream, starts: list[int]) -> dict[str, np.ndarray]:
        """Rows starting at ``starts`` of the stream as numpy arrays [R, S(, K)]."""
        shape = (len(starts), self.seq_len)
        out = {
            key: np.empty(shape, _DTYPES[key])
            for key in ("tokens", "labels", "loss_mask", "position_ids", "doc_ids")
        }
        rows = np.empty(shape, np.int64)  # the top-k table row of each label, -1: none
        d = stream.docs
        starts = np.asarray(starts, dtype=np.int64)
        pack_rows(d.tokens, stream.doc_of_token, d.row, starts, self.pad_id, out["tokens"], out["labels"],
                  out["loss_mask"], rows, out["position_ids"], out["doc_ids"])  # fmt: skip
        out["topk_ids"], out["topk_logprobs"], logits = _gather(d.tables, rows, self.k, self.with_logits)
        out["soft_mask"] = out["topk_ids"][..., 0] >= 0
        if self.with_logits:
            out["topk_logits"] = logits
        out.update(_gather_extras(d.tables, rows, self._extras))
        if "actual_logprob" in out:
            out["actual_logprob"] = out["actual_logprob"][..., 0]
        return out

    def _batch(self, stream: _Stream | None, pending: list) -> dict[str, torch.Tensor]:
        """Stack the rank's pending rows (starts in ``stream`` or already materialised) and pad to B rows."""
        starts = [p for p in pending if not isinstance(p, dict)]
        parts = [p for p in pending if isinstance(p, dict)]
        if starts:
            parts.append(self._materialize(stream, starts))
        missing = self.micro_batch_size - sum(len(p["tokens"]) for p in parts)
        if missing > 0:
            parts.append(self._empty_rows(missing))
        batch = {
            key: np.concatenate([p[key] for p in parts]) if len(parts) > 1 else parts[0][key]
            for key in parts[0]
        }
        return {
            key: torch.from_numpy(np.ascontiguousarray(value.astype(_DTYPES[key], copy=False)))
            for key, value in batch.items()
        }

    def _empty_rows(self, n: int) -> dict[str, np.ndarray]:
        S, K = self.seq_len, self.k
        out = {
            "tokens": np.full((n, S), self.pad_id, np.int64),
            "labels": np.full((n, S), self.pad_id, np.int64),
            "loss_mask": np.zeros((n, S), np.float32),
            "soft_mask": np.zeros((n, S), bool),
            "topk_ids": np.full((n, S, K), -1, np.int64),
            "topk_logprobs": np.full((n, S, K), -np.inf, np.float32),
            "position_ids": np.zeros((n, S), np.int64),
            "doc_ids": np.full((n, S), -1, np.int64),
        }
        if self.with_logits:
            out["topk_logits"] = np.full((n, S, K), np.nan, np.float32)
        for name, width in self._extras.items():
            fill, dtype = _EXTRAS[name]
            out[name] = np.full((n, S, width) if name != "actual_logprob" else (n, S), fill, dtype)
        return out


_DTYPES = {
    "tokens": np.int64,
    "labels": np.int64,
    "loss_mask": np.float32,
    "soft_mask": np.bool_,
    "topk_ids": np.int64,
    "topk_logprobs": np.float32,
    "position_ids": np.int64,
    "doc_ids": np.int64,
    "topk_logits": np.float32,
    **{name: dtype for name, (_, dtype) in _EXTRAS.items()},
}
