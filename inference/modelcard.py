"""The model card: what ``model.json`` in a model package says about the model.

IHE AI Results (AIR) asks that every result names the algorithm, its version and a device UID
that changes with every version; the SR's algorithm identification (TID 4019) and Contributing
Equipment are filled from this card.
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

    def operating_point(self, name: str) -> OperatingPoint | None:
        for point in self.operating_points:
            if point.name == name:
                return point
        return None
