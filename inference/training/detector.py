"""Train a YOLOv8 fracture detector (n/s/m, built from the yaml: no download) on the YOLO boxes.

The images are those of serving: prepared once (:mod:`inference.training.cache`) at the image
size, written as uint8 PNG with their boxes moved into the letterboxed frame, in the folder
layout ultralytics reads (``images/{train,val}``, ``labels/{train,val}``).

Which images: every boxed image of the ``train`` split (FracAtlas and the web set), and
FracAtlas' confirmed negatives as background images (at most ``negatives_per_positive`` per
boxed image). Web images without a box are not confirmed normals and are left out.

FAMO option: each training box is made square by growing its short side about the centre
(clipped to the image), as the FAMO study does; evaluation always uses the original boxes.

Evaluation (:func:`evaluate_detector`) on the ``valid`` split: lesion recall against false-
positive boxes per image over the confidence range (a FROC curve; a box hits when IoU >= 0.5,
one detection per ground-truth box), the recall at <= 0.5 FP/image, and the image-level AUROC of
the highest box confidence on the sources with confirmed negatives.

Errors::

    TrainingError (inference.training.loop)   nothing to train on, a missing checkpoint
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from inference.datasets import LabelledImage, load_sources, summarise
from inference.models.catalog import YOLO_VARIANTS
from inference.pixels import PreprocessConfig
from inference.training.cache import PreparedSet, prepare_set
from inference.training.loop import TrainingError

log = logging.getLogger(__name__)

VARIANTS = YOLO_VARIANTS
PixelBox = tuple[float, float, float, float]


@dataclass(frozen=True, slots=True)
class DetectorJob:
    data: tuple[Path, ...]
    variant: str = "n"
    size: int = 320
    epochs: int = 10
    hours: float | None = None  # ultralytics ``time``: overrides epochs when set
    batch: int = 16
    seed: int = 0
    famo: bool = False
    negatives_per_positive: float = 0.5
    device: str = "auto"
    workers: int = 2
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train_split: str = "train"
    valid_split: str = "valid"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["data"] = [str(p) for p in self.data]
        data["preprocess"] = self.preprocess.as_dict()
        return data


def famo_square(box: PixelBox, width: float, height: float) -> PixelBox:
    """Grow the short side of ``box`` to its long side about the centre, clipped to the image."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return (
        max(0.0, cx - side / 2),
        max(0.0, cy - side / 2),
        min(width, cx + side / 2),
        min(height, cy + side / 2),
    )


def select_detector_images(
    images: Sequence[LabelledImage], split: str, negatives_per_positive: float, seed: int
) -> list[LabelledImage]:
    boxed = [i for i in images if i.split == split and i.boxes]
    negatives = [i for i in images if i.split == split and i.label == 0 and not i.boxes]
    rng = np.random.default_rng([seed, 31])
    keep = min(len(negatives), int(round(negatives_per_positive * len(boxed))))
    chosen = (
        [negatives[k] for k in sorted(rng.choice(len(negatives), size=keep, replace=False))] if keep else []
    )
    return boxed + chosen


def write_yolo_folder(prepared: PreparedSet, folder: Path, part: str, famo: bool) -> None:
    images_dir, labels_dir = folder / "images" / part, folder / "labels" / part
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    size = float(prepared.size)
    for index, image in enumerate(prepared.images):
        stem = f"{index:05d}-{image.path.stem}"
        png = images_dir / f"{stem}.png"
        if not png.is_file():
            cv2.imwrite(str(png), prepared.pixels[index])
        lines = []
        for box in prepared.boxes_in_pixels(index):
            x0, y0, x1, y1 = famo_square(box, size, size) if famo else box
            centre_x, centre_y = (x0 + x1) / 2 / size, (y0 + y1) / 2 / size
            lines.append(f"0 {centre_x:.6f} {centre_y:.6f} {(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}")
        (labels_dir / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))


@dataclass(frozen=True, slots=True)
class DetectorFit:
    job: DetectorJob
    weights: Path
    train: tuple[LabelledImage, ...]
    valid: tuple[LabelledImage, ...]
    seconds: float
    epochs_run: int


