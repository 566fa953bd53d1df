"""Held-out metrics as pure functions, and bootstrap confidence intervals over sequences.

Per-token inputs (``TokenRows``) come from ``student.evaluate``, which computes them from vocab-parallel logits
with the loss's own kernel (``student.losses.topk_cross_entropy``): hard CE -log q(y) on the actual next token;
over the k+1 bins (the teacher's k tokens plus "everything else"), with teacher p = (w_1..w_k, r),
w_j = exp(l_j), r = 1 - sum_j w_j, and student (q_t1..q_tk, s), s = 1 - sum_j q_tj,

    soft CE  = -sum_j w_j log q_tj - r log s                       (= H_bins(p) + KL)
    KL(p||q) = sum_j w_j (l_j - log q_tj) + r (log r - log s)      (0 log 0 = 0);

the student's top-1 probability (ECE confidence), whether that top-1 is the label (ECE correctness) and whether
it is the teacher's top-1 (agreement). Perplexity is exp of the token-mean hard CE.

Sequences are the bootstrap unit (tokens within a sequence are not independent): ``per_sequence_sums``
reduces token rows to one row of sums per held-out sequence, and every metric is a ratio of sums over the
sequences drawn, so a resample is one matrix product. ECE keeps, per sequence, a histogram over confidence bins
(count, summed confidence, summed correctness): the ECE of a resample is computed from the summed histograms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

METRICS = ("ce", "perplexity", "soft_ce", "kl_teacher_student", "top1_agreement", "ece")
"""The metrics ``metric_values`` computes, in the order reports show them."""


def confidence_bin(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Index of the equal-width bin ((b/B, (b+1)/B], the first one closed at 0) of each confidence."""
    return np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def _calibration_rows(confidence: np.ndarray, correct: np.ndarray) -> np.ndarray:
    return np.stack([np.ones(len(confidence)), confidence, correct], -1).astype(np.float64)


