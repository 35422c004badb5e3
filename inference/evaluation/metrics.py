"""Binary classification metrics with 95% confidence intervals, as pure numpy functions.

Conventions: labels are 0/1, scores are probabilities in [0, 1], and a case is called positive
when its score is at or above the threshold (the ``>=`` of the node's operating points).

Intervals: proportions (accuracy, sensitivity, specificity, PPV, NPV) get Wilson score
intervals; AUROC, average precision, Brier score, ECE, F1 and Cohen's kappa get percentile
intervals from a stratified bootstrap (positives and negatives resampled separately, so every
resample keeps the prevalence and AUROC stays defined) driven by a seeded generator, so a report
is reproducible. Resampling treats the given units (images or studies) as independent.

Every statistic is written once, vectorised over a ``(B, n)`` matrix of scores whose columns
are ordered positives first (:class:`_Stratified`): the point estimate is the case ``B = 1``
and the bootstrap the case ``B = resamples``. A statistic the data leave undefined (AUROC
without negatives, PPV without positive calls) is NaN, and so is its interval.

Errors::

    MetricsError (ValueError)   labels not 0/1, arrays of different lengths, scores outside
                                [0, 1] or not finite, a confidence outside (0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import norm, rankdata

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_BINS = 10
# Score matrices of the bootstrap are built in blocks of about this many cells (memory bound).
_BLOCK_CELLS = 2_000_000


class MetricsError(ValueError):
    """Inputs a metric cannot be computed on; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate and its confidence interval; NaN where the data leave it undefined."""

    estimate: float
    low: float
    high: float

    @property
    def defined(self) -> bool:
        return not math.isnan(self.estimate)


NAN_INTERVAL = Interval(math.nan, math.nan, math.nan)


@dataclass(frozen=True, slots=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.tn + self.fn


@dataclass(frozen=True, slots=True)
class Curve:
    """A curve as parallel arrays, e.g. ROC (x = FPR, y = TPR) or PR (x = recall, y = precision)."""

    x: FloatArray
    y: FloatArray
    thresholds: FloatArray


@dataclass(frozen=True, slots=True)
class Reliability:
    """Equal-width probability bins: mean predicted probability and observed frequency per bin."""

    edges: FloatArray  # bins + 1 edges from 0 to 1
    mean_score: FloatArray  # NaN for an empty bin
    observed: FloatArray  # NaN for an empty bin
    counts: IntArray


@dataclass(frozen=True, slots=True)
class ThresholdMetrics:
    """Everything decided at one operating point of a model card."""

    name: str
    threshold: float
    confusion: Confusion
    accuracy: Interval
    sensitivity: Interval
    specificity: Interval
    ppv: Interval
    npv: Interval
    f1: Interval
    kappa: Interval


@dataclass(frozen=True, slots=True)
class ClassificationMetrics:
    n: int
    positives: int
    auroc: Interval
    average_precision: Interval
    brier: Interval
    ece: Interval
    operating_points: tuple[ThresholdMetrics, ...]


# --------------------------------------------------------------------------------------------
# input checks


def check_binary(labels: ArrayLike, scores: ArrayLike) -> tuple[IntArray, FloatArray]:
    """Labels as int64 0/1 and scores as float64 in [0, 1], both 1-D and of one length."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise MetricsError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise MetricsError(f"{y.size} labels but {s.size} scores")
    if y.size and not np.isin(y, (0, 1)).all():
        raise MetricsError("labels must be 0 or 1")
    if not np.isfinite(s).all() or (s.size and (s.min() < 0.0 or s.max() > 1.0)):
        raise MetricsError("scores must be finite probabilities in [0, 1]")
    return y.astype(np.int64), s


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise MetricsError(f"confidence must lie in (0, 1), got {confidence}")


# --------------------------------------------------------------------------------------------
# Wilson interval


