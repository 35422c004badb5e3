"""Detector metrics: mAP, precision/recall, FROC, and the FAMO study's three levels.

Boxes are normalised ``(x0, y0, x1, y1)`` in [0, 1] of the source image; IoU does not change
under the per-axis scaling that normalisation is, so pixel and normalised IoU agree.

Matching (as in PASCAL VOC and COCO): within each image, predictions are taken in descending
confidence and each is matched to the unmatched fracture box it overlaps most, when that IoU
reaches the threshold; a prediction that matches nothing, including a second box on an already
found fracture, is a false positive. Because a prediction's match depends only on the
predictions ranked above it, one ranking of all predictions gives every confidence threshold
at once: AP, FROC and the operating points all read the same ranked list.

- **mAP@0.5** and **mAP@0.5:0.95**: AP with COCO's 101-point interpolated precision, at IoU 0.5
  and averaged over IoU 0.50, 0.55, ..., 0.95 (one class, so AP is mAP).
- **FROC**: fraction of fractures found against false positives per image, with the recall at
  0.1 ... 0.5 false positives per image that the multi-site study tabulates.
- **Levels** (FAMO study): per fracture (box recall and precision at an operating point), per
  image (an image is called positive when any box reaches the threshold; its score is its top
  box confidence, 0 without boxes) and per case (the same with the maximum over a case's images).
- **Localisation** (issue 12's target): at IoU 0.3 and 0.5, the recall reached with at most
  0.5 false-positive boxes per image over all images, negatives included (:func:`recall_at_budget`,
  with its Wilson interval and the confidence that reaches it), a FROC table at 0.1 ... 2 false
  positives per image, and box recall, precision and false positives per image at each box
  operating point (:func:`localisation`). Each image may be held to its own thresholds (the
  node holds each group's boxes to its own localiser's points): :func:`held_to`.

Errors::

    MetricsError (ValueError, from metrics)   a box with x1 < x0 or y1 < y0, a confidence
                                              outside [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.evaluation.aggregate import aggregate_studies
from inference.evaluation.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    ClassificationMetrics,
    FloatArray,
    Interval,
    MetricsError,
    classification_metrics,
    wilson_interval,
)

NormalisedBox = tuple[float, float, float, float]
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
FROC_RATES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_IOU = 0.5
LOCALISATION_IOUS: tuple[float, ...] = (0.3, 0.5)
LOCALISATION_RATES: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0)
FP_BUDGET = 0.5  # false-positive boxes per image of the issue-12 target


@dataclass(frozen=True, slots=True)
class ScoredBox:
    x0: float
    y0: float
    x1: float
    y1: float
    score: float


@dataclass(frozen=True, slots=True)
class ImageDetections:
    """One image's reference fracture boxes and the detector's boxes."""

    image_id: str
    case_id: str
    label: int  # 1 when the image shows a fracture (may hold even without a drawn box)
    truth: tuple[NormalisedBox, ...]
    predictions: tuple[ScoredBox, ...]


@dataclass(frozen=True, slots=True)
class Ranking:
    """Every prediction of a set of images in descending confidence, flagged true/false positive."""

    scores: FloatArray
    true_positive: np.ndarray  # bool, aligned with scores
    lesions: int
    images: int


@dataclass(frozen=True, slots=True)
class Froc:
    fp_per_image: FloatArray  # starts at 0, non-decreasing
    sensitivity: FloatArray  # fraction of fractures found, starts at 0
    thresholds: FloatArray  # confidence of each point; inf for the first
    recall_at: tuple[tuple[float, float], ...]  # (false positives per image, recall)


@dataclass(frozen=True, slots=True)
class LesionLevel:
    """Box-level precision and recall at one operating point (IoU at the matching threshold)."""

    name: str
    threshold: float
    true_positives: int
    false_positives: int
    lesions: int
    precision: Interval
    recall: Interval
    false_positives_per_image: float


@dataclass(frozen=True, slots=True)
class DetectionMetrics:
    images: int
    cases: int
    lesions: int
    map50: float
    map50_95: float
    froc: Froc
    lesion_level: tuple[LesionLevel, ...]
    image_level: ClassificationMetrics
    case_level: ClassificationMetrics


# --------------------------------------------------------------------------------------------
# overlap and matching


def _check_box(box: Sequence[float]) -> None:
    if box[2] < box[0] or box[3] < box[1]:
        raise MetricsError(f"box {tuple(box)} has x1 < x0 or y1 < y0")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes; 0 for two empty boxes."""
    return float(iou_matrix(np.array([a[:4]], dtype=np.float64), np.array([b[:4]], dtype=np.float64))[0, 0])


