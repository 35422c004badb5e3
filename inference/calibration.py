"""Calibration, operating points and the validation metrics of a model card; pure numpy/scipy.

- Temperature scaling (Guo et al. 2017): one scalar ``T`` fitted by minimising the negative
  log-likelihood of ``sigmoid(logit / T)`` (or ``softmax(logits / T)``) on held-apart
  validation logits. ECE and Brier score are reported before and after.
- For binary models, by default, a logit offset ``b`` is fitted with ``T``:
  ``sigmoid(logit / T + b)`` (Platt scaling written as a temperature and a shift). A network
  trained on balanced batches assumes a fracture prevalence of about one half; one temperature
  cannot move its probabilities to the validation prevalence, the offset can. Both keep the
  ranking, so AUROC and the operating points' sensitivity/specificity do not change.
- Operating points: a high-sensitivity point (sensitivity >= 0.90), a high-specificity point
  (specificity >= 0.90) and Youden's J. They are chosen with nested selection: inside repeated
  stratified folds of the validation set each threshold is chosen on the other folds and
  applied to the held-out fold, and the card reports the pooled out-of-fold sensitivity and
  specificity with Wilson 95% intervals; the threshold itself is then chosen on the whole set.
- AUROC with DeLong's 95% interval; Wilson intervals for proportions.

A threshold ``t`` calls an image positive when its calibrated probability is ``>= t``.

Errors::

    CalibrationError        too few labels of a class, mismatched shapes, non-finite values
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import optimize, special, stats

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, YOUDEN, OperatingPoint

FloatArray = NDArray[np.float64]

TARGET_SENSITIVITY = 0.90
TARGET_SPECIFICITY = 0.90
_EPS = 1e-6


class CalibrationError(ValueError):
    """Data that cannot be calibrated or scored (one class only, shapes, NaN)."""


def _binary(labels: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.int64], FloatArray]:
    y = np.asarray(labels).astype(np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise CalibrationError(f"{y.size} labels for {s.size} scores")
    if not np.all(np.isfinite(s)):
        raise CalibrationError("scores contain NaN or infinity")
    if not np.all((y == 0) | (y == 1)):
        raise CalibrationError("labels must be 0 or 1")
    return y, s


def _both_classes(y: NDArray[np.int64]) -> None:
    if y.sum() == 0 or y.sum() == y.size:
        raise CalibrationError(f"need positives and negatives, got {int(y.sum())} of {y.size} positive")


def sigmoid(x: ArrayLike) -> FloatArray:
    return np.asarray(special.expit(np.asarray(x, dtype=np.float64)), dtype=np.float64)


def logit(p: ArrayLike) -> FloatArray:
    """The log-odds of probabilities, clipped away from 0 and 1 so the result stays finite."""
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.asarray(np.log(q) - np.log1p(-q), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# proportions and AUROC


def wilson_interval(successes: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; (0, 1) when ``total`` is 0."""
    if total <= 0:
        return (0.0, 1.0)
    z = float(stats.norm.ppf(0.5 + level / 2))
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _midranks(x: FloatArray) -> FloatArray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(1, x.size + 1, dtype=np.float64)
    # average the ranks of tied values
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse], dtype=np.float64)


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted one half)."""
    y, s = _binary(labels, scores)
    _both_classes(y)
    ranks = _midranks(s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_with_ci(labels: ArrayLike, scores: ArrayLike, level: float = 0.95) -> tuple[float, float, float]:
    """``(auroc, low, high)`` with DeLong's variance (DeLong et al. 1988; Sun & Xu 2014)."""
    y, s = _binary(labels, scores)
    _both_classes(y)
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    all_ranks = _midranks(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = _midranks(pos), _midranks(neg)
    area = float((all_ranks[:m].sum() - m * (m + 1) / 2) / (m * n))
    v10 = (all_ranks[:m] - pos_ranks) / n
    v01 = 1.0 - (all_ranks[m:] - neg_ranks) / m
    variance = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    z = float(stats.norm.ppf(0.5 + level / 2))
    half = z * math.sqrt(max(float(variance), 0.0))
    return area, max(0.0, area - half), min(1.0, area + half)


def sensitivity_specificity(
    labels: ArrayLike, probabilities: ArrayLike, threshold: float
) -> tuple[float, float]:
    y, p = _binary(labels, probabilities)
    called = p >= threshold
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    sens = float(called[y == 1].sum() / n_pos) if n_pos else float("nan")
    spec = float((~called[y == 0]).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


# --------------------------------------------------------------------------------------------
# calibration


def expected_calibration_error(labels: ArrayLike, probabilities: ArrayLike, bins: int = 10) -> float:
    """ECE of a binary probability: sum over equal-width bins of |fraction positive - mean p| * share.

    Bins are ``[0, 1/b), [1/b, 2/b), ..., [(b-1)/b, 1]``.
    """
    y, p = _binary(labels, probabilities)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        if count:
            total += abs(float(y[inside].mean()) - float(p[inside].mean())) * count / y.size
    return total


def brier_score(labels: ArrayLike, probabilities: ArrayLike) -> float:
    y, p = _binary(labels, probabilities)
    return float(np.mean((p - y) ** 2))


def _binary_nll(z: FloatArray, y: NDArray[np.int64], log_t: float, offset: float) -> float:
    scaled = z / math.exp(log_t) + offset
    # -[y log s + (1-y) log(1-s)] with log s = -softplus(-x)
    return float(np.mean(np.logaddexp(0.0, -scaled) * y + np.logaddexp(0.0, scaled) * (1 - y)))


def fit_temperature(logits: ArrayLike, labels: ArrayLike) -> float:
    """The temperature ``T`` minimising the validation NLL.

    Binary: ``logits`` has shape (N,) and ``labels`` 0/1. Multi-class: ``logits`` (N, K) and
    ``labels`` class indices. ``T`` is searched on log scale within [0.05, 20].
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if not np.all(np.isfinite(z)):
        raise CalibrationError("logits contain NaN or infinity")
    if z.ndim == 1:
        _binary(y, z)
        _both_classes(y)

        def nll(log_t: float) -> float:
            return _binary_nll(z, y, log_t, 0.0)

    elif z.ndim == 2:
        if z.shape[0] != y.size:
            raise CalibrationError(f"{y.size} labels for {z.shape[0]} logit rows")
        if y.min() < 0 or y.max() >= z.shape[1]:
            raise CalibrationError("class index out of range")

        def nll(log_t: float) -> float:
            scaled = z / math.exp(log_t)
            log_p = scaled - special.logsumexp(scaled, axis=1, keepdims=True)
            return float(-np.mean(log_p[np.arange(y.size), y]))

    else:
        raise CalibrationError(f"logits must be 1-D or 2-D, got shape {z.shape}")
    result = optimize.minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(float(result.x)))


def fit_temperature_offset(logits: ArrayLike, labels: ArrayLike) -> tuple[float, float]:
    """``(T, b)`` minimising the validation NLL of ``sigmoid(logit / T + b)`` (binary only).

    ``T`` stays within [0.05, 20] and ``b`` within [-10, 10].
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y, _ = _binary(labels, z)
    _both_classes(y)
    start = (math.log(fit_temperature(z, y)), 0.0)
    result = optimize.minimize(
        lambda v: _binary_nll(z, y, float(v[0]), float(v[1])),
        np.array(start),
        method="L-BFGS-B",
        bounds=[(math.log(0.05), math.log(20.0)), (-10.0, 10.0)],
    )
    return float(math.exp(float(result.x[0]))), float(result.x[1])


def apply_calibration(logits: ArrayLike, temperature: float, offset: float = 0.0) -> FloatArray:
    """Calibrated probabilities ``sigmoid(logit / T + b)``."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / temperature + offset)


@dataclass(frozen=True, slots=True)
class CalibrationReport:
    temperature: float
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    n: int
    logit_offset: float = 0.0
    method: str = "temperature"  # or "temperature+offset"

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "method": self.method,
            "temperature": round(self.temperature, 6),
            "logit_offset": round(self.logit_offset, 6),
            "ece_before": round(self.ece_before, 6),
            "ece_after": round(self.ece_after, 6),
            "brier_before": round(self.brier_before, 6),
            "brier_after": round(self.brier_after, 6),
            "n": self.n,
        }


def calibrate_temperature(logits: ArrayLike, labels: ArrayLike, offset: bool = True) -> CalibrationReport:
    """Fit ``T`` (and the offset ``b`` unless ``offset`` is false) on binary logits.

    ECE and Brier are reported before (``sigmoid(logit)``) and after calibration.
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y, _ = _binary(labels, z)
    if offset:
        temperature, shift = fit_temperature_offset(z, y)
    else:
        temperature, shift = fit_temperature(z, y), 0.0
    before, after = sigmoid(z), apply_calibration(z, temperature, shift)
    return CalibrationReport(
        temperature=temperature,
        logit_offset=shift,
        method="temperature+offset" if offset else "temperature",
        ece_before=expected_calibration_error(y, before),
        ece_after=expected_calibration_error(y, after),
        brier_before=brier_score(y, before),
        brier_after=brier_score(y, after),
        n=int(y.size),
    )


# --------------------------------------------------------------------------------------------
# operating points


def threshold_for_sensitivity(
    labels: ArrayLike, probabilities: ArrayLike, target: float = TARGET_SENSITIVITY
) -> float:
    """The highest threshold whose sensitivity on these data is at least ``target``."""
    y, p = _binary(labels, probabilities)
    positives = np.sort(p[y == 1])[::-1]
    if positives.size == 0:
        raise CalibrationError("no positives to choose a sensitivity threshold on")
    k = max(1, math.ceil(target * positives.size - 1e-9))
    return float(positives[k - 1])


def threshold_for_specificity(
    labels: ArrayLike, probabilities: ArrayLike, target: float = TARGET_SPECIFICITY
) -> float:
    """The lowest threshold whose specificity on these data is at least ``target``.

    It lies half-way between the highest negative that must be called negative and the next
    higher score, so that the choice does not sit on a data point.
    """
    y, p = _binary(labels, probabilities)
    negatives = np.sort(p[y == 0])
    if negatives.size == 0:
        raise CalibrationError("no negatives to choose a specificity threshold on")
    m = max(1, math.ceil(target * negatives.size - 1e-9))
    bound = float(negatives[m - 1])
    higher = p[p > bound]
    if higher.size == 0:
        return float(np.nextafter(bound, np.inf))
    return (bound + float(higher.min())) / 2.0


def threshold_youden(labels: ArrayLike, probabilities: ArrayLike) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the lower one on ties)."""
    y, p = _binary(labels, probabilities)
    _both_classes(y)
    candidates = np.unique(p)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    # positives / negatives at or above each candidate, by sorted search
    pos_sorted = np.sort(p[y == 1])
    neg_sorted = np.sort(p[y == 0])
    tp = n_pos - np.searchsorted(pos_sorted, candidates, side="left")
    fp = n_neg - np.searchsorted(neg_sorted, candidates, side="left")
    j = tp / n_pos + (n_neg - fp) / n_neg - 1.0
    return float(candidates[int(np.argmax(j))])


_CHOOSERS = {
    HIGH_SENSITIVITY: threshold_for_sensitivity,
    HIGH_SPECIFICITY: threshold_for_specificity,
    YOUDEN: threshold_youden,
}


def stratified_folds(
    labels: NDArray[np.int64], folds: int, rng: np.random.Generator
) -> list[NDArray[np.int64]]:
    """Indices of ``folds`` folds, each class spread evenly over them in random order."""
    out: list[list[int]] = [[] for _ in range(folds)]
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        rng.shuffle(members)
        start = int(rng.integers(folds))
        for i, index in enumerate(members):
            out[(start + i) % folds].append(int(index))
    return [np.array(sorted(f), dtype=np.int64) for f in out]


def operating_points(
    labels: ArrayLike,
    probabilities: ArrayLike,
    names: Sequence[str] = (HIGH_SENSITIVITY, HIGH_SPECIFICITY, YOUDEN),
    folds: int = 5,
    repeats: int = 5,
    seed: int = 0,
) -> tuple[OperatingPoint, ...]:
    """Thresholds chosen on all the data; sensitivity/specificity from nested out-of-fold choice.

    For each repeat and fold, the threshold is chosen on the other folds and applied to the held-
    out fold; TP/FN/TN/FP are pooled over folds and repeats, and the interval is Wilson's on the
    per-repeat counts (the number of images, not images times repeats).
    """
    y, p = _binary(labels, probabilities)
    _both_classes(y)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    folds = max(2, min(folds, n_pos, n_neg))
    rng = np.random.default_rng(seed)
    pooled = {name: np.zeros(4, dtype=np.int64) for name in names}  # tp, fn, tn, fp
    for _ in range(repeats):
        for held in stratified_folds(y, folds, rng):
            mask = np.ones(y.size, dtype=bool)
            mask[held] = False
            for name in names:
                t = _CHOOSERS[name](y[mask], p[mask])
                called = p[held] >= t
                truth = y[held] == 1
                pooled[name] += np.array(
                    [
                        (called & truth).sum(),
                        (~called & truth).sum(),
                        (~called & ~truth).sum(),
                        (called & ~truth).sum(),
                    ]
                )
    points = []
    for name in names:
        tp, fn, tn, fp = (int(v) for v in pooled[name])
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        points.append(
            OperatingPoint(
                name=name,
                threshold=float(_CHOOSERS[name](y, p)),
                sensitivity=round(sens, 4),
                specificity=round(spec, 4),
                sensitivity_ci=tuple(round(v, 4) for v in wilson_interval(round(sens * n_pos), n_pos)),  # type: ignore[arg-type]
                specificity_ci=tuple(round(v, 4) for v in wilson_interval(round(spec * n_neg), n_neg)),  # type: ignore[arg-type]
            )
        )
    return tuple(points)


def binary_metrics(labels: ArrayLike, probabilities: ArrayLike) -> dict[str, Any]:
    """AUROC with its DeLong 95% CI, counts, ECE and Brier: the card's ``validation_metrics`` core."""
    y, p = _binary(labels, probabilities)
    area, low, high = auroc_with_ci(y, p)
    return {
        "n": int(y.size),
        "positives": int(y.sum()),
        "auroc": round(area, 4),
        "auroc_ci": [round(low, 4), round(high, 4)],
        "ece": round(expected_calibration_error(y, p), 4),
        "brier": round(brier_score(y, p), 4),
    }
