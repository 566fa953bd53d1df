"""Held-out metrics as pure functions, and the clustered, seed-aware bootstrap of their intervals.

Per-token inputs (``TokenRows``) come from ``student.evaluate``, which computes them from vocab-parallel logits
with the loss's own kernel (``student.losses.topk_cross_entropy``): hard CE -log q(y) on the actual next token;
over the k+1 bins (the teacher's k tokens plus "everything else"), with teacher p = (w_1..w_k, r),
w_j = exp(l_j), r = 1 - sum_j w_j = 1 - W, and student (q_t1..q_tk, s), s = 1 - sum_j q_tj,

    soft CE  = -sum_j w_j log q_tj - r log s                       (= H_bins(p) + KL)
    KL(p||q) = sum_j w_j (l_j - log q_tj) + r (log r - log s)      (0 log 0 = 0);

This "KL over top-k + tail bins" is the soft loss itself: it cannot see how the student spreads the tail mass
over the tail tokens. So, where the teacher model is available, ``full_kl`` is KL(teacher||student) over the
whole vocabulary; ``ce_outside_teacher_topk`` is the student's hard CE on the positions whose actual token is
not among the teacher's stored top-k (how well the student does where the top-k targets said nothing), and
the data itself is described by the teacher's top-k mass W and the rate at which the actual token is in the
top-k. Also: the student's top-1 probability (ECE confidence), whether that top-1 is the label (ECE
correctness) and whether it is the teacher's top-1 (agreement). Perplexity is exp of the token-mean hard CE.

Intervals (``summarize_runs`` / ``difference_runs``): held-out documents are clustered in source files and a
student is trained once per seed, so both are resampled. Per-token rows are reduced to one row of sums per
*cluster* (``per_cluster_sums``) for each training seed's model; every metric is a ratio of sums over the
clusters drawn. One bootstrap replicate draws F clusters with replacement (the same draw for every model and
seed: the comparison is paired) and J seeds with replacement (the same seed indices for both models of a
difference: seed s fixes the data order of every student), computes each seed's metric on the drawn clusters
and averages it over the drawn seeds. Resampling J seeds shrinks their spread by (J-1)/J, so the seed part of
each replicate (its distance from the all-seed mean on the same clusters) is scaled by sqrt(J/(J-1)). The
interval is the percentile interval of the replicates. With one seed the seed part is zero: the interval
then covers held-out sampling only (``training_variance`` says so). ECE keeps, per cluster, a histogram over
confidence bins (count, summed confidence, summed correctness), so a replicate's ECE comes from summed
histograms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = (
    "ce",
    "perplexity",
    "soft_ce",
    "kl_teacher_student",
    "full_kl_teacher_student",
    "ce_outside_teacher_topk",
    "top1_agreement",
    "ece",
)
"""The model metrics ``metric_values`` computes, in the order reports show them."""
DATA_METRICS = ("teacher_topk_mass_mean", "actual_in_teacher_topk_rate")
"""Facts of the held-out data and its stored top-k (the same for every model)."""
BREAKDOWN_METRICS = ("ce", "kl_teacher_student", "full_kl_teacher_student")
"""The metrics split by buckets of the teacher's top-k mass W."""