def fit_detector(
    job: DetectorJob,
    cache_dir: Path | None,
    work_dir: Path,
    resume: bool = False,
    progress: bool = True,
    images: Sequence[LabelledImage] | None = None,
) -> DetectorFit:
    """Prepare the YOLO folder and train; returns the path of the last weights."""
    from inference.models.ultralytics_env import prepare_ultralytics

    if job.variant not in VARIANTS:
        raise TrainingError(f"YOLOv8 variant must be one of {', '.join(VARIANTS)}, got {job.variant!r}")
    everything = list(images) if images is not None else load_sources(job.data)
    train = select_detector_images(everything, job.train_split, job.negatives_per_positive, job.seed)
    valid = [i for i in everything if i.split == job.valid_split and (i.boxes or i.label == 0)]
    if not any(i.boxes for i in train):
        raise TrainingError("no boxed training images")
    work_dir = work_dir.resolve()
    folder = work_dir / "yolo-data"
    for part, chosen in (("train", train), ("val", valid or train[:1])):
        prepared = prepare_set(chosen, job.size, job.preprocess, cache_dir, progress)
        write_yolo_folder(prepared, folder, part, job.famo and part == "train")
    data_yaml = work_dir / "data.yaml"
    data_yaml.write_text(
        json.dumps(
            {"path": str(folder), "train": "images/train", "val": "images/val", "names": {"0": "fracture"}}
        )
    )
    prepare_ultralytics(work_dir / "ultralytics-config")
    import torch
    from ultralytics import YOLO  # type: ignore[attr-defined]

    device = job.device
    if device == "auto":
        device = "0" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = "0"
    last = work_dir / "run" / "weights" / "last.pt"
    began = time.monotonic()
    if resume and last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False)
        if state.get("epoch", -1) == -1:
            log.info("%s is a finished run; not training again", last)
        else:
            YOLO(str(last)).train(resume=True)
    else:
        model = YOLO(f"yolov8{job.variant}.yaml", task="detect")
        arguments: dict[str, Any] = {
            "data": str(data_yaml),
            "epochs": job.epochs,
            "imgsz": job.size,
            "batch": job.batch,
            "device": device,
            "workers": job.workers,
            "amp": False,
            "plots": False,
            "val": False,
            "project": str(work_dir),
            "name": "run",
            "exist_ok": True,
            "seed": job.seed,
            "deterministic": True,
            "pretrained": False,
            "verbose": progress,
            "hsv_h": 0.0,
            "hsv_s": 0.0,
            "degrees": 10.0,
            "close_mosaic": max(1, job.epochs // 4),
        }
        if job.hours is not None:
            arguments["time"] = job.hours
        model.train(**arguments)
    if not last.is_file():
        raise TrainingError(f"ultralytics wrote no weights at {last}")
    state = torch.load(last, map_location="cpu", weights_only=False)
    epochs_run = (
        int(state.get("train_args", {}).get("epochs", job.epochs))
        if state.get("epoch", -1) == -1
        else int(state.get("epoch", 0)) + 1
    )
    return DetectorFit(
        job=job,
        weights=last,
        train=tuple(train),
        valid=tuple(valid),
        seconds=time.monotonic() - began,
        epochs_run=epochs_run,
    )


# --------------------------------------------------------------------------------------------
# evaluation


def iou(a: PixelBox, b: PixelBox) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def froc(
    truths: Sequence[Sequence[PixelBox]],
    detections: Sequence[Sequence[tuple[float, float, float, float, float]]],
    iou_threshold: float = 0.5,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """``(thresholds, recall, false positives per image)`` over every distinct confidence.

    Detections of an image are matched greedily by confidence to unmatched truths with IoU >=
    ``iou_threshold``; each truth is found at most once, extra hits on it count as false positives.
    """
    scored: list[tuple[float, bool]] = []
    total = sum(len(t) for t in truths)
    for image_truths, image_dets in zip(truths, detections, strict=True):
        used = [False] * len(image_truths)
        for det in sorted(image_dets, key=lambda d: -d[4]):
            best, which = 0.0, -1
            for k, truth in enumerate(image_truths):
                if not used[k]:
                    overlap = iou(det[:4], truth)
                    if overlap > best:
                        best, which = overlap, k
            hit = which >= 0 and best >= iou_threshold
            if hit:
                used[which] = True
            scored.append((det[4], hit))
    if not scored:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    scored.sort(key=lambda s: -s[0])
    confidences = np.array([s[0] for s in scored])
    hits = np.cumsum([s[1] for s in scored])
    misses = np.cumsum([not s[1] for s in scored])
    # keep the last entry of each run of equal confidences
    last = np.r_[confidences[1:] != confidences[:-1], True]
    recall = hits[last] / max(total, 1)
    fppi = misses[last] / max(len(truths), 1)
    return confidences[last], recall.astype(np.float64), fppi.astype(np.float64)


def recall_at_fppi(recall: NDArray[np.float64], fppi: NDArray[np.float64], limit: float) -> float:
    inside = fppi <= limit
    return float(recall[inside].max()) if inside.any() else 0.0


def detector_summary(fitted: DetectorFit) -> dict[str, Any]:
    return {
        "sources": [str(p) for p in fitted.job.data],
        "train": summarise(list(fitted.train)),
        "boxes_train": sum(len(i.boxes) for i in fitted.train),
        "valid": summarise(list(fitted.valid)),
        "left_out": ["web images without a box (not confirmed normals)"],
        "famo_square_boxes": fitted.job.famo,
    }
