"""Package a fracture-map model (kind ``segmenter``): choose its score, calibrate, set its points.

The order keeps ``valid`` for the end, as issue 12 asks:

1. The weights are written (float16, as served) and read back: everything below scores the
   network the node will run.
2. **Score and flip TTA** are chosen on the early-stopping hold-out carved out of ``train``
   (never on ``valid``): each image score of :data:`SEGMENTER_SCORES`, with and without the
   mirror pass, by AUROC; ties go to the cheaper (no flip) and to the earlier method.
3. On ``valid``, once: the image score gets a temperature and logit offset and image operating
   points (:func:`inference.training.package.calibration_fields`, the classifiers' Platt scaling
   and nested threshold choice); the map's per-image maxima get the map temperature and offset
   that calibrate box probabilities; and two **box operating points** are set on the map
   probability: ``high_sensitivity``, the cut whose connected regions find the most fracture
   boxes at no more than ``BoxTargets.sensitive_fp_per_image`` false-positive boxes per image,
   and ``high_specificity``, the box-peak threshold on those regions at no more than
   ``BoxTargets.specific_fp_per_image``. A hit is IoU >= ``BoxTargets.iou`` with a FracAtlas
   fracture box (one hit per fracture box); all valid images count, negatives included.

:func:`package_segmenter` packages a finished :class:`~inference.training.segmenter.SegmenterRun`;
:func:`package_segmenter_from_checkpoint` packages the best weights of a training checkpoint
(``checkpoint.pt`` of :func:`~inference.training.segmenter.fit_segmenter`, or a bare state_dict)
without training again.

Errors::

    TrainingError (inference.training.loop)   a checkpoint that cannot be read or does not fit
    DatasetError (inference.datasets)         unreadable data or polygon file
    PackageError (inference.packages)         a package that cannot be written
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from inference.calibration import CalibrationError, apply_calibration, auroc, calibrate_temperature
from inference.calibration import wilson_interval as wilson
from inference.datasets import LabelledImage, summarise
from inference.maps import map_boxes
from inference.modelcard import (
    HIGH_SENSITIVITY,
    HIGH_SPECIFICITY,
    SEGMENTER_SCORES,
    BoxOperatingPoint,
    ModelCard,
    ModelKind,
    SegmenterSpec,
)
from inference.models import ModelLoadError
from inference.models.segmenter import forward_maps, image_logits, load_segnet, upsample_maps
from inference.models.segnet import SegNet
from inference.models.torchio import WEIGHTS_FILE, save_weights, select_device
from inference.packages import ModelPackage, new_device_uid, write_package
from inference.pixels import PreprocessConfig
from inference.protocols import RawBox
from inference.regions import AnatomicalGroup, Region
from inference.training.augment import AugmentConfig
from inference.training.cache import prepare_set
from inference.training.classifier import trained_regions
from inference.training.detector import froc, recall_at_fppi
from inference.training.loop import TrainingError
from inference.training.package import calibration_fields, machine, per_group_auroc
from inference.training.segmenter import (
    SegmenterJob,
    SegmenterLoop,
    SegmenterRun,
    default_polygons,
    select_segmenter_images,
)
from inference.training.splits import holdout_split, targets_of

log = logging.getLogger(__name__)

PixelBox = tuple[float, float, float, float]
CANDIDATE_CUTS = 41  # quantiles of the images' peak probabilities tried as region cuts


@dataclass(frozen=True, slots=True)
class BoxTargets:
    """What the box operating points aim at (issue 12: recall >= 0.70 at <= 0.5 FP per image)."""

    iou: float = 0.3
    sensitive_fp_per_image: float = 0.5
    specific_fp_per_image: float = 0.1


@dataclass(frozen=True, slots=True)
class ScoreChoice:
    score: str
    flip: bool
    stop_auroc: dict[str, float] = field(default_factory=dict)  # "max", "max+flip", ... -> AUROC


# ---------------------------------------------------------------------------------------------
# choosing the image score on the early-stopping hold-out


def choose_score(
    module: SegNet,
    pixels: NDArray[np.uint8],
    targets: NDArray[np.int64],
    device: torch.device,
    batch: int = 32,
    score: str | None = None,
    flip: bool | None = None,
) -> ScoreChoice:
    """The image score (and flip TTA) with the best AUROC on the hold-out; given ones are kept."""
    array = pixels.astype(np.float32) / 255.0
    table: dict[str, float] = {}
    candidates: list[tuple[float, int, str, bool]] = []
    for mirrored in (False, True):
        if flip is not None and mirrored != flip:
            continue
        coarse, heads = forward_maps(module, array, device, batch, mirrored)
        for order, method in enumerate(SEGMENTER_SCORES):
            if score is not None and method != score:
                continue
            try:
                value = auroc(targets, image_logits(coarse, heads, method))
            except CalibrationError:
                value = float("nan")
            table[method + ("+flip" if mirrored else "")] = round(value, 4)
            rank = -math.inf if math.isnan(value) else value
            candidates.append((rank, -(order + 10 * int(mirrored)), method, mirrored))
    best = max(candidates)
    return ScoreChoice(score=best[2], flip=best[3], stop_auroc=table)


# ---------------------------------------------------------------------------------------------
# box operating points on valid


def region_boxes(
    full_maps: NDArray[np.float32], threshold: float, temperature: float, offset: float
) -> list[list[RawBox]]:
    return [map_boxes(m, threshold, temperature, offset) for m in full_maps]


def _recall_fppi(
    truths: Sequence[Sequence[PixelBox]], detections: Sequence[Sequence[RawBox]], iou: float
) -> tuple[float, float, int, int]:
    """(recall, false positives per image, hits, fracture boxes) counting every detection."""
    total = sum(len(t) for t in truths)
    _, recall, fppi = froc(truths, detections, iou)
    if recall.size == 0:
        return 0.0, 0.0, 0, total
    return float(recall[-1]), float(fppi[-1]), round(float(recall[-1]) * total), total


def _at_threshold(detections: Sequence[Sequence[RawBox]], threshold: float) -> list[list[RawBox]]:
    return [[b for b in boxes if b[4] >= threshold] for boxes in detections]


def choose_box_points(
    full_maps: NDArray[np.float32],
    truths: Sequence[Sequence[PixelBox]],
    temperature: float,
    offset: float,
    targets: BoxTargets = BoxTargets(),
) -> tuple[tuple[BoxOperatingPoint, ...], dict[str, Any]]:
    """The two box operating points and the box metrics of ``full_maps`` (N, S, S) logits."""
    n = len(full_maps)
    if n == 0 or sum(len(t) for t in truths) == 0:
        return (), {"note": "no fracture boxes to set box operating points on"}
    peaks = apply_calibration(full_maps.reshape(n, -1).max(axis=1), temperature, offset)
    cuts = np.unique(np.quantile(peaks, np.linspace(0.0, 1.0, CANDIDATE_CUTS)))
    sweep: list[tuple[float, float, float]] = []  # cut, recall, fppi
    best: tuple[float, float] | None = None  # (recall, cut) under the FP budget
    for cut in cuts:
        recall, fppi, _, _ = _recall_fppi(
            truths, region_boxes(full_maps, float(cut), temperature, offset), targets.iou
        )
        sweep.append((float(cut), recall, fppi))
        if fppi <= targets.sensitive_fp_per_image and (best is None or recall >= best[0]):
            best = (recall, float(cut))
    low = best[1] if best is not None else float(cuts[-1])
    detections = region_boxes(full_maps, low, temperature, offset)
    thresholds, recall_curve, fppi_curve = froc(truths, detections, targets.iou)
    high = low
    inside = np.flatnonzero(fppi_curve <= targets.specific_fp_per_image) if thresholds.size else np.zeros(0)
    if inside.size:
        high = max(low, float(thresholds[inside[-1]]))
    elif thresholds.size:
        # Even the top box breaks the budget: no box is a firm call (the point sits above them all).
        high = max(low, min(1.0, float(np.nextafter(thresholds[0], np.inf))))
    points = []
    metrics: dict[str, Any] = {
        "iou": targets.iou,
        "targets_fp_per_image": {
            HIGH_SENSITIVITY: targets.sensitive_fp_per_image,
            HIGH_SPECIFICITY: targets.specific_fp_per_image,
        },
        "images": n,
        "fracture_boxes": int(sum(len(t) for t in truths)),
        "cut_sweep": [
            {"cut": round(c, 5), "recall": round(r, 4), "fp_per_image": round(f, 4)} for c, r, f in sweep
        ],
    }
    for name, threshold in ((HIGH_SENSITIVITY, low), (HIGH_SPECIFICITY, high)):
        called = _at_threshold(detections, threshold)
        recall, fppi, hits, total = _recall_fppi(truths, called, targets.iou)
        recall_half, fppi_half, _, _ = _recall_fppi(truths, called, 0.5)
        points.append(
            BoxOperatingPoint(
                name=name,
                threshold=float(threshold),
                recall=round(recall, 4),
                false_positives_per_image=round(fppi, 4),
                iou=targets.iou,
                recall_ci=tuple(round(v, 4) for v in wilson(hits, total)),  # type: ignore[arg-type]
            )
        )
        metrics[name] = {
            "threshold": float(threshold),
            f"recall_iou{targets.iou}": round(recall, 4),
            f"fp_per_image_iou{targets.iou}": round(fppi, 4),
            "recall_iou0.5": round(recall_half, 4),
            "fp_per_image_iou0.5": round(fppi_half, 4),
        }
    for overlap in sorted({targets.iou, 0.5}):
        _, recall_o, fppi_o = froc(truths, detections, overlap)
        metrics[f"froc_iou{overlap}"] = {
            f"recall_at_{limit}_fp_per_image": round(recall_at_fppi(recall_o, fppi_o, limit), 4)
            for limit in (0.1, 0.25, 0.5, 1.0, 2.0)
        }
    return tuple(points), metrics


# ---------------------------------------------------------------------------------------------
# the package


def _calibration(scores: NDArray[np.float64], labels: NDArray[np.int64], seed: int) -> dict[str, Any]:
    try:
        return calibration_fields(scores, labels, seed)
    except CalibrationError as exc:
        log.warning("not calibrated: %s", exc)
        return {
            "temperature": 1.0,
            "logit_offset": 0.0,
            "operating_points": (),
            "validation_metrics": {"n": int(labels.size), "positives": int(labels.sum()), "note": str(exc)},
        }


def _map_calibration(maxima: NDArray[np.float64], labels: NDArray[np.int64]) -> tuple[float, float, str]:
    try:
        report = calibrate_temperature(maxima, labels, offset=True)
    except CalibrationError as exc:
        return 1.0, 0.0, str(exc)
    return report.temperature, report.logit_offset, ""


def _package(
    module: SegNet,
    job: SegmenterJob,
    train: Sequence[LabelledImage],
    stop: Sequence[LabelledImage],
    valid: Sequence[LabelledImage],
    left_out: Sequence[str],
    training: Mapping[str, Any],
    out: Path,
    name: str,
    cache_dir: Path | None,
    version: str,
    group: AnatomicalGroup | None,
    notes: str,
    score: str | None,
    flip: bool | None,
    targets: BoxTargets,
    device: str,
) -> ModelPackage:
    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(module, out / WEIGHTS_FILE)
    try:
        where = select_device(device)
    except ModelLoadError as exc:
        raise TrainingError(str(exc)) from exc
    served = load_segnet(job.loop.backbone, weights, where)
    config = PreprocessConfig()
    batch = job.loop.eval_batch

    if stop:
        stop_set = prepare_set(list(stop), job.size, config, cache_dir, progress=False)
        choice = choose_score(served, stop_set.pixels, targets_of(stop), where, batch, score, flip)
    else:
        choice = ScoreChoice(score or "max", bool(flip))
    log.info(
        "segmenter score %s%s (hold-out AUROC %s)",
        choice.score,
        " + flip" if choice.flip else "",
        choice.stop_auroc,
    )

    fields: dict[str, Any] = {
        "temperature": 1.0,
        "logit_offset": 0.0,
        "operating_points": (),
        "validation_metrics": {},
    }
    spec = SegmenterSpec(score=choice.score, flip=choice.flip)
    if valid:
        prepared = prepare_set(list(valid), job.size, config, cache_dir, progress=False)
        coarse, heads = forward_maps(
            served, prepared.pixels.astype(np.float32) / 255.0, where, batch, choice.flip
        )
        labels = targets_of(valid)
        scores = image_logits(coarse, heads, choice.score).astype(np.float64)
        fields = _calibration(scores, labels, job.loop.seed)
        metrics = fields["validation_metrics"]
        metrics["per_group"] = per_group_auroc(list(valid), scores)
        metrics["split"] = job.valid_split
        metrics["calibrated_on"] = sorted({i.source for i in valid})
        metrics["image_score"] = choice.score + (" + flip TTA" if choice.flip else "")
        full = upsample_maps(coarse, job.size)
        maxima = full.reshape(len(full), -1).max(axis=1).astype(np.float64)
        map_t, map_b, map_note = _map_calibration(maxima, labels)
        truths = [prepared.boxes_in_pixels(k) for k in range(len(valid))]
        box_points, box_metrics = choose_box_points(full, truths, map_t, map_b, targets)
        box_metrics["map_calibration"] = {"temperature": round(map_t, 6), "logit_offset": round(map_b, 6)}
        if map_note:
            box_metrics["map_calibration"]["note"] = map_note
        metrics["boxes"] = box_metrics
        if box_points:
            sensitive = box_points[0]
            metrics[f"box_recall_at_{sensitive.name}"] = sensitive.recall
        spec = dataclasses.replace(
            spec, map_temperature=map_t, map_logit_offset=map_b, box_operating_points=box_points
        )

    regions: tuple[Region, ...] = trained_regions(list(train), group)
    if job.regions is not None:
        regions = tuple(r for r in regions if str(r) in job.regions)
    summary: dict[str, Any] = {
        "sources": [str(p) for p in job.data],
        "polygons": str(job.polygons) if job.polygons is not None else str(default_polygons(job.data)),
        "train": summarise(list(train)),
        "early_stopping": summarise(list(stop)),
        "valid": summarise(list(valid)),
        "left_out": list(left_out),
        "size": job.size,
        "stop_fraction": job.stop_fraction,
        "loop": job.loop.as_dict(),
        "score_choice": {
            "chosen_on": "early-stopping hold-out carved from train (never valid)",
            "stop_auroc": choice.stop_auroc,
        },
    }
    summary.update(training)
    card = ModelCard(
        name=name,
        version=version,
        device_uid=new_device_uid(),
        kind=ModelKind.SEGMENTER,
        architecture=job.loop.backbone,
        group=group,
        regions=regions,
        input_size=job.size,
        preprocessing=config.as_dict(),
        training_data=summary,
        notes=notes,
        segmenter=spec,
        **fields,
    )
    return write_package(out, card, {WEIGHTS_FILE: weights})


def _fit_summary(run: SegmenterRun) -> dict[str, Any]:
    fitted = run.fitted
    return {
        "epochs_planned": run.job.loop.epochs,
        "epochs_run": fitted.epochs_run,
        "best_epoch": fitted.best_epoch,
        "early_stopping_auroc_max": round(fitted.best_score, 4),
        "wall_seconds": round(fitted.seconds, 1),
        "machine": machine(run.job.loop.threads) if fitted.device == "cpu" else fitted.device,
        "history": [{k: round(v, 4) for k, v in h.items()} for h in fitted.history],
    }


def package_segmenter(
    run: SegmenterRun,
    out: Path,
    name: str,
    cache_dir: Path | None,
    version: str = "1.0.0",
    group: AnatomicalGroup | None = None,
    notes: str = "",
    score: str | None = None,
    flip: bool | None = None,
    targets: BoxTargets = BoxTargets(),
    device: str = "cpu",
) -> ModelPackage:
    """The package of a finished run: score chosen on its hold-out, calibrated on its ``valid``."""
    return _package(
        run.fitted.module,
        run.job,
        run.train,
        run.stop,
        run.valid,
        run.left_out,
        _fit_summary(run),
        out,
        name,
        cache_dir,
        version,
        group,
        notes,
        score,
        flip,
        targets,
        device,
    )


# ---------------------------------------------------------------------------------------------
# from a checkpoint


def loop_from_config(config: Mapping[str, Any]) -> SegmenterLoop:
    """The :class:`SegmenterLoop` a checkpoint's ``config`` describes (unknown keys ignored)."""
    known = {f.name for f in dataclasses.fields(SegmenterLoop)}
    values: dict[str, Any] = {k: v for k, v in config.items() if k in known and k != "augment"}
    augment = config.get("augment")
    if isinstance(augment, Mapping):
        names = {f.name for f in dataclasses.fields(AugmentConfig)}
        settings: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in augment.items() if k in names
        }
        values["augment"] = AugmentConfig(**settings)
    return SegmenterLoop(**values)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    module: SegNet
    loop: SegmenterLoop | None  # None: a bare state_dict (no run settings in it)
    summary: dict[str, Any]


