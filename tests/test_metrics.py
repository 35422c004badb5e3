"""Classification metrics and study aggregation: hand-computed cases, scikit-learn and scipy as oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn import calibration as skcal
from sklearn import metrics as sk

from inference.evaluation import metrics as m
from inference.evaluation.aggregate import AggregationError, aggregate_probabilities, aggregate_studies

# The example of scikit-learn's documentation, worked by hand below.
Y4 = np.array([0, 0, 1, 1])
S4 = np.array([0.1, 0.4, 0.35, 0.8])


def random_case(seed: int, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    # Scores that depend on the label, so the metrics are away from chance.
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0.0, 1.0)
    return labels, (np.round(scores, 1) if ties else scores)


# ---------------------------------------------------------------------------------------------
# hand-computed


def test_hand_computed_ranking_metrics() -> None:
    # Pairs (positive, negative): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, *) right: 3 of 4.
    assert m.auroc(Y4, S4) == pytest.approx(0.75)
    # Ranked 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision 1 at recall 0.5, 2/3 at recall 1.
    assert m.average_precision(Y4, S4) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert m.brier_score(Y4, S4) == pytest.approx((0.01 + 0.16 + 0.65**2 + 0.04) / 4)


def test_ties_count_half_in_auroc() -> None:
    assert m.auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert m.auroc([0, 0, 1], [0.2, 0.5, 0.5]) == pytest.approx(0.75)


def test_hand_computed_ece() -> None:
    # Bin [0.1, 0.2): scores 0.1, 0.1, observed 1 of 2 -> |0.5 - 0.1| x 2/4.
    # Bin [0.9, 1.0]: scores 0.9, 1.0, observed 2 of 2 -> |1 - 0.95| x 2/4.
    labels = [0, 1, 1, 1]
    scores = [0.1, 0.1, 0.9, 1.0]
    assert m.expected_calibration_error(labels, scores) == pytest.approx(0.4 * 0.5 + 0.05 * 0.5)
    table = m.reliability(labels, scores)
    assert table.counts.tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table.observed[1] == pytest.approx(0.5) and table.mean_score[9] == pytest.approx(0.95)
    assert math.isnan(table.observed[0])


def test_hand_computed_kappa_and_f1() -> None:
    table = m.Confusion(tp=20, fp=5, tn=15, fn=10)
    # Observed agreement 35/50; chance (25 x 30 + 25 x 20) / 50^2 = 0.5.
    assert m.cohen_kappa(table) == pytest.approx((0.7 - 0.5) / (1 - 0.5))
    assert m.f1_score(table) == pytest.approx(40 / 55)
    assert math.isnan(m.cohen_kappa(m.Confusion(tp=0, fp=0, tn=5, fn=0)))


def test_operating_point_calls_at_or_above_threshold() -> None:
    table = m.confusion(Y4, S4, 0.4)
    assert (table.tp, table.fp, table.tn, table.fn) == (1, 1, 1, 1)
    result = m.classification_metrics(Y4, S4, [("youden", 0.4)], resamples=0)
    point = result.operating_points[0]
    assert point.sensitivity.estimate == 0.5 and point.specificity.estimate == 0.5
    assert point.ppv.estimate == 0.5 and point.npv.estimate == 0.5 and point.accuracy.estimate == 0.5
    assert math.isnan(point.kappa.low)  # no resamples, no interval


def test_undefined_statistics_are_nan() -> None:
    result = m.classification_metrics([0, 0, 0], [0.1, 0.2, 0.9], [("p", 0.5)], resamples=50)
    assert not result.auroc.defined and not result.average_precision.defined
    assert not result.operating_points[0].sensitivity.defined
    assert result.operating_points[0].specificity.estimate == pytest.approx(2 / 3)
    assert result.brier.defined


def test_invalid_inputs_raise() -> None:
    with pytest.raises(m.MetricsError):
        m.auroc([0, 2], [0.1, 0.2])
    with pytest.raises(m.MetricsError):
        m.auroc([0, 1], [0.1, 1.2])
    with pytest.raises(m.MetricsError):
        m.auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(m.MetricsError):
        m.wilson_interval(3, 2)


# ---------------------------------------------------------------------------------------------
# oracles


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_against_scikit_learn(seed: int, ties: bool) -> None:
    labels, scores = random_case(seed, 137, ties)
    assert m.auroc(labels, scores) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
    assert m.average_precision(labels, scores) == pytest.approx(
        sk.average_precision_score(labels, scores), abs=1e-12
    )
    assert m.brier_score(labels, scores) == pytest.approx(sk.brier_score_loss(labels, scores), abs=1e-12)
    for threshold in (0.3, 0.5, 0.7):
        calls = (scores >= threshold).astype(int)
        table = m.confusion(labels, scores, threshold)
        assert m.cohen_kappa(table) == pytest.approx(sk.cohen_kappa_score(labels, calls), abs=1e-12)
        assert m.f1_score(table) == pytest.approx(sk.f1_score(labels, calls), abs=1e-12)
        tn, fp, fn, tp = sk.confusion_matrix(labels, calls).ravel()
        assert (table.tp, table.fp, table.tn, table.fn) == (tp, fp, tn, fn)
    fpr, tpr, _ = sk.roc_curve(labels, scores, drop_intermediate=False)
    roc = m.roc_curve(labels, scores)
    np.testing.assert_allclose(roc.x, fpr)
    np.testing.assert_allclose(roc.y, tpr)
    precision, recall, _ = sk.precision_recall_curve(labels, scores)
    pr = m.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(pr.y, precision[:-1][::-1])
    np.testing.assert_allclose(pr.x, recall[:-1][::-1])


@pytest.mark.parametrize("seed", [0, 3])
def test_reliability_and_ece_against_scikit_learn_calibration_curve(seed: int) -> None:
    labels, scores = random_case(seed, 300, ties=False)
    observed, predicted = skcal.calibration_curve(labels, scores, n_bins=10, strategy="uniform")
    table = m.reliability(labels, scores, bins=10)
    filled = table.counts > 0
    np.testing.assert_allclose(table.observed[filled], observed)
    np.testing.assert_allclose(table.mean_score[filled], predicted)
    weights = table.counts[filled] / labels.size
    ece = float(np.sum(weights * np.abs(observed - predicted)))
    assert m.expected_calibration_error(labels, scores, bins=10) == pytest.approx(ece)


@pytest.mark.parametrize(("successes", "total"), [(0, 10), (8, 10), (10, 10), (37, 211)])
def test_wilson_against_scipy(successes: int, total: int) -> None:
    expected = binomtest(successes, total).proportion_ci(confidence_level=0.95, method="wilson")
    interval = m.wilson_interval(successes, total)
    assert interval.estimate == pytest.approx(successes / total)
    assert interval.low == pytest.approx(expected.low) and interval.high == pytest.approx(expected.high)


# ---------------------------------------------------------------------------------------------
# intervals


def test_wilson_contains_estimate_and_shrinks_with_n() -> None:
    widths = []
    for total in (10, 100, 1000):
        interval = m.wilson_interval(int(0.3 * total), total)
        assert interval.low <= interval.estimate <= interval.high
        widths.append(interval.high - interval.low)
    assert widths[0] > widths[1] > widths[2]
    assert m.wilson_interval(0, 5).low == 0.0 and m.wilson_interval(0, 5).high > 0.0


def test_bootstrap_contains_estimate_and_shrinks_with_n() -> None:
    widths: dict[str, list[float]] = {"auroc": [], "ap": [], "kappa": []}
    for n in (60, 600, 6000):
        labels, scores = random_case(7, n, ties=False)
        result = m.classification_metrics(labels, scores, [("p", 0.5)], resamples=300, seed=1)
        for key, interval in (
            ("auroc", result.auroc),
            ("ap", result.average_precision),
            ("kappa", result.operating_points[0].kappa),
        ):
            assert interval.low <= interval.estimate <= interval.high
            widths[key].append(interval.high - interval.low)
        for interval in (result.brier, result.ece, result.operating_points[0].f1):
            assert interval.low <= interval.estimate <= interval.high
    for key, values in widths.items():
        assert values[0] > values[1] > values[2], key


def test_bootstrap_is_seeded_and_stratified() -> None:
    labels, scores = random_case(11, 80, ties=False)
    stats = {"auroc": m.auroc_rows}
    first = m.bootstrap_intervals(labels, scores, stats, resamples=200, seed=5)
    again = m.bootstrap_intervals(labels, scores, stats, resamples=200, seed=5)
    other = m.bootstrap_intervals(labels, scores, stats, resamples=200, seed=6)
    assert first == again
    assert first != other
    # Stratified: with two positives in 80, a plain bootstrap would often draw none (NaN AUROC).
    few = labels.copy()
    few[:] = 0
    few[:2] = 1
    interval = m.bootstrap_intervals(few, scores, stats, resamples=200, seed=5)["auroc"]
    assert interval.defined and not math.isnan(interval.low)


def test_bootstrap_interval_covers_auroc_of_the_population() -> None:
    # Binormal scores with separation d have AUROC Phi(d / sqrt(2)); a 95% interval from 400
    # cases should contain it for a fixed seed (and does for most seeds).
    from scipy.stats import norm

    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(200, int), np.zeros(200, int)]
    raw = np.r_[rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 200)]
    scores = 1.0 / (1.0 + np.exp(-raw))
    interval = m.bootstrap_intervals(labels, scores, {"auroc": m.auroc_rows}, resamples=500)["auroc"]
    truth = float(norm.cdf(1.0 / math.sqrt(2.0)))
    assert interval.low < truth < interval.high
    assert interval.high - interval.low < 0.12


# ---------------------------------------------------------------------------------------------
# aggregation


def test_aggregate_by_mean_and_max() -> None:
    assert aggregate_probabilities([0.2, 0.4, 0.9], "mean") == pytest.approx(0.5)
    assert aggregate_probabilities([0.2, 0.4, 0.9], "max") == pytest.approx(0.9)
    assert aggregate_probabilities(np.array([0.3]), "mean") == pytest.approx(0.3)
    with pytest.raises(AggregationError):
        aggregate_probabilities([], "mean")
    with pytest.raises(AggregationError):
        aggregate_probabilities([0.1], "median")  # type: ignore[arg-type]


def test_aggregate_studies_groups_views() -> None:
    keys = [("s1", "g"), ("s2", "g"), ("s1", "g"), ("s1", "h")]
    labels = [0, 1, 1, 0]
    scores = [0.2, 0.7, 0.6, 0.1]
    by_mean = aggregate_studies(keys, labels, scores, "mean")
    assert by_mean.keys == (("s1", "g"), ("s2", "g"), ("s1", "h"))
    assert by_mean.labels.tolist() == [1, 1, 0]  # any positive view makes the study positive
    np.testing.assert_allclose(by_mean.scores, [0.4, 0.7, 0.1])
    assert by_mean.views.tolist() == [2, 1, 1]
    by_max = aggregate_studies(keys, labels, scores, "max")
    np.testing.assert_allclose(by_max.scores, [0.6, 0.7, 0.1])
    with pytest.raises(AggregationError):
        aggregate_studies(keys[:2], labels, scores, "mean")
