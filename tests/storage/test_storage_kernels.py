"""The compiled loops of ``storage.kernels`` against plain numpy versions of the same computation."""

import numpy as np
import pytest

from storage.codec import (
    OPENAI_SENTINEL,
    TAIL_NONE,
    Q16Params,
    code_tables,
    concat_ranges,
    encode_codes,
    encode_q16,
    segment_ids,
    segment_starts,
)
from storage.kernels import (
    copy_prefixes,
    count_values,
    decode_q16_entries,
    equal_strings,
    first_match,
    gather_ranges,
    gather_rows,
    interleave_planes,
    lookup,
    pack_rows,
    split_planes,
    topk_counts,
)


@pytest.mark.parametrize("planes", [1, 2, 3, 4])
def test_interleave_planes(planes):
    rng = np.random.default_rng(planes)
    values = rng.integers(0, 1 << (8 * planes), size=1001, dtype=np.int64).astype(np.uint32)
    split = [((values >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(planes)]
    out = np.empty(len(values), np.int32)
    interleave_planes(*split, *split[:1] * (4 - planes), planes, out)
    assert out.view(np.uint32).tolist() == values.tolist()


def numpy_decode_q16(deltas, tail, k, params):
    """The decoder written with numpy passes: running codes per position, tables, one normaliser each."""
    logprob_table, prob_table = code_tables(params)
    seg = segment_ids(k)
    running = np.cumsum(deltas, dtype=np.int64)
    starts = segment_starts(k)[:-1]
    base = np.zeros(len(k), dtype=np.int64)
    base[k > 0] = running[starts[k > 0]] - deltas[starts[k > 0]]
    codes = running - base[seg]
    tail = tail.astype(np.int64)
    tail_prob = np.where(tail == TAIL_NONE, 0.0, prob_table[np.minimum(tail, len(prob_table) - 1)])
    total = np.bincount(seg, weights=prob_table[codes], minlength=len(k)) + tail_prob
    return (logprob_table[codes] - np.log(np.where(total > 0, total, 1.0))[seg]).astype(np.float32)


def test_decode_q16_matches_numpy():
    rng = np.random.default_rng(0)
    k = rng.integers(0, 25, size=3000)
    k[:7] = 0
    probs = [np.sort(rng.dirichlet(np.full(n + 5, 0.2)))[::-1][:n] for n in k]
    logprobs = np.log(np.maximum(np.concatenate(probs), 1e-38)).astype(np.float32)
    params = Q16Params()
    deltas, tail = encode_q16(logprobs, k, params)
    _, prob_table = code_tables(params)
    tail_prob = np.where(tail == TAIL_NONE, 0.0, prob_table[np.minimum(tail, len(prob_table) - 1)])
    out = np.empty(len(deltas), np.float32)
    decode_q16_entries(deltas.astype(np.int32), segment_starts(k), tail_prob, *code_tables(params), out)
    np.testing.assert_allclose(out, numpy_decode_q16(deltas, tail, k, params), rtol=0, atol=1e-6)


def test_decode_q16_rejects_codes_past_the_table():
    deltas = np.array([3, 60000], np.int32)
    with pytest.raises(IndexError, match="damaged"):
        decode_q16_entries(
            deltas, np.array([0, 2]), np.zeros(1), *code_tables(Q16Params()), np.empty(2, np.float32)
        )


def test_lookup():
    rng = np.random.default_rng(1)
    table = rng.integers(-1, 1000, size=500).astype(np.int32)
    index = rng.integers(0, 500, size=10_000).astype(np.int32)
    out = np.empty(len(index), np.int32)
    lookup(table, index, out)
    assert out.tolist() == table[index].tolist()
    with pytest.raises(IndexError):
        lookup(table, np.array([500], np.int32), out)


def test_gather_rows_fills_only_its_rows():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((50, 6)).astype(np.float32)[:, :4]  # (a strided view, as the reader passes)
    rows = rng.integers(-1, 120, size=300)
    out = np.full((300, 4), 7.0, np.float32)
    gather_rows(table, 40, rows, out)
    mine = (rows >= 40) & (rows < 90)
    assert np.array_equal(out[mine], table[rows[mine] - 40])
    assert (out[~mine] == 7.0).all()
    with pytest.raises(ValueError, match="widths"):
        gather_rows(table, 40, rows, np.empty((300, 5), np.float32))


def numpy_pack_rows(tokens, doc_of_token, row, starts, seq_len, pad_id):
    """The row layout written with numpy passes over ``[R, S + 1]`` windows."""
    index = np.asarray(starts)[:, None] + np.arange(seq_len + 1)[None, :]
    window, doc = tokens[index], doc_of_token[index]
    doc_in, doc_label = doc[:, :-1], doc[:, 1:]
    loss = (doc_in == doc_label) & (doc_label >= 0)
    starts_flag = np.ones_like(doc_in, dtype=bool)
    starts_flag[:, 1:] = doc_in[:, 1:] != doc_in[:, :-1]
    column = np.broadcast_to(np.arange(seq_len), doc_in.shape)
    segment_start = np.maximum.accumulate(np.where(starts_flag, column, 0), axis=1)
    pad = doc_in < 0
    return {
        "tokens": np.where(pad, pad_id, window[:, :-1]),
        "labels": np.where(doc_label < 0, pad_id, window[:, 1:]),
        "loss_mask": loss.astype(np.float32),
        "rows": np.where(loss, row[index[:, 1:]], -1),
        "positions": np.where(pad, 0, column - segment_start),
        "docs": np.where(pad, -1, np.cumsum(starts_flag, axis=1) - 1),
    }


def test_pack_rows_matches_numpy():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 30, size=40)
    doc_of_token = np.repeat(np.arange(40), lengths)
    doc_of_token = np.concatenate([doc_of_token, np.full(25, -1)])  # padding at the end
    n = len(doc_of_token)
    tokens = rng.integers(0, 1000, size=n)
    row = np.where(rng.random(n) < 0.8, np.arange(n), -1)  # some tokens without targets
    seq_len, starts = 16, np.arange(0, n - 17, 16)
    want = numpy_pack_rows(tokens, doc_of_token, row, starts, seq_len, 5)
    got = {key: np.empty_like(value) for key, value in want.items()}
    pack_rows(
        tokens, doc_of_token, row, starts, 5, got["tokens"], got["labels"], got["loss_mask"], got["rows"],
        got["positions"], got["docs"],
    )  # fmt: skip
    for key, value in want.items():
        assert np.array_equal(got[key], value), key


def test_equal_strings():
    a = [b"", b"ab", b"abc", b"\x00", b"xyz"]
    b = [b"ab", b"", b"abd", b"\x00", b"xy"]

    def layout(strings):
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in strings])]).astype(np.int32)
        return offsets, np.frombuffer(b"".join(strings) or b"\x00", np.uint8)

    index_a = np.array([0, 1, 2, 3, 4, 1, 0])
    index_b = np.array([1, 0, 2, 3, 4, 0, 0])
    out = np.empty(len(index_a), bool)
    equal_strings(*layout(a), index_a, *layout(b), index_b, out)
    assert out.tolist() == [a[i] == b[j] for i, j in zip(index_a, index_b, strict=True)]


