"""Fit the logistic stack of a group's classifier and a fracture-map model; choose it out of fold.

The stack (issue 12, item 3) is ``p = sigmoid(w_c * z_c + w_m * z_m + b)`` with ``z_c`` the
classifier's uncalibrated logit and ``z_m`` the map model's image score (its card's ``score``
method and flip TTA): :class:`inference.modelcard.Stack`, served by :mod:`node.modelset`.

- **Fit** (:func:`fit_logistic`): penalised maximum likelihood, ``sum log-loss + l2/2 * |w|^2``
  (the bias is not penalised), by Newton's method (IRLS) with step halving; the penalty keeps
  the weights finite on separable data. Plain numpy.
- **Choice** (:func:`compare_out_of_fold`): repeated stratified k-fold on the images the stack is
  fitted on (the early-stopping hold-out carved out of FracAtlas ``train``, never ``valid``).
  In each fold the stack is fitted on the other folds and scored on the held-out one, beside
  each member's own logit (which needs no fitting); the AUROC of each fold is kept. The stack is
  chosen when its mean fold AUROC beats the better member's.
- **Calibration** (:func:`calibrate_stack`): on ``valid``, once, a temperature and logit offset
  of the stack's logit (the classifiers' Platt scaling), folded into the weights and the bias,
  and the stack's own operating points (nested selection, as every card's).

Errors::

    CalibrationError (inference.calibration)   shapes that differ, one class only, NaN
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from inference.calibration import CalibrationError, auroc, operating_points
from inference.calibration import binary_metrics as card_metrics
from inference.maps import stacked_probabilities
from inference.modelcard import Stack
from inference.training.splits import repeated_kfold

FloatArray = NDArray[np.float64]

DEFAULT_L2 = 1.0
DEFAULT_FOLDS = 5
DEFAULT_REPEATS = 10
MEMBERS = ("stack", "classifier", "map")


def _inputs(
    classifier_logits: ArrayLike, map_logits: ArrayLike, labels: ArrayLike | None = None
) -> tuple[FloatArray, NDArray[np.int64]]:
    c = np.asarray(classifier_logits, dtype=np.float64).ravel()
    m = np.asarray(map_logits, dtype=np.float64).ravel()
    if c.shape != m.shape:
        raise CalibrationError(f"{c.size} classifier logits for {m.size} map logits")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(m))):
        raise CalibrationError("logits contain NaN or infinity")
    y = np.zeros(c.size, dtype=np.int64)
    if labels is not None:
        y = np.asarray(labels).astype(np.int64).ravel()
        if y.shape != c.shape:
            raise CalibrationError(f"{y.size} labels for {c.size} logits")
        if not np.all((y == 0) | (y == 1)):
            raise CalibrationError("labels must be 0 or 1")
    return np.column_stack([c, m]), y


def _penalised_loss(x: FloatArray, y: NDArray[np.int64], beta: FloatArray, l2: float) -> float:
    z = x @ beta[:2] + beta[2]
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    return loss + 0.5 * l2 * float(beta[:2] @ beta[:2])


def fit_logistic(
    x: ArrayLike, labels: ArrayLike, l2: float = DEFAULT_L2, iterations: int = 100
) -> tuple[tuple[float, float], float]:
    """``((w_1, w_2), b)`` of the L2-penalised logistic regression of ``labels`` on ``x`` (N, 2).

    Newton / IRLS on ``sum log-loss + l2 / 2 * (w_1^2 + w_2^2)``; each step is halved until the
    penalised loss does not rise. ``l2`` must be positive when the classes are separable.
    """
    features = np.asarray(x, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if features.ndim != 2 or features.shape[1] != 2 or features.shape[0] != y.size:
        raise CalibrationError(f"expected (N, 2) inputs for {y.size} labels, got {features.shape}")
    if y.sum() == 0 or y.sum() == y.size:
        raise CalibrationError(f"need positives and negatives, got {int(y.sum())} of {y.size} positive")
    if l2 < 0:
        raise CalibrationError(f"the L2 penalty {l2} must not be negative")
    design = np.column_stack([features, np.ones(y.size)])
    penalty = np.diag([l2, l2, 0.0])
    prevalence = float(y.mean())
    beta = np.array([0.0, 0.0, math.log(prevalence / (1.0 - prevalence))])
    loss = _penalised_loss(features, y, beta, l2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (p - y) + penalty @ beta
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + penalty + 1e-12 * np.eye(3)
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while True:
            candidate = beta - scale * step
            new_loss = _penalised_loss(features, y, candidate, l2)
            if new_loss <= loss + 1e-12 or scale < 1e-8:
                break
            scale /= 2.0
        beta, previous = candidate, loss
        loss = new_loss
        if float(np.max(np.abs(scale * step))) < 1e-10 or abs(previous - loss) < 1e-13:
            break
    return (float(beta[0]), float(beta[1])), float(beta[2])


def stack_logits(stack: Stack, classifier_logits: ArrayLike, map_logits: ArrayLike) -> FloatArray:
    """The stack's logit ``w_c z_c + w_m z_m + b`` per image."""
    x, _ = _inputs(classifier_logits, map_logits)
    return np.asarray(x @ np.asarray(stack.weights) + stack.bias, dtype=np.float64)


