"""Analyse one study: decode -> route -> preprocess -> predict -> aggregate -> outcome.

Input is the study's spooled DICOM files; output is a :class:`inference.values.StudyResult` and
the windowed source frames the overlays are drawn on. No database session is open while this
runs. A failure on one image (bad pixel data) or one group (a model error) is recorded with its
reason in the result and the rest of the study goes on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from inference.decision import box_threshold, group_outcome
from inference.evaluation.aggregate import AggregationMethod, aggregate_probabilities
from inference.modelcard import ModelCard
from inference.pixels import PreparedImage, PreprocessConfig, prepare
from inference.priority import decide_priority
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable, Region
from inference.routing import KeywordTable, route
from inference.values import Box, GroupResult, ImageResult, Outcome, RegionSource, Routing, StudyResult
from node.imaging import ImagingError, SourceFrame, header_facts, load_frames
from node.metrics import Metrics
from node.modelset import GroupModels, ModelSet

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
            except (InvalidDicomError, OSError, ValueError) as exc:
                log.error("spooled file %s cannot be read: %s", path.name, type(exc).__name__)
                continue
            sop_uid = str(ds.SOPInstanceUID)
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
    priority, score = decide_priority(groups)
    result = StudyResult(
        study_instance_uid=study_uid,
        revision=revision,
        groups=tuple(groups),
        not_analysed=tuple(not_analysed),
        priority=priority,
        score=score,
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
    deciding = models.classifier.card if models.classifier is not None else models.detector.card  # type: ignore[union-attr]
    probability = aggregate_probabilities(np.asarray(probabilities, dtype=np.float64), config.aggregation)
    outcome, point = group_outcome(probability, deciding)
    return GroupResult(group, outcome, probability, point, regions, out_of_group, models.cards, images)


def _predict(
    items: list[_Routed], models: GroupModels, config: AnalysisConfig, metrics: Metrics
) -> tuple[list[float], list[list[Box]]]:
    probabilities: list[float] = []
    boxes: list[list[Box]] = [[] for _ in items]
    if models.classifier is not None:
        with metrics.time_stage("preprocess"):
            prepared = _prepare(items, models.classifier.card)
        with metrics.time_stage("inference"):
            for batch in _batches(prepared, config.batch_size):
                metrics.inference_batch_images.observe(len(batch))
                probabilities.extend(float(p) for p in models.classifier.probabilities(batch))
    if models.detector is not None:
        card = models.detector.card
        threshold = box_threshold(card)
        with metrics.time_stage("preprocess"):
            prepared = _prepare(items, card)
        with metrics.time_stage("inference"):
            found: list[list[tuple[float, float, float, float, float]]] = []
            for batch in _batches(prepared, config.batch_size):
                metrics.inference_batch_images.observe(len(batch))
                found.extend(models.detector.detect(batch))
        for index, (image_boxes, prep) in enumerate(zip(found, prepared, strict=True)):
            for x0, y0, x1, y1, confidence in image_boxes:
                if confidence < threshold:
                    continue
                sx0, sy0, sx1, sy1 = prep.transform.to_source(x0, y0, x1, y1)
                boxes[index].append(Box(sx0, sy0, sx1, sy1, float(confidence)))
        if models.classifier is None:
            # Detector-only group: the image probability is its highest box confidence
            # (the multi-site Faster R-CNN study), calibrated by the detector card's temperature
            # and offset.
            probabilities = [max((c for *_, c in image_boxes), default=0.0) for image_boxes in found]
    return probabilities, boxes
