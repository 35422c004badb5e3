"""Turn a finished training run into a model package, and (re)calibrate a package on data.

Calibration is the same for every kind: a score per validation image (classifier logit;
detector: logit of the highest box confidence, as in the multi-site Faster R-CNN study), a
temperature fitted on it, operating points chosen with nested selection
(:func:`inference.calibration.operating_points`), AUROC with its DeLong CI. Only images with a
confirmed label from sources that hold confirmed negatives count (datasets README).

Errors::

    CalibrationError (inference.calibration)   validation data with one class only
    PackageError (inference.packages)          a package that fails verification
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from inference.calibration import (
    CalibrationError,
    apply_calibration,
    binary_metrics,
    calibrate_temperature,
    logit,
    operating_points,
    sigmoid,
)
from inference.datasets import LabelledImage, select
from inference.modelcard import ModelCard, ModelKind
from inference.models.torchio import WEIGHTS_FILE, save_weights
from inference.packages import ModelPackage, new_device_uid, rewrite_card, verify_package, write_package
from inference.pixels import PreprocessConfig
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, Region
from inference.training.cache import prepare_set
from inference.training.classifier import ClassifierFit, data_summary, trained_regions
from inference.training.detector import DetectorFit, detector_summary, froc, recall_at_fppi
from inference.training.region import RegionFit, region_metrics, region_summary

log = logging.getLogger(__name__)


def machine(threads: int | None = None) -> str:
    """Where training ran: the GPU's name, else the CPU with its core count and torch threads."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    used = threads if threads is not None else torch.get_num_threads()
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {used} torch thread(s)"


def calibration_fields(
    scores: NDArray[np.float64], labels: NDArray[np.int64], seed: int = 0, offset: bool = True
) -> dict[str, Any]:
    """Temperature (and logit offset), operating points and metrics from uncalibrated logits."""
    report = calibrate_temperature(scores, labels, offset=offset)
    probabilities = apply_calibration(scores, report.temperature, report.logit_offset)
    points = operating_points(labels, probabilities, seed=seed)
    metrics = binary_metrics(labels, probabilities)
    metrics["calibration"] = report.as_dict()
    metrics["operating_points_selection"] = (
        "thresholds on all validation images; sensitivity/specificity "
        "out-of-fold from 5x repeated stratified 5-fold selection, Wilson 95% CI"
    )
    return {
        "temperature": report.temperature,
        "logit_offset": report.logit_offset,
        "operating_points": points,
        "validation_metrics": metrics,
    }


def calibration_images(
    images: Sequence[LabelledImage], regions: Sequence[Region], split: str | None
) -> list[LabelledImage]:
    """Labelled images of ``regions`` (and ``split``) from sources with confirmed negatives."""
    chosen = [
        i for i in select(images, regions=regions, labelled_only=True) if split is None or i.split == split
    ]
    with_negatives = {i.source for i in chosen if i.label == 0}
    return [i for i in chosen if i.source in with_negatives]


def per_group_auroc(images: Sequence[LabelledImage], scores: NDArray[np.float64]) -> dict[str, Any]:
    """AUROC with CI of the images of each anatomical group (an image counts in each group it shows)."""
    out: dict[str, Any] = {}
    for group in AnatomicalGroup:
        mask = np.array(
            [any(DEFAULT_GROUP_TABLE.group_of(r) == group for r in i.all_regions) for i in images]
        )
        if not mask.any():
            continue
        labels = np.array([i.label for i in images], dtype=np.int64)[mask]
        try:
            metrics = binary_metrics(labels, sigmoid(scores[mask]))
        except CalibrationError:
            metrics = {"n": int(mask.sum()), "positives": int(labels.sum()), "auroc": None}
        out[str(group)] = {k: metrics[k] for k in ("n", "positives", "auroc", "auroc_ci") if k in metrics}
    return out


