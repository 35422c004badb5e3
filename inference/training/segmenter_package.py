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

4. Optionally (``stack_with``, a classifier package): the **stack** of that classifier and this
   map model (:mod:`inference.training.stack`). Both logits are computed on the hold-out images
   of the classifier's groups, each model with its own preprocessing and input size; the stack is
   fitted there and compared with each member by repeated stratified k-fold, out of fold, on
   those images only. When it wins it is calibrated on ``valid`` of those groups once, gets its
   own operating points and goes on the card; the card notes say which images chose it either
   way. :func:`classifier_split` reconstructs which training images the classifier itself was
   fitted on (checked against the counts on its card), so ``StackOptions.images="unseen"`` can
   keep only hold-out images neither model trained on.

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
    Stack,
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


STACK_IMAGES = ("holdout", "unseen")


@dataclass(frozen=True, slots=True)
class StackOptions:
    """How :func:`stack_with_classifier` fits and chooses the stack.

    ``images``: ``"holdout"`` every early-stopping hold-out image of the classifier's groups;
    ``"unseen"`` only those the classifier was not fitted on either (needs its split to be
    reconstructable from its card). ``force``: attach the stack even when a member wins.
    """

    l2: float = 1.0
    folds: int = 5
    repeats: int = 10
    images: str = "holdout"
    force: bool = False


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
# the stack with a classifier


def classifier_split(
    card: ModelCard, images: Sequence[LabelledImage]
) -> tuple[frozenset[Path], frozenset[Path]] | None:
    """``(fitted on, early-stopping hold-out)`` image paths of a classifier package, rebuilt from
    its card (group or regions, seed, the default hold-out fraction) with the classifier's own
    selection and split; None unless the counts match what its card's ``training_data`` says."""
    from inference.training.classifier import ClassifierJob, select_images
    from inference.training.loop import LoopConfig

    summary = card.training_data
    seed = int(summary.get("loop", {}).get("seed", 0)) if isinstance(summary.get("loop"), dict) else 0
    wanted_train = summary.get("train", {}).get("images") if isinstance(summary.get("train"), dict) else None
    wanted_stop = (
        summary.get("early_stopping", {}).get("images")
        if isinstance(summary.get("early_stopping"), dict)
        else None
    )
    if wanted_train is None or wanted_stop is None:
        return None
    candidates: list[tuple[AnatomicalGroup | None, tuple[Region, ...] | None]] = [(card.group, None)]
    if card.regions:
        candidates.append((card.group, tuple(card.regions)))
    for group, regions in candidates:
        job = ClassifierJob(data=(), group=group, regions=regions, loop=LoopConfig(seed=seed))
        try:
            selection = select_images(list(images), job)
        except TrainingError:
            continue
        train = list(selection.train)
        fit_idx, stop_idx = holdout_split(
            [i.study_id for i in train], targets_of(train), job.stop_fraction, seed
        )
        # the card's "train" counts the fit set (older cards: the fit set and the hold-out)
        if len(stop_idx) == wanted_stop and wanted_train in (len(fit_idx), len(fit_idx) + len(stop_idx)):
            return frozenset(train[k].path for k in fit_idx), frozenset(train[k].path for k in stop_idx)
    return None


def _in_groups(image: LabelledImage, groups: frozenset[AnatomicalGroup]) -> bool:
    from inference.regions import DEFAULT_GROUP_TABLE

    return any(DEFAULT_GROUP_TABLE.group_of(r) in groups for r in image.all_regions)


def card_groups(card: ModelCard) -> frozenset[AnatomicalGroup]:
    """The groups a card serves (its group and its regions' groups), as the node reads it."""
    from inference.regions import DEFAULT_GROUP_TABLE

    groups = {g for g in (DEFAULT_GROUP_TABLE.group_of(r) for r in card.regions) if g is not None}
    if card.group is not None:
        groups.add(card.group)
    return frozenset(groups)


def _classifier_logits(
    package: ModelPackage, images: Sequence[LabelledImage], cache_dir: Path | None, device: str
) -> NDArray[np.float64]:
    from inference.models.classifier import TorchClassifier

    classifier = TorchClassifier.load(package, device)
    config = PreprocessConfig.from_dict(package.card.preprocessing)
    pixels = prepare_set(list(images), package.card.input_size, config, cache_dir, progress=False).pixels
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate(
        [classifier.logits(pixels[s : s + 32].astype(np.float32) / 255.0) for s in range(0, len(pixels), 32)]
    ).astype(np.float64)