def numpy_encode_q16(logprob, k, params):
    """The encoder written with numpy passes: codes of every entry, deltas within a position, the tail."""
    starts = segment_starts(k)
    codes = encode_codes(logprob, params)
    deltas = np.diff(codes, prepend=0)
    first = starts[:-1][k > 0]
    deltas[first] = codes[first]
    mass = np.bincount(segment_ids(k), weights=np.exp(logprob.astype(np.float64)), minlength=len(k))
    rest = 1.0 - mass
    tail = np.full(len(k), TAIL_NONE, dtype=np.int64)
    tail[rest > 0] = encode_codes(np.log(rest[rest > 0]), params)
    return deltas.astype(np.uint16), tail.astype(np.uint16)


@pytest.mark.parametrize("params", [Q16Params(), Q16Params(s0=2.0**-6, p0=1e-2, floor=-30.0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encode_q16_matches_numpy(params, dtype):
    rng = np.random.default_rng(0)
    k = rng.integers(0, 25, size=3000)
    k[:7] = 0
    probs = [np.sort(rng.dirichlet(np.full(n + 5, rng.choice([0.01, 0.2, 5.0]))))[::-1][:n] for n in k]
    logprobs = np.log(np.maximum(np.concatenate(probs), 1e-60)).astype(dtype)
    logprobs[rng.random(len(logprobs)) < 0.01] = 0.0  # certain tokens (no tail)
    logprobs = np.concatenate([np.sort(s)[::-1] for s in np.split(logprobs, segment_starts(k)[1:-1])])
    deltas, tail = encode_q16(logprobs, k, params)
    expected_deltas, expected_tail = numpy_encode_q16(logprobs, k, params)
    assert deltas.dtype == np.uint16 and tail.dtype == np.uint16
    assert np.array_equal(deltas, expected_deltas)
    assert np.array_equal(tail, expected_tail)


@pytest.mark.parametrize("planes", [1, 2, 3])
def test_split_planes(planes):
    rng = np.random.default_rng(planes)
    values = rng.integers(0, 1 << (8 * planes), size=1001).astype(np.int32)
    out = np.empty((planes, len(values)), np.uint8)
    assert split_planes(values, out) == values.max()
    expected = values.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :planes].T
    assert np.array_equal(out, expected)
    assert split_planes(np.zeros(0, np.uint16), np.empty((2, 0), np.uint8)) == -1


@pytest.mark.parametrize("shuffled", [False, True])
def test_topk_counts_and_copy_prefixes(shuffled):
    """Counts and order as ``sort_positions`` sees them: padding (-1 id, -inf, NaN, the sentinel) anywhere."""
    rng = np.random.default_rng(4)
    logprobs = -np.sort(rng.exponential(size=(60, 7)), axis=1).astype(np.float32)
    ids = rng.integers(0, 100, size=(60, 7)).astype(np.int32)
    k = rng.integers(0, 8, size=60)
    pad = np.arange(7)[None, :] >= k[:, None]
    ids[pad], logprobs[pad] = -1, -np.inf
    logprobs[5, 6], logprobs[9, 6] = OPENAI_SENTINEL, np.nan
    if shuffled:
        ids[::3], logprobs[::3] = ids[::3, ::-1], logprobs[::3, ::-1]
    valid = (ids >= 0) & np.isfinite(logprobs) & (logprobs > OPENAI_SENTINEL)
    key = np.where(valid, logprobs, -np.inf)
    got = np.empty(60, np.int64)
    assert topk_counts(ids, logprobs, OPENAI_SENTINEL, got) == (key[:, 1:] <= key[:, :-1]).all()
    assert got.tolist() == valid.sum(axis=1).tolist()
    out = np.full(valid.sum() + 3, 7, np.int64)
    assert copy_prefixes(ids, got, out, 3) == len(out)
    prefix = np.arange(7)[None, :] < got[:, None]
    assert out[:3].tolist() == [7, 7, 7] and out[3:].tolist() == ids[prefix].tolist()


def test_count_values():
    rng = np.random.default_rng(5)
    values = rng.integers(0, 300, size=5000).astype(np.int32)
    counts = np.ones(310, np.int64)
    count_values(values, counts)
    assert np.array_equal(counts, np.bincount(values, minlength=310) + 1)


def test_first_match():
    rng = np.random.default_rng(6)
    k = rng.integers(0, 12, size=400)
    k[0] = 300  # past the limit
    offsets = segment_starts(k)
    values = rng.integers(0, 8, size=int(offsets[-1]))
    targets = rng.integers(0, 9, size=len(k))
    targets[0] = values[260]
    values[:260][values[:260] == targets[0]] = 99  # position 0's only match is its entry 260
    out = np.empty(len(k), np.uint8)
    first_match(values, offsets, targets, 255, 255, out)
    expected = [
        next((j for j in range(min(n, 255)) if values[s + j] == t), 255)
        for s, n, t in zip(offsets[:-1], k, targets, strict=True)
    ]
    assert out.tolist() == expected and out[0] == 255


def test_gather_ranges():
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, size=1000).astype(np.uint8)
    starts = rng.integers(0, 990, size=200)
    lengths = rng.integers(0, 11, size=200)
    out = np.empty(int(lengths.sum()), np.uint8)
    gather_ranges(data, starts, lengths, out)
    assert np.array_equal(out, data[concat_ranges(starts, lengths)])
    with pytest.raises(IndexError):
        gather_ranges(data, np.array([995]), np.array([10]), np.empty(10, np.uint8))