def package_classifier(
    fitted: ClassifierFit, out: Path, name: str, version: str = "1.0.0", notes: str = ""
) -> ModelPackage:
    job = fitted.job
    if job.regions is not None:
        regions = tuple(r for r in trained_regions(fitted.selection.train, None) if r in job.regions)
    else:
        regions = trained_regions(fitted.selection.train, job.group)
    labels = np.array([i.label for i in fitted.selection.valid], dtype=np.int64)
    scores = fitted.valid_logits.astype(np.float64)
    fields: dict[str, Any] = {
        "temperature": 1.0,
        "logit_offset": 0.0,
        "operating_points": (),
        "validation_metrics": {},
    }
    try:
        fields = calibration_fields(scores, labels, job.loop.seed)
    except CalibrationError as exc:
        log.warning("not calibrated: %s", exc)
        fields["validation_metrics"] = {
            "n": int(labels.size),
            "positives": int(labels.sum()),
            "note": str(exc),
        }
    fields["validation_metrics"]["per_group"] = per_group_auroc(fitted.selection.valid, scores)
    fields["validation_metrics"]["split"] = job.valid_split
    training = data_summary(fitted)
    training.update(
        {
            "epochs_planned": job.loop.epochs,
            "epochs_run": fitted.result.epochs_run,
            "best_epoch": fitted.result.best_epoch,
            "early_stopping_auroc": round(fitted.result.best_score, 4),
            "wall_seconds": round(fitted.result.seconds, 1),
            "machine": machine(job.loop.threads) if fitted.result.device == "cpu" else fitted.result.device,
            "loop": job.loop.as_dict(),
            "history": [{k: round(v, 4) for k, v in h.items()} for h in fitted.result.history],
        }
    )
    if fitted.cross_validation is not None:
        training["cross_validation"] = fitted.cross_validation
    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(fitted.result.module, out / WEIGHTS_FILE)
    card = ModelCard(
        name=name,
        version=version,
        device_uid=new_device_uid(),
        kind=ModelKind.CLASSIFIER,
        architecture=job.loop.backbone,
        group=job.group,
        regions=regions,
        input_size=job.size,
        preprocessing=job.preprocess.as_dict(),
        training_data=training,
        notes=notes,
        **fields,
    )
    return write_package(out, card, {WEIGHTS_FILE: weights})