_NEEDS = {
    "ce": ("ce_sum", "tokens"),
    "perplexity": ("ce_sum", "tokens"),
    "soft_ce": ("soft_ce_sum", "soft_tokens"),
    "kl_teacher_student": ("kl_sum", "soft_tokens"),
    "full_kl_teacher_student": ("full_kl_sum", "full_tokens"),
    "ce_outside_teacher_topk": ("outside_ce_sum", "outside_tokens"),
    "top1_agreement": ("agree_sum", "soft_tokens"),
    "ece": ("calibration",),
    "teacher_topk_mass_mean": ("mass_sum", "soft_tokens"),
    "actual_in_teacher_topk_rate": ("in_topk_sum", "soft_tokens"),
}


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

    ``cluster`` numbers the resampling unit of each position (its document's source file, 0..F-1); ``hard``
    marks positions whose label is a real next token, ``soft`` those that also have a teacher top-k. ``ce`` =
    -log q(y); ``soft_ce`` and ``kl`` over the k+1 bins; ``confidence`` = max_v q(v); ``correct``: student
    top-1 == label; ``agree``: student top-1 == teacher top-1. ``full_kl``: KL(teacher||student) over the whole
    vocabulary (NaN where not computed); ``topk_mass``: the teacher's stored top-k mass W; ``in_topk``: the
    label is among the teacher's stored top-k.
    """

    cluster: np.ndarray
    hard: np.ndarray
    soft: np.ndarray
    ce: np.ndarray
    soft_ce: np.ndarray
    kl: np.ndarray
    confidence: np.ndarray
    correct: np.ndarray
    agree: np.ndarray
    full_kl: np.ndarray | None = None
    topk_mass: np.ndarray | None = None
    in_topk: np.ndarray | None = None

    def select(self, mask: np.ndarray) -> TokenRows:
        """The rows where ``mask`` holds (e.g. one bucket of W)."""
        return TokenRows(**{k: None if v is None else v[mask] for k, v in self.__dict__.items()})


SUM_KEYS = (
    "tokens",
    "ce_sum",
    "soft_tokens",
    "soft_ce_sum",
    "kl_sum",
    "agree_sum",
    "full_tokens",
    "full_kl_sum",
    "outside_tokens",
    "outside_ce_sum",
    "mass_sum",
    "in_topk_sum",
)


def per_cluster_sums(rows: TokenRows, num_clusters: int, ece_bins: int) -> dict[str, np.ndarray]:
    """Token rows -> per-cluster sums: each ``SUM_KEYS`` entry [F] and ``calibration`` [F, B, 3] (ECE over
    ``hard`` positions)."""
    n = len(rows.cluster)
    hard = rows.hard.astype(bool)
    soft = rows.soft.astype(bool) & hard
    cluster = rows.cluster.astype(np.int64)
    full_kl = rows.full_kl if rows.full_kl is not None else np.full(n, np.nan)
    full = hard & np.isfinite(full_kl)
    mass = rows.topk_mass if rows.topk_mass is not None else np.full(n, np.nan)
    in_topk = rows.in_topk.astype(bool) if rows.in_topk is not None else np.zeros(n, bool)
    outside = soft & ~in_topk if rows.in_topk is not None else np.zeros(n, bool)

    def total(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.bincount(cluster[mask], weights=values[mask].astype(np.float64), minlength=num_clusters)

    ones = np.ones(n)
    calibration = np.zeros((num_clusters, ece_bins, 3))
    bins = confidence_bin(rows.confidence, ece_bins)
    rows_cal = _calibration_rows(rows.confidence, rows.correct)[hard]
    np.add.at(calibration, (cluster[hard], bins[hard]), rows_cal)
    return {
        "tokens": total(ones, hard),
        "ce_sum": total(rows.ce, hard),
        "soft_tokens": total(ones, soft),
        "soft_ce_sum": total(rows.soft_ce, soft),
        "kl_sum": total(rows.kl, soft),
        "agree_sum": total(rows.agree, soft),
        "full_tokens": total(ones, full),
        "full_kl_sum": total(full_kl, full),
        "outside_tokens": total(ones, outside),
        "outside_ce_sum": total(rows.ce, outside),
        "mass_sum": total(mass, soft & np.isfinite(mass)),
        "in_topk_sum": total(in_topk.astype(np.float64), soft),
        "calibration": calibration,
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)


def metric_values(totals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every metric whose sums are present, from summed cluster stats; on one total (scalars) or a batch of
    resamples [R]."""
    out = {}
    for name, keys in _NEEDS.items():
        if not all(k in totals for k in keys):
            continue
        if name == "ece":
            out[name] = ece_from_histogram(totals["calibration"])
        else:
            out[name] = _ratio(totals[keys[0]], totals[keys[1]])
            if name == "perplexity":
                out[name] = np.exp(out[name])
    return out


def _totals(sums: Mapping[str, np.ndarray], counts: np.ndarray | None) -> dict[str, np.ndarray]:
    """Totals over all clusters (``counts`` None) or of R resamples given how often each cluster was drawn,
    ``counts`` [R, F]."""
    if counts is None:
        return {k: np.asarray(v).sum(0) for k, v in sums.items()}
    out = {k: counts @ sums[k] for k in SUM_KEYS if k in sums}
    if "calibration" in sums:
        cal = sums["calibration"]
        out["calibration"] = (counts @ cal.reshape(cal.shape[0], -1)).reshape(len(counts), *cal.shape[1:])
    return out


@dataclass(frozen=True)
class Draws:
    """One bootstrap's draws: ``clusters`` [R, F] and ``seeds`` [R, J], how often each is drawn."""

    clusters: np.ndarray
    seeds: np.ndarray


def bootstrap_draws(num_clusters: int, num_seeds: int, n_resamples: int, seed: int) -> Draws:
    """F clusters and J seeds drawn with replacement in each of R replicates (fixed by ``seed``)."""
    if num_clusters < 2:
        raise ValueError(
            f"a bootstrap over held-out clusters (source files) needs at least 2 of them, got {num_clusters}"
        )
    rng = np.random.default_rng(seed)
    clusters = rng.multinomial(num_clusters, np.full(num_clusters, 1.0 / num_clusters), size=n_resamples)
    seeds = rng.multinomial(num_seeds, np.full(num_seeds, 1.0 / num_seeds), size=n_resamples)
    return Draws(clusters, seeds)


def _per_seed(runs: Sequence[Mapping[str, np.ndarray]], counts: np.ndarray | None) -> dict[str, np.ndarray]:
    """``{metric: [..., J]}``: each seed's metric on all clusters (``counts`` None) or on each replicate."""
    values = [metric_values(_totals(run, counts)) for run in runs]
    return {name: np.stack([v[name] for v in values], -1) for name in values[0]}


def _seed_average(per_seed: np.ndarray, draws: Draws) -> np.ndarray:
    """[R, J] -> [R]: the replicate's mean over its drawn seeds, its seed part scaled by sqrt(J/(J-1))."""
    j = per_seed.shape[-1]
    every = per_seed.mean(-1)
    if j == 1:
        return every
    drawn = (per_seed * draws.seeds).sum(-1) / j
    return every + math.sqrt(j / (j - 1)) * (drawn - every)


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def _estimates(
    point: dict[str, np.ndarray], boot: dict[str, np.ndarray], draws: Draws, confidence: float
) -> dict[str, dict[str, float | list[float]]]:
    out = {}
    for name, per_seed in point.items():
        finite = per_seed[np.isfinite(per_seed)]
        low, high = _interval(_seed_average(boot[name], draws), confidence)
        out[name] = {
            "value": float(per_seed.mean()) if len(finite) == len(per_seed) else math.nan,
            "ci_low": low,
            "ci_high": high,
            "spread": float(per_seed.std(ddof=1)) if len(finite) > 1 else math.nan,
            "seeds": [float(v) for v in per_seed],
        }
    return out


def _check_runs(runs: Sequence[Mapping[str, np.ndarray]]) -> int:
    if not runs:
        raise ValueError("no training seeds to summarize")
    sizes = {len(run["tokens"]) for run in runs}
    if len(sizes) != 1:
        raise ValueError(f"every seed must be evaluated on the same clusters, got sizes {sorted(sizes)}")
    return sizes.pop()


def summarize_runs(
    runs: Sequence[Mapping[str, np.ndarray]], n_resamples: int, confidence: float, seed: int = 0
) -> dict[str, dict[str, float | list[float]]]:
    """``{metric: {value, ci_low, ci_high, spread, seeds}}`` of one model trained once per seed (``runs``:
    per-cluster sums of each seed's model): ``value`` the mean over seeds, ``spread`` their standard deviation
    (NaN with one seed), ``seeds`` the per-seed values, the interval from the clustered, seed-aware bootstrap
    (module docstring)."""
    draws = bootstrap_draws(_check_runs(runs), len(runs), n_resamples, seed)
    return _estimates(_per_seed(runs, None), _per_seed(runs, draws.clusters), draws, confidence)


def difference_runs(
    runs_a: Sequence[Mapping[str, np.ndarray]],
    runs_b: Sequence[Mapping[str, np.ndarray]],
    n_resamples: int,
    confidence: float,
    seed: int = 0,
) -> dict[str, dict[str, float | list[float]]]:
    """The same as ``summarize_runs`` for metric(a) - metric(b), paired: seed j of a against seed j of b, both
    on the same drawn clusters and the same drawn seed indices, so variation shared by both cancels."""
    n = _check_runs(runs_a)
    if _check_runs(runs_b) != n or len(runs_a) != len(runs_b):
        raise ValueError(
            f"a paired comparison needs the same clusters and seeds: {n} clusters x {len(runs_a)} seeds vs "
            f"{len(runs_b[0]['tokens'])} x {len(runs_b)}"
        )
    draws = bootstrap_draws(n, len(runs_a), n_resamples, seed)
    point_a, point_b = _per_seed(runs_a, None), _per_seed(runs_b, None)
    boot_a, boot_b = _per_seed(runs_a, draws.clusters), _per_seed(runs_b, draws.clusters)
    point = {k: point_a[k] - point_b[k] for k in point_a}
    boot = {k: boot_a[k] - boot_b[k] for k in boot_a}
    return _estimates(point, boot, draws, confidence)


def mass_buckets(topk_mass: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bucket index of each W: bucket b holds edges[b-1] <= W < edges[b] (0 below edges[0], len(edges) at or
    above the last edge)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), topk_mass, side="right")
