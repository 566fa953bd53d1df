"""The top-k codec: q16 stays within its documented KL error, keeps the decoded mass <= 1 and the tail accurate."""

import numpy as np
import pytest

from storage.codec import (
    OPENAI_SENTINEL,
    TAIL_NONE,
    Q16Params,
    concat_ranges,
    decode_q16,
    encode_q16,
    frequency_ranks,
    segment_ids,
    sort_positions,
    topk_kl,
)


def flat_topk(rng, positions, k, concentration):
    """Sorted top-k logprobs of random distributions (the k largest of a Dirichlet over k + 50 outcomes)."""
    probs = rng.dirichlet(np.full(k + 50, concentration), size=positions)
    top = -np.sort(-probs, axis=1)[:, :k]
    return np.log(np.maximum(top, 1e-38)).astype(np.float32).ravel(), np.full(positions, k)


@pytest.mark.parametrize("concentration", [0.01, 0.1, 1.0])
def test_q16_kl_error_within_documented_bound(concentration):
    rng = np.random.default_rng(0)
    logprobs, k = flat_topk(rng, 20000, 20, concentration)
    deltas, tail = encode_q16(logprobs, k, Q16Params())
    decoded = decode_q16(deltas, tail, k, Q16Params())
    kl = topk_kl(logprobs, decoded, k)
    assert kl.mean() < 1e-4 and kl.max() < 1e-3, (kl.mean(), kl.max())
    mass = np.bincount(segment_ids(k), weights=np.exp(decoded.astype(np.float64)))
    assert mass.max() <= 1 + 1e-6
    # entries that carry mass stay close in log space (the step grows as 1/sqrt(p): KL is what is bounded)
    big = np.exp(logprobs) > 1e-2
    assert np.abs(decoded - logprobs)[big].max() < 0.05


def test_tiny_tail_keeps_relative_accuracy():
    """A peaked distribution whose top-k holds all but 1e-7 of the mass: naive rounding broke exactly this."""
    logprobs = np.log(np.array([1 - 1e-7 - 2e-8, 1e-8, 1e-8])).astype(np.float64)
    k = np.array([3])
    deltas, tail = encode_q16(logprobs, k, Q16Params())
    decoded = decode_q16(deltas, tail, k, Q16Params()).astype(np.float64)
    rest = 1 - np.exp(decoded).sum()
    assert rest >= 0
    assert topk_kl(logprobs, decoded, k)[0] < 1e-5


def test_full_mass_and_empty_positions():
    """No residual (all mass in the top-k, or a top-k summing past 1 by rounding) and positions with k = 0."""
    logprobs = np.log(np.array([1.0, 0.6, 0.6, 0.9, 0.05])).astype(np.float32)
    k = np.array([1, 0, 2, 0, 2])
    deltas, tail = encode_q16(logprobs, k, Q16Params())
    assert tail[0] == TAIL_NONE and tail[2] == TAIL_NONE and tail[4] != TAIL_NONE
    decoded = decode_q16(deltas, tail, k, Q16Params()).astype(np.float64)
    assert decoded[0] == 0.0
    assert np.allclose(np.exp(decoded[1:3]), [0.5, 0.5], atol=1e-6)  # normalised back to a distribution
    assert np.allclose(decoded[3:], logprobs[3:], atol=0.02)


def test_unsorted_input_is_rejected():
    with pytest.raises(ValueError, match="sorted"):
        encode_q16(np.log(np.array([0.1, 0.5], np.float32)), np.array([2]), Q16Params())


def test_frequency_ranks_put_common_ids_first():
    ids = np.array([7, 3, 7, 9, 7, 3])
    order, ranks = frequency_ranks(ids)
    assert order.tolist() == [7, 3, 9]
    assert order[ranks].tolist() == ids.tolist()


def test_concat_ranges_matches_loop():
    starts, lengths = np.array([5, 0, 9, 2]), np.array([2, 0, 3, 1])
    expected = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    assert concat_ranges(starts, lengths).tolist() == expected.tolist()


def test_frequency_ranks_counting_and_sorting_paths_agree():
    rng = np.random.default_rng(0)
    dense = rng.zipf(1.3, size=20000) % 5000  # counted by id (bincount)
    for ids in (dense, dense * 10**7, np.concatenate([dense, [-3, -3]])):  # sparse / negative: the sort
        unique, counts = np.unique(ids, return_counts=True)
        expected = unique[np.lexsort((unique, -counts))]
        order, ranks = frequency_ranks(ids)
        assert order.tolist() == expected.tolist()
        assert order[ranks].tolist() == ids.tolist()
    order, ranks = frequency_ranks(np.zeros(0, np.int64))
    assert len(order) == len(ranks) == 0


@pytest.mark.parametrize("scale", [1, 10**7])  # counted by id / sorted
def test_frequency_ranks_of_parts_as_of_their_concatenation(scale):
    rng = np.random.default_rng(1)
    parts = [(rng.zipf(1.3, size=n) % 500 * scale).astype(np.int64) for n in (30, 2000, 0, 7)]
    order, ranks = frequency_ranks(np.concatenate(parts))
    got_order, *got_ranks = frequency_ranks(*parts)
    assert got_order.tolist() == order.tolist()
    assert np.concatenate(got_ranks).tolist() == ranks.tolist()
    copies = [p.copy() for p in parts]
    got_order, *got_ranks = frequency_ranks(*copies, in_place=True)
    assert all(np.shares_memory(g, c) for g, c in zip(got_ranks, copies, strict=True) if c.size)
    assert np.concatenate(copies).tolist() == ranks.tolist()


@pytest.mark.parametrize("presorted", [True, False])
def test_sort_positions_sorts_rows_and_counts_entries(presorted):
    rng = np.random.default_rng(1)
    logprob = -np.sort(rng.exponential(size=(50, 6)), axis=1).astype(np.float32)  # each row decreasing
    ids = rng.integers(0, 100, size=(50, 6))
    ids[::7, 4:] = -1
    logprob[::7, 4:] = -np.inf
    logprob[3, 5] = OPENAI_SENTINEL
    if not presorted:
        logprob[::2] = logprob[::2, ::-1]
        ids[::2] = ids[::2, ::-1]
    extra = ids * 10
    got_ids, got_logprob, got_extra, k = sort_positions(ids, logprob, extra)
    valid = (ids >= 0) & np.isfinite(logprob) & (logprob > OPENAI_SENTINEL)
    order = np.argsort(-np.where(valid, logprob.astype(np.float64), -np.inf), axis=1, kind="stable")
    assert np.array_equal(got_ids, np.take_along_axis(ids, order, 1))
    assert np.array_equal(got_logprob, np.take_along_axis(logprob, order, 1))
    assert np.array_equal(got_extra, got_ids * 10)
    assert k.tolist() == valid.sum(axis=1).tolist()