def package_region(
    fitted: RegionFit, out: Path, name: str, version: str = "1.0.0", notes: str = ""
) -> ModelPackage:
    temperature, metrics = region_metrics(fitted)
    training = region_summary(fitted)
    training.update(
        {
            "epochs_planned": fitted.job.loop.epochs,
            "epochs_run": fitted.result.epochs_run,
            "best_epoch": fitted.result.best_epoch,
            "early_stopping_balanced_accuracy": round(fitted.result.best_score, 4),
            "wall_seconds": round(fitted.result.seconds, 1),
            "machine": machine(fitted.job.loop.threads)
            if fitted.result.device == "cpu"
            else fitted.result.device,
            "loop": fitted.job.loop.as_dict(),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(fitted.result.module, out / WEIGHTS_FILE)
    card = ModelCard(
        name=name,
        version=version,
        device_uid=new_device_uid(),
        kind=ModelKind.REGION,
        architecture=fitted.job.loop.backbone,
        group=None,
        regions=fitted.classes,
        input_size=fitted.job.size,
        preprocessing=fitted.job.preprocess.as_dict(),
        temperature=temperature,
        training_data=training,
        validation_metrics=metrics,
        notes=notes,
    )
    return write_package(out, card, {WEIGHTS_FILE: weights})


# --------------------------------------------------------------------------------------------
# detector


def detector_scores(
    package: ModelPackage, images: Sequence[LabelledImage], cache_dir: Path | None, device: str = "cpu"
) -> tuple[
    list[list[tuple[float, float, float, float, float]]], list[list[tuple[float, float, float, float]]]
]:
    """Raw (uncalibrated) boxes per image and the images' true boxes, both in prepared pixels."""
    from inference.models.detector import YoloDetector

    detector = YoloDetector.load(package, device)
    config = PreprocessConfig.from_dict(package.card.preprocessing)
    prepared = prepare_set(list(images), package.card.input_size, config, cache_dir, progress=False)
    detections: list[list[tuple[float, float, float, float, float]]] = []
    for start in range(0, len(images), 16):
        batch = prepared.pixels[start : start + 16].astype(np.float32) / 255.0
        detections.extend(detector.raw_boxes(batch))
    truths = [prepared.boxes_in_pixels(k) for k in range(len(images))]
    return detections, truths


def detector_fields(
    detections: Sequence[Sequence[tuple[float, float, float, float, float]]],
    truths: Sequence[Sequence[tuple[float, float, float, float]]],
    images: Sequence[LabelledImage],
    seed: int = 0,
    offset: bool = True,
) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for overlap in (0.5, 0.25):
        _, recall, fppi = froc(truths, detections, overlap)
        metrics[f"froc_iou{overlap}"] = {
            f"recall_at_{limit}_fp_per_image": round(recall_at_fppi(recall, fppi, limit), 4)
            for limit in (0.25, 0.5, 1.0, 2.0)
        }
    metrics["froc_images"] = len(images)
    metrics["froc_boxes"] = int(sum(len(t) for t in truths))
    metrics["recall_at_0.5_fp_per_image"] = metrics["froc_iou0.5"]["recall_at_0.5_fp_per_image"]
    labelled = [k for k, i in enumerate(images) if i.label is not None]
    sources_with_negatives = {images[k].source for k in labelled if images[k].label == 0}
    keep = [k for k in labelled if images[k].source in sources_with_negatives]
    top = np.array([max((d[4] for d in detections[k]), default=0.0) for k in keep], dtype=np.float64)
    labels = np.array([images[k].label for k in keep], dtype=np.int64)
    fields: dict[str, Any] = {"temperature": 1.0, "logit_offset": 0.0, "operating_points": ()}
    try:
        fields = calibration_fields(logit(top), labels, seed, offset)
        image_level = fields["validation_metrics"]
    except CalibrationError as exc:
        image_level = {"note": str(exc)}
    metrics["image_level"] = image_level
    metrics["image_probability"] = "highest box confidence, calibrated on its logit"
    fields["validation_metrics"] = metrics
    return fields


def package_detector(
    fitted: DetectorFit,
    out: Path,
    name: str,
    cache_dir: Path | None,
    version: str = "1.0.0",
    group: AnatomicalGroup | None = None,
    notes: str = "",
) -> ModelPackage:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    target = out / WEIGHTS_FILE
    shutil.copyfile(fitted.weights, target)
    _strip_ultralytics_checkpoint(target)
    regions = trained_regions(fitted.train, None)
    job = fitted.job
    training = detector_summary(fitted)
    training.update(
        {
            "epochs_run": fitted.epochs_run,
            "wall_seconds": round(fitted.seconds, 1),
            "machine": machine(),
            "job": job.as_dict(),
        }
    )
    card = ModelCard(
        name=name,
        version=version,
        device_uid=new_device_uid(),
        kind=ModelKind.DETECTOR,
        architecture=f"yolov8{job.variant}",
        group=group,
        regions=regions,
        input_size=job.size,
        preprocessing=job.preprocess.as_dict(),
        training_data=training,
        notes=notes,
    )
    package = write_package(out, card, {WEIGHTS_FILE: target})
    if fitted.valid:
        detections, truths = detector_scores(package, fitted.valid, cache_dir, "cpu")
        fields = detector_fields(detections, truths, fitted.valid, job.seed)
        package = write_package(out, replace(package.card, **fields), {WEIGHTS_FILE: target})
    return package


def _strip_ultralytics_checkpoint(path: Path) -> None:
    """Drop the optimiser state and the EMA copy from an ultralytics checkpoint (half the size)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("ema") is not None and state.get("model") is None:
        state["model"] = state["ema"]
    state["ema"] = None
    state["optimizer"] = None
    state["epoch"] = -1
    if state.get("model") is not None:
        state["model"] = state["model"].half()
    torch.save(state, path)


# --------------------------------------------------------------------------------------------
# calibrating an existing package


def calibrate_package(
    package_path: Path,
    images: Sequence[LabelledImage],
    split: str | None,
    cache_dir: Path | None,
    device: str = "cpu",
    seed: int = 0,
    scope: Mapping[str, Any] | None = None,
    offset: bool = True,
) -> ModelPackage:
    """Fit temperature, logit offset and operating points of a verified package on ``images``.

    Writes a new version. ``scope`` may give the card a new ``name``, ``group``, ``regions``,
    ``notes`` or ``version`` first (an all-region model chosen for one group); the calibration
    then uses that group's images. ``offset=False`` fits the temperature alone (offset 0).
    """
    package = verify_package(package_path)
    card = replace(package.card, **dict(scope or {}))
    if card.kind is ModelKind.REGION:
        raise CalibrationError("region models are calibrated when trained (softmax temperature)")
    chosen = calibration_images(images, card.regions, split)
    if not chosen:
        raise CalibrationError(f"no labelled images of {', '.join(map(str, card.regions))} in the data")
    if card.kind is ModelKind.DETECTOR:
        detections, truths = detector_scores(package, chosen, cache_dir, device)
        fields = detector_fields(detections, truths, chosen, seed, offset)
    else:
        from inference.models.classifier import TorchClassifier

        classifier = TorchClassifier.load(package, device)
        config = PreprocessConfig.from_dict(card.preprocessing)
        pixels = prepare_set(chosen, card.input_size, config, cache_dir, progress=False).pixels
        scores = np.concatenate(
            [
                classifier.logits(pixels[s : s + 32].astype(np.float32) / 255.0)
                for s in range(0, len(pixels), 32)
            ]
        ).astype(np.float64)
        labels = np.array([i.label for i in chosen], dtype=np.int64)
        fields = calibration_fields(scores, labels, seed, offset)
        fields["validation_metrics"]["per_group"] = per_group_auroc(chosen, scores)
    fields["validation_metrics"]["split"] = split
    fields["validation_metrics"]["calibrated_on"] = sorted({i.source for i in chosen})
    return rewrite_card(package, **dict(scope or {}), **fields)
