"""student.metrics: ECE, perplexity and per-sequence sums against hand-computed values and direct token means;
bootstrap intervals (coverage, paired differences). The per-token KL / CE / agreement are tested in
test_eval_evaluate.py against a dense reference."""

import math

import numpy as np
import pytest

from student import metrics


def test_ece_hand_checked():
    confidence = np.array([0.95, 0.95, 0.65, 0.35])
    correct = np.array([1, 0, 1, 0])
    # bins of width 0.1: {0.95, 0.95} acc 0.5; {0.65} acc 1; {0.35} acc 0
    expected = 0.5 * abs(0.5 - 0.95) + 0.25 * abs(1 - 0.65) + 0.25 * abs(0 - 0.35)
    assert metrics.expected_calibration_error(confidence, correct, 10) == pytest.approx(expected)
    # perfectly calibrated within one bin -> 0; confident and always wrong -> the confidence
    assert metrics.expected_calibration_error(np.full(4, 0.5), np.array([1, 0, 1, 0]), 10) == pytest.approx(0)
    assert metrics.expected_calibration_error(np.full(3, 0.9), np.zeros(3), 10) == pytest.approx(0.9)


def _rows(rng, n_seq, lengths):
    seq = np.repeat(np.arange(n_seq), lengths)
    n = len(seq)
    confidence = rng.uniform(0.05, 1.0, n)
    return metrics.TokenRows(
        sequence=seq,
        hard=np.ones(n, bool),
        soft=rng.random(n) < 0.8,
        ce=rng.exponential(2.0, n),
        soft_ce=rng.exponential(1.0, n),
        kl=rng.exponential(0.3, n),
        confidence=confidence,
        correct=rng.random(n) < confidence,
        agree=rng.random(n) < 0.4,
    )


def test_sequence_sums_give_token_means():
    rng = np.random.default_rng(1)
    rows = _rows(rng, 5, [3, 8, 1, 6, 4])
    rows.hard[[2, 7]] = False  # positions without a real label count nowhere
    sums = metrics.per_sequence_sums(rows, 5, ece_bins=10)
    values = metrics.metric_values({k: np.asarray(v).sum(0) for k, v in sums.items()})
    hard, soft = rows.hard, rows.soft & rows.hard
    assert values["ce"] == pytest.approx(rows.ce[hard].mean())
    assert values["perplexity"] == pytest.approx(math.exp(rows.ce[hard].mean()))
    assert values["soft_ce"] == pytest.approx(rows.soft_ce[soft].mean())
    assert values["kl_teacher_student"] == pytest.approx(rows.kl[soft].mean())
    assert values["top1_agreement"] == pytest.approx(rows.agree[soft].mean())
    ece = metrics.expected_calibration_error(rows.confidence[hard], rows.correct[hard], 10)
    assert values["ece"] == pytest.approx(ece)
    assert sums["tokens"].tolist() == [2, 7, 1, 6, 4]


def test_perplexity_of_uniform_model_is_vocab_size():
    n, vocab = 12, 64
    rows = metrics.TokenRows(
        sequence=np.arange(n) % 3,
        hard=np.ones(n, bool),
        soft=np.zeros(n, bool),
        ce=np.full(n, math.log(vocab)),
        soft_ce=np.zeros(n),
        kl=np.zeros(n),
        confidence=np.full(n, 1 / vocab),
        correct=np.zeros(n, bool),
        agree=np.zeros(n, bool),
    )
    out = metrics.summarize(metrics.per_sequence_sums(rows, 3, 10), n_resamples=50, confidence=0.95)
    assert out["perplexity"]["value"] == pytest.approx(vocab)
    assert out["perplexity"]["ci_low"] == pytest.approx(vocab)
    assert math.isnan(out["kl_teacher_student"]["value"])  # no teacher positions: undefined, not 0


def test_bootstrap_interval_covers_the_truth_about_95_percent():
    """Sequences of varying length with per-token CE ~ Exponential(mean 2): the CI of the ratio-of-sums
    estimator should contain 2 in roughly 95% of independent experiments."""
    rng = np.random.default_rng(2)
    trials, covered = 200, 0
    for _ in range(trials):
        n_seq = 40
        tokens = rng.integers(5, 30, n_seq).astype(float)
        ce_sum = np.array([rng.exponential(2.0, int(t)).sum() for t in tokens])
        zeros = np.zeros(n_seq)
        sums = {
            "tokens": tokens,
            "ce_sum": ce_sum,
            "soft_tokens": tokens,
            "soft_ce_sum": zeros,
            "kl_sum": zeros,
            "agree_sum": zeros,
            "calibration": np.zeros((n_seq, 2, 3)),
        }
        ci = metrics.summarize(sums, n_resamples=300, confidence=0.95, seed=int(rng.integers(1 << 30)))["ce"]
        assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]
        covered += ci["ci_low"] <= 2.0 <= ci["ci_high"]
    assert 0.88 <= covered / trials <= 0.99, covered


def test_paired_difference_cancels_shared_variation():
    rng = np.random.default_rng(3)
    rows_a = _rows(rng, 30, rng.integers(4, 20, 30))
    shifted = metrics.TokenRows(**{**rows_a.__dict__, "ce": rows_a.ce + 0.1})
    sums_a = metrics.per_sequence_sums(rows_a, 30, 10)
    sums_b = metrics.per_sequence_sums(shifted, 30, 10)
    diff = metrics.paired_difference(sums_b, sums_a, n_resamples=500, confidence=0.95)["ce"]
    # b is a uniformly 0.1 nats worse: every paired resample sees exactly +0.1
    assert diff["value"] == pytest.approx(0.1)
    assert diff["ci_low"] == pytest.approx(0.1) and diff["ci_high"] == pytest.approx(0.1)
    single = metrics.summarize(sums_a, n_resamples=500, confidence=0.95)["ce"]
    assert single["ci_high"] - single["ci_low"] > 0.01  # while each model alone varies across resamples


def test_bootstrap_needs_two_sequences():
    rows = _rows(np.random.default_rng(4), 1, [5])
    with pytest.raises(ValueError, match="at least 2 held-out sequences"):
        metrics.summarize(metrics.per_sequence_sums(rows, 1, 10), 10, 0.95)
