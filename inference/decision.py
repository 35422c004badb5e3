"""From a calibrated probability to an outcome, at the operating points of a model card.

positive: at or above the high-specificity point; possible: at or above the high-sensitivity
point only; negative: below both. The name of the point that decided is returned with the
outcome so reports can say which operating point was used.
"""

from __future__ import annotations

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard
from inference.values import Outcome

# Used only when a card carries no operating points (an uncalibrated package): a box or an
# image needs an even chance to count. Calibrated bundled models always carry their points.
UNCALIBRATED_THRESHOLD = 0.5


class MissingOperatingPointError(ValueError):
    """A classifier card without its high-sensitivity and high-specificity points."""


def thresholds(card: ModelCard) -> tuple[float, float]:
    """(high-sensitivity threshold, high-specificity threshold) of the card."""
    sensitive = card.operating_point(HIGH_SENSITIVITY)
    specific = card.operating_point(HIGH_SPECIFICITY)
    low = sensitive.threshold if sensitive is not None else UNCALIBRATED_THRESHOLD
    high = specific.threshold if specific is not None else UNCALIBRATED_THRESHOLD
    return min(low, high), max(low, high)


def group_outcome(probability: float, card: ModelCard) -> tuple[Outcome, str]:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    low, high = thresholds(card)
    if probability >= high:
        return Outcome.POSITIVE, HIGH_SPECIFICITY
    if probability >= low:
        return Outcome.POSSIBLE, HIGH_SENSITIVITY
    return Outcome.NEGATIVE, HIGH_SENSITIVITY


def box_threshold(card: ModelCard) -> float:
    """Boxes below the detector's high-sensitivity point are not shown."""
    return thresholds(card)[0]
