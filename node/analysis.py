"""Analyse one study: decode -> route -> preprocess -> predict -> aggregate -> outcome.

Per group, :class:`node.modelset.GroupModels` says which model gives the probability (stack,
classifier, map model or detector) and which gives the boxes (map model, else detector); boxes
are mapped back to source pixels with the letterbox transform of their model's input.

Input is the study's spooled DICOM files; output is a :class:`inference.values.StudyResult` and
the windowed source frames the overlays are drawn on. No database session is open while this
runs. A failure on one image (bad pixel data) or one group (a model error) is recorded with its
reason in the result and the rest of the study goes on.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from inference.decision import box_threshold, group_outcome
from inference.evaluation.aggregate import AggregationMethod, aggregate_probabilities
from inference.maps import stacked_probabilities
from inference.modelcard import ModelCard
from inference.pixels import PreparedImage, PreprocessConfig, prepare
from inference.priority import DEFAULT_POLICY, PriorityPolicy, decide_priority, priority_notes
from inference.protocols import RawBox
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable, Region
from inference.routing import DEFAULT_MIN_IMAGE_CONFIDENCE, BelowMinimum, KeywordTable, route
from inference.values import Box, GroupResult, ImageResult, Outcome, RegionSource, Routing, StudyResult
from node import received
from node.imaging import ImagingError, SourceFrame, header_facts, load_frames
from node.metrics import Metrics
from node.modelset import GroupModels, ModelSet, ProbabilitySource
from node.redact import safe_reason

log = logging.getLogger(__name__)

FrameKey = tuple[str, int]  # (SOP Instance UID, frame index)


@dataclass(frozen=True, slots=True)
class AnalysisConfig:
    max_pixels: int = 100_000_000
    aggregation: AggregationMethod = "mean"
    batch_size: int = 8
    stretch: bool = True
    clahe: bool = False
    gradcam: bool = False  # Grad-CAM overlays for the extra SC series (export.gradcam_sc)
    priority: PriorityPolicy = DEFAULT_POLICY
    min_image_confidence: float = DEFAULT_MIN_IMAGE_CONFIDENCE
    below_minimum: BelowMinimum = BelowMinimum.NOT_ANALYSED


@dataclass(frozen=True, slots=True)
class Analysis:
    result: StudyResult
    sources: dict[str, Dataset]  # SOP Instance UID -> dataset (pixels not decoded again)
    frames: dict[FrameKey, NDArray[np.float32]] = field(default_factory=dict)
    explanations: dict[FrameKey, NDArray[np.uint8]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Routed:
    frame: SourceFrame
    routing: Routing


def _failed_routing(reason: str) -> Routing:
    return Routing(Region.UNKNOWN, RegionSource.NONE, 0.0, None, None, None, False, reason)


def analyse_study(
    study_uid: str,
    revision: int,
    files: Sequence[Path],
    *,
    models: ModelSet,
    keywords: KeywordTable,
    config: AnalysisConfig,
    metrics: Metrics,
    table: GroupTable = DEFAULT_GROUP_TABLE,
) -> Analysis:
    sources: dict[str, Dataset] = {}
    routed: list[_Routed] = []
    failed: list[ImageResult] = []
    with metrics.time_stage("decode"):
        for path in files:
            try:
                ds = pydicom.dcmread(path)
            except Exception as exc:  # noqa: BLE001 - one unreadable file must not fail the study
                log.error("spooled file %s cannot be read: %s", path.name, safe_reason(exc))
                continue
            sop_uid = received.uid(ds, "SOPInstanceUID")
            if sop_uid is None:  # ingest refuses such instances; a spool edited by hand may not
                log.error("spooled file %s has no SOP Instance UID; skipped", path.name)
                continue
            sources[sop_uid] = ds
            facts = header_facts(ds)
            try:
                frames = load_frames(ds, max_pixels=config.max_pixels)
            except ImagingError as exc:
                failed.append(ImageResult(sop_uid, 0, _failed_routing(exc.reason), None, (), exc.reason))
                metrics.processing_failures.labels(stage="decode").inc()
                continue
            for frame in frames:
                routing = route(
                    facts,
                    table=table,
                    available=models.available,
                    keywords=keywords,
                    region_model=models.region_model,
                    image=frame.pixels,
                    min_image_confidence=config.min_image_confidence,
                    below_minimum=config.below_minimum,
                )
                routed.append(_Routed(frame, routing))

    by_group: dict[AnatomicalGroup, list[_Routed]] = defaultdict(list)
    not_analysed = list(failed)
    for item in routed:
        if item.routing.group is None:
            not_analysed.append(
                ImageResult(item.frame.sop_instance_uid, item.frame.frame, item.routing, None)
            )
        else:
            by_group[item.routing.group].append(item)

    groups = []
    for group in sorted(by_group):
        groups.append(_analyse_group(group, by_group[group], models.groups[group], config, metrics))
    priority, score = decide_priority(groups, config.priority)
    result = StudyResult(
        study_instance_uid=study_uid,
        revision=revision,
        groups=tuple(groups),
        not_analysed=tuple(not_analysed),
        priority=priority,
        score=score,
        priority_notes=tuple(priority_notes(groups, config.priority)),
    )
    frames_by_key = {(r.frame.sop_instance_uid, r.frame.frame): r.frame.pixels for r in routed}
    explanations = _explain(by_group, models, metrics) if config.gradcam else {}
    return Analysis(result, sources, frames_by_key, explanations)


def _explain(
    by_group: dict[AnatomicalGroup, list[_Routed]], models: ModelSet, metrics: Metrics
) -> dict[FrameKey, NDArray[np.uint8]]:
    """Grad-CAM overlays of every image whose group has a classifier (torch loads only here)."""
    from inference.evaluation.gradcam import explain_image

    out: dict[FrameKey, NDArray[np.uint8]] = {}
    with metrics.time_stage("report"):
        for group, items in by_group.items():
            classifier = models.groups[group].classifier
            if classifier is None:
                continue
            for item in items:
                key = (item.frame.sop_instance_uid, item.frame.frame)
                try:
                    out[key] = explain_image(classifier, item.frame.pixels).overlay
                except (RuntimeError, ValueError) as exc:
                    log.warning("no Grad-CAM map for one image of group %s: %s", group, exc)
    return out


def _prepare(items: Sequence[_Routed], card: ModelCard) -> list[PreparedImage]:
    config = PreprocessConfig.from_dict(card.preprocessing)
    return [prepare(item.frame.pixels, config, card.input_size) for item in items]


class _Prepared:
    """Prepared images per (input size, preprocessing): two models that agree share them."""

    def __init__(self, items: Sequence[_Routed], metrics: Metrics) -> None:
        self._items = items
        self._metrics = metrics
        self._done: dict[str, list[PreparedImage]] = {}

    def __call__(self, card: ModelCard) -> list[PreparedImage]:
        key = json.dumps([card.input_size, card.preprocessing], sort_keys=True, default=str)
        if key not in self._done:
            with self._metrics.time_stage("preprocess"):
                self._done[key] = _prepare(self._items, card)
        return self._done[key]


def _batches(prepared: Sequence[PreparedImage], size: int) -> list[NDArray[np.float32]]:
    return [
        np.stack([p.pixels for p in prepared[i : i + size]]).astype(np.float32)
        for i in range(0, len(prepared), size)
    ]


def _analyse_group(
    group: AnatomicalGroup,
    items: list[_Routed],
    models: GroupModels,
    config: AnalysisConfig,
    metrics: Metrics,
) -> GroupResult:
    regions = tuple(sorted({i.routing.region for i in items}, key=list(Region).index))
    out_of_group = any(i.routing.out_of_group for i in items)
    try:
        probabilities, boxes = _predict(items, models, config, metrics)
    except (RuntimeError, ValueError) as exc:
        reason = f"model failure: {type(exc).__name__}"
        log.error("group %s failed: %s", group, exc)
        metrics.processing_failures.labels(stage="inference").inc()
        images = tuple(
            ImageResult(i.frame.sop_instance_uid, i.frame.frame, i.routing, None, (), reason) for i in items
        )
        return GroupResult(
            group, Outcome.NOT_ANALYSED, None, None, regions, out_of_group, models.cards, images, reason
        )

    images = tuple(
        ImageResult(i.frame.sop_instance_uid, i.frame.frame, i.routing, float(p), tuple(b))
        for i, p, b in zip(items, probabilities, boxes, strict=True)
    )
    probability = aggregate_probabilities(np.asarray(probabilities, dtype=np.float64), config.aggregation)
    outcome, point = group_outcome(probability, models.deciding)
    return GroupResult(group, outcome, probability, point, regions, out_of_group, models.cards, images)


def _source_boxes(raw: Sequence[RawBox], prepared: PreparedImage, threshold: float) -> list[Box]:
    """Boxes at or above ``threshold`` in source pixels; a box left without area is dropped."""
    out: list[Box] = []
    for x0, y0, x1, y1, confidence in raw:
        if confidence < threshold:
            continue
        sx0, sy0, sx1, sy1 = prepared.transform.to_source(x0, y0, x1, y1)
        if sx1 > sx0 and sy1 > sy0:
            out.append(Box(sx0, sy0, sx1, sy1, float(confidence)))
    return out


def _predict(
    items: list[_Routed], models: GroupModels, config: AnalysisConfig, metrics: Metrics
) -> tuple[list[float], list[list[Box]]]:
    """Per image: the probability of the group's probability source, and the localiser's boxes."""
    source = models.probability_source
    prepared_for = _Prepared(items, metrics)
    probabilities: list[float] = []
    classifier_logits: list[float] = []
    boxes: list[list[Box]] = [[] for _ in items]
    if models.classifier is not None:
        prepared = prepared_for(models.classifier.card)
        with metrics.time_stage("inference"):
            for batch in _batches(prepared, config.batch_size):
                metrics.inference_batch_images.observe(len(batch))
                if source is ProbabilitySource.STACK:
                    classifier_logits.extend(float(z) for z in models.classifier.logits(batch))
                else:
                    probabilities.extend(float(p) for p in models.classifier.probabilities(batch))
    if models.segmenter is not None:
        prepared = prepared_for(models.segmenter.card)
        with metrics.time_stage("inference"):
            outputs = []
            for batch in _batches(prepared, config.batch_size):
                metrics.inference_batch_images.observe(len(batch))
                outputs.append(models.segmenter.segment(batch))
        found = [b for out in outputs for b in out.boxes]
        # The runtime cut the map at the loosest box point: every region it returns is shown.
        for index, (image_boxes, prep) in enumerate(zip(found, prepared, strict=True)):
            boxes[index] = _source_boxes(image_boxes, prep, 0.0)
        if source is ProbabilitySource.SEGMENTER:
            probabilities = [float(p) for out in outputs for p in out.probabilities]
        elif source is ProbabilitySource.STACK:
            assert models.stack is not None
            map_logits = np.concatenate([out.logits for out in outputs]) if outputs else np.zeros(0)
            stacked = stacked_probabilities(models.stack, np.asarray(classifier_logits), map_logits)
            probabilities = [float(p) for p in stacked]
    if models.detector is not None and (models.segmenter is None or source is ProbabilitySource.DETECTOR):
        card = models.detector.card
        prepared = prepared_for(card)
        with metrics.time_stage("inference"):
            detected: list[list[RawBox]] = []
            for batch in _batches(prepared, config.batch_size):
                metrics.inference_batch_images.observe(len(batch))
                detected.extend(models.detector.detect(batch))
        if models.segmenter is None:
            threshold = box_threshold(card)
            for index, (image_boxes, prep) in enumerate(zip(detected, prepared, strict=True)):
                boxes[index] = _source_boxes(image_boxes, prep, threshold)
        if source is ProbabilitySource.DETECTOR:
            # The image probability of a group the detector decides is its highest box
            # confidence (the multi-site Faster R-CNN study), calibrated by the detector card's
            # temperature and offset.
            probabilities = [max((c for *_, c in image_boxes), default=0.0) for image_boxes in detected]
    return probabilities, boxes
