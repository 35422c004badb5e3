"""From model runs to the numbers of the report: per model, overall, per group and per region.

Units and levels:

- **image**: every labelled image the model read;
- **study (mean / max)**: a study's images of one anatomical group aggregated with
  :func:`inference.evaluation.aggregate.aggregate_probabilities`, the node's own function;
  a study is positive when any of its images is;
- detectors add the FAMO levels (per fracture, per image, per case) of
  :mod:`inference.evaluation.detection`;
- fracture-map models (kind ``segmenter``) get the classifier rows for their image probability
  and, like detectors, **localisation** rows: at IoU 0.3 and 0.5, the recall within 0.5
  false-positive boxes per image over all images of the row (negatives included), the FROC table
  and box recall / FP per image at the card's box operating points;
- a stack (:func:`inference.evaluation.runner.stack_run`) gets the classifier rows (its boxes are
  its map model's, reported there).

An image that shows several regions (FracAtlas marks some) counts in each of their region and
group rows, once in the overall row. A row is flagged ``out_of_group`` when the model was not
trained for that group (the node reaches it through the adjacency of the group table).

Errors: none of its own; :class:`inference.evaluation.metrics.MetricsError` passes through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from inference.calibration import CalibrationError, fit_temperature
from inference.decision import UNCALIBRATED_THRESHOLD
from inference.evaluation.aggregate import AggregationMethod, aggregate_studies
from inference.evaluation.detection import (
    LOCALISATION_IOUS,
    DetectionMetrics,
    ImageDetections,
    Localisation,
    ScoredBox,
    detection_metrics,
    localisation,
)
from inference.evaluation.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    ClassificationMetrics,
    Interval,
    Reliability,
    bootstrap_intervals,
    brier_rows,
    classification_metrics,
    ece_rows,
    reliability,
)
from inference.evaluation.runner import EvalImage, ModelRun, thresholds_of, uncalibrated
from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard, ModelKind
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable, Region


class Scope(StrEnum):
    OVERALL = "overall"
    GROUP = "group"
    REGION = "region"


@dataclass(frozen=True, slots=True)
class EvaluationConfig:
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE
    table: GroupTable = DEFAULT_GROUP_TABLE


@dataclass(frozen=True, slots=True)
class Subset:
    scope: Scope
    name: str  # "all", a group or a region value
    out_of_group: bool
    images: int


@dataclass(frozen=True, slots=True)
class ClassifierRow:
    subset: Subset
    image: ClassificationMetrics
    study_mean: ClassificationMetrics
    study_max: ClassificationMetrics


@dataclass(frozen=True, slots=True)
class DetectorRow:
    subset: Subset
    detection: DetectionMetrics  # carries the image and case (study, max) levels


@dataclass(frozen=True, slots=True)
class LocalisationRow:
    subset: Subset
    by_iou: tuple[Localisation, ...]  # one per IoU of LOCALISATION_IOUS


@dataclass(frozen=True, slots=True)
class CalibrationCheck:
    """Calibration on this data before (sigmoid of the logits) and after the card's calibration."""

    temperature: float  # the card's
    logit_offset: float  # the card's
    fitted_temperature: float | None  # the temperature that would fit this data best
    ece_before: Interval
    ece_after: Interval
    brier_before: Interval
    brier_after: Interval
    reliability_before: Reliability  # the reliability diagram's bins
    reliability_after: Reliability


@dataclass(frozen=True, slots=True)
class ModelEvaluation:
    card: ModelCard
    served: tuple[AnatomicalGroup, ...] | None  # None: evaluated on every image
    rows: tuple[ClassifierRow | DetectorRow, ...]
    calibration: CalibrationCheck | None
    localisation: tuple[LocalisationRow, ...] = ()  # map models and detectors
    members: tuple[str, ...] = ()  # a stack: its classifier and map model


def home_groups(card: ModelCard, table: GroupTable = DEFAULT_GROUP_TABLE) -> frozenset[AnatomicalGroup]:
    """The groups a card was trained for: its own group and the groups of its regions; every
    group for a card that names neither (a model trained on all regions)."""
    if not card.regions and card.group is None:
        return frozenset(AnatomicalGroup)
    groups = {g for g in (table.group_of(r) for r in card.regions) if g is not None}
    if card.group is not None:
        groups.add(card.group)
    return frozenset(groups)


