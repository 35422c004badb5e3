"""Train the image-based body-region classifier the router falls back on.

Classes are the regions the data show on their own (an image that FracAtlas marks with several
regions is left out: it has no single answer). The label does not matter here, so the web
set's images count whatever their fracture status; its images of unknown region are left out.
Validation reports the accuracy of every region with a Wilson 95 % interval.

Errors::

    TrainingError (inference.training.loop)   fewer than two regions to tell apart
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference.calibration import fit_temperature, wilson_interval
from inference.datasets import LabelledImage, load_sources, summarise
from inference.pixels import PreprocessConfig
from inference.regions import Region
from inference.training.cache import prepare_set
from inference.training.loop import FitResult, LoopConfig, TrainingError, fit, predict_logits, resolve_device
from inference.training.splits import holdout_split

log = logging.getLogger(__name__)

NOT_A_CLASS = (Region.OTHER, Region.UNKNOWN)


@dataclass(frozen=True, slots=True)
class RegionJob:
    data: tuple[Path, ...]
    size: int = 160
    loop: LoopConfig = field(default_factory=LoopConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    stop_fraction: float = 0.15
    min_images: int = 20  # a region with fewer training images is not a class
    train_split: str = "train"
    valid_split: str = "valid"


def single_region(images: Sequence[LabelledImage]) -> list[LabelledImage]:
    return [i for i in images if len(i.all_regions) == 1 and i.region not in NOT_A_CLASS]


@dataclass(frozen=True, slots=True)
class RegionFit:
    job: RegionJob
    classes: tuple[Region, ...]
    train: tuple[LabelledImage, ...]
    valid: tuple[LabelledImage, ...]
    result: FitResult
    valid_logits: NDArray[np.float32]  # (N, K)
    valid_targets: NDArray[np.int64]


def fit_region(
    job: RegionJob,
    cache_dir: Path | None,
    work_dir: Path | None,
    resume: bool = False,
    progress: bool = True,
    images: Sequence[LabelledImage] | None = None,
) -> RegionFit:
    everything = single_region(list(images) if images is not None else load_sources(job.data))
    train = [i for i in everything if i.split == job.train_split]
    valid = [i for i in everything if i.split == job.valid_split]
    if not valid:
        targets_all = np.array([list(Region).index(i.region) for i in train], dtype=np.int64)
        tr, va = holdout_split([i.study_id for i in train], targets_all, 0.2, job.loop.seed + 1)
        train, valid = [train[k] for k in tr], [train[k] for k in va]
    counts: dict[Region, int] = {}
    for image in train:
        counts[image.region] = counts.get(image.region, 0) + 1
    order = list(Region)
    classes = tuple(sorted((r for r, n in counts.items() if n >= job.min_images), key=order.index))
    if len(classes) < 2:
        raise TrainingError(f"need at least two regions with {job.min_images}+ training images, got {counts}")
    index = {r: k for k, r in enumerate(classes)}
    train = [i for i in train if i.region in index]
    valid = [i for i in valid if i.region in index]
    targets = np.array([index[i.region] for i in train], dtype=np.int64)
    fit_idx, stop_idx = holdout_split([i.study_id for i in train], targets, job.stop_fraction, job.loop.seed)
    prepared = prepare_set(train, job.size, job.preprocess, cache_dir, progress)
    log.info(
        "region classes %s; training on %d, early stopping on %d, validating on %d",
        [str(c) for c in classes],
        len(fit_idx),
        len(stop_idx),
        len(valid),
    )
    result = fit(
        prepared.pixels[fit_idx],
        targets[fit_idx],
        prepared.pixels[stop_idx],
        targets[stop_idx],
        outputs=len(classes),
        config=job.loop,
        checkpoint=None if work_dir is None else work_dir / "checkpoint.pt",
        resume=resume,
        progress=progress,
    )
    valid_targets = np.array([index[i.region] for i in valid], dtype=np.int64)
    valid_logits = np.zeros((0, len(classes)), dtype=np.float32)
    if valid:
        valid_pixels = prepare_set(valid, job.size, job.preprocess, cache_dir, progress).pixels
        valid_logits = predict_logits(result.module, valid_pixels, resolve_device("cpu"))
    return RegionFit(job, classes, tuple(train), tuple(valid), result, valid_logits, valid_targets)


def region_metrics(fitted: RegionFit) -> tuple[float, dict[str, Any]]:
    """``(temperature, validation metrics)``: accuracy overall and per region with Wilson CIs."""
    logits, targets = fitted.valid_logits, fitted.valid_targets
    if len(targets) == 0:
        return 1.0, {"n": 0}
    temperature = fit_temperature(logits, targets) if len(np.unique(targets)) > 1 else 1.0
    predicted = logits.argmax(axis=1)
    per_region: dict[str, Any] = {}
    for k, region in enumerate(fitted.classes):
        mask = targets == k
        n = int(mask.sum())
        correct = int((predicted[mask] == k).sum())
        per_region[str(region)] = {
            "n": n,
            "accuracy": round(correct / n, 4) if n else None,
            "accuracy_ci": [round(v, 4) for v in wilson_interval(correct, n)],
        }
    correct = int((predicted == targets).sum())
    confusion = np.zeros((len(fitted.classes), len(fitted.classes)), dtype=np.int64)
    for t, p in zip(targets, predicted, strict=True):
        confusion[t, p] += 1
    return temperature, {
        "n": int(len(targets)),
        "accuracy": round(correct / len(targets), 4),
        "accuracy_ci": [round(v, 4) for v in wilson_interval(correct, len(targets))],
        "per_region": per_region,
        "confusion": {
            "classes": [str(c) for c in fitted.classes],
            "rows_true_cols_predicted": confusion.tolist(),
        },
    }


def region_summary(fitted: RegionFit) -> dict[str, Any]:
    return {
        "sources": [str(p) for p in fitted.job.data],
        "train": summarise(list(fitted.train)),
        "valid": summarise(list(fitted.valid)),
        "left_out": ["images marked with several regions", "images of unknown region"],
    }
