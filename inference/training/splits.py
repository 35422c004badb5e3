"""Study-grouped, label-stratified splits: the early-stopping hold-out and repeated k-fold.

Images of one study (``LabelledImage.study_id``) always fall on the same side, so views of one
patient visit never sit in both the training and the held-out part. Strata are the labels
(binary fracture) or the class indices (region model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from inference.datasets import LabelledImage


def _study_strata(
    studies: Sequence[str], targets: NDArray[np.int64]
) -> tuple[list[str], dict[str, int], dict[str, list[int]]]:
    members: dict[str, list[int]] = {}
    for index, study in enumerate(studies):
        members.setdefault(study, []).append(index)
    # a study's stratum is its highest target (a study with a positive view is positive)
    stratum = {study: int(targets[idx].max()) for study, idx in members.items()}
    return sorted(members), stratum, members


def holdout_split(
    studies: Sequence[str], targets: NDArray[np.int64], fraction: float, seed: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(train indices, held-out indices)`` with about ``fraction`` of each stratum held out."""
    names, stratum, members = _study_strata(studies, targets)
    rng = np.random.default_rng([seed, 7919])
    held: list[int] = []
    for value in sorted(set(stratum.values())):
        group = [s for s in names if stratum[s] == value]
        rng.shuffle(group)
        take = max(1, round(fraction * len(group))) if len(group) > 1 else 0
        for study in group[:take]:
            held.extend(members[study])
    held_set = set(held)
    train = [i for i in range(len(studies)) if i not in held_set]
    return np.array(train, dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def repeated_kfold(
    studies: Sequence[str], targets: NDArray[np.int64], folds: int, repeats: int, seed: int
) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """``folds * repeats`` pairs of (train indices, test indices), study-grouped and stratified."""
    if folds < 2:
        raise ValueError("k-fold needs at least 2 folds")
    names, stratum, members = _study_strata(studies, targets)
    out: list[tuple[NDArray[np.int64], NDArray[np.int64]]] = []
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, repeat, 104729])
        assignment: dict[str, int] = {}
        for value in sorted(set(stratum.values())):
            group = [s for s in names if stratum[s] == value]
            rng.shuffle(group)
            offset = int(rng.integers(folds))
            for i, study in enumerate(group):
                assignment[study] = (offset + i) % folds
        for fold in range(folds):
            test = sorted(i for s in names if assignment[s] == fold for i in members[s])
            test_set = set(test)
            train = [i for i in range(len(studies)) if i not in test_set]
            out.append((np.array(train, dtype=np.int64), np.array(test, dtype=np.int64)))
    return out


def targets_of(images: Sequence[LabelledImage]) -> NDArray[np.int64]:
    """Binary targets; an unknown label is an error for the caller to have filtered out."""
    if any(image.label is None for image in images):
        raise ValueError("images without a confirmed label cannot be training targets")
    return np.array([image.label for image in images], dtype=np.int64)
