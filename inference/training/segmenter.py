"""Train a fracture-map model (kind ``segmenter``) on the FracAtlas fracture polygons.

Dense supervision: every fractured FracAtlas image has segmentation polygons
(``fracture_polygons.json``, normalised coordinates); they are rasterised into masks in the
letterboxed frame the network sees (:func:`rasterise_polygons`, the same transform that maps
boxes). FracAtlas negatives give empty masks. The loss is pixel BCE + soft Dice on the map plus
a BCE on the image-level head. The web teaching-file set has no confirmed negatives: it is not
trained on at all (its boxes as masks would teach "web picture = fracture"); it only measures
sensitivity on a second source.

The image's score is read from the map (:func:`map_score`: the maximum, or the mean of the top
``k`` values) or from the image head; which one serves is chosen on the early-stopping hold-out
carved out of ``train`` (never on ``valid``).

Errors::

    TrainingError (inference.training.loop)   nothing to train on, a checkpoint of another run
    DatasetError (inference.datasets)         unreadable data or polygon file
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from tqdm import tqdm

from inference.calibration import CalibrationError, auroc
from inference.datasets import DatasetError, LabelledImage
from inference.models.segnet import SegNet
from inference.pixels import LetterboxTransform
from inference.training.augment import AugmentConfig, augment_with_masks
from inference.training.loop import TrainingError, resolve_device, save_checkpoint

log = logging.getLogger(__name__)

POLYGON_FILE = "fracture_polygons.json"
Polygon = Sequence[float]  # x1, y1, x2, y2, ... normalised to [0, 1]
SCORE_METHODS: tuple[str, ...] = ("max", "top16", "image", "mean-max-image")


@dataclass(frozen=True, slots=True)
class SegmenterLoop:
    backbone: str = "mobilenet_v3_small"
    epochs: int = 30
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    patience: int = 8
    negatives_per_positive: float = 2.0
    dice_weight: float = 1.0
    image_weight: float = 0.5
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    eval_batch: int = 32
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["augment"] = self.augment.as_dict()
        return data


@dataclass(frozen=True, slots=True)
class SegmenterFit:
    module: SegNet
    best_epoch: int
    best_score: float
    epochs_run: int
    history: tuple[dict[str, float], ...]
    seconds: float
    device: str


# ---------------------------------------------------------------------------------------------
# masks


def load_polygons(path: Path) -> dict[str, list[list[float]]]:
    """``{image file name: [polygon, ...]}`` from a FracAtlas ``fracture_polygons.json``."""
    try:
        data = json.loads(path.read_text())
        images = data["images"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read the fracture polygons: {exc}", path) from exc
    if not isinstance(images, dict):
        raise DatasetError("the polygon file's 'images' is not an object", path)
    out: dict[str, list[list[float]]] = {}
    for name, polygons in images.items():
        if not isinstance(polygons, list):
            raise DatasetError(f"polygons of {name} are not a list", path)
        out[str(name)] = [[float(v) for v in polygon] for polygon in polygons]
    return out


def _fill(canvas: NDArray[np.uint8], xs: NDArray[np.float64], ys: NDArray[np.float64]) -> None:
    """Set the pixels of ``canvas`` whose centre lies inside the polygon (even-odd rule).

    Pixel (row j, column i) spans [i, i + 1) x [j, j + 1) in model coordinates; its centre is
    (i + 0.5, j + 0.5). Edges are taken half-open in y, so a vertex on a scan line counts once.
    """
    size = canvas.shape[0]
    x0, y0 = xs, ys
    x1, y1 = np.roll(xs, -1), np.roll(ys, -1)
    first = max(0, int(np.floor(ys.min())))
    last = min(size, int(np.ceil(ys.max())) + 1)
    for row in range(first, last):
        centre = row + 0.5
        crossing = ((y0 <= centre) & (centre < y1)) | ((y1 <= centre) & (centre < y0))
        if not crossing.any():
            continue
        a, b, c, d = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
        where = np.sort(a + (centre - b) * (c - a) / (d - b))
        for left, right in zip(where[0::2], where[1::2], strict=False):
            start = max(0, int(np.ceil(left - 0.5)))
            stop = min(size, int(np.ceil(right - 0.5)))
            if stop > start:
                canvas[row, start:stop] = 1


def rasterise_polygons(polygons: Sequence[Polygon], transform: LetterboxTransform) -> NDArray[np.uint8]:
    """A ``size`` x ``size`` mask (1 inside any polygon) in the letterboxed model frame.

    The normalised vertices are scaled to source pixels and mapped with ``transform`` exactly as
    boxes are; a model pixel is inside when its centre is (so a square covering pixels [20, 50)
    gives exactly 30 columns). A polygon too thin to hold any pixel centre still marks the pixel
    holding its vertex mean, so no fracture vanishes from its mask; a polygon of fewer than three
    vertices is skipped.
    """
    size = transform.size
    canvas = np.zeros((size, size), dtype=np.uint8)
    w, h = transform.source_width, transform.source_height
    for polygon in polygons:
        if len(polygon) < 6:
            continue
        values = np.asarray(polygon[: len(polygon) // 2 * 2], dtype=np.float64).reshape(-1, 2)
        xs = values[:, 0] * w * transform.scale + transform.pad_x
        ys = values[:, 1] * h * transform.scale + transform.pad_y
        before = int(canvas.sum())
        _fill(canvas, xs, ys)
        if int(canvas.sum()) == before:
            column, row = int(np.floor(xs.mean())), int(np.floor(ys.mean()))
            if 0 <= column < size and 0 <= row < size:
                canvas[row, column] = 1
    return canvas


def masks_for(
    images: Sequence[LabelledImage],
    transforms: Sequence[LetterboxTransform],
    polygons: dict[str, list[list[float]]],
) -> NDArray[np.uint8]:
    """Masks for prepared images; a fractured image without polygons falls back to its boxes."""
    if not images:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    size = transforms[0].size
    out = np.zeros((len(images), size, size), dtype=np.uint8)
    for index, (image, transform) in enumerate(zip(images, transforms, strict=True)):
        if image.label != 1:
            continue
        shapes: list[list[float]] = list(polygons.get(image.path.name, []))
        if not shapes:
            shapes = [[x0, y0, x1, y0, x1, y1, x0, y1] for x0, y0, x1, y1 in image.boxes]
        out[index] = rasterise_polygons(shapes, transform)
    return out


# ---------------------------------------------------------------------------------------------
# scores


def map_score(map_logits: NDArray[np.float32], method: str = "max") -> NDArray[np.float32]:
    """Image logits from ``(N, H, W)`` map logits: the maximum or the mean of the top 16."""
    flat = map_logits.reshape(map_logits.shape[0], -1)
    if method == "max":
        peak: NDArray[np.float32] = flat.max(axis=1).astype(np.float32)
        return peak
    if method.startswith("top"):
        k = min(int(method[3:]), flat.shape[1])
        top = np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:]
        mean: NDArray[np.float32] = top.mean(axis=1).astype(np.float32)
        return mean
    raise ValueError(f"unknown map score {method!r}")


def image_scores(
    coarse_logits: NDArray[np.float32], image_logits: NDArray[np.float32]
) -> dict[str, NDArray[np.float32]]:
    """Every candidate image score of :data:`SCORE_METHODS`, as logits."""
    peak = map_score(coarse_logits, "max")
    return {
        "max": peak,
        "top16": map_score(coarse_logits, "top16"),
        "image": image_logits.astype(np.float32),
        "mean-max-image": ((peak + image_logits) / 2.0).astype(np.float32),
    }


def predict_maps(
    module: SegNet,
    pixels: NDArray[np.uint8],
    device: torch.device,
    batch: int = 32,
    flip: bool = False,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``(coarse map logits (N, S/4, S/4), image logits (N,))``; ``flip`` averages a mirror pass."""
    module.eval()
    maps: list[NDArray[np.float32]] = []
    heads: list[NDArray[np.float32]] = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            x = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch])).to(device)
            x = (x.float() / 255.0).unsqueeze(1)
            coarse, image = module(x)
            if flip:
                coarse_f, image_f = module(torch.flip(x, dims=(3,)))
                coarse = (coarse + torch.flip(coarse_f, dims=(3,))) / 2.0
                image = (image + image_f) / 2.0
            maps.append(coarse[:, 0].float().cpu().numpy())
            heads.append(image.float().cpu().numpy())
    if not maps:
        return np.zeros((0, 1, 1), dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(maps), np.concatenate(heads)


def _safe_auroc(targets: NDArray[np.int64], scores: NDArray[np.float32]) -> float:
    try:
        return auroc(targets, scores)
    except CalibrationError:
        return float("nan")


def score_candidates(
    module: SegNet, pixels: NDArray[np.uint8], targets: NDArray[np.int64], device: torch.device, batch: int
) -> dict[str, float]:
    coarse, image = predict_maps(module, pixels, device, batch)
    return {name: _safe_auroc(targets, s) for name, s in image_scores(coarse, image).items()}


# ---------------------------------------------------------------------------------------------
# training


def _soft_dice(probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - Dice over the whole batch (an empty-mask image adds only to the denominator)."""
    intersection = (probabilities * masks).sum()
    return 1.0 - (2.0 * intersection + 1.0) / (probabilities.sum() + masks.sum() + 1.0)


def _order(targets: NDArray[np.int64], config: SegmenterLoop, epoch: int) -> NDArray[np.int64]:
    """All positives and a fresh draw of negatives, shuffled; a function of seed and epoch."""
    rng = np.random.default_rng([config.seed, epoch])
    positives = np.flatnonzero(targets == 1)
    negatives = np.flatnonzero(targets == 0)
    take = min(negatives.size, math.ceil(config.negatives_per_positive * positives.size))
    chosen = np.concatenate([positives, rng.choice(negatives, size=take, replace=False)])
    return rng.permutation(chosen).astype(np.int64)


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("device", "threads", "eval_batch", "epochs")}


def fit_segmenter(
    train_pixels: NDArray[np.uint8],
    train_masks: NDArray[np.uint8],
    train_targets: NDArray[np.int64],
    stop_pixels: NDArray[np.uint8],
    stop_targets: NDArray[np.int64],
    config: SegmenterLoop,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> SegmenterFit:
    """Train a :class:`SegNet`; keep the epoch with the best early-stopping AUROC (map maximum).

    A checkpoint is written after every epoch; ``resume`` continues from it (the epoch count may
    be raised on resumption: the schedule is rebuilt for the new total).
    """
    if len(train_targets) == 0 or len(stop_targets) == 0:
        raise TrainingError("the training and the early-stopping sets must not be empty")
    if len(np.unique(train_targets)) < 2:
        raise TrainingError("the training set holds one class only")
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    module = SegNet(config.backbone).to(device)
    optimiser = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    positives = int((train_targets == 1).sum())
    per_epoch = positives + min(
        int((train_targets == 0).sum()), math.ceil(config.negatives_per_positive * positives)
    )
    steps_per_epoch = math.ceil(per_epoch / config.batch)
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total // 2)

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))

    start_epoch, best_score, best_epoch, elapsed = 0, -math.inf, 0, 0.0
    best_state: dict[str, torch.Tensor] = copy.deepcopy(module.state_dict())
    history: list[dict[str, float]] = []
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if _identity(state.get("config", {})) != _identity(config.as_dict()):
            raise TrainingError(
                f"{checkpoint} belongs to a run with other settings; remove it or drop --resume"
            )
        module.load_state_dict(state["module"])
        optimiser.load_state_dict(state["optimiser"])
        start_epoch = int(state["epoch"])
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        best_state = state["best_state"]
        history = list(state["history"])
        elapsed = float(state["seconds"])
        log.info("resumed from %s after epoch %d", checkpoint, start_epoch)

    pixels_t = torch.from_numpy(train_pixels)
    masks_t = torch.from_numpy(train_masks)
    targets_t = torch.from_numpy(train_targets)
    began = time.monotonic() - elapsed
    step_index = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        if best_epoch > 0 and epoch - best_epoch >= config.patience:
            log.info("early stop after epoch %d (best %d)", epoch, best_epoch)
            break
        module.train()
        order = torch.from_numpy(_order(train_targets, config, epoch))
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        running, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            mininterval=10,
            leave=False,
        )
        for step in bar:
            index = order[step * config.batch : (step + 1) * config.batch]
            if len(index) < 2:
                continue
            for group in optimiser.param_groups:
                group["lr"] = lr_at(step_index)
            step_index += 1
            x = (pixels_t[index].float() / 255.0).unsqueeze(1)
            m = masks_t[index].float().unsqueeze(1)
            x, warped = augment_with_masks(x, config.augment, generator, m)
            assert warped is not None
            x, warped = x.to(device), (warped > 0.5).float().to(device)
            y = targets_t[index].float().to(device)
            full, image = module.map_logits(x)
            full = full.unsqueeze(1)
            pixel_loss = F.binary_cross_entropy_with_logits(full, warped)
            dice = _soft_dice(torch.sigmoid(full), warped)
            image_loss = F.binary_cross_entropy_with_logits(image, y)
            loss = pixel_loss * 10.0 + config.dice_weight * dice + config.image_weight * image_loss
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
            running += float(loss.detach()) * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
        bar.close()
        scores = score_candidates(module, stop_pixels, stop_targets, device, config.eval_batch)
        value = scores["max"]
        record = {
            "epoch": float(epoch + 1),
            "loss": running / max(seen, 1),
            "seconds": time.monotonic() - began,
        }
        record.update({f"stop_auroc_{k}": v for k, v in scores.items()})
        history.append(record)
        improved = not math.isnan(value) and value > best_score
        if improved:
            best_score, best_epoch = value, epoch + 1
            best_state = copy.deepcopy(module.state_dict())
        log.info(
            "epoch %d/%d loss %.4f stop AUROC max %.4f top16 %.4f image %.4f%s (%.0f s)",
            epoch + 1,
            config.epochs,
            record["loss"],
            scores["max"],
            scores["top16"],
            scores["image"],
            " best" if improved else "",
            record["seconds"],
        )
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {
                    "config": config.as_dict(),
                    "module": module.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "epoch": epoch + 1,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "history": history,
                    "seconds": time.monotonic() - began,
                },
            )
    module.load_state_dict(best_state)
    module = module.cpu().eval()
    return SegmenterFit(
        module=module,
        best_epoch=best_epoch,
        best_score=best_score,
        epochs_run=len(history),
        history=tuple(history),
        seconds=time.monotonic() - began,
        device=str(device),
    )


# ---------------------------------------------------------------------------------------------
# a whole run: select, prepare, mask, fit


@dataclass(frozen=True, slots=True)
class SegmenterJob:
    """Everything that decides a segmenter training run."""

    data: tuple[Path, ...]
    polygons: Path | None = None  # default: <the FracAtlas source>/fracture_polygons.json
    regions: tuple[str, ...] | None = None  # None: every region of the data
    size: int = 256
    loop: SegmenterLoop = field(default_factory=SegmenterLoop)
    stop_fraction: float = 0.15
    train_split: str = "train"
    valid_split: str = "valid"


@dataclass(frozen=True, slots=True)
class SegmenterRun:
    job: SegmenterJob
    train: tuple[LabelledImage, ...]
    stop: tuple[LabelledImage, ...]
    valid: tuple[LabelledImage, ...]
    left_out: tuple[str, ...]
    fitted: SegmenterFit
    stop_scores: dict[str, float]  # AUROC of each candidate image score on the stop hold-out
    stop_logits: dict[str, NDArray[np.float32]]


def default_polygons(data: Sequence[Path]) -> Path:
    for root in data:
        candidate = root / POLYGON_FILE
        if candidate.is_file():
            return candidate
    raise DatasetError(f"no {POLYGON_FILE} beside the data; pass --polygons")


def select_segmenter_images(
    images: Sequence[LabelledImage], job: SegmenterJob
) -> tuple[list[LabelledImage], list[LabelledImage], list[str]]:
    """FracAtlas-style labelled images of the wanted regions: (train, valid, left-out reasons)."""
    left_out: list[str] = []
    wanted = None if job.regions is None else set(job.regions)
    chosen = [
        i
        for i in images
        if i.label is not None and (wanted is None or any(str(r) in wanted for r in i.all_regions))
    ]
    sources_with_negatives = {i.source for i in chosen if i.label == 0}
    for source in sorted({i.source for i in chosen} - sources_with_negatives):
        count = sum(1 for i in chosen if i.source == source)
        left_out.append(f"{count} images of {source}: no confirmed negatives (never trained on)")
    chosen = [i for i in chosen if i.source in sources_with_negatives]
    unknown = sum(1 for i in images if i.label is None)
    if unknown:
        left_out.append(f"{unknown} images without a confirmed label")
    train = [i for i in chosen if i.split == job.train_split]
    valid = [i for i in chosen if i.split == job.valid_split]
    if not train:
        raise TrainingError("no labelled training images for this selection")
    return train, valid, left_out


def run_segmenter(
    job: SegmenterJob,
    cache_dir: Path | None,
    work_dir: Path | None,
    resume: bool = False,
    progress: bool = True,
    images: Sequence[LabelledImage] | None = None,
) -> SegmenterRun:
    """Select, prepare (cached), rasterise, train with early stopping; score the stop hold-out."""
    from inference.datasets import load_sources
    from inference.pixels import PreprocessConfig
    from inference.training.cache import prepare_set
    from inference.training.splits import holdout_split, targets_of

    everything = list(images) if images is not None else load_sources(job.data)
    polygons = load_polygons(job.polygons or default_polygons(job.data))
    train, valid, left_out = select_segmenter_images(everything, job)
    targets = targets_of(train)
    fit_idx, stop_idx = holdout_split([i.study_id for i in train], targets, job.stop_fraction, job.loop.seed)
    prepared = prepare_set(train, job.size, PreprocessConfig(), cache_dir, progress)
    masks = masks_for(train, prepared.transforms, polygons)
    log.info(
        "segmenter: %d training images (%d with masks), %d early stopping, %d valid",
        len(fit_idx),
        int((masks[fit_idx].reshape(len(fit_idx), -1).max(axis=1) > 0).sum()),
        len(stop_idx),
        len(valid),
    )
    fitted = fit_segmenter(
        prepared.pixels[fit_idx],
        masks[fit_idx],
        targets[fit_idx],
        prepared.pixels[stop_idx],
        targets[stop_idx],
        job.loop,
        checkpoint=None if work_dir is None else work_dir / "checkpoint.pt",
        resume=resume,
        progress=progress,
    )
    device = resolve_device("cpu")
    coarse, image = predict_maps(
        fitted.module, prepared.pixels[stop_idx], device, job.loop.eval_batch, flip=True
    )
    logits = image_scores(coarse, image)
    stop_targets = targets[stop_idx]
    scores = {name: _safe_auroc(stop_targets, s) for name, s in logits.items()}
    return SegmenterRun(
        job=job,
        train=tuple(train[k] for k in fit_idx),
        stop=tuple(train[k] for k in stop_idx),
        valid=tuple(valid),
        left_out=tuple(left_out),
        fitted=fitted,
        stop_scores=scores,
        stop_logits=logits,
    )