def _map_logits(
    module: SegNet,
    images: Sequence[LabelledImage],
    size: int,
    choice: ScoreChoice,
    cache_dir: Path | None,
    where: torch.device,
    batch: int,
) -> NDArray[np.float64]:
    prepared = prepare_set(list(images), size, PreprocessConfig(), cache_dir, progress=False)
    coarse, heads = forward_maps(
        module, prepared.pixels.astype(np.float32) / 255.0, where, batch, choice.flip
    )
    return image_logits(coarse, heads, choice.score).astype(np.float64)


@dataclass(frozen=True, slots=True)
class StackResult:
    stack: Stack | None  # None: a member won out of fold (and not forced)
    summary: dict[str, Any]
    note: str


def stack_with_classifier(
    classifier_path: Path,
    module: SegNet,
    size: int,
    choice: ScoreChoice,
    stop: Sequence[LabelledImage],
    valid: Sequence[LabelledImage],
    everything: Sequence[LabelledImage],
    cache_dir: Path | None,
    device: str,
    batch: int = 32,
    seed: int = 0,
    options: StackOptions = StackOptions(),
) -> StackResult:
    """Fit, choose (out of fold, on the hold-out) and calibrate (on valid) the stack of the
    classifier package at ``classifier_path`` with this map model."""
    from inference.packages import verify_package
    from inference.training.stack import calibrate_stack, compare_out_of_fold, fit_stack

    if options.images not in STACK_IMAGES:
        raise TrainingError(f"stack images {options.images!r}: choose one of {', '.join(STACK_IMAGES)}")
    package = verify_package(classifier_path)
    card = package.card
    if card.kind is not ModelKind.CLASSIFIER:
        raise TrainingError(f"{classifier_path} is a {card.kind} package, not a classifier")
    groups = card_groups(card)
    where = select_device(device)
    chosen = [i for i in stop if i.label is not None and _in_groups(i, groups)]
    split = classifier_split(card, everything)
    seen = 0 if split is None else sum(1 for i in chosen if i.path in split[0])
    if options.images == "unseen":
        if split is None:
            raise TrainingError(
                f"the training split of {card.name} cannot be rebuilt from its card: use the whole hold-out"
            )
        chosen = [i for i in chosen if i.path not in split[0]]
        seen = 0
    labels = targets_of(chosen)
    group_text = ", ".join(sorted(str(g) for g in groups))
    where_text = (
        f"{len(chosen)} images ({int(labels.sum())} fractures) of the early-stopping hold-out carved out of "
        f"FracAtlas train, groups {group_text}"
        + (" (only those the classifier was not fitted on either)" if options.images == "unseen" else "")
    )
    overlap = (
        "the classifier's own fit set cannot be rebuilt from its card: some of these images may be "
        "in it, which makes its logits there optimistic"
        if split is None
        else f"{seen} of them were in the classifier's own fit set (its logits there are in-sample)"
    )
    classifier_z = _classifier_logits(package, chosen, cache_dir, device)
    map_z = _map_logits(module, chosen, size, choice, cache_dir, where, batch)
    try:
        comparison = compare_out_of_fold(
            classifier_z,
            map_z,
            labels,
            studies=[i.study_id for i in chosen],
            folds=options.folds,
            repeats=options.repeats,
            seed=seed,
            l2=options.l2,
        )
    except CalibrationError as exc:
        note = f"Stack with {card.name} not attached: {where_text} cannot choose it ({exc})."
        return StackResult(None, {"classifier": card.name, "chosen_on": where_text, "note": str(exc)}, note)
    table = comparison.as_dict()
    means = table["mean_auroc"]
    summary: dict[str, Any] = {
        "classifier": card.name,
        "classifier_version": card.version,
        "groups": sorted(str(g) for g in groups),
        "chosen_on": where_text,
        "classifier_fit_overlap": overlap,
        "out_of_fold": table,
    }
    verdict = (
        f"out-of-fold AUROC ({comparison.folds}-fold x {comparison.repeats}): stack {means['stack']:.3f}, "
        f"classifier {means['classifier']:.3f}, map {means['map']:.3f}; {comparison.chosen} chosen"
    )
    if comparison.chosen != "stack" and not options.force:
        note = f"Stack with {card.name} not attached: chosen on {where_text}; {verdict}; {overlap}."
        return StackResult(None, summary, note)
    stack = fit_stack(classifier_z, map_z, labels, card.name, options.l2)
    summary["fitted_weights"] = {"classifier": stack.weights[0], "map": stack.weights[1], "bias": stack.bias}
    in_valid = [i for i in valid if i.label is not None and _in_groups(i, groups)]
    calibrated_note = "not calibrated (no valid images of its groups)"
    if in_valid:
        valid_labels = targets_of(in_valid)
        classifier_v = _classifier_logits(package, in_valid, cache_dir, device)
        map_v = _map_logits(module, in_valid, size, choice, cache_dir, where, batch)
        try:
            stack = calibrate_stack(stack, classifier_v, map_v, valid_labels, seed)
            metrics = dict(stack.validation_metrics)
            z = stack.weights[0] * classifier_v + stack.weights[1] * map_v + stack.bias
            metrics["per_group"] = per_group_auroc(in_valid, z)
            metrics["split"] = "valid"
            stack = dataclasses.replace(stack, validation_metrics=metrics)
            calibrated_note = f"calibrated and its operating points set on {len(in_valid)} valid images once"
        except CalibrationError as exc:
            calibrated_note = f"not calibrated: {exc}"
    forced = " (forced)" if comparison.chosen != "stack" else ""
    note = (
        f"Stack with {card.name} {card.version}{forced}: weights and choice from {where_text}; {verdict}; "
        f"{overlap}; {calibrated_note}."
    )
    return StackResult(dataclasses.replace(stack, notes=note), summary, note)


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
    stack_with: Path | None = None,
    stack_options: StackOptions = StackOptions(),
    everything: Sequence[LabelledImage] = (),
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

    stack_summary: dict[str, Any] | None = None
    if stack_with is not None:
        result = stack_with_classifier(
            stack_with,
            served,
            job.size,
            choice,
            stop,
            valid,
            list(everything) or [*train, *stop, *valid],
            cache_dir,
            device,
            batch,
            job.loop.seed,
            stack_options,
        )
        stack_summary = result.summary
        spec = dataclasses.replace(spec, stack=result.stack)
        notes = (notes + "\n" if notes else "") + result.note
        log.info("%s", result.note)

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
    if stack_summary is not None:
        summary["stack"] = stack_summary
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
    *,
    stack_with: Path | None = None,
    stack_options: StackOptions = StackOptions(),
) -> ModelPackage:
    """The package of a finished run: score chosen on its hold-out, calibrated on its ``valid``;
    with ``stack_with`` (a classifier package) the stack is tried as the module docstring says."""
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
        stack_with,
        stack_options,
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
    *,
    stack_with: Path | None = None,
    stack_options: StackOptions = StackOptions(),
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
        stack_with,
        stack_options,
        everything,
    )


