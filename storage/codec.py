"""Pure encoders of the per-position top-k: logprob quantization (``q16``), frequency ranks of ids, KL error.

All functions work on *flat* arrays: the entries of every position of a shard, concatenated in position order,
with ``k[p]`` entries for position ``p`` (sorted by decreasing logprob). No Python loop per position.

The ``q16`` logprob code
------------------------
KL between a distribution and a slightly perturbed one is, to second order, ``2 Σ (Δ√p)²`` over the bins, so a
quantizer uniform in ``√p`` spends its bits where they matter (high-rate quantization theory; the Fisher
metric). Uniform in ``√p`` alone gives tiny probabilities a relative error that explodes, so below ``p0`` the
code turns linear in ``log p`` (step ``s0/√p0`` nats). With ``s0 = 2⁻⁷`` and ``p0 = 1e-3`` one code step is
``2⁻⁸`` in ``√p`` and at most 0.25 nats below ``p0``.

Codes are monotone in the logprob, so within a position (sorted by decreasing logprob) they never decrease and
are stored as non-negative deltas (small numbers that zstd packs well). The teacher's residual mass
``r = 1 − Σ p`` is coded with the same function as a "tail" code per position, and decoding normalises the
``k + 1`` bins jointly: the decoded top-k mass is always ``≤ 1`` and the residual keeps its relative accuracy
even when it is tiny (naive per-entry rounding made the decoded mass exceed 1 and the tail KL blow up).
Measured KL over the ``k + 1`` bins (``benchmarks/storage.py``): mean ≈ 5e-5, max ≈ 1e-4 nats at k = 20;
the worst case is bounded by about ``2 (k + 1) (2⁻⁹)²`` ≈ 1.6e-4 nats.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from storage.kernels import count_values, decode_q16_entries, encode_q16_entries, lookup

LOGPROB_FLOOR = -80.0  # logprobs below this are stored as this (p < 2e-35 carries no mass worth a bit)
OPENAI_SENTINEL = -9999.0  # "not returned" logprob: such an entry is padding, never data
RESIDUAL_RESOLUTION = 1e-7  # smallest residual mass a sum of float32 probabilities resolves
TAIL_NONE = 65535  # tail code: the top-k carries all the mass (r = 0)
Q16_BLOCK = 1 << 16  # entries the q16 encoder takes at a time (its float64 temporaries: 2 × 512 KiB)


@dataclass(frozen=True)
class Q16Params:
    """Parameters of the ``q16`` code; stored in every shard's metadata so old shards decode after a change."""

    s0: float = 2.0**-7
    p0: float = 1e-3
    floor: float = LOGPROB_FLOOR

    def to_dict(self) -> dict[str, float]:
        return {"s0": self.s0, "p0": self.p0, "floor": self.floor}


def _code_float(logprob: np.ndarray, params: Q16Params) -> np.ndarray:
    """The continuous code: 0 at logprob 0, increasing as the logprob decreases."""
    lp = np.clip(logprob.astype(np.float64), params.floor, 0.0)
    l0 = np.log(params.p0)
    sqrt_p0 = np.sqrt(params.p0)
    upper = (2.0 - 2.0 * np.exp(np.maximum(lp, l0) / 2.0)) / params.s0
    lower = sqrt_p0 * (l0 - np.minimum(lp, l0)) / params.s0
    return upper + lower


def encode_codes(logprob: np.ndarray, params: Q16Params) -> np.ndarray:
    return np.rint(_code_float(logprob, params)).astype(np.int64)


@cache
def code_tables(params: Q16Params) -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables code -> (logprob, probability) in float64; decoding is a gather, not a log/exp."""
    n = int(encode_codes(np.array([params.floor]), params)[0]) + 2
    codes = np.arange(n, dtype=np.float64)
    l0 = np.log(params.p0)
    c0 = (2.0 - 2.0 * np.sqrt(params.p0)) / params.s0
    upper = 2.0 * np.log(np.clip(1.0 - codes * params.s0 / 2.0, 1e-300, None))
    lower = l0 - (codes - c0) * params.s0 / np.sqrt(params.p0)
    logprob = np.where(codes <= c0, upper, lower)
    return logprob, np.exp(logprob)


def segment_ids(k: np.ndarray) -> np.ndarray:
    """For flat entries grouped by position: the position index of every entry."""
    return np.repeat(np.arange(len(k), dtype=np.int64), k)


def segment_starts(k: np.ndarray) -> np.ndarray:
    """Offsets ``[P + 1]`` of each position's first entry."""
    offsets = np.zeros(len(k) + 1, dtype=np.int64)
    np.cumsum(k, out=offsets[1:])
    return offsets


def concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without the Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - segment_starts(lengths)[:-1]
    return np.repeat(shift, lengths) + np.arange(total, dtype=np.int64)


def sort_positions(ids: np.ndarray, logprob: np.ndarray, extra: np.ndarray | None = None):
    """Sort each row of padded ``[P, K]`` arrays by decreasing logprob, padding (-1 id, -inf or OpenAI's -9999
    sentinel) last.

    Returns ``(ids, logprob, extra, k)`` still padded, plus the count of real entries per row. Rows that are
    already in that order (what the parsers give) are returned as they are, without a sort.
    """
    valid = (ids >= 0) & np.isfinite(logprob) & (logprob > OPENAI_SENTINEL)
    key = np.where(valid, logprob, -np.inf)
    k = valid.sum(axis=1)
    if (key[:, 1:] <= key[:, :-1]).all():  # a stable sort would keep every row as it is
        return ids, logprob, extra, k
    order = np.argsort(-key, axis=1, kind="stable")
    take = np.take_along_axis
    sorted_extra = None if extra is None else take(extra, order, axis=1)
    return take(ids, order, 1), take(logprob, order, 1), sorted_extra, k


def encode_q16(logprob: np.ndarray, k: np.ndarray, params: Q16Params) -> tuple[np.ndarray, np.ndarray]:
    """Flat sorted logprobs -> (uint16 code deltas [E], uint16 tail codes [P]).

    The codes are ``encode_codes``'s: the exponentials are numpy's (as in ``encode_codes``), the rest of the
    arithmetic compiled (``encode_q16_entries``). Positions go in blocks of at most ``Q16_BLOCK`` entries (or
    one position), so the float64 temporaries stay small and in the cache rather than tens of bytes of fresh
    memory per entry (tens of MB, page faults included, per shard)."""
    offsets = segment_starts(k)
    deltas = np.empty(len(logprob), dtype=np.uint16)
    tail = np.empty(len(k), dtype=np.uint16)
    width = int(k.max(initial=0))
    step = max(1, Q16_BLOCK // max(width, 1))  # positions per block
    buffers = np.empty((2, min(len(logprob), step * width)), dtype=np.float64)
    for p0 in range(0, len(k), step):
        p1 = min(p0 + step, len(k))
        e0, e1 = int(offsets[p0]), int(offsets[p1])
        block = logprob[e0:e1], offsets[p0 : p1 + 1] - e0
        _encode_q16_block(*block, params, buffers, deltas[e0:e1], tail[p0:p1])
    return deltas, tail


def _encode_q16_block(
    logprob: np.ndarray,
    offsets: np.ndarray,
    params: Q16Params,
    buffers: np.ndarray,
    out_deltas: np.ndarray,
    out_tail: np.ndarray,
) -> None:
    """``encode_q16`` of some positions (``offsets`` into their ``logprob``), with the exponentials in
    ``buffers`` [2, ≥ entries] (scratch)."""
    l0 = np.log(params.p0)
    half_exp, prob = buffers[0, : len(logprob)], buffers[1, : len(logprob)]
    half_exp[:] = logprob  # exp(max(clip(lp, floor, 0), l0) / 2), in place
    np.clip(half_exp, max(params.floor, l0), 0.0, out=half_exp)
    half_exp /= 2.0
    np.exp(half_exp, out=half_exp)
    np.exp(logprob, dtype=np.float64, out=prob)
    mass = np.empty(len(out_tail), dtype=np.float64)
    constants = (params.s0, np.sqrt(params.p0), l0, params.floor)
    encode_q16_entries(logprob, half_exp, prob, offsets, *constants, out_deltas, mass)
    rest = 1.0 - mass
    has_rest = rest > 0
    out_tail[~has_rest] = TAIL_NONE
    out_tail[has_rest] = encode_codes(np.log(rest[has_rest]), params)


def decode_q16(deltas: np.ndarray, tail: np.ndarray, k: np.ndarray, params: Q16Params) -> np.ndarray:
    """Inverse of ``encode_q16``: float32 logprobs [E] whose k+1 bins (with the tail) sum to exactly 1."""
    logprob_table, prob_table = code_tables(params)
    tail_codes = tail.astype(np.int64)
    tail_prob = np.where(
        tail_codes == TAIL_NONE, 0.0, prob_table[np.minimum(tail_codes, len(prob_table) - 1)]
    )
    out = np.empty(len(deltas), dtype=np.float32)
    decode_q16_entries(deltas, segment_starts(k), tail_prob, logprob_table, prob_table, out)
    return out


def encode_logprobs(codec: str, logprob: np.ndarray, k: np.ndarray, params: Q16Params):
    """Flat sorted logprobs -> (values column, tail column or None) for the shard's codec."""
    if codec == "q16":
        return encode_q16(logprob, k, params)
    if codec == "f16":
        return np.maximum(logprob, np.finfo(np.float16).min).astype(np.float16), None
    if codec == "f32":
        return logprob.astype(np.float32), None
    raise ValueError(f"unknown logprob codec {codec!r} (expected q16, f16 or f32)")


def decode_logprobs(
    codec: str, values: np.ndarray, tail: np.ndarray | None, k: np.ndarray, params: Q16Params
):
    if codec == "q16":
        if tail is None:
            raise ValueError("q16 shard without a tail column")
        return decode_q16(values, tail, k, params)
    return values.astype(np.float32)


def _by_count(counts: np.ndarray) -> np.ndarray:
    """Indices of ``counts`` by decreasing count, ties by index: ``np.lexsort((arange, -counts))``, as one
    sort of an int64 key (3x faster) where the key fits."""
    n = len(counts)
    top = int(counts.max(initial=0))
    if top * n >= 1 << 62:
        return np.lexsort((np.arange(n), -counts))
    return np.argsort((top - counts.astype(np.int64, copy=False)) * n + np.arange(n))


def frequency_ranks(*parts: np.ndarray, in_place: bool = False) -> tuple[np.ndarray, ...]:
    """Rank ids by decreasing frequency (ties by id) over all ``parts`` together: returns (ids in rank order,
    then for each part the rank of each of its ids). ``in_place``: the ranks overwrite the parts' ids (spares
    a copy of the largest array; the parts must be writable 1-d integer arrays)."""
    parts = tuple(np.asarray(p).reshape(-1) for p in parts)
    size = sum(p.size for p in parts)
    rank_type = np.int32 if size <= np.iinfo(np.int32).max else np.int64
    low = min((int(p.min()) for p in parts if p.size), default=0)
    high = max((int(p.max()) for p in parts if p.size), default=-1)
    if low < 0 or high > 4 * size + (1 << 20):  # too sparse to count by id
        unique, inverse, counts = np.unique(np.concatenate(parts), return_inverse=True, return_counts=True)
        order = _by_count(counts)
        rank_of_unique = np.empty(len(unique), dtype=rank_type)
        rank_of_unique[order] = np.arange(len(unique))
        ranks = np.split(
            rank_of_unique[inverse.reshape(-1)], np.cumsum([p.size for p in parts[:-1]], dtype=int)
        )
        if in_place:
            for part, part_ranks in zip(parts, ranks, strict=True):
                part[:] = part_ranks
            ranks = parts
        return unique[order], *ranks
    counts = np.zeros(high + 1, dtype=np.int64)  # O(ids + max id) rather than a sort of all ids
    for part in parts:
        count_values(part, counts)
    unique = np.flatnonzero(counts)
    order = _by_count(counts[unique])
    rank_of_id = np.zeros(len(counts), dtype=rank_type)
    rank_of_id[unique[order]] = np.arange(len(unique))
    ranks = parts if in_place else tuple(np.empty(part.size, dtype=rank_type) for part in parts)
    for part, out in zip(parts, ranks, strict=True):
        lookup(rank_of_id, part, out)
    return unique[order].astype(np.result_type(*parts), copy=False), *ranks


def topk_kl(reference: np.ndarray, decoded: np.ndarray, k: np.ndarray) -> np.ndarray:
    """KL(reference ‖ decoded) per position over the k + 1 bins (top-k plus the residual), in nats (float64).

    Both inputs are flat logprobs over the same entries. The residual ``1 − Σ p`` is computed from float32
    logprobs, whose sum resolves about 1e-7, so residuals are floored at ``RESIDUAL_RESOLUTION`` on both sides
    (such a bin changes the KL by less than 1e-6 nats; without the floor a 1e-12 residual rounded to 0 reads as
    an infinite error).
    """
    seg = segment_ids(k)
    p = np.exp(reference.astype(np.float64))
    q = np.exp(decoded.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    kl = np.bincount(seg, weights=terms, minlength=len(k))
    rest_p = np.maximum(1.0 - np.bincount(seg, weights=p, minlength=len(k)), RESIDUAL_RESOLUTION)
    rest_q = np.maximum(1.0 - np.bincount(seg, weights=q, minlength=len(k)), RESIDUAL_RESOLUTION)
    rest = rest_p * (np.log(rest_p) - np.log(rest_q))
    return np.where(k > 0, kl + rest, 0.0)