def _own_groups(image: EvalImage, table: GroupTable) -> set[AnatomicalGroup]:
    return {g for g in (table.group_of(r) for r in image.regions) if g is not None}


def subsets_of(
    images: Sequence[EvalImage],
    indices: NDArray[np.int64],
    home: frozenset[AnatomicalGroup],
    table: GroupTable,
) -> list[tuple[Subset, NDArray[np.int64]]]:
    """The rows: positions into ``indices`` for overall, each group and each region.

    A group or region row is ``out_of_group`` when its group is not in ``home`` (the groups a
    model was trained for, or for the node the groups with a model).
    """
    out: list[tuple[Subset, NDArray[np.int64]]] = []
    everything = np.arange(indices.size, dtype=np.int64)
    out.append((Subset(Scope.OVERALL, "all", False, int(indices.size)), everything))
    for group in AnatomicalGroup:
        chosen = np.array(
            [p for p, i in enumerate(indices) if group in _own_groups(images[i], table)], dtype=np.int64
        )
        if chosen.size:
            out.append((Subset(Scope.GROUP, group.value, group not in home, int(chosen.size)), chosen))
    for region in Region:
        chosen = np.array([p for p, i in enumerate(indices) if region in images[i].regions], dtype=np.int64)
        if chosen.size:
            region_group = table.group_of(region)
            outside = region_group is None or region_group not in home
            out.append((Subset(Scope.REGION, region.value, outside, int(chosen.size)), chosen))
    return out


def _study_keys(images: Sequence[EvalImage], indices: NDArray[np.int64], table: GroupTable) -> list[object]:
    return [(images[i].study_id, table.group_of(images[i].region)) for i in indices]


def _labels(images: Sequence[EvalImage], indices: NDArray[np.int64]) -> NDArray[np.int64]:
    return np.array([images[i].label for i in indices], dtype=np.int64)


def _study_metrics(
    keys: list[object],
    labels: NDArray[np.int64],
    scores: NDArray[np.float64],
    method: AggregationMethod,
    thresholds: list[tuple[str, float]],
    config: EvaluationConfig,
) -> ClassificationMetrics:
    studies = aggregate_studies(keys, labels, scores, method)
    return classification_metrics(
        studies.labels,
        studies.scores,
        thresholds,
        resamples=config.resamples,
        seed=config.seed,
        confidence=config.confidence,
    )


def _classifier_rows(
    images: Sequence[EvalImage], run: ModelRun, config: EvaluationConfig
) -> list[ClassifierRow]:
    thresholds = thresholds_of(run.card, UNCALIBRATED_THRESHOLD)
    rows = []
    for subset, positions in subsets_of(
        images, run.indices, home_groups(run.card, config.table), config.table
    ):
        indices = run.indices[positions]
        labels = _labels(images, indices)
        scores = run.probabilities[positions]
        keys = _study_keys(images, indices, config.table)
        rows.append(
            ClassifierRow(
                subset=subset,
                image=classification_metrics(
                    labels,
                    scores,
                    thresholds,
                    resamples=config.resamples,
                    seed=config.seed,
                    confidence=config.confidence,
                ),
                study_mean=_study_metrics(keys, labels, scores, "mean", thresholds, config),
                study_max=_study_metrics(keys, labels, scores, "max", thresholds, config),
            )
        )
    return rows


def detections_of(
    images: Sequence[EvalImage], run: ModelRun, positions: NDArray[np.int64]
) -> list[ImageDetections]:
    """The detector's boxes and the reference boxes of the images at ``positions`` of the run."""
    if run.boxes is None:
        raise ValueError(f"{run.card.name} is not a detector run")
    return [
        ImageDetections(
            image_id=images[run.indices[p]].key,
            case_id=images[run.indices[p]].study_id,
            label=int(images[run.indices[p]].label or 0),
            truth=images[run.indices[p]].boxes,
            predictions=run.boxes[p],
        )
        for p in positions
    ]