def fit_stack(
    classifier_logits: ArrayLike,
    map_logits: ArrayLike,
    labels: ArrayLike,
    classifier: str,
    l2: float = DEFAULT_L2,
    notes: str = "",
) -> Stack:
    """The stack of the two logits fitted on ``labels`` (no calibration, no operating points yet)."""
    x, y = _inputs(classifier_logits, map_logits, labels)
    weights, bias = fit_logistic(x, y, l2)
    return Stack(classifier=classifier, weights=weights, bias=bias, notes=notes)


# ---------------------------------------------------------------------------------------------
# out-of-fold choice


@dataclass(frozen=True, slots=True)
class StackComparison:
    """Fold AUROCs of the stack and of each member, out of fold, and the choice they make."""

    folds: int
    repeats: int
    images: int
    positives: int
    auroc: dict[str, tuple[float, ...]]  # "stack" / "classifier" / "map" -> one AUROC per fold
    chosen: str  # "stack", "classifier" or "map"
    l2: float = DEFAULT_L2
    weights: tuple[tuple[float, float, float], ...] = field(default=())  # (w_c, w_m, b) per fold

    def mean(self, member: str) -> float:
        values = np.asarray(self.auroc[member], dtype=np.float64)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else math.nan

    def wins(self) -> int:
        """Folds in which the stack beats both members."""
        s, c, m = (np.asarray(self.auroc[k]) for k in MEMBERS)
        return int(np.sum((s > c) & (s > m)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "folds": self.folds,
            "repeats": self.repeats,
            "images": self.images,
            "positives": self.positives,
            "l2": self.l2,
            "mean_auroc": {k: round(self.mean(k), 4) for k in MEMBERS},
            "sd_auroc": {
                k: round(float(np.nanstd(np.asarray(self.auroc[k], dtype=np.float64))), 4) for k in MEMBERS
            },
            "stack_wins_folds": self.wins(),
            "chosen": self.chosen,
        }


def _fold_auroc(labels: NDArray[np.int64], scores: FloatArray) -> float:
    try:
        return auroc(labels, scores)
    except CalibrationError:
        return math.nan


def compare_out_of_fold(
    classifier_logits: ArrayLike,
    map_logits: ArrayLike,
    labels: ArrayLike,
    *,
    studies: Sequence[str] | None = None,
    folds: int = DEFAULT_FOLDS,
    repeats: int = DEFAULT_REPEATS,
    seed: int = 0,
    l2: float = DEFAULT_L2,
) -> StackComparison:
    """Repeated stratified (study-grouped) k-fold AUROC of the stack against each member.

    Each fold's stack is fitted on the other folds only. The stack is ``chosen`` when its mean
    fold AUROC is higher than both members'; otherwise the better member is.
    """
    x, y = _inputs(classifier_logits, map_logits, labels)
    positives = int(y.sum())
    if positives < 2 or y.size - positives < 2:
        raise CalibrationError(f"need two images of each class, got {positives} of {y.size} positive")
    folds = max(2, min(folds, positives, y.size - positives))
    names = list(studies) if studies is not None else [str(k) for k in range(y.size)]
    scores: dict[str, list[float]] = {k: [] for k in MEMBERS}
    fitted: list[tuple[float, float, float]] = []
    for train, test in repeated_kfold(names, y, folds, repeats, seed):
        if y[train].sum() in (0, train.size):
            continue
        weights, bias = fit_logistic(x[train], y[train], l2)
        fitted.append((weights[0], weights[1], bias))
        scores["stack"].append(_fold_auroc(y[test], x[test] @ np.asarray(weights) + bias))
        scores["classifier"].append(_fold_auroc(y[test], x[test, 0]))
        scores["map"].append(_fold_auroc(y[test], x[test, 1]))
    comparison = StackComparison(
        folds=folds,
        repeats=repeats,
        images=int(y.size),
        positives=positives,
        auroc={k: tuple(v) for k, v in scores.items()},
        chosen="stack",
        l2=l2,
        weights=tuple(fitted),
    )
    means = {k: comparison.mean(k) for k in MEMBERS}
    best_member = "classifier" if means["classifier"] >= means["map"] else "map"
    chosen = "stack" if means["stack"] > means[best_member] else best_member
    return StackComparison(
        folds=comparison.folds,
        repeats=comparison.repeats,
        images=comparison.images,
        positives=comparison.positives,
        auroc=comparison.auroc,
        chosen=chosen,
        l2=l2,
        weights=comparison.weights,
    )


# ---------------------------------------------------------------------------------------------
# calibration on valid


def calibrate_stack(
    stack: Stack,
    classifier_logits: ArrayLike,
    map_logits: ArrayLike,
    labels: ArrayLike,
    seed: int = 0,
    offset: bool = True,
) -> Stack:
    """The stack recalibrated on these images: Platt scaling of its logit folded into its weights
    and bias, its operating points and validation metrics set on the calibrated probability."""
    from inference.training.package import calibration_fields

    z = stack_logits(stack, classifier_logits, map_logits)
    _, y = _inputs(classifier_logits, map_logits, labels)
    fields = calibration_fields(z, y, seed, offset)
    temperature, shift = float(fields["temperature"]), float(fields["logit_offset"])
    calibrated = Stack(
        classifier=stack.classifier,
        weights=(stack.weights[0] / temperature, stack.weights[1] / temperature),
        bias=stack.bias / temperature + shift,
        operating_points=tuple(fields["operating_points"]),
        validation_metrics=dict(fields["validation_metrics"]),
        notes=stack.notes,
    )
    return calibrated


def stack_metrics(
    stack: Stack, classifier_logits: ArrayLike, map_logits: ArrayLike, labels: ArrayLike
) -> dict[str, Any]:
    """AUROC (DeLong CI), ECE and Brier of the stacked probability on these images."""
    x, y = _inputs(classifier_logits, map_logits, labels)
    p = stacked_probabilities(stack, x[:, 0], x[:, 1])
    return card_metrics(y, p)


def stack_points(
    stack: Stack, classifier_logits: ArrayLike, map_logits: ArrayLike, labels: ArrayLike, seed: int = 0
) -> Stack:
    """The stack with operating points chosen on these images (no recalibration)."""
    x, y = _inputs(classifier_logits, map_logits, labels)
    p = stacked_probabilities(stack, x[:, 0], x[:, 1])
    return Stack(
        classifier=stack.classifier,
        weights=stack.weights,
        bias=stack.bias,
        operating_points=operating_points(y, p, seed=seed),
        validation_metrics=card_metrics(y, p),
        notes=stack.notes,
    )


__all__ = [
    "StackComparison",
    "calibrate_stack",
    "compare_out_of_fold",
    "fit_logistic",
    "fit_stack",
    "stack_logits",
    "stack_metrics",
    "stack_points",
]
