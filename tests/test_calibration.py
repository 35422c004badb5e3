"""Calibration maths against known cases: temperature, ECE/Brier, thresholds, AUROC, Wilson."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from inference.calibration import (
    CalibrationError,
    auroc,
    auroc_with_ci,
    brier_score,
    calibrate_temperature,
    expected_calibration_error,
    fit_temperature,
    fit_temperature_offset,
    operating_points,
    sensitivity_specificity,
    sigmoid,
    threshold_for_sensitivity,
    threshold_for_specificity,
    threshold_youden,
    wilson_interval,
)
from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, YOUDEN


def _synthetic(scale: float, n: int = 40_000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true probability is sigmoid(z / scale): temperature ``scale`` calibrates them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 4.0, n)  # wide logits: the scale is well determined
    y = (rng.random(n) < sigmoid(z / scale)).astype(np.int64)
    return z, y


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.5])
def test_temperature_recovers_a_known_scale(scale: float) -> None:
    z, y = _synthetic(scale)
    assert fit_temperature(z, y) == pytest.approx(scale, rel=0.06)


def test_multiclass_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 3.0, (30_000, 4))
    scaled = logits / 2.0
    p = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = (rng.random((len(p), 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.06)


def test_calibration_report_improves_an_overconfident_model() -> None:
    z, y = _synthetic(3.0, n=20_000)
    report = calibrate_temperature(z, y)
    assert report.ece_after < report.ece_before
    assert report.brier_after < report.brier_before
    assert report.n == 20_000


@pytest.mark.parametrize(("scale", "shift"), [(1.0, -1.5), (2.0, 0.0), (0.7, 1.0)])
def test_temperature_and_offset_recover_a_known_scale_and_shift(scale: float, shift: float) -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(0.0, 4.0, 40_000)
    y = (rng.random(z.size) < sigmoid(z / scale + shift)).astype(np.int64)
    temperature, offset = fit_temperature_offset(z, y)
    assert temperature == pytest.approx(scale, rel=0.06)
    assert offset == pytest.approx(shift, abs=0.08)


def test_offset_undoes_the_prevalence_of_balanced_training() -> None:
    """A model trained 1:1 whose data hold 15 % fractures: temperature alone cannot fix it."""
    rng = np.random.default_rng(4)
    y = (rng.random(20_000) < 0.15).astype(np.int64)
    z = rng.normal(np.where(y == 1, 1.0, -1.0), 1.2)  # centred on 0: assumes prevalence 1/2
    alone = calibrate_temperature(z, y, offset=False)
    shifted = calibrate_temperature(z, y)
    assert alone.logit_offset == 0.0 and alone.method == "temperature"
    assert shifted.method == "temperature+offset" and shifted.logit_offset < -1.0
    assert shifted.ece_after < 0.02 < alone.ece_after
    assert shifted.brier_after < alone.brier_after
    assert shifted.as_dict()["logit_offset"] == round(shifted.logit_offset, 6)


def test_ece_and_brier_on_hand_computed_cases() -> None:
    labels = [0, 1, 1, 0]
    probs = [0.1, 0.9, 0.8, 0.3]
    # bins: 0.1 -> [0.1,0.2): |0-0.1|; 0.3 -> [0.3,0.4): |0-0.3|; 0.8: |1-0.8|; 0.9: |1-0.9|; each 1/4
    assert expected_calibration_error(labels, probs) == pytest.approx((0.1 + 0.3 + 0.2 + 0.1) / 4)
    assert brier_score(labels, probs) == pytest.approx((0.01 + 0.01 + 0.04 + 0.09) / 4)
    # two images in one bin: |mean label 0.5 - mean p 0.65| * 2/2
    assert expected_calibration_error([0, 1], [0.61, 0.69]) == pytest.approx(0.15)
    # p = 1.0 lands in the last bin, not past it
    assert expected_calibration_error([1], [1.0]) == pytest.approx(0.0)


def test_auroc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    area, low, high = auroc_with_ci(y, s)
    assert area == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert low < area < high
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5


def test_delong_interval_narrows_with_more_data() -> None:
    widths = []
    for n in (100, 1600):
        rng = np.random.default_rng(n)
        y = rng.integers(0, 2, n)
        s = rng.normal(y, 1.0)
        _, low, high = auroc_with_ci(y, s)
        widths.append(high - low)
    assert widths[1] < widths[0] / 3  # ~ 1/sqrt(16) = 1/4


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0.1 < high < 0.2


@pytest.mark.parametrize("seed", range(5))
def test_thresholds_meet_their_constraint_on_the_data_they_were_chosen_on(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    p = sigmoid(rng.normal(y * 1.5, 1.0))
    sens, _ = sensitivity_specificity(y, p, threshold_for_sensitivity(y, p))
    assert sens >= 0.90
    _, spec = sensitivity_specificity(y, p, threshold_for_specificity(y, p))
    assert spec >= 0.90
    # the sensitivity threshold is the highest that meets it: a hair higher fails
    t = threshold_for_sensitivity(y, p)
    assert sensitivity_specificity(y, p, float(np.nextafter(t, 1.0)))[0] < 0.90
    # Youden's threshold maximises J over every candidate
    j_best = sum(sensitivity_specificity(y, p, threshold_youden(y, p))) - 1
    j_all = max(sum(sensitivity_specificity(y, p, float(c))) - 1 for c in np.unique(p))
    assert j_best == pytest.approx(j_all)


def test_operating_points_are_nested_and_named() -> None:
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 400)
    p = sigmoid(rng.normal(y * 2.0, 1.0))
    points = {point.name: point for point in operating_points(y, p, folds=5, repeats=3, seed=0)}
    assert set(points) == {HIGH_SENSITIVITY, HIGH_SPECIFICITY, YOUDEN}
    assert points[HIGH_SENSITIVITY].threshold == threshold_for_sensitivity(y, p)
    assert points[HIGH_SPECIFICITY].threshold == threshold_for_specificity(y, p)
    assert points[HIGH_SENSITIVITY].threshold < points[HIGH_SPECIFICITY].threshold
    for point in points.values():
        assert point.sensitivity_ci[0] <= point.sensitivity <= point.sensitivity_ci[1]
        assert point.specificity_ci[0] <= point.specificity <= point.specificity_ci[1]
    # out-of-fold the constraint holds only approximately: it is an honest estimate, not a promise
    assert 0.80 <= points[HIGH_SENSITIVITY].sensitivity <= 0.97
    assert 0.80 <= points[HIGH_SPECIFICITY].specificity <= 0.97


def test_one_class_is_refused() -> None:
    with pytest.raises(CalibrationError, match="positives and negatives"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(CalibrationError):
        fit_temperature(np.array([0.1, math.nan]), np.array([0, 1]))
    with pytest.raises(CalibrationError, match="labels"):
        brier_score([0, 2], [0.1, 0.2])


def test_detector_confidences_get_the_cards_temperature_and_offset() -> None:
    from inference.models.detector import calibrate_confidence

    confidence = np.array([0.1, 0.5, 0.9])
    z = np.log(confidence / (1 - confidence))
    assert np.allclose(calibrate_confidence(confidence, 2.0, -1.0), sigmoid(z / 2.0 - 1.0))
    assert np.allclose(calibrate_confidence(confidence, 1.0), confidence)
