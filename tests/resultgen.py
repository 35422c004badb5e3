"""Study results for the result-object tests (SR, SC, export), built on generated radiographs.

The values are what the worker hands to ``node.results``: model cards with operating points,
routings, boxes in source pixels. The sources are real DICOM datasets from ``tests.dicomgen``
(or the pydicom-data RG3 CR), so every object built from them can be validated.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard, ModelKind, OperatingPoint
from inference.regions import AnatomicalGroup, Region
from inference.values import (
    Box,
    GroupResult,
    ImageResult,
    Outcome,
    Priority,
    RegionSource,
    Routing,
    StudyResult,
)
from tests.dicomgen import make_dataset

LOOSE = 0.30  # high-sensitivity threshold of the test cards
STRICT = 0.70  # high-specificity threshold

OPERATING_POINTS = (
    OperatingPoint(HIGH_SENSITIVITY, LOOSE, 0.95, 0.55),
    OperatingPoint(HIGH_SPECIFICITY, STRICT, 0.72, 0.95),
)


def card(
    kind: ModelKind, version: str = "1.0.0", group: AnatomicalGroup = AnatomicalGroup.UPPER_DISTAL
) -> ModelCard:
    name = f"{group}-{kind}"
    device = uuid.uuid5(uuid.NAMESPACE_URL, f"fracnode-tests/{name}/{version}")
    return ModelCard(
        name=name,
        version=version,
        device_uid=f"2.25.{device.int}",
        kind=kind,
        architecture="mobilenet_v3_small" if kind == ModelKind.CLASSIFIER else "yolov8n",
        group=group,
        regions=(Region.WRIST, Region.HAND, Region.FINGER),
        input_size=224 if kind == ModelKind.CLASSIFIER else 640,
        operating_points=OPERATING_POINTS,
    )


def wrist_sources(n: int = 2, rows: int = 128, cols: int = 96) -> list[Dataset]:
    """``n`` DX instances of one new study and series (right wrist PA)."""
    study, series = generate_uid(), generate_uid()
    return [
        make_dataset(study_uid=study, series_uid=series, instance_number=i + 1, seed=i, rows=rows, cols=cols)
        for i in range(n)
    ]


def routing(
    region: Region = Region.WRIST, laterality: str | None = "R", out_of_group: bool = False
) -> Routing:
    return Routing(
        region=region,
        source=RegionSource.BODY_PART,
        confidence=1.0,
        laterality=laterality,
        view="PA",
        group=AnatomicalGroup.UPPER_DISTAL,
        out_of_group=out_of_group,
    )


def study_result(
    sources: Sequence[Dataset],
    *,
    boxes: Sequence[Sequence[Box]] | None = None,
    outcome: Outcome = Outcome.POSITIVE,
    probability: float | None = 0.82,
    out_of_group: bool = False,
    revision: int = 1,
    version: str = "1.0.0",
    region: Region = Region.WRIST,
) -> StudyResult:
    """One upper-distal group over ``sources`` (one frame each) with ``boxes[i]`` on image i."""
    per_image = list(boxes) if boxes is not None else [() for _ in sources]
    images = tuple(
        ImageResult(
            sop_instance_uid=str(ds.SOPInstanceUID),
            frame=0,
            routing=routing(region, _side(ds), out_of_group),
            probability=0.5 + 0.1 * i if probability is not None else None,
            boxes=tuple(per_image[i]),
        )
        for i, ds in enumerate(sources)
    )
    point = {Outcome.POSITIVE: HIGH_SPECIFICITY, Outcome.POSSIBLE: HIGH_SENSITIVITY}.get(outcome)
    if outcome == Outcome.NEGATIVE:
        point = HIGH_SENSITIVITY
    group = GroupResult(
        group=AnatomicalGroup.UPPER_DISTAL,
        outcome=outcome,
        probability=probability,
        operating_point=point,
        regions=(region,),
        out_of_group=out_of_group,
        models=(card(ModelKind.CLASSIFIER, version), card(ModelKind.DETECTOR, version)),
        images=images,
        reason="no model for this group" if outcome == Outcome.NOT_ANALYSED else None,
    )
    return StudyResult(
        study_instance_uid=str(sources[0].StudyInstanceUID),
        revision=revision,
        groups=(group,),
        not_analysed=(),
        priority=Priority.URGENT if outcome == Outcome.POSITIVE else Priority.REVIEW,
        score=probability,
    )


def _side(ds: Dataset) -> str | None:
    """The laterality the router reads: ImageLaterality, else the series Laterality."""
    return str(ds.get("ImageLaterality") or ds.get("Laterality") or "") or None


def windowed(ds: Dataset) -> NDArray[np.float32]:
    """The frame as the node's imaging stage hands it over: float32 in [0, 1], MONOCHROME2."""
    pixels = ds.pixel_array.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / max(high - low, 1.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def frames_of(sources: Sequence[Dataset]) -> dict[tuple[str, int], NDArray[np.float32]]:
    return {(str(ds.SOPInstanceUID), 0): windowed(ds) for ds in sources}


def flat_frame(rows: int, cols: int, level: float = 0.5) -> NDArray[np.float32]:
    return np.full((rows, cols), level, dtype=np.float32)