def iou_matrix(first: FloatArray, second: FloatArray) -> FloatArray:
    """IoU of every box of ``first`` (P, 4) with every box of ``second`` (T, 4): shape (P, T)."""
    first = first.reshape(-1, 4)
    second = second.reshape(-1, 4)
    if first.size == 0 or second.size == 0:
        return np.zeros((first.shape[0], second.shape[0]))
    for box in (*first, *second):
        _check_box(box)
    x0 = np.maximum(first[:, None, 0], second[None, :, 0])
    y0 = np.maximum(first[:, None, 1], second[None, :, 1])
    x1 = np.minimum(first[:, None, 2], second[None, :, 2])
    y1 = np.minimum(first[:, None, 3], second[None, :, 3])
    inter = np.clip(x1 - x0, 0.0, None) * np.clip(y1 - y0, 0.0, None)
    area_a = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
    area_b = (second[:, 2] - second[:, 0]) * (second[:, 3] - second[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def match_image(image: ImageDetections, iou_threshold: float) -> tuple[FloatArray, np.ndarray]:
    """The image's prediction scores in descending order and whether each is a true positive."""
    predictions = sorted(image.predictions, key=lambda box: -box.score)
    scores = np.array([box.score for box in predictions], dtype=np.float64)
    if scores.size and (scores.min() < 0.0 or scores.max() > 1.0):
        raise MetricsError("box confidences must lie in [0, 1]")
    hits = np.zeros(len(predictions), dtype=bool)
    if not predictions or not image.truth:
        return scores, hits
    overlaps = iou_matrix(
        np.array([(b.x0, b.y0, b.x1, b.y1) for b in predictions], dtype=np.float64),
        np.array(image.truth, dtype=np.float64),
    )
    taken = np.zeros(len(image.truth), dtype=bool)
    for index in range(len(predictions)):
        candidates = np.where(taken, -1.0, overlaps[index])
        best = int(np.argmax(candidates))
        if candidates[best] >= iou_threshold:
            taken[best] = True
            hits[index] = True
    return scores, hits


def rank(images: Sequence[ImageDetections], iou_threshold: float = DEFAULT_IOU) -> Ranking:
    """Match every image and merge the predictions into one ranking, highest confidence first."""
    scores: list[FloatArray] = []
    flags: list[np.ndarray] = []
    for image in images:
        image_scores, image_hits = match_image(image, iou_threshold)
        scores.append(image_scores)
        flags.append(image_hits)
    all_scores = np.concatenate(scores) if scores else np.array([], dtype=np.float64)
    all_flags = np.concatenate(flags) if flags else np.array([], dtype=bool)
    order = np.argsort(-all_scores, kind="stable")
    return Ranking(
        scores=all_scores[order],
        true_positive=all_flags[order],
        lesions=sum(len(image.truth) for image in images),
        images=len(images),
    )


def _threshold_points(ranking: Ranking) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Cumulative true and false positives at the end of each block of tied confidences."""
    if ranking.scores.size == 0:
        empty = np.array([], dtype=np.float64)
        return empty, empty, empty
    ends = np.r_[np.flatnonzero(np.diff(ranking.scores) != 0), ranking.scores.size - 1]
    tp = np.cumsum(ranking.true_positive.astype(np.float64))[ends]
    fp = (ends + 1.0) - tp
    return tp, fp, ranking.scores[ends]


# --------------------------------------------------------------------------------------------
# AP / mAP


def average_precision_at(images: Sequence[ImageDetections], iou_threshold: float) -> float:
    """AP at one IoU threshold, COCO's 101-point interpolation; NaN without reference boxes."""
    ranking = rank(images, iou_threshold)
    if ranking.lesions == 0:
        return math.nan
    tp, fp, _ = _threshold_points(ranking)
    if tp.size == 0:
        return 0.0
    recall = tp / ranking.lesions
    precision = tp / (tp + fp)
    # The precision envelope: the best precision at this recall or any higher one.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    levels = np.linspace(0.0, 1.0, 101)
    where = np.searchsorted(recall, levels, side="left")
    interpolated = np.where(where < recall.size, envelope[np.minimum(where, recall.size - 1)], 0.0)
    return float(interpolated.mean())


def mean_average_precision(
    images: Sequence[ImageDetections], iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS
) -> float:
    """The mean of :func:`average_precision_at` over ``iou_thresholds`` (COCO mAP@0.5:0.95)."""
    values = [average_precision_at(images, t) for t in iou_thresholds]
    return math.nan if any(math.isnan(v) for v in values) else float(np.mean(values))


# --------------------------------------------------------------------------------------------
# FROC and lesion level


def froc(
    images: Sequence[ImageDetections],
    iou_threshold: float = DEFAULT_IOU,
    rates: Sequence[float] = FROC_RATES,
) -> Froc:
    """Lesion sensitivity against false positives per image, over every confidence threshold.

    ``recall_at`` gives, for each rate, the highest sensitivity reached with at most that many
    false positives per image (0 when even the most confident box exceeds it).
    """
    ranking = rank(images, iou_threshold)
    tp, fp, thresholds = _threshold_points(ranking)
    images_count = max(ranking.images, 1)
    lesions = ranking.lesions
    sensitivity = np.r_[0.0, tp / lesions] if lesions else np.full(tp.size + 1, math.nan)
    fp_per_image = np.r_[0.0, fp / images_count]
    recall_at = []
    for rate in rates:
        allowed = sensitivity[fp_per_image <= rate + 1e-12]
        recall_at.append((float(rate), float(allowed.max()) if allowed.size else 0.0))
    return Froc(
        fp_per_image=fp_per_image,
        sensitivity=sensitivity,
        thresholds=np.r_[math.inf, thresholds],
        recall_at=tuple(recall_at),
    )


def lesion_level(
    images: Sequence[ImageDetections],
    name: str,
    threshold: float,
    iou_threshold: float = DEFAULT_IOU,
    confidence: float = DEFAULT_CONFIDENCE,
) -> LesionLevel:
    """Box precision and recall (Wilson intervals) counting the boxes at or above ``threshold``."""
    ranking = rank(images, iou_threshold)
    kept = ranking.scores >= threshold
    tp = int(ranking.true_positive[kept].sum())
    fp = int(kept.sum()) - tp
    return LesionLevel(
        name=name,
        threshold=float(threshold),
        true_positives=tp,
        false_positives=fp,
        lesions=ranking.lesions,
        precision=wilson_interval(tp, tp + fp, confidence),
        recall=wilson_interval(tp, ranking.lesions, confidence),
        false_positives_per_image=fp / max(ranking.images, 1),
    )


# --------------------------------------------------------------------------------------------
# image and case level


def image_scores(images: Sequence[ImageDetections]) -> tuple[np.ndarray, FloatArray]:
    """Each image's label and score: its most confident box, 0 when it has none."""
    labels = np.array([image.label for image in images], dtype=np.int64)
    scores = np.array([max((b.score for b in image.predictions), default=0.0) for image in images])
    return labels, scores.astype(np.float64)


def detection_metrics(
    images: Sequence[ImageDetections],
    thresholds: Sequence[tuple[str, float]],
    *,
    iou_threshold: float = DEFAULT_IOU,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> DetectionMetrics:
    """mAP, FROC, and per-fracture, per-image and per-case metrics at each operating point."""
    labels, scores = image_scores(images)
    cases = aggregate_studies([image.case_id for image in images], labels, scores, "max")
    return DetectionMetrics(
        images=len(images),
        cases=len(cases.keys),
        lesions=sum(len(image.truth) for image in images),
        map50=average_precision_at(images, 0.5),
        map50_95=mean_average_precision(images),
        froc=froc(images, iou_threshold),
        lesion_level=tuple(
            lesion_level(images, name, t, iou_threshold, confidence) for name, t in thresholds
        ),
        image_level=classification_metrics(
            labels, scores, thresholds, resamples=resamples, seed=seed, confidence=confidence
        ),
        case_level=classification_metrics(
            cases.labels, cases.scores, thresholds, resamples=resamples, seed=seed, confidence=confidence
        ),
    )


# --------------------------------------------------------------------------------------------
# localisation: recall within a false-positive budget, over all images


@dataclass(frozen=True, slots=True)
class BudgetRecall:
    """The most fractures found with at most ``budget`` false-positive boxes per image."""

    budget: float
    iou: float
    recall: Interval  # Wilson interval on hits / fracture boxes
    hits: int
    lesions: int
    false_positives_per_image: float  # at the confidence reached
    threshold: float  # the lowest box confidence counted; inf when no box fits the budget


@dataclass(frozen=True, slots=True)
class Localisation:
    """Boxes against fracture boxes at one IoU, every image counted (negatives give only FPs)."""

    iou: float
    images: int
    negatives: int
    lesions: int
    target: BudgetRecall
    recall_at: tuple[tuple[float, float], ...]  # (FP per image, recall): the FROC table
    points: tuple[LesionLevel, ...]  # at the box operating points


def recall_at_budget(
    images: Sequence[ImageDetections],
    iou_threshold: float,
    budget: float = FP_BUDGET,
    confidence: float = DEFAULT_CONFIDENCE,
) -> BudgetRecall:
    """The highest recall over confidence thresholds whose false positives per image stay within
    ``budget`` (the FROC read at ``budget``), with the threshold that reaches it."""
    ranking = rank(images, iou_threshold)
    tp, fp, thresholds = _threshold_points(ranking)
    count = max(ranking.images, 1)
    inside = np.flatnonzero(fp / count <= budget + 1e-12)
    if inside.size == 0 or ranking.lesions == 0:
        hits, fppi, threshold = 0, 0.0, math.inf
    else:
        last = int(inside[-1])  # tp never decreases as the threshold falls
        hits, fppi, threshold = int(tp[last]), float(fp[last]) / count, float(thresholds[last])
    return BudgetRecall(
        budget=float(budget),
        iou=float(iou_threshold),
        recall=wilson_interval(hits, ranking.lesions, confidence),
        hits=hits,
        lesions=ranking.lesions,
        false_positives_per_image=fppi,
        threshold=threshold,
    )


def held_to(images: Sequence[ImageDetections], thresholds: Sequence[float]) -> list[ImageDetections]:
    """Each image with only its boxes at or above its own threshold."""
    if len(images) != len(thresholds):
        raise MetricsError(f"{len(thresholds)} thresholds for {len(images)} images")
    return [
        ImageDetections(
            image.image_id,
            image.case_id,
            image.label,
            image.truth,
            tuple(b for b in image.predictions if b.score >= t),
        )
        for image, t in zip(images, thresholds, strict=True)
    ]


def localisation(
    images: Sequence[ImageDetections],
    points: Sequence[tuple[str, float | Sequence[float]]],
    iou_threshold: float,
    *,
    budget: float = FP_BUDGET,
    rates: Sequence[float] = LOCALISATION_RATES,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Localisation:
    """Recall within the FP budget, the FROC table and the box operating points at one IoU.

    A point's threshold is one number, or one per image (the node's per-group points).
    """
    levels = []
    for name, threshold in points:
        if isinstance(threshold, int | float):
            levels.append(lesion_level(images, name, float(threshold), iou_threshold, confidence))
        else:
            values = [float(t) for t in threshold]
            level = lesion_level(held_to(images, values), name, 0.0, iou_threshold, confidence)
            same = bool(values) and all(v == values[0] for v in values)
            levels.append(
                LesionLevel(
                    name=level.name,
                    threshold=values[0] if same else math.nan,
                    true_positives=level.true_positives,
                    false_positives=level.false_positives,
                    lesions=level.lesions,
                    precision=level.precision,
                    recall=level.recall,
                    false_positives_per_image=level.false_positives_per_image,
                )
            )
    curve = froc(images, iou_threshold, rates)
    return Localisation(
        iou=float(iou_threshold),
        images=len(images),
        negatives=sum(1 for image in images if image.label == 0),
        lesions=sum(len(image.truth) for image in images),
        target=recall_at_budget(images, iou_threshold, budget, confidence),
        recall_at=curve.recall_at,
        points=tuple(levels),
    )
