"""Compiled loops (numba) for the reader's per-entry hot paths: byte planes -> ints, q16 decoding, id lookup,
row packing and gathering, and the byte comparison of vocabulary entries; and for the shard writer's: the
records' top-k into flat arrays, id counts, the actual token's place in its top-k, q16 encoding, ints -> byte
planes, token bytes.

A shard holds millions of top-k entries. In numpy each step (interleave the byte planes, a cumulative sum per
position, two table lookups, a sum, a log, a subtraction, the id mapping, the gathers of a batch) is a pass over
arrays of tens of MB; as one loop per step the reader decodes an entry in a few nanoseconds, so data loading
keeps ahead of training on one core (``benchmarks/storage.py``). The writer likewise: its numpy version made
a dozen full-size temporaries (``[positions, k]`` int64 copies, masks, casts), whose page faults cost about as
much as its arithmetic. Each docstring states the computation, and
``tests/storage/test_storage_kernels.py`` compares every kernel with a plain numpy version of it. Compiled code
is cached next to this file (``cache=True``); indices that come from a file are bounds-checked.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def interleave_planes(p0, p1, p2, p3, planes, out):
    """``out[i] = p0[i] | p1[i] << 8 | p2[i] << 16 | p3[i] << 24`` over the first ``planes`` planes."""
    for i in range(out.shape[0]):
        value = np.int32(p0[i])
        if planes > 1:
            value |= np.int32(p1[i]) << 8
        if planes > 2:
            value |= np.int32(p2[i]) << 16
        if planes > 3:
            value |= np.int32(p3[i]) << 24
        out[i] = value


@njit(cache=True, nogil=True)
def decode_q16_entries(deltas, entry_offsets, tail_prob, logprob_table, prob_table, out):
    """Per position ``p`` (entries ``entry_offsets[p]:entry_offsets[p + 1]``): codes are the running sum of the
    deltas; ``out = logprob_table[code] - log(Σ prob_table[code] + tail_prob[p])`` (sum from 0.0 in entry
    order, then the tail; float64, cast to float32)."""
    for p in range(entry_offsets.shape[0] - 1):
        start, end = entry_offsets[p], entry_offsets[p + 1]
        code, total = 0, 0.0
        for e in range(start, end):
            code += deltas[e]
            if code < 0 or code >= prob_table.shape[0]:
                raise IndexError("q16 code outside the code table (damaged shard)")
            total += prob_table[code]
        total += tail_prob[p]
        log_total = np.log(total) if total > 0 else 0.0
        code = 0
        for e in range(start, end):
            code += deltas[e]
            out[e] = np.float32(logprob_table[code] - log_total)


@njit(cache=True, nogil=True)
def lookup(table, index, out):
    """``out[i] = table[index[i]]``."""
    for i in range(index.shape[0]):
        j = index[i]
        if j < 0 or j >= table.shape[0]:
            raise IndexError("index outside the lookup table")
        out[i] = table[j]


@njit(cache=True, nogil=True)
def pack_rows(
    tokens, doc_of_token, row, starts, pad_id, out_tokens, labels, loss_mask, target_rows, positions, docs
):
    """Row ``r`` of a batch from stream tokens ``[starts[r], starts[r] + S]`` (``S`` = the outputs' width).

    Inputs are stream tokens ``t`` (labels ``t + 1``); ``doc_of_token`` -1 marks padding. A label counts
    (``loss_mask``) when it continues its input's document; ``target_rows`` is then the label's top-k table row
    (else -1). Positions and document ids restart at each document and at each row (-1 / 0 on padding)."""
    width = out_tokens.shape[1]
    for r in range(starts.shape[0]):
        start = starts[r]
        position, doc_index = 0, -1
        for i in range(width):
            t = start + i
            doc, next_doc = doc_of_token[t], doc_of_token[t + 1]
            if i == 0 or doc != doc_of_token[t - 1]:
                position, doc_index = 0, doc_index + 1
            pad = doc < 0
            out_tokens[r, i] = pad_id if pad else tokens[t]
            labels[r, i] = pad_id if next_doc < 0 else tokens[t + 1]
            counts = doc == next_doc and next_doc >= 0
            loss_mask[r, i] = 1.0 if counts else 0.0
            target_rows[r, i] = row[t + 1] if counts else -1
            positions[r, i] = 0 if pad else position
            docs[r, i] = -1 if pad else doc_index
            position += 1


@njit(cache=True, nogil=True)
def gather_rows(table, first, rows, out):
    """``out[i] = table[rows[i] - first]`` for the ``rows`` that fall in the table (``first`` is the global
    index of its row 0); other rows of ``out`` are left as they are."""
    if table.shape[1] != out.shape[1]:
        raise ValueError("table and output widths differ")
    end = first + table.shape[0]
    for i in range(rows.shape[0]):
        r = rows[i]
        if first <= r < end:
            for j in range(out.shape[1]):
                out[i, j] = table[r - first, j]


@njit(cache=True, nogil=True)
def fill_rows(rows, out, value):
    """``out[i] = value`` for every ``rows[i] < 0`` (rows without targets)."""
    for i in range(rows.shape[0]):
        if rows[i] < 0:
            for j in range(out.shape[1]):
                out[i, j] = value


@njit(cache=True, nogil=True)
def equal_strings(offsets_a, data_a, index_a, offsets_b, data_b, index_b, out):
    """``out[i]``: string ``index_a[i]`` of A has the same bytes as string ``index_b[i]`` of B (each a binary
    column as Arrow lays it out: ``offsets`` [n + 1] into ``data``)."""
    for i in range(index_a.shape[0]):
        a, b = index_a[i], index_b[i]
        start_a, start_b = offsets_a[a], offsets_b[b]
        length = offsets_a[a + 1] - start_a
        same = length == offsets_b[b + 1] - start_b
        j = 0
        while same and j < length:
            same = data_a[start_a + j] == data_b[start_b + j]
            j += 1
        out[i] = same


@njit(cache=True, nogil=True)
def sample_targets(
    entry_offsets, topk_ids, topk_logprobs, sample_offsets, sample_ids, sample_counts, out_ids, out_weights
):
    """Per position ``p`` (row ``p`` of the ``[P, M]`` outputs): the sparse target ``p_j`` on each top-k entry
    (entries ``entry_offsets[p]:entry_offsets[p + 1]``) plus ``r · count / S`` on each tail sample (entries
    ``sample_offsets[p]:sample_offsets[p + 1]``), where ``r = max(0, 1 − Σ_j p_j)`` over every top-k entry and
    ``S = Σ count`` over every sample. Entries with id -1 (no student id) are left out after ``r`` and ``S``
    are taken; equal ids are merged by summing (in order of first appearance); the weights are then divided by
    their sum (float64, cast to float32). The rest of each row is -1 / 0 (all of it where nothing is left)."""
    weights = np.zeros(out_ids.shape[1], np.float64)
    for p in range(entry_offsets.shape[0] - 1):
        mass, draws = 0.0, 0
        for e in range(entry_offsets[p], entry_offsets[p + 1]):
            mass += np.exp(np.float64(topk_logprobs[e]))
        for e in range(sample_offsets[p], sample_offsets[p + 1]):
            draws += sample_counts[e]
        rest = max(1.0 - mass, 0.0)
        n, total = 0, 0.0
        for pass_ in range(2):
            first, last = (
                (entry_offsets[p], entry_offsets[p + 1])
                if pass_ == 0
                else (sample_offsets[p], sample_offsets[p + 1])
            )
            for e in range(first, last):
                if pass_ == 0:
                    token, weight = topk_ids[e], np.exp(np.float64(topk_logprobs[e]))
                else:
                    token, weight = sample_ids[e], rest * sample_counts[e] / draws
                if token < 0:
                    continue
                j = 0
                while j < n and out_ids[p, j] != token:
                    j += 1
                if j == n:
                    if n == out_ids.shape[1]:
                        raise ValueError("more sample targets at one position than the output width")
                    out_ids[p, n] = token
                    weights[n] = 0.0
                    n += 1
                weights[j] += weight
                total += weight
        if total <= 0:
            n = 0
        for j in range(out_ids.shape[1]):
            if j >= n:
                out_ids[p, j] = -1
                out_weights[p, j] = 0.0
            else:
                out_weights[p, j] = np.float32(weights[j] / total)


@njit(cache=True, nogil=True)
def encode_q16_entries(logprob, half_exp, prob, entry_offsets, s0, sqrt_p0, l0, floor, out_deltas, out_mass):
    """The q16 encoder's per-entry arithmetic (``storage.codec.encode_q16``), float64 as numpy does it: with
    ``lp = clip(logprob, floor, 0)`` and ``half_exp = exp(max(lp, l0) / 2)``, the code is ``rint((2 − 2 ·
    half_exp) / s0 + sqrt_p0 · (l0 − min(lp, l0)) / s0)``; ``out_deltas`` is each code minus the one before it
    in its position (the first: the code itself), and ``out_mass[p]`` the sum of ``prob`` over position
    ``p``'s entries (from 0.0, in entry order). Raises ValueError when a delta is negative (unsorted).

    The codes are first written over ``half_exp`` (a scratch array, then), in a loop of independent entries
    that the compiler vectorises."""
    for e in range(logprob.shape[0]):
        lp = min(max(np.float64(logprob[e]), floor), 0.0)
        upper = (2.0 - 2.0 * half_exp[e]) / s0
        lower = sqrt_p0 * (l0 - min(lp, l0)) / s0
        half_exp[e] = np.rint(upper + lower)
    for p in range(entry_offsets.shape[0] - 1):
        previous, total = 0, 0.0
        for e in range(entry_offsets[p], entry_offsets[p + 1]):
            code = np.int64(half_exp[e])
            if code < previous:
                raise ValueError("q16: logprobs must be sorted by decreasing value within each position")
            out_deltas[e] = code - previous
            previous = code
            total += prob[e]
        out_mass[p] = total


@njit(cache=True, nogil=True)
def topk_counts(ids, logprobs, sentinel, out_k):
    """Per row ``p`` of padded ``[n, K]`` top-k arrays: ``out_k[p]`` = its real entries (id ≥ 0, logprob finite
    and above ``sentinel``). Returns whether every row is already in ``storage.codec.sort_positions``'s order:
    keys (the logprob of a real entry, -inf for the others) never increase along a row, so real entries come
    first, by decreasing logprob."""
    in_order = True
    for p in range(ids.shape[0]):
        count, previous = 0, np.inf
        for j in range(ids.shape[1]):
            lp = logprobs[p, j]
            real = ids[p, j] >= 0 and np.isfinite(lp) and lp > sentinel
            key = lp if real else -np.inf
            if key > previous:
                in_order = False
            previous = key
            count += real
        out_k[p] = count
    return in_order


@njit(cache=True, nogil=True)
def copy_prefixes(rows, k, out, start):
    """The first ``k[p]`` entries of each row ``p`` of ``rows`` [n, K], concatenated into ``out`` from
    ``start`` on; returns where they end."""
    e = start
    for p in range(rows.shape[0]):
        for j in range(k[p]):
            out[e] = rows[p, j]
            e += 1
    return e


@njit(cache=True, nogil=True)
def count_values(values, counts):
    """``counts[v] += 1`` for each ``v`` of ``values`` (``np.bincount`` without its cast of the values to
    int64); the caller checks that they index ``counts``."""
    for i in range(values.shape[0]):
        counts[values[i]] += 1


@njit(cache=True, nogil=True)
def first_match(values, offsets, targets, limit, missing, out):
    """``out[p]``: the first ``j < limit`` with ``values[offsets[p] + j] == targets[p]`` among position ``p``'s
    entries ``offsets[p]:offsets[p + 1]``, else ``missing``."""
    for p in range(targets.shape[0]):
        start = offsets[p]
        found = missing
        for j in range(min(offsets[p + 1] - start, limit)):
            if values[start + j] == targets[p]:
                found = j
                break
        out[p] = found


@njit(cache=True, nogil=True)
def split_planes(values, out):
    """``out[b, i]`` = byte ``b`` (little-endian, two's complement) of ``values[i]``, for the ``out.shape[0]``
    low bytes; returns the largest value (-1 when there is none)."""
    top = -1
    for i in range(values.shape[0]):
        top = max(top, np.int64(values[i]))
    for b in range(out.shape[0]):  # a plane at a time: one sequential write each
        shift = 8 * b
        for i in range(values.shape[0]):
            out[b, i] = (np.int64(values[i]) >> shift) & 0xFF
    return top


@njit(cache=True, nogil=True)
def gather_ranges(data, starts, lengths, out):
    """``out`` = ``data[starts[i]:starts[i] + lengths[i]]`` for every ``i``, concatenated."""
    o = 0
    for i in range(starts.shape[0]):
        start, length = starts[i], lengths[i]
        if start < 0 or length < 0 or start + length > data.shape[0] or o + length > out.shape[0]:
            raise IndexError("byte range outside the data")
        for j in range(length):  # (a slice assignment costs more than this loop for short strings)
            out[o + j] = data[start + j]
        o += length
