"""Train a fracture classifier for one anatomical group (or all regions) and package it.

Data rules, from the datasets README:

- Training and metrics use images with a confirmed label only.
- A source that has no confirmed negatives in a split (the web teaching-file set) is left out
  of that split: its positives next to another source's negatives would teach the network to
  tell the sources apart instead of fractures (a source shortcut). The card lists what was
  left out.
- The source's ``train`` split trains; an early-stopping hold-out (study-grouped, stratified)
  is carved out of it; the ``valid`` split is kept apart for calibration, operating points and
  the card's metrics. Data without splits get a study-grouped 20 % validation hold-out.

Errors::

    TrainingError (inference.training.loop)   nothing to train on, one class, bad checkpoint
    DatasetError (inference.datasets)         unreadable data
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference.datasets import LabelledImage, load_sources, select, summarise
from inference.pixels import PreprocessConfig
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, Region
from inference.training.cache import prepare_set
from inference.training.loop import FitResult, LoopConfig, TrainingError, fit, predict_logits, resolve_device
from inference.training.splits import holdout_split, repeated_kfold, targets_of

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClassifierJob:
    """Everything that decides a classifier training run."""

    data: tuple[Path, ...]
    group: AnatomicalGroup | None = None  # None: all regions of the data
    regions: tuple[Region, ...] | None = None  # narrower than the group, when given
    size: int = 224
    loop: LoopConfig = field(default_factory=LoopConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    stop_fraction: float = 0.15
    train_split: str = "train"
    valid_split: str = "valid"
    kfold: int = 0  # 0: no cross-validation
    repeats: int = 1


@dataclass(frozen=True, slots=True)
class Selection:
    train: tuple[LabelledImage, ...]
    valid: tuple[LabelledImage, ...]
    left_out: tuple[str, ...]  # human-readable reasons, for the card


def _sources_with_negatives(images: Sequence[LabelledImage]) -> set[str]:
    return {i.source for i in images if i.label == 0}


def select_images(images: Sequence[LabelledImage], job: ClassifierJob) -> Selection:
    """The training and validation images of ``job`` from everything the sources hold."""
    # Explicit regions win over the group: a lower-limb model names lower-middle as its group
    # and trains on leg and hip images.
    groups = None if job.group is None or job.regions is not None else [job.group]
    chosen = select(images, groups=groups, regions=job.regions, labelled_only=True)
    left_out: list[str] = []
    unknown = sum(1 for i in select(images, groups=groups, regions=job.regions) if i.label is None)
    if unknown:
        left_out.append(f"{unknown} images without a confirmed label (not confirmed negatives)")
    has_splits = any(i.split == job.valid_split for i in chosen)
    if has_splits:
        train = [i for i in chosen if i.split == job.train_split]
        valid = [i for i in chosen if i.split == job.valid_split]
    else:
        targets = targets_of(chosen)
        tr, va = holdout_split([i.study_id for i in chosen], targets, 0.2, job.loop.seed + 1)
        train = [chosen[k] for k in tr]
        valid = [chosen[k] for k in va]
        left_out.append("no valid split in the data: a study-grouped 20 % hold-out validates")
    for name, part in (("train", train), ("valid", valid)):
        keep = _sources_with_negatives(part)
        dropped = sorted({i.source for i in part} - keep)
        for source in dropped:
            count = sum(1 for i in part if i.source == source)
            left_out.append(f"{count} {name} images of {source}: no confirmed negatives (source shortcut)")
        if name == "train":
            train = [i for i in part if i.source in keep]
        else:
            valid = [i for i in part if i.source in keep]
    if not train:
        raise TrainingError("no labelled training images for this selection")
    return Selection(train=tuple(train), valid=tuple(valid), left_out=tuple(left_out))


@dataclass(frozen=True, slots=True)
class ClassifierFit:
    job: ClassifierJob
    selection: Selection
    stop: tuple[LabelledImage, ...]
    result: FitResult
    valid_logits: NDArray[np.float32]  # (N,) on selection.valid
    cross_validation: dict[str, Any] | None


def fit_classifier(
    job: ClassifierJob,
    cache_dir: Path | None,
    work_dir: Path | None,
    resume: bool = False,
    progress: bool = True,
    images: Sequence[LabelledImage] | None = None,
) -> ClassifierFit:
    """Select, prepare (cached), train with early stopping, and score the validation images."""
    everything = list(images) if images is not None else load_sources(job.data)
    selection = select_images(everything, job)
    train_images = list(selection.train)
    targets = targets_of(train_images)
    fit_idx, stop_idx = holdout_split(
        [i.study_id for i in train_images], targets, job.stop_fraction, job.loop.seed
    )
    prepared = prepare_set(train_images, job.size, job.preprocess, cache_dir, progress)
    cross_validation = None
    if job.kfold >= 2:
        cross_validation = _cross_validate(
            job, prepared.pixels, targets, train_images, work_dir, resume, progress
        )
    log.info(
        "training on %d images (%d positive), early stopping on %d, validating on %d",
        len(fit_idx),
        int(targets[fit_idx].sum()),
        len(stop_idx),
        len(selection.valid),
    )
    result = fit(
        prepared.pixels[fit_idx],
        targets[fit_idx],
        prepared.pixels[stop_idx],
        targets[stop_idx],
        outputs=1,
        config=job.loop,
        checkpoint=None if work_dir is None else work_dir / "checkpoint.pt",
        resume=resume,
        progress=progress,
    )
    valid_logits = np.zeros(0, dtype=np.float32)
    if selection.valid:
        valid_prepared = prepare_set(list(selection.valid), job.size, job.preprocess, cache_dir, progress)
        valid_logits = predict_logits(result.module, valid_prepared.pixels, resolve_device("cpu"))[:, 0]
    return ClassifierFit(
        job=job,
        selection=selection,
        stop=tuple(train_images[k] for k in stop_idx),
        result=result,
        valid_logits=valid_logits,
        cross_validation=cross_validation,
    )


def _cross_validate(
    job: ClassifierJob,
    pixels: NDArray[np.uint8],
    targets: NDArray[np.int64],
    images: Sequence[LabelledImage],
    work_dir: Path | None,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    """Repeated stratified k-fold on the training images; out-of-fold AUROC per fold."""
    from inference.calibration import CalibrationError, auroc

    studies = [i.study_id for i in images]
    scores: list[float] = []
    for number, (train_idx, test_idx) in enumerate(
        repeated_kfold(studies, targets, job.kfold, job.repeats, job.loop.seed)
    ):
        sub_studies = [studies[k] for k in train_idx]
        fit_rel, stop_rel = holdout_split(sub_studies, targets[train_idx], job.stop_fraction, job.loop.seed)
        fit_idx, stop_idx = train_idx[fit_rel], train_idx[stop_rel]
        result = fit(
            pixels[fit_idx],
            targets[fit_idx],
            pixels[stop_idx],
            targets[stop_idx],
            outputs=1,
            config=job.loop,
            checkpoint=None if work_dir is None else work_dir / f"fold{number}.pt",
            resume=resume,
            progress=progress,
        )
        logits = predict_logits(result.module, pixels[test_idx], resolve_device("cpu"))[:, 0]
        try:
            scores.append(auroc(targets[test_idx], logits))
        except CalibrationError:
            scores.append(float("nan"))
        log.info("fold %d: out-of-fold AUROC %.4f", number + 1, scores[-1])
    values = np.array(scores, dtype=np.float64)
    return {
        "folds": job.kfold,
        "repeats": job.repeats,
        "auroc_per_fold": [round(float(v), 4) for v in values],
        "auroc_mean": round(float(np.nanmean(values)), 4),
        "auroc_sd": round(float(np.nanstd(values, ddof=1)) if values.size > 1 else 0.0, 4),
    }


def trained_regions(images: Sequence[LabelledImage], group: AnatomicalGroup | None) -> tuple[Region, ...]:
    """The regions of the training images that the model answers for (inside its group)."""
    seen = {r for i in images for r in i.all_regions}
    if group is not None:
        seen = {r for r in seen if DEFAULT_GROUP_TABLE.group_of(r) == group}
    order = list(Region)
    return tuple(sorted(seen, key=order.index))


def data_summary(fitted: ClassifierFit) -> dict[str, Any]:
    return {
        "sources": [str(p) for p in fitted.job.data],
        "train": summarise([i for i in fitted.selection.train if i not in set(fitted.stop)]),
        "early_stopping": summarise(list(fitted.stop)),
        "valid": summarise(list(fitted.selection.valid)),
        "left_out": list(fitted.selection.left_out),
    }
