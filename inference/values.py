"""Frozen values that cross package boundaries: routing decisions, boxes, results, priority.

The node builds them from DICOM; inference computes them from arrays; nothing here knows about
pydicom, pynetdicom or sqlmodel.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from inference.modelcard import ModelCard
from inference.regions import AnatomicalGroup, Region


class RegionSource(StrEnum):
    """Where a region decision came from, in resolution order."""

    BODY_PART = "body_part"  # BodyPartExamined (0018,0015)
    ANATOMIC_CODE = "anatomic_code"  # AnatomicRegionSequence (0008,2218)
    DESCRIPTION = "description"  # Study/Series description, protocol, requested procedure
    IMAGE = "image"  # the image-based region classifier
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Routing:
    """The region an image shows and the group model that reads it."""

    region: Region
    source: RegionSource
    confidence: float
    laterality: str | None  # "L", "R", "B" or None
    view: str | None  # e.g. "AP", "PA", "LAT", "OBL"
    group: AnatomicalGroup | None  # None: not analysed
    out_of_group: bool
    reason: str | None = None  # why the image is not analysed, when group is None
    # The image classifier's best answer when it was asked (also when it was not trusted).
    guess: Region | None = None
    guess_confidence: float | None = None
    # Set when the image was analysed on a guess below the minimum confidence (by setting).
    low_confidence: bool = False


@dataclass(frozen=True, slots=True)
class Box:
    """A fracture box in source-image pixel coordinates (column x, row y), corners inclusive-exclusive."""

    x0: float
    y0: float
    x1: float
    y1: float
    probability: float


class Outcome(StrEnum):
    POSITIVE = "positive"  # at or above the high-specificity point
    POSSIBLE = "possible"  # at or above the high-sensitivity point only
    NEGATIVE = "negative"
    NOT_ANALYSED = "not_analysed"


class Priority(StrEnum):
    """Worklist priority of a study, most urgent first in :data:`PRIORITY_ORDER`."""

    URGENT = "urgent"
    REVIEW = "review"
    ROUTINE = "routine"
    NOT_ANALYSED = "not_analysed"


PRIORITY_ORDER: tuple[Priority, ...] = (
    Priority.URGENT,
    Priority.REVIEW,
    Priority.ROUTINE,
    Priority.NOT_ANALYSED,
)


@dataclass(frozen=True, slots=True)
class ImageResult:
    """What the models said about one frame of one source instance."""

    sop_instance_uid: str
    frame: int  # 0-based frame index
    routing: Routing
    probability: float | None  # calibrated fracture probability; None when not analysed
    boxes: tuple[Box, ...] = ()
    error: str | None = None  # reason the image failed (decode, pixel data, model)


@dataclass(frozen=True, slots=True)
class GroupResult:
    """The study-level result of one anatomical group."""

    group: AnatomicalGroup
    outcome: Outcome
    probability: float | None  # aggregated calibrated probability over the group's views
    operating_point: str | None  # name of the operating point the outcome was decided at
    regions: tuple[Region, ...]
    out_of_group: bool
    models: tuple[ModelCard, ...]
    images: tuple[ImageResult, ...]
    reason: str | None = None  # why not analysed


@dataclass(frozen=True, slots=True)
class StudyResult:
    study_instance_uid: str
    revision: int
    groups: tuple[GroupResult, ...]
    not_analysed: tuple[ImageResult, ...]  # images routed nowhere (other/unknown/failed)
    priority: Priority
    score: float | None  # highest group probability, for ordering within a priority
    # Why a group's outcome raised the study less than it would have (inference.priority policy).
    priority_notes: tuple[str, ...] = ()
