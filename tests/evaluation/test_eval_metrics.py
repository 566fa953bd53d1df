"""student.metrics: ECE, perplexity and per-cluster sums against hand-computed values and direct token means;
the clustered, seed-aware bootstrap (coverage with known seed and file variance, paired differences). The per-token KL / CE / agreement are tested in
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
        cluster=seq,
        hard=np.ones(n, bool),
        soft=rng.random(n) < 0.8,
        ce=rng.exponential(2.0, n),
        soft_ce=rng.exponential(1.0, n),
        kl=rng.exponential(0.3, n),
        confidence=confidence,
        correct=rng.random(n) < confidence,
        agree=rng.random(n) < 0.4,
        full_kl=np.where(rng.random(n) < 0.9, rng.exponential(0.5, n), np.nan),
        topk_mass=rng.uniform(0.2, 1.0, n),
        in_topk=rng.random(n) < 0.7,
    )


def test_cluster_sums_give_token_means():
    rng = np.random.default_rng(1)
    rows = _rows(rng, 5, [3, 8, 1, 6, 4])
    rows.hard[[2, 7]] = False  # positions without a real label count nowhere
    sums = metrics.per_cluster_sums(rows, 5, ece_bins=10)
    values = metrics.metric_values({k: np.asarray(v).sum(0) for k, v in sums.items()})
    hard, soft = rows.hard, rows.soft & rows.hard
    full = hard & np.isfinite(rows.full_kl)
    assert values["ce"] == pytest.approx(rows.ce[hard].mean())
    assert values["perplexity"] == pytest.approx(math.exp(rows.ce[hard].mean()))
    assert values["soft_ce"] == pytest.approx(rows.soft_ce[soft].mean())
    assert values["kl_teacher_student"] == pytest.approx(rows.kl[soft].mean())
    assert values["full_kl_teacher_student"] == pytest.approx(rows.full_kl[full].mean())
    assert values["ce_outside_teacher_topk"] == pytest.approx(rows.ce[soft & ~rows.in_topk].mean())
    assert values["teacher_topk_mass_mean"] == pytest.approx(rows.topk_mass[soft].mean())
    assert values["actual_in_teacher_topk_rate"] == pytest.approx(rows.in_topk[soft].mean())
    assert values["top1_agreement"] == pytest.approx(rows.agree[soft].mean())
    ece = metrics.expected_calibration_error(rows.confidence[hard], rows.correct[hard], 10)
    assert values["ece"] == pytest.approx(ece)
    assert sums["tokens"].tolist() == [2, 7, 1, 6, 4]


def test_perplexity_of_uniform_model_is_vocab_size():
    n, vocab = 12, 64
    rows = metrics.TokenRows(
        cluster=np.arange(n) % 3,
        hard=np.ones(n, bool),
        soft=np.zeros(n, bool),
        ce=np.full(n, math.log(vocab)),
        soft_ce=np.zeros(n),
        kl=np.zeros(n),
        confidence=np.full(n, 1 / vocab),
        correct=np.zeros(n, bool),
        agree=np.zeros(n, bool),
    )
    out = metrics.summarize_runs([metrics.per_cluster_sums(rows, 3, 10)], n_resamples=50, confidence=0.95)
    assert out["perplexity"]["value"] == pytest.approx(vocab)
    assert out["perplexity"]["ci_low"] == pytest.approx(vocab)
    assert math.isnan(out["kl_teacher_student"]["value"])  # no teacher positions: undefined, not 0
    assert math.isnan(out["full_kl_teacher_student"]["value"])  # no teacher model: not computed
    assert math.isnan(out["ce"]["spread"]) and out["ce"]["seeds"] == [pytest.approx(math.log(vocab))]


def _synthetic_runs(rng, n_files, n_seeds, mu, seed_sd, file_sd, token_sd):
    """CE of seed j's model on file f: per-token values mu + a_j + b_f + noise, a_j ~ N(0, seed_sd) (training
    variance), b_f ~ N(0, file_sd) (files differ), files of 3..40 tokens."""
    tokens = rng.integers(3, 41, n_files).astype(float)
    file_effect = rng.normal(0, file_sd, n_files)
    runs = []
    for _ in range(n_seeds):
        seed_effect = rng.normal(0, seed_sd)
        noise = rng.normal(0, token_sd / np.sqrt(tokens))  # mean of `tokens` iid token values
        runs.append({"tokens": tokens, "ce_sum": tokens * (mu + seed_effect + file_effect + noise)})
    return runs


@pytest.mark.parametrize(
    ("seed_sd", "file_sd"), [(0.05, 0.15), (0.15, 0.05), (0.1, 0.1)], ids=["files", "seeds", "both"]
)
def test_clustered_seed_aware_interval_covers_the_truth_about_95_percent(seed_sd, file_sd):
    """Known variance from training seeds and from files: over repeated experiments (new seeds, new files each
    time) the interval must contain the true mean about 95% of the time, whichever source dominates; an
    interval that ignored either source would fall well short when that source dominates."""
    rng = np.random.default_rng(2)
    trials, covered, covered_files_only = 300, 0, 0
    for _ in range(trials):
        runs = _synthetic_runs(rng, 30, 8, 2.0, seed_sd, file_sd, 0.5)
        ci = metrics.summarize_runs(runs, n_resamples=400, confidence=0.95, seed=int(rng.integers(1 << 30)))
        ce = ci["ce"]
        assert ce["ci_low"] <= ce["value"] <= ce["ci_high"]
        assert ce["value"] == pytest.approx(np.mean(ce["seeds"]))
        covered += ce["ci_low"] <= 2.0 <= ce["ci_high"]
        files_only = metrics.summarize_runs(runs[:1], n_resamples=400, confidence=0.95, seed=1)["ce"]
        covered_files_only += files_only["ci_low"] <= 2.0 <= files_only["ci_high"]
    assert 0.90 <= covered / trials <= 0.99, covered
    if seed_sd > file_sd:  # one seed, files only: training variance left out, the interval is too narrow
        assert covered_files_only / trials < 0.85, covered_files_only


def test_paired_difference_cancels_shared_variation():
    rng = np.random.default_rng(3)
    runs_a = [metrics.per_cluster_sums(_rows(rng, 30, rng.integers(4, 20, 30)), 30, 10) for _ in range(3)]
    runs_b = [{**s, "ce_sum": s["ce_sum"] + 0.1 * s["tokens"]} for s in runs_a]
    diff = metrics.difference_runs(runs_b, runs_a, n_resamples=500, confidence=0.95)["ce"]
    # b is uniformly 0.1 nats worse than a on every seed: every paired resample sees exactly +0.1
    assert diff["value"] == pytest.approx(0.1)
    assert diff["ci_low"] == pytest.approx(0.1) and diff["ci_high"] == pytest.approx(0.1)
    assert diff["seeds"] == [pytest.approx(0.1)] * 3
    single = metrics.summarize_runs(runs_a, n_resamples=500, confidence=0.95)["ce"]
    assert single["ci_high"] - single["ci_low"] > 0.01  # while each model alone varies across resamples
    assert single["spread"] > 0


def test_bootstrap_needs_two_clusters():
    rows = _rows(np.random.default_rng(4), 1, [5])
    with pytest.raises(ValueError, match="at least 2 of them"):
        metrics.summarize_runs([metrics.per_cluster_sums(rows, 1, 10)], 10, 0.95)


def test_mass_buckets():
    edges = [0.5, 0.8, 0.95]
    got = metrics.mass_buckets(np.array([0.1, 0.5, 0.79, 0.8, 0.96, 1.0]), edges)
    assert got.tolist() == [0, 1, 1, 2, 3, 3]