def calibration_histogram(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """[n_bins, 3]: per confidence bin, count, summed confidence, summed correctness."""
    out = np.zeros((n_bins, 3), dtype=np.float64)
    np.add.at(out, confidence_bin(confidence, n_bins), _calibration_rows(confidence, correct))
    return out


def ece_from_histogram(hist: np.ndarray) -> np.ndarray:
    """Expected calibration error sum_b (n_b/N) |acc_b - conf_b| of one histogram [B,3] or many [..., B,3]."""
    total = hist[..., 0].sum(-1)
    gap = np.abs(hist[..., 2] - hist[..., 1]).sum(-1)
    return gap / np.maximum(total, 1.0)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    return float(ece_from_histogram(calibration_histogram(confidence, correct, n_bins)))


@dataclass
class TokenRows:
    """Per-position values of one model on the held-out data, all arrays [N].

    ``sequence`` numbers the held-out sequence of each position (0..S-1); ``hard`` marks positions whose label
    is a real next token, ``soft`` those that also have a teacher top-k. ``ce`` = -log q(y); ``soft_ce`` and
    ``kl`` over the k+1 bins; ``confidence`` = max_v q(v); ``correct``: student top-1 == label; ``agree``:
    student top-1 == teacher top-1.
    """

    sequence: np.ndarray
    hard: np.ndarray
    soft: np.ndarray
    ce: np.ndarray
    soft_ce: np.ndarray
    kl: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    agree: np.ndarray


SUM_KEYS = ("tokens", "ce_sum", "soft_tokens", "soft_ce_sum", "kl_sum", "agree_sum")


def per_sequence_sums(rows: TokenRows, num_sequences: int, ece_bins: int) -> dict[str, np.ndarray]:
    """Token rows -> per-sequence sums: each ``SUM_KEYS`` entry [S] and ``calibration`` [S, B, 3] (ECE over
    ``hard`` positions)."""
    hard = rows.hard.astype(bool)
    soft = rows.soft.astype(bool) & hard
    seq = rows.sequence.astype(np.int64)

    def total(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.bincount(seq[mask], weights=values[mask].astype(np.float64), minlength=num_sequences)

    ones = np.ones(len(seq))
    calibration = np.zeros((num_sequences, ece_bins, 3))
    bins = confidence_bin(rows.confidence, ece_bins)
    np.add.at(calibration, (seq[hard], bins[hard]), _calibration_rows(rows.confidence, rows.correct)[hard])
    return {
        "tokens": total(ones, hard),
        "ce_sum": total(rows.ce, hard),
        "soft_tokens": total(ones, soft),
        "soft_ce_sum": total(rows.soft_ce, soft),
        "kl_sum": total(rows.kl, soft),
        "agree_sum": total(rows.agree, soft),
        "calibration": calibration,
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)


def metric_values(totals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every metric from summed sequence stats; works on one total (scalars) or a batch of resamples [R]."""
    ce = _ratio(totals["ce_sum"], totals["tokens"])
    return {
        "ce": ce,
        "perplexity": np.exp(ce),
        "soft_ce": _ratio(totals["soft_ce_sum"], totals["soft_tokens"]),
        "kl_teacher_student": _ratio(totals["kl_sum"], totals["soft_tokens"]),
        "top1_agreement": _ratio(totals["agree_sum"], totals["soft_tokens"]),
        "ece": ece_from_histogram(totals["calibration"]),
    }


def _resample_totals(sums: Mapping[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Totals of R resamples given how often each sequence was drawn, ``counts`` [R, S]."""
    out = {k: counts @ sums[k] for k in SUM_KEYS}
    cal = sums["calibration"]
    out["calibration"] = (counts @ cal.reshape(cal.shape[0], -1)).reshape(len(counts), *cal.shape[1:])
    return out


def bootstrap_counts(num_sequences: int, n_resamples: int, seed: int) -> np.ndarray:
    """[R, S] how often each sequence is drawn in each resample (S draws with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_sequences, np.full(num_sequences, 1.0 / num_sequences), size=n_resamples)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def _check_sums(sums: Mapping[str, np.ndarray]) -> int:
    n = len(sums["tokens"])
    if n < 2:
        raise ValueError(f"a bootstrap over sequences needs at least 2 held-out sequences, got {n}")
    return n


def summarize(
    sums: Mapping[str, np.ndarray], n_resamples: int, confidence: float, seed: int = 0
) -> dict[str, dict[str, float]]:
    """``{metric: {value, ci_low, ci_high}}`` with percentile bootstrap intervals over sequences."""
    n = _check_sums(sums)
    point = metric_values({k: np.asarray(v).sum(0) for k, v in sums.items()})
    boot = metric_values(_resample_totals(sums, bootstrap_counts(n, n_resamples, seed)))
    out = {}
    for name in METRICS:
        low, high = _interval(boot[name], confidence)
        out[name] = {"value": float(point[name]), "ci_low": low, "ci_high": high}
    return out


def paired_difference(
    sums_a: Mapping[str, np.ndarray],
    sums_b: Mapping[str, np.ndarray],
    n_resamples: int,
    confidence: float,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{metric: {value, ci_low, ci_high}}`` of metric(a) - metric(b), both models resampled with the same
    sequences in each draw (a paired bootstrap: the variation shared by both models cancels)."""
    n = _check_sums(sums_a)
    if _check_sums(sums_b) != n:
        raise ValueError(f"paired bootstrap needs the same sequences: {n} vs {len(sums_b['tokens'])}")
    counts = bootstrap_counts(n, n_resamples, seed)
    point_a = metric_values({k: np.asarray(v).sum(0) for k, v in sums_a.items()})
    point_b = metric_values({k: np.asarray(v).sum(0) for k, v in sums_b.items()})
    boot_a = metric_values(_resample_totals(sums_a, counts))
    boot_b = metric_values(_resample_totals(sums_b, counts))
    out = {}
    for name in METRICS:
        low, high = _interval(boot_a[name] - boot_b[name], confidence)
        out[name] = {"value": float(point_a[name] - point_b[name]), "ci_low": low, "ci_high": high}
    return out