# ---------------------------------------------------------------------------------------------
# calibrating a map-model package on a site's labelled images


def _kept_box_points(spec: SegmenterSpec, map_t: float, map_b: float) -> tuple[BoxOperatingPoint, ...]:
    """The card's box points moved to a new map calibration at the same map cuts (the regions and
    boxes stay the same; only the probability they are stated in changes)."""
    from inference.maps import logit_threshold

    kept = []
    for point in spec.box_operating_points:
        cut = logit_threshold(point.threshold, spec.map_temperature, spec.map_logit_offset)
        kept.append(
            dataclasses.replace(point, threshold=float(apply_calibration(np.array([cut]), map_t, map_b)[0]))
        )
    return tuple(kept)


def calibrate_segmenter_package(
    package_path: Path,
    images: Sequence[LabelledImage],
    split: str | None,
    cache_dir: Path | None,
    device: str = "cpu",
    seed: int = 0,
    scope: Mapping[str, Any] | None = None,
    offset: bool = True,
    targets: BoxTargets = BoxTargets(),
    stack_classifier: Path | None = None,
) -> ModelPackage:
    """Refit a map-model package on labelled images and write it as a new version.

    On the labelled images of the card's regions (and ``split``; sources with confirmed
    negatives only): the image score's temperature and logit offset and image operating points
    (:func:`inference.training.package.calibration_fields`), the map calibration (from the images'
    map maxima) and, when the images carry fracture boxes, the two box operating points as at
    packaging (:func:`choose_box_points`); without boxes the box points keep their map cuts,
    restated in the new map calibration, and the card says their recall was not measured here.
    A stack on the card is recalibrated (same weights, new Platt scaling, new operating points)
    when ``stack_classifier`` gives its classifier package; otherwise it is kept and flagged.
    """
    from inference.calibration import CalibrationError as _CalibrationError
    from inference.packages import rewrite_card, verify_package
    from inference.training.package import calibration_images

    package = verify_package(package_path)
    card = dataclasses.replace(package.card, **dict(scope or {}))
    if card.kind is not ModelKind.SEGMENTER:
        raise _CalibrationError(f"{package_path} is a {card.kind} package, not a fracture-map model")
    spec = card.segmenter if card.segmenter is not None else SegmenterSpec()
    chosen = calibration_images(images, card.regions, split)
    if not chosen:
        raise _CalibrationError(f"no labelled images of {', '.join(map(str, card.regions))} in the data")
    where = select_device(device)
    weights = package.weight_path(WEIGHTS_FILE if WEIGHTS_FILE in card.weights else None)
    module = load_segnet(card.architecture, weights, where)
    config = PreprocessConfig.from_dict(card.preprocessing)
    prepared = prepare_set(list(chosen), card.input_size, config, cache_dir, progress=False)
    coarse, heads = forward_maps(module, prepared.pixels.astype(np.float32) / 255.0, where, 32, spec.flip)
    labels = targets_of(chosen)
    scores = image_logits(coarse, heads, spec.score).astype(np.float64)
    fields = calibration_fields(scores, labels, seed, offset)
    metrics = fields["validation_metrics"]
    metrics["per_group"] = per_group_auroc(list(chosen), scores)
    metrics["split"] = split
    metrics["calibrated_on"] = sorted({i.source for i in chosen})
    metrics["image_score"] = spec.score + (" + flip TTA" if spec.flip else "")
    full = upsample_maps(coarse, card.input_size)
    maxima = full.reshape(len(full), -1).max(axis=1).astype(np.float64)
    map_t, map_b, map_note = _map_calibration(maxima, labels)
    truths = [prepared.boxes_in_pixels(k) for k in range(len(chosen))]
    if sum(len(t) for t in truths):
        box_points, box_metrics = choose_box_points(full, truths, map_t, map_b, targets)
    else:
        box_points = _kept_box_points(spec, map_t, map_b)
        box_metrics = {
            "note": "no fracture boxes in the calibration data: the box points keep their map cuts "
            "(restated in the new map calibration); their recall and false positives were not measured here",
            "images": len(chosen),
        }
    box_metrics["map_calibration"] = {"temperature": round(map_t, 6), "logit_offset": round(map_b, 6)}
    if map_note:
        box_metrics["map_calibration"]["note"] = map_note
    metrics["boxes"] = box_metrics
    if box_points and "fracture_boxes" in box_metrics:
        metrics[f"box_recall_at_{box_points[0].name}"] = box_points[0].recall
    stack = spec.stack
    if stack is not None:
        if stack_classifier is None:
            metrics["stack_note"] = (
                "the stack was not recalibrated on these images (pass its classifier package to do so)"
            )
        else:
            from inference.training.stack import calibrate_stack

            classifier = verify_package(stack_classifier)
            if classifier.card.name != stack.classifier:
                raise _CalibrationError(
                    f"the stack names {stack.classifier}, the given classifier is {classifier.card.name}"
                )
            in_groups = [k for k, i in enumerate(chosen) if _in_groups(i, card_groups(classifier.card))]
            subset = [chosen[k] for k in in_groups]
            classifier_z = _classifier_logits(classifier, subset, cache_dir, device)
            stack = calibrate_stack(stack, classifier_z, scores[in_groups], labels[in_groups], seed, offset)
            z = stack.weights[0] * classifier_z + stack.weights[1] * scores[in_groups] + stack.bias
            stack_validation = dict(stack.validation_metrics)
            stack_validation["per_group"] = per_group_auroc(subset, z)
            stack_validation["split"] = split
            stack = dataclasses.replace(
                stack,
                validation_metrics=stack_validation,
                notes=stack.notes + f" Recalibrated on {len(subset)} images of {metrics['calibrated_on']}.",
            )
    new_spec = dataclasses.replace(
        spec, map_temperature=map_t, map_logit_offset=map_b, box_operating_points=box_points, stack=stack
    )
    changes = dict(scope or {})
    return rewrite_card(package, **changes, **fields, segmenter=new_spec)


__all__ = [
    "BoxTargets",
    "Checkpoint",
    "ScoreChoice",
    "StackOptions",
    "StackResult",
    "calibrate_segmenter_package",
    "classifier_split",
    "stack_with_classifier",
    "choose_box_points",
    "choose_score",
    "package_segmenter",
    "package_segmenter_from_checkpoint",
    "read_checkpoint",
]