def _detector_rows(images: Sequence[EvalImage], run: ModelRun, config: EvaluationConfig) -> list[DetectorRow]:
    thresholds = thresholds_of(run.card, UNCALIBRATED_THRESHOLD)
    return [
        DetectorRow(
            subset=subset,
            detection=detection_metrics(
                detections_of(images, run, positions),
                thresholds,
                resamples=config.resamples,
                seed=config.seed,
                confidence=config.confidence,
            ),
        )
        for subset, positions in subsets_of(
            images, run.indices, home_groups(run.card, config.table), config.table
        )
    ]


BOX_POINT_NAMES = (HIGH_SENSITIVITY, HIGH_SPECIFICITY)


def box_points(card: ModelCard) -> list[tuple[str, float]]:
    """The thresholds the card holds boxes to: a map model's box operating points, a detector's
    operating points (:meth:`ModelCard.box_threshold`); one 0.5 point for a card with none."""
    points = []
    for name in BOX_POINT_NAMES:
        threshold = card.box_threshold(name)
        if threshold is not None and math.isfinite(threshold):
            points.append((name, float(threshold)))
    return points or [(f"uncalibrated_{UNCALIBRATED_THRESHOLD:g}", UNCALIBRATED_THRESHOLD)]


def localisation_rows(
    images: Sequence[EvalImage], run: ModelRun, config: EvaluationConfig
) -> list[LocalisationRow]:
    """The localisation rows of a run with boxes: overall, per group and per region."""
    if run.boxes is None:
        return []
    points = box_points(run.card)
    rows = []
    for subset, positions in subsets_of(
        images, run.indices, home_groups(run.card, config.table), config.table
    ):
        found = detections_of(images, run, positions)
        rows.append(
            LocalisationRow(
                subset,
                tuple(
                    localisation(found, points, iou, confidence=config.confidence)
                    for iou in LOCALISATION_IOUS
                ),
            )
        )
    return rows


def calibration_check(
    images: Sequence[EvalImage], run: ModelRun, config: EvaluationConfig
) -> CalibrationCheck | None:
    """ECE and Brier score of the model's probabilities before and after the card's calibration."""
    before = uncalibrated(run)
    if before is None or run.logits is None or run.indices.size == 0:
        return None
    labels = _labels(images, run.indices)
    stats = {"ece": ece_rows, "brier": brier_rows}
    common = {"resamples": config.resamples, "seed": config.seed, "confidence": config.confidence}
    raw = bootstrap_intervals(labels, before, stats, **common)  # type: ignore[arg-type]
    scaled = bootstrap_intervals(labels, run.probabilities, stats, **common)  # type: ignore[arg-type]
    try:
        fitted: float | None = fit_temperature(run.logits, labels)
    except CalibrationError:
        fitted = None
    return CalibrationCheck(
        temperature=float(run.card.temperature),
        logit_offset=float(run.card.logit_offset),
        fitted_temperature=fitted,
        ece_before=raw["ece"],
        ece_after=scaled["ece"],
        brier_before=raw["brier"],
        brier_after=scaled["brier"],
        reliability_before=reliability(labels, before),
        reliability_after=reliability(labels, run.probabilities),
    )


def evaluate_run(images: Sequence[EvalImage], run: ModelRun, config: EvaluationConfig) -> ModelEvaluation:
    """Every row of one model's report."""
    rows: list[ClassifierRow | DetectorRow]
    if run.card.kind == ModelKind.DETECTOR:
        rows = list(_detector_rows(images, run, config))
    else:
        rows = list(_classifier_rows(images, run, config))
    served = None if run.served is None else tuple(sorted(run.served, key=list(AnatomicalGroup).index))
    return ModelEvaluation(
        card=run.card,
        served=served,
        rows=tuple(rows),
        calibration=calibration_check(images, run, config),
        localisation=() if run.is_stack else tuple(localisation_rows(images, run, config)),
        members=run.members,
    )


# --------------------------------------------------------------------------------------------
# the node as a whole