def read_checkpoint(path: Path, backbone: str = "mobilenet_v3_small") -> Checkpoint:
    """The best weights of a :func:`fit_segmenter` checkpoint, or a bare SegNet state_dict.

    A checkpoint names its backbone; ``backbone`` is used for a bare state_dict only.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise TrainingError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise TrainingError(f"{path} holds no state_dict or checkpoint")
    loop: SegmenterLoop | None = None
    summary: dict[str, Any] = {"from_checkpoint": str(path)}
    if "best_state" in state:
        loop = loop_from_config(dict(state.get("config", {})))
        weights = state["best_state"]
        history = list(state.get("history", []))
        summary.update(
            {
                "epochs_planned": loop.epochs,
                "epochs_run": int(state.get("epoch", len(history))),
                "best_epoch": int(state.get("best_epoch", 0)),
                "early_stopping_auroc_max": round(float(state.get("best_score", float("nan"))), 4),
                "wall_seconds": round(float(state.get("seconds", 0.0)), 1),
                "history": [{k: round(float(v), 4) for k, v in h.items()} for h in history],
            }
        )
        backbone = loop.backbone
    else:
        weights = state
    module = SegNet(backbone)
    try:
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    except (RuntimeError, AttributeError) as exc:
        raise TrainingError(f"{path}: the weights do not fit a {backbone} segmenter: {exc}") from exc
    return Checkpoint(module.eval(), loop, summary)


def package_segmenter_from_checkpoint(
    checkpoint: Path,
    job: SegmenterJob,
    out: Path,
    name: str,
    cache_dir: Path | None,
    version: str = "1.0.0",
    group: AnatomicalGroup | None = None,
    notes: str = "",
    score: str | None = None,
    flip: bool | None = None,
    targets: BoxTargets = BoxTargets(),
    device: str = "cpu",
    images: Sequence[LabelledImage] | None = None,
) -> ModelPackage:
    """Package the best weights of ``checkpoint`` without training again.

    The run's settings come from the checkpoint (backbone, seed: the same early-stopping hold-out
    is carved out of ``train`` again); ``job`` gives the data, regions and input size, which a
    checkpoint does not record: ``job.size`` must be the size the run trained at.
    """
    from inference.datasets import load_sources

    read = read_checkpoint(checkpoint, job.loop.backbone)
    if read.loop is not None:
        job = dataclasses.replace(
            job, loop=dataclasses.replace(read.loop, device=job.loop.device, threads=job.loop.threads)
        )
    everything = list(images) if images is not None else load_sources(job.data)
    train, valid, left_out = select_segmenter_images(everything, job)
    targets_all = targets_of(train)
    fit_idx, stop_idx = holdout_split(
        [i.study_id for i in train], targets_all, job.stop_fraction, job.loop.seed
    )
    summary = dict(read.summary)
    summary["packaged_on"] = machine(job.loop.threads)
    if job.loop.device == "cpu" or not torch.cuda.is_available():
        torch.set_num_threads(job.loop.threads)
    return _package(
        read.module,
        job,
        [train[k] for k in fit_idx],
        [train[k] for k in stop_idx],
        valid,
        left_out,
        summary,
        out,
        name,
        cache_dir,
        version,
        group,
        notes,
        score,
        flip,
        targets,
        device,
    )


__all__ = [
    "BoxTargets",
    "Checkpoint",
    "ScoreChoice",
    "choose_box_points",
    "choose_score",
    "package_segmenter",
    "package_segmenter_from_checkpoint",
    "read_checkpoint",
]
