"""Detector metrics on constructed cases whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as sk

from inference.evaluation import detection as d
from inference.evaluation.metrics import MetricsError


def box(x0: float, y0: float, x1: float, y1: float, score: float) -> d.ScoredBox:
    return d.ScoredBox(x0, y0, x1, y1, score)


L1 = (0.1, 0.1, 0.2, 0.2)
L2 = (0.5, 0.5, 0.6, 0.6)
L3 = (0.7, 0.1, 0.8, 0.3)
L4 = (0.3, 0.6, 0.4, 0.7)
ELSEWHERE = (0.0, 0.8, 0.05, 0.9)


def constructed() -> list[d.ImageDetections]:
    """Ranked over all images: 0.9 TP, 0.8 TP, 0.7 FP, 0.6 FP, 0.5 TP, 0.3 FP, 0.2 TP.

    Four fractures in ten images (the last five empty and without boxes).
    """
    images = [
        d.ImageDetections("a", "case1", 1, (L1,), (box(*L1, 0.9),)),
        d.ImageDetections("b", "case1", 1, (L2, L3), (box(*L2, 0.8), box(*ELSEWHERE, 0.6), box(*L3, 0.5))),
        d.ImageDetections("c", "case2", 0, (), (box(*ELSEWHERE, 0.7),)),
        d.ImageDetections("d", "case3", 1, (L4,), (box(*L4, 0.2),)),
        d.ImageDetections("e", "case4", 0, (), (box(*ELSEWHERE, 0.3),)),
    ]
    images += [d.ImageDetections(f"n{i}", f"case{5 + i}", 0, (), ()) for i in range(5)]
    return images


def test_iou_by_hand() -> None:
    assert d.iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert d.iou((0, 0, 1, 1), (0, 0, 1, 1)) == pytest.approx(1.0)
    assert d.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    with pytest.raises(MetricsError):
        d.iou((1, 0, 0, 1), (0, 0, 1, 1))


def test_second_box_on_a_found_fracture_is_a_false_positive() -> None:
    image = d.ImageDetections("x", "c", 1, (L1,), (box(*L1, 0.4), box(*L1, 0.9)))
    scores, hits = d.match_image(image, 0.5)
    assert scores.tolist() == [0.9, 0.4]
    assert hits.tolist() == [True, False]


def test_greedy_match_takes_the_unmatched_box_with_most_overlap() -> None:
    left, right = (0.0, 0.0, 0.4, 0.4), (0.3, 0.0, 0.7, 0.4)
    # The first prediction overlaps `right` most; the second is left with `left`.
    image = d.ImageDetections(
        "x", "c", 1, (left, right), (box(0.28, 0.0, 0.68, 0.4, 0.9), box(0.05, 0.0, 0.45, 0.4, 0.8))
    )
    _, hits = d.match_image(image, 0.5)
    assert hits.tolist() == [True, True]


def test_froc_known_answer() -> None:
    curve = d.froc(constructed())
    # Cumulative (FP, found) after each box: (0,1) (0,2) (1,2) (2,2) (2,3) (3,3) (3,4); 10 images.
    np.testing.assert_allclose(curve.fp_per_image, [0, 0, 0, 0.1, 0.2, 0.2, 0.3, 0.3])
    np.testing.assert_allclose(curve.sensitivity, [0, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 1.0])
    assert curve.recall_at == ((0.1, 0.5), (0.2, 0.75), (0.3, 1.0), (0.4, 1.0), (0.5, 1.0))


def test_froc_rate_below_the_first_false_positive() -> None:
    images = [d.ImageDetections("a", "a", 1, (L1,), (box(*ELSEWHERE, 0.9), box(*L1, 0.5)))]
    curve = d.froc(images, rates=(0.5, 1.0))
    assert curve.recall_at == ((0.5, 0.0), (1.0, 1.0))


def test_average_precision_known_answer() -> None:
    # Precision after each box: 1, 1, 2/3, 2/4, 3/5, 3/6, 4/7 at recall .25 .5 .5 .5 .75 .75 1.
    # Interpolated precision: 1 up to recall 0.5 (51 of COCO's 101 levels), 0.6 up to 0.75
    # (25 levels), 4/7 up to 1 (25 levels).
    expected = (51 * 1.0 + 25 * 0.6 + 25 * 4 / 7) / 101
    assert d.average_precision_at(constructed(), 0.5) == pytest.approx(expected)
    # Every true positive is an exact match, so AP is the same at every IoU threshold.
    assert d.mean_average_precision(constructed()) == pytest.approx(expected)


def test_map_over_iou_thresholds_known_answer() -> None:
    truth = (0.0, 0.0, 1.0, 1.0)
    images = [d.ImageDetections("a", "a", 1, (truth,), (box(0.0, 0.0, 0.72, 1.0, 0.8),))]
    # IoU 0.72: found at IoU thresholds 0.50 ... 0.70 (AP 1), missed at 0.75 ... 0.95 (AP 0).
    assert d.average_precision_at(images, 0.7) == pytest.approx(1.0)
    assert d.average_precision_at(images, 0.75) == 0.0
    assert d.mean_average_precision(images) == pytest.approx(0.5)
    assert math.isnan(d.mean_average_precision([d.ImageDetections("n", "n", 0, (), ())]))


def test_lesion_image_and_case_levels() -> None:
    result = d.detection_metrics(constructed(), [("op", 0.55)], resamples=100)
    lesion = result.lesion_level[0]
    # Boxes >= 0.55: 0.9 TP, 0.8 TP, 0.7 FP, 0.6 FP.
    assert (lesion.true_positives, lesion.false_positives, lesion.lesions) == (2, 2, 4)
    assert lesion.precision.estimate == 0.5 and lesion.recall.estimate == 0.5
    assert lesion.false_positives_per_image == pytest.approx(0.2)
    assert result.images == 10 and result.cases == 9 and result.lesions == 4
    # Image scores: a .9, b .8, c .7, d .2, e .3, five empty 0; labels 1 1 0 1 0 0 0 0 0 0.
    image = result.image_level.operating_points[0].confusion
    assert (image.tp, image.fp, image.tn, image.fn) == (2, 1, 6, 1)
    labels = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.2, 0.3, 0, 0, 0, 0, 0]
    assert result.image_level.auroc.estimate == pytest.approx(sk.roc_auc_score(labels, scores))
    # Cases: case1 = max(a, b) = 0.9 positive; the rest one image each.
    case = result.case_level.operating_points[0].confusion
    assert (case.tp, case.fp, case.tn, case.fn) == (1, 1, 6, 1)
    assert result.case_level.n == 9 and result.case_level.positives == 2


def test_confidences_outside_unit_interval_raise() -> None:
    with pytest.raises(MetricsError):
        d.froc([d.ImageDetections("a", "a", 1, (L1,), (box(*L1, 1.5),))])