@dataclass(frozen=True, slots=True)
class NodeEvaluation:
    """All routed models together, as the node reports: each image scored by the model that
    decides its group (the classifier, else the detector's top box), each call made at the
    operating point of that model's card. Rows compare across groups, so "all images" is the
    node's overall performance.
    """

    deciding: tuple[tuple[AnatomicalGroup, str], ...]  # (group, model name) for every group used
    rows: tuple[ClassifierRow, ...]
    localisers: tuple[tuple[AnatomicalGroup, str], ...] = ()  # (group, model whose boxes it shows)
    localisation: tuple[LocalisationRow, ...] = ()


def deciding_runs(runs: Sequence[ModelRun]) -> dict[AnatomicalGroup, ModelRun]:
    """Each group's deciding run: as the plans say (``decides``), else in the node's order
    (:class:`node.modelset.GroupModels`): stack, classifier, map model, detector."""
    chosen: dict[AnatomicalGroup, ModelRun] = {}
    if any(run.decides is not None for run in runs):
        for run in runs:
            for group in run.decides or ():
                chosen.setdefault(group, run)
        return chosen
    order: list[ModelRun] = [r for r in runs if r.is_stack]
    for kind in (ModelKind.CLASSIFIER, ModelKind.SEGMENTER, ModelKind.DETECTOR):
        order += [r for r in runs if r.card.kind == kind and not r.is_stack]
    for run in order:
        for group in run.served or ():
            chosen.setdefault(group, run)
    return chosen


def _localising_runs(runs: Sequence[ModelRun]) -> dict[AnatomicalGroup, ModelRun]:
    """Each group's box source: as the plans say (``localises``), else its map model, else its
    detector."""
    chosen: dict[AnatomicalGroup, ModelRun] = {}
    if any(run.localises is not None for run in runs):
        for run in runs:
            for group in run.localises or ():
                chosen.setdefault(group, run)
        return chosen
    for kind in (ModelKind.SEGMENTER, ModelKind.DETECTOR):
        for run in runs:
            if run.card.kind == kind and not run.is_stack and run.boxes is not None:
                for group in run.served or ():
                    chosen.setdefault(group, run)
    return chosen


def _node_localisation(
    images: Sequence[EvalImage], runs: Sequence[ModelRun], config: EvaluationConfig
) -> tuple[dict[AnatomicalGroup, ModelRun], list[LocalisationRow]]:
    """Every image routed as the node routes it (over the groups any model serves), its boxes from
    its group's localiser held to that localiser's box points. An image whose group has no
    localiser shows no box: its fractures count as missed."""
    localising = _localising_runs(runs)
    if not localising:
        return localising, []
    available = frozenset(g for run in runs for g in (run.served or ())) | frozenset(localising)
    position = {id(run): {int(i): p for p, i in enumerate(run.indices)} for run in localising.values()}
    found: list[ImageDetections] = []
    kept: list[int] = []
    thresholds: list[dict[str, float]] = []
    names = [n for n in BOX_POINT_NAMES if all(n in dict(box_points(r.card)) for r in localising.values())]
    for index, image in enumerate(images):
        group = config.table.route(image.region, available)[0]
        if image.label is None or group is None:
            continue
        run = localising.get(group)
        predictions: tuple[ScoredBox, ...] = ()
        points = {name: math.inf for name in names}
        if run is not None:
            where = position[id(run)].get(index)
            if where is None or run.boxes is None:  # the image could not be read
                continue
            predictions = run.boxes[where]
            points = dict(box_points(run.card))
        kept.append(index)
        found.append(ImageDetections(image.key, image.study_id, int(image.label), image.boxes, predictions))
        thresholds.append(points)
    indices = np.asarray(kept, dtype=np.int64)
    rows = []
    for subset, positions in subsets_of(images, indices, available, config.table):
        chosen = [found[p] for p in positions]
        per_image: list[tuple[str, float | Sequence[float]]] = [
            (name, [thresholds[p][name] for p in positions]) for name in names
        ]
        rows.append(
            LocalisationRow(
                subset,
                tuple(
                    localisation(chosen, per_image, iou, confidence=config.confidence)
                    for iou in LOCALISATION_IOUS
                ),
            )
        )
    return localising, rows


