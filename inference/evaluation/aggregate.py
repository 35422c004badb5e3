"""Study-level aggregation of per-view probabilities: the one function the node worker and the
evaluation share, so a study's reported probability and its evaluated probability agree.

The seeds aggregate a study's views by the mean (MURA's study-level protocol) or the maximum
(a fracture seen on any view is a fracture). A study's label is positive when any of its units
is positive.

Errors::

    AggregationError (ValueError)   no probabilities, an unknown method, mismatched lengths
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

AggregationMethod = Literal["mean", "max"]
AGGREGATION_METHODS: tuple[AggregationMethod, ...] = ("mean", "max")


class AggregationError(ValueError):
    """Probabilities that cannot be aggregated."""


def aggregate_probabilities(probs: ArrayLike, method: AggregationMethod) -> float:
    """One study probability from its views' probabilities, by ``"mean"`` or ``"max"``."""
    values = np.asarray(probs, dtype=np.float64).ravel()
    if values.size == 0:
        raise AggregationError("no probabilities to aggregate")
    if method == "mean":
        return float(values.mean())
    if method == "max":
        return float(values.max())
    raise AggregationError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATION_METHODS)}")


@dataclass(frozen=True, slots=True)
class StudyScores:
    """Aggregated units in first-seen order: key, label (any positive view) and probability."""

    keys: tuple[Hashable, ...]
    labels: NDArray[np.int64]
    scores: NDArray[np.float64]
    views: NDArray[np.int64]  # how many views each study had


def aggregate_studies(
    keys: Sequence[Hashable], labels: ArrayLike, scores: ArrayLike, method: AggregationMethod
) -> StudyScores:
    """Group views by ``keys`` (e.g. ``(study_id, group)``) and aggregate each group's scores."""
    y = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not len(keys) == y.size == s.size:
        raise AggregationError(f"{len(keys)} keys, {y.size} labels and {s.size} scores")
    members: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        members.setdefault(key, []).append(index)
    ordered = tuple(members)
    return StudyScores(
        keys=ordered,
        labels=np.array([int(y[members[k]].max()) for k in ordered], dtype=np.int64),
        scores=np.array([aggregate_probabilities(s[members[k]], method) for k in ordered], dtype=np.float64),
        views=np.array([len(members[k]) for k in ordered], dtype=np.int64),
    )
