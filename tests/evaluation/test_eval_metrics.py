"""student.metrics against hand-computed values and a dense float64 reference built independently."""

import math

import numpy as np
import pytest

from student import metrics


def test_kl_and_soft_ce_over_bins_hand_checked():
    # teacher: top-2 masses 0.5, 0.3 -> tail 0.2; student puts 0.25, 0.25 on them -> tail 0.5
    teacher = np.log(np.array([[0.5, 0.3]]))
    student = np.log(np.array([[0.25, 0.25]]))
    kl = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    ce = -(0.5 * math.log(0.25) + 0.3 * math.log(0.25) + 0.2 * math.log(0.5))
    assert metrics.kl_over_bins(teacher, student)[0] == pytest.approx(kl, abs=1e-12)
    assert metrics.soft_ce_over_bins(teacher, student)[0] == pytest.approx(ce, abs=1e-12)


def test_padded_topk_and_full_teacher_mass():
    # a varying k: the second entry is padding (-inf teacher logprob, arbitrary student value)
    teacher = np.array([[math.log(1.0), -math.inf]])  # all mass on one token: no tail
    student = np.array([[math.log(0.8), 123.0]])
    assert metrics.kl_over_bins(teacher, student)[0] == pytest.approx(-math.log(0.8), abs=1e-12)
    # identical bins give zero KL
    same = np.log(np.array([[0.6, 0.1]]))
    assert metrics.kl_over_bins(same, same)[0] == pytest.approx(0.0, abs=1e-12)


def _dense_bins_reference(p_full, q_full, ids):
    """KL and CE over (top-k tokens, everything else) by explicit loops over a full vocabulary."""
    kl, ce = [], []
    for p_row, q_row, id_row in zip(p_full, q_full, ids, strict=True):
        p_bins = [float(p_row[i]) for i in id_row] + [1.0 - sum(float(p_row[i]) for i in id_row)]
        q_bins = [float(q_row[i]) for i in id_row] + [1.0 - sum(float(q_row[i]) for i in id_row)]
        kl.append(sum(a * math.log(a / b) for a, b in zip(p_bins, q_bins, strict=True) if a > 0))
        ce.append(-sum(a * math.log(b) for a, b in zip(p_bins, q_bins, strict=True) if a > 0))
    return np.array(kl), np.array(ce)


def test_bins_against_dense_reference():
    rng = np.random.default_rng(0)
    n, vocab, k = 32, 50, 5
    p_full = rng.dirichlet(np.full(vocab, 0.3), size=n)
    q_full = rng.dirichlet(np.full(vocab, 0.5), size=n)
    ids = np.argsort(-p_full, axis=-1)[:, :k]
    teacher = np.log(np.take_along_axis(p_full, ids, -1))
    student = np.log(np.take_along_axis(q_full, ids, -1))
    kl_ref, ce_ref = _dense_bins_reference(p_full, q_full, ids)
    np.testing.assert_allclose(metrics.kl_over_bins(teacher, student), kl_ref, atol=1e-10)
    np.testing.assert_allclose(metrics.soft_ce_over_bins(teacher, student), ce_ref, atol=1e-10)
    assert (metrics.kl_over_bins(teacher, student) >= -1e-12).all()


def test_teacher_top1_unsorted_and_padded():
    ids = np.array([[7, 3, -1], [4, 9, 2], [-1, -1, -1]])
    logprobs = np.array([[-2.0, -0.5, -np.inf], [-1.0, -3.0, -0.2], [-np.inf] * 3])
    assert metrics.teacher_top1(ids, logprobs).tolist() == [3, 2, -1]


def test_ece_hand_checked():
    confidence = np.array([0.95, 0.95, 0.65, 0.35])
    correct = np.array([1, 0, 1, 0])
    # bins of width 0.1: {0.95, 0.95} acc 0.5; {0.65} acc 1; {0.35} acc 0
    expected = 0.5 * abs(0.5 - 0.95) + 0.25 * abs(1 - 0.65) + 0.25 * abs(0 - 0.35)
    assert metrics.expected_calibration_error(confidence, correct, 10) == pytest.approx(expected)
    # perfectly calibrated within one bin -> 0; confident and always wrong -> the confidence
    assert metrics.expected_calibration_error(np.full(4, 0.5), np.array([1, 0, 1, 0]), 10) == pytest.approx(0)
    assert metrics.expected_calibration_error(np.full(3, 0.9), np.zeros(3), 10) == pytest.approx(0.9)


def _rows(rng, n_seq, lengths, k=4, vocab=30):
    seq = np.repeat(np.arange(n_seq), lengths)
    n = len(seq)
    logits = rng.normal(size=(n, vocab)) * 2
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = rng.integers(0, vocab, n)
    teacher_full = rng.dirichlet(np.full(vocab, 0.2), size=n)
    ids = np.argsort(-teacher_full, -1)[:, :k]
    top = logq.argmax(-1)
    soft = rng.random(n) < 0.8
    return metrics.TokenRows(
        sequence=seq,
        hard=np.ones(n, bool),
        soft=soft,
        label_logprob=logq[np.arange(n), labels],
        topk_logprobs=np.log(np.take_along_axis(teacher_full, ids, -1)),
        student_topk_logprobs=np.take_along_axis(logq, ids, -1),
        confidence=np.exp(logq.max(-1)),
        correct=top == labels,
        agree=top == ids[:, 0],
    )


def test_sequence_sums_give_token_means():
    rng = np.random.default_rng(1)
    rows = _rows(rng, 5, [3, 8, 1, 6, 4])
    sums = metrics.per_sequence_sums(rows, 5, ece_bins=10)
    values = metrics.metric_values({k: np.asarray(v).sum(0) for k, v in sums.items()})
    ce = -rows.label_logprob.mean()
    assert values["ce"] == pytest.approx(ce)
    assert values["perplexity"] == pytest.approx(math.exp(ce))
    soft = rows.soft
    kl = metrics.kl_over_bins(rows.topk_logprobs, rows.student_topk_logprobs)[soft].mean()
    assert values["kl_teacher_student"] == pytest.approx(kl)
    assert values["top1_agreement"] == pytest.approx(rows.agree[soft].mean())
    ece = metrics.expected_calibration_error(rows.confidence, rows.correct, 10)
    assert values["ece"] == pytest.approx(ece)


def test_perplexity_of_uniform_model_is_vocab_size():
    n, vocab = 12, 64
    rows = metrics.TokenRows(
        sequence=np.arange(n) % 3,
        hard=np.ones(n, bool),
        soft=np.zeros(n, bool),
        label_logprob=np.full(n, -math.log(vocab)),
        topk_logprobs=np.full((n, 1), -np.inf),
        student_topk_logprobs=np.zeros((n, 1)),
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
    shifted = metrics.TokenRows(**{**rows_a.__dict__, "label_logprob": rows_a.label_logprob - 0.1})
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