def _at_unit_thresholds(
    labels: NDArray[np.int64],
    scores: NDArray[np.float64],
    thresholds: dict[str, NDArray[np.float64]],
    config: EvaluationConfig,
) -> ClassificationMetrics:
    """Classification metrics where each unit is called at its own threshold.

    A call ``p >= t`` is the call ``p - t + 0.5 >= 0.5``: the threshold metrics are computed on
    the shifted scores (clipped to [0, 1], which keeps every call), the ranking and calibration
    metrics on the probabilities themselves.
    """

    def metrics(values: NDArray[np.float64], points: list[tuple[str, float]]) -> ClassificationMetrics:
        return classification_metrics(
            labels, values, points, resamples=config.resamples, seed=config.seed, confidence=config.confidence
        )

    base = metrics(scores, [])
    points = []
    for name, unit in thresholds.items():
        point = metrics(np.clip(scores - unit + 0.5, 0.0, 1.0), [(name, 0.5)]).operating_points[0]
        same = unit.size > 0 and bool(np.all(unit == unit[0]))
        points.append(replace(point, threshold=float(unit[0]) if same else math.nan))
    return replace(base, operating_points=tuple(points))


def evaluate_node(
    images: Sequence[EvalImage], runs: Sequence[ModelRun], config: EvaluationConfig
) -> NodeEvaluation | None:
    """The node view of routed runs; None when no run is routed (``--model`` evaluations)."""
    deciding = deciding_runs(runs)
    if not deciding:
        return None
    available = frozenset(deciding)
    position = {id(run): {int(i): p for p, i in enumerate(run.indices)} for run in deciding.values()}
    kept: list[int] = []
    scores: list[float] = []
    cards: list[ModelCard] = []
    groups: list[AnatomicalGroup] = []
    for index, image in enumerate(images):
        group = config.table.route(image.region, available)[0]
        if image.label is None or group is None:
            continue
        run = deciding[group]
        where = position[id(run)].get(index)
        if where is None:  # the image could not be read
            continue
        kept.append(index)
        scores.append(float(run.probabilities[where]))
        cards.append(run.card)
        groups.append(group)
    indices = np.asarray(kept, dtype=np.int64)
    probabilities = np.asarray(scores, dtype=np.float64)
    names: dict[str, None] = {}
    for card in cards:
        names.update({name: None for name, _ in thresholds_of(card, UNCALIBRATED_THRESHOLD)})
    unit_thresholds = {
        name: np.array(
            [
                dict(thresholds_of(card, UNCALIBRATED_THRESHOLD)).get(name, UNCALIBRATED_THRESHOLD)
                for card in cards
            ]
        )
        for name in names
    }
    rows = []
    for subset, positions in subsets_of(images, indices, available, config.table):
        labels = _labels(images, indices[positions])
        subset_scores = probabilities[positions]
        subset_thresholds = {name: values[positions] for name, values in unit_thresholds.items()}
        keys = [(images[indices[p]].study_id, groups[p]) for p in positions]
        study_rows = {}
        for method in ("mean", "max"):
            studies = aggregate_studies(keys, labels, subset_scores, method)
            first = {key: p for p, key in reversed(list(enumerate(keys)))}
            study_thresholds = {
                name: values[[first[key] for key in studies.keys]]
                for name, values in subset_thresholds.items()
            }
            study_rows[method] = _at_unit_thresholds(studies.labels, studies.scores, study_thresholds, config)
        rows.append(
            ClassifierRow(
                subset=subset,
                image=_at_unit_thresholds(labels, subset_scores, subset_thresholds, config),
                study_mean=study_rows["mean"],
                study_max=study_rows["max"],
            )
        )
    ordered = sorted(deciding.items(), key=lambda item: list(AnatomicalGroup).index(item[0]))
    localising, box_rows = _node_localisation(images, runs, config)
    boxes_by = sorted(localising.items(), key=lambda item: list(AnatomicalGroup).index(item[0]))
    return NodeEvaluation(
        deciding=tuple((g, run.card.name) for g, run in ordered),
        rows=tuple(rows),
        localisers=tuple((g, run.card.name) for g, run in boxes_by),
        localisation=tuple(box_rows),
    )