def wilson_interval(successes: int, total: int, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """The proportion ``successes / total`` with its Wilson score interval (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n
    successes. ``total == 0`` gives :data:`NAN_INTERVAL`.
    """
    _check_confidence(confidence)
    if successes < 0 or successes > total:
        raise MetricsError(f"{successes} successes out of {total}")
    if total == 0:
        return NAN_INTERVAL
    z = float(norm.ppf(0.5 + confidence / 2.0))
    p = successes / total
    denominator = 1.0 + z * z / total
    centre = (p + z * z / (2.0 * total)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / total + z * z / (4.0 * total * total)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


# --------------------------------------------------------------------------------------------
# vectorised statistics over (B, n) score matrices, positives in the first columns


@dataclass(frozen=True, slots=True)
class _Stratified:
    """Scores split by label: ``positives`` and ``negatives`` as 1-D arrays."""

    positives: FloatArray
    negatives: FloatArray

    @classmethod
    def of(cls, labels: IntArray, scores: FloatArray) -> _Stratified:
        return cls(scores[labels == 1], scores[labels == 0])

    @property
    def n_pos(self) -> int:
        return int(self.positives.size)

    @property
    def n_neg(self) -> int:
        return int(self.negatives.size)

    def matrix(self) -> FloatArray:
        return np.concatenate([self.positives, self.negatives])[None, :]


BatchStatistic = Callable[[FloatArray, int], FloatArray]
"""``(scores (B, n) positives first, number of positives) -> values (B,)``."""


def _nan(rows: int) -> FloatArray:
    return np.full(rows, math.nan)


def auroc_rows(scores: FloatArray, n_pos: int) -> FloatArray:
    """Mann-Whitney U / (n_pos n_neg): the area under the ROC curve with ties counted half."""
    n_neg = scores.shape[1] - n_pos
    if n_pos == 0 or n_neg == 0:
        return _nan(scores.shape[0])
    ranks = rankdata(scores, axis=1)
    rank_sum = ranks[:, :n_pos].sum(axis=1)
    return np.asarray((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg), dtype=np.float64)


def average_precision_rows(scores: FloatArray, n_pos: int) -> FloatArray:
    """Sum over distinct thresholds of (recall step) x precision, as scikit-learn defines it.

    Each positive contributes the precision at the end of its block of tied scores, divided by
    the number of positives.
    """
    rows, n = scores.shape
    if n_pos == 0:
        return _nan(rows)
    order = np.argsort(-scores, axis=1, kind="stable")
    ordered = np.take_along_axis(scores, order, axis=1)
    hits = (order < n_pos).astype(np.float64)
    true_positives = np.cumsum(hits, axis=1)
    block_end = np.ones_like(ordered, dtype=bool)
    block_end[:, :-1] = ordered[:, 1:] != ordered[:, :-1]
    positions = np.arange(n)
    # For every position, the index of the last position of its block of tied scores.
    end = np.where(block_end, positions, n)
    end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
    precision_at_end = np.take_along_axis(true_positives, end, axis=1) / (end + 1.0)
    return np.asarray((hits * precision_at_end).sum(axis=1) / n_pos, dtype=np.float64)


def _labels_row(n: int, n_pos: int) -> FloatArray:
    y = np.zeros(n)
    y[:n_pos] = 1.0
    return y


def brier_rows(scores: FloatArray, n_pos: int) -> FloatArray:
    if scores.shape[1] == 0:
        return _nan(scores.shape[0])
    return np.asarray(((scores - _labels_row(scores.shape[1], n_pos)) ** 2).mean(axis=1), dtype=np.float64)


def _bin_index(scores: FloatArray, bins: int) -> IntArray:
    return np.minimum((scores * bins).astype(np.int64), bins - 1)


def _ece_rows(scores: FloatArray, n_pos: int, bins: int) -> FloatArray:
    """Expected calibration error: sum over bins of |observed - predicted| weighted by bin size."""
    rows, n = scores.shape
    if n == 0:
        return _nan(rows)
    index = _bin_index(scores, bins) + bins * np.arange(rows)[:, None]
    y = np.broadcast_to(_labels_row(n, n_pos), scores.shape)
    length = rows * bins
    predicted = np.bincount(index.ravel(), weights=scores.ravel(), minlength=length).reshape(rows, bins)
    observed = np.bincount(index.ravel(), weights=y.ravel(), minlength=length).reshape(rows, bins)
    return np.asarray(np.abs(observed - predicted).sum(axis=1) / n, dtype=np.float64)


def _counts_rows(scores: FloatArray, n_pos: int, threshold: float) -> tuple[FloatArray, ...]:
    called = scores >= threshold
    tp = called[:, :n_pos].sum(axis=1).astype(np.float64)
    fp = called[:, n_pos:].sum(axis=1).astype(np.float64)
    fn = n_pos - tp
    tn = (scores.shape[1] - n_pos) - fp
    return tp, fp, tn, fn


def _kappa_from_counts(tp: FloatArray, fp: FloatArray, tn: FloatArray, fn: FloatArray) -> FloatArray:
    """Cohen's kappa of the 2x2 table: (observed - chance agreement) / (1 - chance agreement)."""
    n = tp + fp + tn + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        observed = (tp + tn) / n
        chance = ((tp + fp) * (tp + fn) + (tn + fn) * (tn + fp)) / (n * n)
        kappa = (observed - chance) / (1.0 - chance)
    return np.where(chance >= 1.0, math.nan, kappa)


def _f1_from_counts(tp: FloatArray, fp: FloatArray, fn: FloatArray) -> FloatArray:
    denominator = 2.0 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, 2.0 * tp / denominator, math.nan)


def _kappa_rows(threshold: float) -> BatchStatistic:
    def statistic(scores: FloatArray, n_pos: int) -> FloatArray:
        tp, fp, tn, fn = _counts_rows(scores, n_pos, threshold)
        return _kappa_from_counts(tp, fp, tn, fn)

    return statistic


def _f1_rows(threshold: float) -> BatchStatistic:
    def statistic(scores: FloatArray, n_pos: int) -> FloatArray:
        tp, fp, _, fn = _counts_rows(scores, n_pos, threshold)
        return _f1_from_counts(tp, fp, fn)

    return statistic


def _ece_statistic(bins: int) -> BatchStatistic:
    def statistic(scores: FloatArray, n_pos: int) -> FloatArray:
        return _ece_rows(scores, n_pos, bins)

    return statistic


def ece_rows(scores: FloatArray, n_pos: int) -> FloatArray:
    """Expected calibration error over :data:`DEFAULT_BINS` equal-width bins, per row."""
    return _ece_rows(scores, n_pos, DEFAULT_BINS)


def _point(statistic: BatchStatistic, labels: ArrayLike, scores: ArrayLike) -> float:
    strata = _Stratified.of(*check_binary(labels, scores))
    return float(statistic(strata.matrix(), strata.n_pos)[0])


# --------------------------------------------------------------------------------------------
# scalar statistics


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    return _point(auroc_rows, labels, scores)


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision: sum of precision x recall increase over thresholds; NaN without positives."""
    return _point(average_precision_rows, labels, scores)


def brier_score(labels: ArrayLike, scores: ArrayLike) -> float:
    """Mean squared difference between probability and outcome (Brier 1950)."""
    return _point(brier_rows, labels, scores)


def expected_calibration_error(labels: ArrayLike, scores: ArrayLike, bins: int = DEFAULT_BINS) -> float:
    """ECE over ``bins`` equal-width bins (Naeini et al. 2015; Guo et al. 2017)."""
    return _point(_ece_statistic(bins), labels, scores)


def confusion(labels: ArrayLike, scores: ArrayLike, threshold: float) -> Confusion:
    """The 2x2 table of calls ``score >= threshold`` against the labels."""
    strata = _Stratified.of(*check_binary(labels, scores))
    tp, fp, tn, fn = (int(v[0]) for v in _counts_rows(strata.matrix(), strata.n_pos, threshold))
    return Confusion(tp=tp, fp=fp, tn=tn, fn=fn)


def cohen_kappa(table: Confusion) -> float:
    """Cohen's kappa of a 2x2 table; NaN when chance agreement is 1 (one class everywhere)."""
    values = [np.array([float(v)]) for v in (table.tp, table.fp, table.tn, table.fn)]
    return float(_kappa_from_counts(*values)[0])


def f1_score(table: Confusion) -> float:
    """2 TP / (2 TP + FP + FN); NaN when there are neither positives nor positive calls."""
    values = [np.array([float(v)]) for v in (table.tp, table.fp, table.fn)]
    return float(_f1_from_counts(*values)[0])


# --------------------------------------------------------------------------------------------
# curves


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> Curve:
    """FPR (x) and TPR (y) at every distinct threshold, from (0, 0) to (1, 1)."""
    y, s = check_binary(labels, scores)
    tps, fps, thresholds = _cumulative_counts(y, s)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = np.concatenate([[0.0], tps / n_pos]) if n_pos else np.full(tps.size + 1, math.nan)
        fpr = np.concatenate([[0.0], fps / n_neg]) if n_neg else np.full(fps.size + 1, math.nan)
    return Curve(x=fpr, y=tpr, thresholds=np.concatenate([[math.inf], thresholds]))


def precision_recall_curve(labels: ArrayLike, scores: ArrayLike) -> Curve:
    """Recall (x) and precision (y) at every distinct threshold, highest threshold first."""
    y, s = check_binary(labels, scores)
    tps, fps, thresholds = _cumulative_counts(y, s)
    n_pos = int(y.sum())
    recall = tps / n_pos if n_pos else np.full(tps.size, math.nan)
    precision = tps / np.maximum(tps + fps, 1.0)
    return Curve(x=recall, y=precision, thresholds=thresholds)


def _cumulative_counts(y: IntArray, s: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """True and false positives called at each distinct score, highest score first."""
    order = np.argsort(-s, kind="stable")
    ordered, hits = s[order], y[order].astype(np.float64)
    if ordered.size == 0:
        empty = np.array([], dtype=np.float64)
        return empty, empty, empty
    last = np.r_[np.flatnonzero(np.diff(ordered) != 0), ordered.size - 1]
    tps = np.cumsum(hits)[last]
    fps = (last + 1.0) - tps
    return tps, fps, ordered[last]


def reliability(labels: ArrayLike, scores: ArrayLike, bins: int = DEFAULT_BINS) -> Reliability:
    """Per-bin mean probability, observed fracture frequency and count (reliability diagram)."""
    y, s = check_binary(labels, scores)
    index = _bin_index(s, bins)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_score = np.bincount(index, weights=s, minlength=bins) / counts
        observed = np.bincount(index, weights=y.astype(np.float64), minlength=bins) / counts
    return Reliability(
        edges=np.linspace(0.0, 1.0, bins + 1),
        mean_score=np.where(counts > 0, mean_score, math.nan),
        observed=np.where(counts > 0, observed, math.nan),
        counts=counts.astype(np.int64),
    )


# --------------------------------------------------------------------------------------------
# stratified bootstrap


def bootstrap_intervals(
    labels: ArrayLike,
    scores: ArrayLike,
    statistics: Mapping[str, BatchStatistic],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Interval]:
    """Point estimates and stratified-bootstrap percentile intervals of several statistics.

    All statistics see the same resamples (one index matrix per block), so their intervals are
    consistent with each other. ``resamples == 0`` gives the estimates with NaN bounds.
    """
    _check_confidence(confidence)
    if resamples < 0:
        raise MetricsError(f"resamples must be >= 0, got {resamples}")
    strata = _Stratified.of(*check_binary(labels, scores))
    estimates = {name: float(stat(strata.matrix(), strata.n_pos)[0]) for name, stat in statistics.items()}
    samples: dict[str, list[FloatArray]] = {name: [] for name in statistics}
    rng = np.random.default_rng(seed)
    n = strata.n_pos + strata.n_neg
    block = max(1, _BLOCK_CELLS // max(n, 1))
    done = 0
    while done < resamples and n > 0:
        rows = min(block, resamples - done)
        matrix = np.concatenate(
            [
                strata.positives[rng.integers(0, strata.n_pos, size=(rows, strata.n_pos))],
                strata.negatives[rng.integers(0, strata.n_neg, size=(rows, strata.n_neg))],
            ],
            axis=1,
        )
        for name, stat in statistics.items():
            samples[name].append(stat(matrix, strata.n_pos))
        done += rows
    tail = (1.0 - confidence) / 2.0 * 100.0
    out: dict[str, Interval] = {}
    for name, estimate in estimates.items():
        values = np.concatenate(samples[name]) if samples[name] else np.array([])
        values = values[~np.isnan(values)]
        if math.isnan(estimate) or values.size == 0:
            out[name] = Interval(estimate, math.nan, math.nan)
            continue
        low, high = np.percentile(values, [tail, 100.0 - tail])
        out[name] = Interval(estimate, float(min(low, estimate)), float(max(high, estimate)))
    return out


def classification_metrics(
    labels: ArrayLike,
    scores: ArrayLike,
    thresholds: Sequence[tuple[str, float]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    bins: int = DEFAULT_BINS,
) -> ClassificationMetrics:
    """Every metric of the evaluation report for one set of units, at each named threshold."""
    y, s = check_binary(labels, scores)
    statistics: dict[str, BatchStatistic] = {
        "auroc": auroc_rows,
        "average_precision": average_precision_rows,
        "brier": brier_rows,
        "ece": _ece_statistic(bins),
    }
    for index, (_, threshold) in enumerate(thresholds):
        statistics[f"kappa/{index}"] = _kappa_rows(threshold)
        statistics[f"f1/{index}"] = _f1_rows(threshold)
    boot = bootstrap_intervals(y, s, statistics, resamples=resamples, seed=seed, confidence=confidence)
    points: list[ThresholdMetrics] = []
    for index, (name, threshold) in enumerate(thresholds):
        table = confusion(y, s, threshold)
        points.append(
            ThresholdMetrics(
                name=name,
                threshold=float(threshold),
                confusion=table,
                accuracy=wilson_interval(table.tp + table.tn, table.total, confidence),
                sensitivity=wilson_interval(table.tp, table.tp + table.fn, confidence),
                specificity=wilson_interval(table.tn, table.tn + table.fp, confidence),
                ppv=wilson_interval(table.tp, table.tp + table.fp, confidence),
                npv=wilson_interval(table.tn, table.tn + table.fn, confidence),
                f1=boot[f"f1/{index}"],
                kappa=boot[f"kappa/{index}"],
            )
        )
    return ClassificationMetrics(
        n=int(y.size),
        positives=int(y.sum()),
        auroc=boot["auroc"],
        average_precision=boot["average_precision"],
        brier=boot["brier"],
        ece=boot["ece"],
        operating_points=tuple(points),
    )
