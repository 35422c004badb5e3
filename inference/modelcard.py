"""The model card: what ``model.json`` in a model package says about the model.

IHE AI Results (AIR) asks that every result names the algorithm, its version and a device UID
that changes with every version; the SR's algorithm identification (TID 4019) and Contributing
Equipment are filled from this card.

A fracture-map model (kind ``segmenter``) carries a :class:`SegmenterSpec` beside the common
fields: how its image score is read from the map, whether it mirrors the image (flip TTA), the
calibration of its map (for boxes), its box operating points and, optionally, a logistic
:class:`Stack` with its group's classifier. Cards without it (every older card) load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from inference.regions import AnatomicalGroup, Region


class ModelKind(StrEnum):
    CLASSIFIER = "classifier"
    DETECTOR = "detector"
    REGION = "region"
    SEGMENTER = "segmenter"


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """A threshold on the calibrated probability and what it achieved on validation."""

    name: str  # "high_sensitivity", "high_specificity", "youden"
    threshold: float
    sensitivity: float
    specificity: float
    sensitivity_ci: tuple[float, float] = (0.0, 1.0)
    specificity_ci: tuple[float, float] = (0.0, 1.0)


HIGH_SENSITIVITY = "high_sensitivity"
HIGH_SPECIFICITY = "high_specificity"
YOUDEN = "youden"

# How a segmenter's image score is read (inference.training.segmenter.image_scores): the map's
# maximum, the mean of its 16 highest values, the image head, or the mean of maximum and head.
SEGMENTER_SCORES: tuple[str, ...] = ("max", "top16", "image", "mean-max-image")


@dataclass(frozen=True, slots=True)
class BoxOperatingPoint:
    """A threshold on a map model's calibrated map probability, and what it found on validation.

    Boxes are the connected regions of the map at or above the loosest point's threshold; a box
    whose own score (its peak) reaches a point's threshold is a call at that point. ``recall`` is
    the fraction of fracture boxes hit (IoU >= ``iou``) and ``false_positives_per_image`` the
    boxes that hit none, over all validation images including the negatives.
    """

    name: str  # "high_sensitivity", "high_specificity"
    threshold: float
    recall: float
    false_positives_per_image: float
    iou: float = 0.3
    recall_ci: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Stack:
    """A logistic stack of the group's classifier and this map model, fitted out of fold.

    ``p = sigmoid(weights[0] * classifier_logit + weights[1] * map_logit + bias)``, both logits
    uncalibrated (the classifier's network output; the map model's image score by its card's
    ``score`` method, with its flip TTA). A recalibration is linear in the stack's logit, so it is
    folded into the weights and the bias. ``classifier`` names the card it was fitted with: with
    any other classifier the stack does not apply. ``operating_points`` are the stacked
    probability's own (the group's outcome is decided at them).
    """

    classifier: str
    weights: tuple[float, float]
    bias: float
    operating_points: tuple[OperatingPoint, ...] = ()
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True, slots=True)
class SegmenterSpec:
    """What a fracture-map model's card adds: image score, flip TTA, map calibration, box points.

    The image probability is ``sigmoid(score / temperature + logit_offset)`` with the card's own
    temperature and offset. A box's probability is its peak map logit calibrated by
    ``map_temperature`` and ``map_logit_offset`` (fitted on the images' map maxima), so box
    thresholds and box probabilities live in one scale.
    """

    score: str = "max"
    flip: bool = False
    map_temperature: float = 1.0
    map_logit_offset: float = 0.0
    box_operating_points: tuple[BoxOperatingPoint, ...] = ()
    serves_probability: bool = True
    stack: Stack | None = None

    def box_point(self, name: str) -> BoxOperatingPoint | None:
        for point in self.box_operating_points:
            if point.name == name:
                return point
        return None


@dataclass(frozen=True, slots=True)
class ModelCard:
    name: str
    version: str
    device_uid: str  # changes with every version (IHE AIR)
    kind: ModelKind
    architecture: str  # e.g. "mobilenet_v3_small", "yolov8n"
    group: AnatomicalGroup | None  # None for region models and all-region models
    regions: tuple[Region, ...]
    input_size: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    # added after the temperature: p = sigmoid(logit / temperature + logit_offset). It corrects
    # the prevalence a balanced training run assumes; 0 for temperature scaling alone.
    logit_offset: float = 0.0
    operating_points: tuple[OperatingPoint, ...] = ()
    training_data: dict[str, Any] = field(default_factory=dict)
    validation_metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""  # ISO 8601
    weights: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    manufacturer: str = "fracnode"
    notes: str = ""
    segmenter: SegmenterSpec | None = None  # kind "segmenter" only

    def operating_point(self, name: str) -> OperatingPoint | None:
        for point in self.operating_points:
            if point.name == name:
                return point
        return None

    def box_threshold(self, name: str) -> float | None:
        """The threshold a box's probability is held to at point ``name``.

        A map model's box points are its own (:attr:`SegmenterSpec.box_operating_points`); a
        detector's boxes are held to its operating points, as its image score is its top box.
        """
        if self.segmenter is not None:
            box = self.segmenter.box_point(name)
            return None if box is None else box.threshold
        point = self.operating_point(name)
        return None if point is None else point.threshold

    def auroc_interval(self) -> tuple[float, float] | None:
        """The 95 % interval of the validation AUROC (a detector's: its image level), if any."""
        metrics: dict[str, Any] = self.validation_metrics
        interval = metrics.get("auroc_ci")
        if interval is None and isinstance(metrics.get("image_level"), dict):
            interval = metrics["image_level"].get("auroc_ci")
        if not isinstance(interval, list | tuple) or len(interval) != 2:
            return None
        try:
            low, high = float(interval[0]), float(interval[1])
        except (TypeError, ValueError):
            return None
        return (low, high)
