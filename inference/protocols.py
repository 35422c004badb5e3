"""The model interfaces the node programs against; one factory loads them from packages.

Inputs are batches of prepared images: float32 arrays of shape (N, S, S) in [0, 1], S the
card's ``input_size`` (see :func:`inference.pixels.prepare`). Outputs are numpy arrays and
plain tuples, never torch tensors or ultralytics objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from inference.modelcard import ModelCard
from inference.regions import Region

# (x0, y0, x1, y1, confidence) in the prepared image's pixel coordinates.
RawBox = tuple[float, float, float, float, float]


@runtime_checkable
class FractureClassifier(Protocol):
    card: ModelCard

    def logits(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Uncalibrated fracture logits, shape (N,)."""
        ...

    def probabilities(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Calibrated fracture probabilities (temperature from the card), shape (N,)."""
        ...


@runtime_checkable
class FractureDetector(Protocol):
    card: ModelCard

    def detect(self, batch: NDArray[np.float32]) -> list[list[RawBox]]:
        """Fracture boxes per image, confidences calibrated by the card's temperature."""
        ...


@dataclass(frozen=True, slots=True)
class SegmenterOutput:
    """One forward pass of a fracture-map model over a batch."""

    logits: NDArray[np.float32]  # (N,) uncalibrated image scores (the card's score method)
    probabilities: NDArray[np.float32]  # (N,) calibrated image probabilities
    boxes: list[list[RawBox]]  # per image, calibrated box probabilities


@runtime_checkable
class FractureSegmenter(Protocol):
    """A fracture-map model: the classifier's and the detector's interface, and both at once."""

    card: ModelCard

    def logits(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Uncalibrated image-score logits, shape (N,)."""
        ...

    def probabilities(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Calibrated image probabilities, shape (N,)."""
        ...

    def detect(self, batch: NDArray[np.float32]) -> list[list[RawBox]]:
        """Boxes of the map's connected regions at the loosest box point, calibrated."""
        ...

    def segment(self, batch: NDArray[np.float32]) -> SegmenterOutput:
        """Logits, probabilities and boxes from one forward pass."""
        ...


@runtime_checkable
class RegionClassifier(Protocol):
    card: ModelCard

    def predict(self, batch: NDArray[np.float32]) -> list[tuple[Region, float]]:
        """The most likely region of each image and its probability."""
        ...
