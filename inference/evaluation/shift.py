"""A new source, measured two ways (issue 12, item 7): image transforms and a second source.

**(b) Source changes on known negatives.** A node installed next to a new PACS meets pictures
unlike its training set; the first symptom is normal images called fractures. Each FracAtlas
negative is read again through pure image transforms that span sources (:data:`SHIFTS`, on the
decoded grey image in [0, 1], before the model's own preprocessing):

- ``half`` / ``double``: resampled to half and double resolution (area / linear interpolation);
- ``jpeg50``: re-compressed as 8-bit baseline JPEG at quality 50;
- ``gamma0.7`` / ``gamma1.4``: ``x ** gamma``;
- ``contrast0.8`` / ``contrast1.25``: ``(x - mean) * c + mean``, clipped to [0, 1];
- ``collimation``: a black frame over the outer 10 % of each side (the field narrowed by a
  shutter; the image keeps its size);
- ``marker``: a burnt-in marker in the top-left corner: a white block (side 12 % of the short
  side) with a black letter "R" in it.

For each model (and the node's deciding probability) :func:`shift_rows` reports, per transform,
the median and 90th percentile of ``|p_shifted - p|`` and the share of negatives that cross each
operating point (up: newly called positive; down), overall and per group.

**(a) A second source, positives only** (upper-limb-web: a boxed image is a fracture, an unboxed
one is *not* a confirmed normal): :func:`second_source_rows` gives the sensitivity at the high-
sensitivity and high-specificity points per region (Wilson intervals), and for map models and
detectors the box recall at their box points. Never a specificity: there are no negatives.

Errors::

    ShiftError (ValueError)    an unknown transform name, an image that is not a 2-D array
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray

from inference.decision import UNCALIBRATED_THRESHOLD
from inference.evaluation.detection import ImageDetections, LesionLevel, lesion_level
from inference.evaluation.metrics import Interval, wilson_interval
from inference.evaluation.runner import EvalImage, ModelRun, thresholds_of
from inference.evaluation.scoring import (
    EvaluationConfig,
    Scope,
    Subset,
    box_points,
    deciding_runs,
    home_groups,
    subsets_of,
)
from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY
from inference.regions import AnatomicalGroup

FloatImage = NDArray[np.float32]
POINT_NAMES = (HIGH_SENSITIVITY, HIGH_SPECIFICITY)
COLLIMATION_FRACTION = 0.10
MARKER_FRACTION = 0.12
NODE = "node"


class ShiftError(ValueError):
    """A transform that does not exist or an image it cannot take."""


def _grey(image: NDArray[np.floating]) -> FloatImage:
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 2 or array.size == 0:
        raise ShiftError(f"expected a non-empty 2-D grey image, got shape {array.shape}")
    return array


def resample(image: NDArray[np.floating], factor: float) -> FloatImage:
    """The image resized by ``factor`` on both axes (area interpolation down, linear up)."""
    array = _grey(image)
    if not factor > 0:
        raise ShiftError(f"resampling factor {factor} must be positive")
    height, width = array.shape
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    method = cv2.INTER_AREA if factor < 1.0 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(array, size, interpolation=method), dtype=np.float32)


def jpeg(image: NDArray[np.floating], quality: int = 50) -> FloatImage:
    """The image quantised to 8 bits, JPEG-encoded at ``quality`` and decoded again."""
    array = _grey(image)
    quantised = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", quantised, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ShiftError("JPEG encoding failed")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    return (np.asarray(decoded, dtype=np.float32) / 255.0).astype(np.float32)


def gamma(image: NDArray[np.floating], value: float) -> FloatImage:
    """``x ** value`` on the image clipped to [0, 1]."""
    return np.power(np.clip(_grey(image), 0.0, 1.0), np.float32(value)).astype(np.float32)


def contrast(image: NDArray[np.floating], factor: float) -> FloatImage:
    """Contrast scaled by ``factor`` about the image's mean, clipped to [0, 1]."""
    array = _grey(image)
    mean = float(array.mean())
    out: FloatImage = np.clip((array - mean) * factor + mean, 0.0, 1.0).astype(np.float32)
    return out


def collimation(image: NDArray[np.floating], fraction: float = COLLIMATION_FRACTION) -> FloatImage:
    """A black frame over the outer ``fraction`` of each side; the size is kept."""
    array = _grey(image).copy()
    height, width = array.shape
    dy, dx = round(height * fraction), round(width * fraction)
    if dy:
        array[:dy] = 0.0
        array[height - dy :] = 0.0
    if dx:
        array[:, :dx] = 0.0
        array[:, width - dx :] = 0.0
    return array


def marker(image: NDArray[np.floating], fraction: float = MARKER_FRACTION, letter: str = "R") -> FloatImage:
    """A burnt-in side marker: a white block (side ``fraction`` of the short side) in the top-left
    corner, a small margin from the edges, with a black ``letter`` in it."""
    array = _grey(image).copy()
    height, width = array.shape
    side = max(4, round(min(height, width) * fraction))
    margin = max(1, round(min(height, width) * 0.03))
    top, left = min(margin, height - side), min(margin, width - side)
    block = np.full((side, side), 255, dtype=np.uint8)
    scale = side / 30.0
    thickness = max(1, round(scale * 2))
    (text_w, text_h), _ = cv2.getTextSize(letter, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    origin = ((side - text_w) // 2, (side + text_h) // 2)
    cv2.putText(block, letter, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, 0, thickness)
    array[top : top + side, left : left + side] = block[: height - top, : width - left] / np.float32(255.0)
    return array


@dataclass(frozen=True, slots=True)
class Shift:
    name: str
    description: str
    apply: Callable[[NDArray[np.floating]], FloatImage] = field(compare=False, repr=False)


SHIFTS: tuple[Shift, ...] = (
    Shift("half", "resampled to half resolution", lambda x: resample(x, 0.5)),
    Shift("double", "resampled to double resolution", lambda x: resample(x, 2.0)),
    Shift("jpeg50", "JPEG re-compression, quality 50", lambda x: jpeg(x, 50)),
    Shift("gamma0.7", "gamma 0.7", lambda x: gamma(x, 0.7)),
    Shift("gamma1.4", "gamma 1.4", lambda x: gamma(x, 1.4)),
    Shift("contrast0.8", "contrast x 0.8", lambda x: contrast(x, 0.8)),
    Shift("contrast1.25", "contrast x 1.25", lambda x: contrast(x, 1.25)),
    Shift("collimation", "black frame over the outer 10 % of each side", collimation),
    Shift("marker", "white marker block with a letter, top-left corner", marker),
)


def shifts_named(names: Sequence[str] | None) -> tuple[Shift, ...]:
    """The transforms of ``names`` (all of :data:`SHIFTS` for None)."""
    if names is None:
        return SHIFTS
    known = {s.name: s for s in SHIFTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ShiftError(f"unknown source change(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(known[n] for n in names)


# --------------------------------------------------------------------------------------------
# shifted copies of the images, decoded once per source image


class _LastDecoded:
    """Keeps the last decoded source image: its shifted copies come one after another."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.pixels: FloatImage | None = None

    def load(self, image: EvalImage) -> FloatImage:
        if self.key != image.key or self.pixels is None:
            self.pixels = image.load()
            self.key = image.key
        return self.pixels


def shifted_images(
    images: Sequence[EvalImage], keep: Sequence[int], shifts: Sequence[Shift]
) -> tuple[list[EvalImage], list[tuple[int, int]]]:
    """Copies of ``images[keep]`` under each shift, source-major, and (source index, shift index)
    of each copy. A copy decodes its source once (the copies of one source are consecutive)."""
    cache = _LastDecoded()
    out: list[EvalImage] = []
    origin: list[tuple[int, int]] = []

    def loader(source: EvalImage, shift: Shift) -> Callable[[], FloatImage]:
        return lambda: shift.apply(cache.load(source))

    for index in keep:
        source = images[index]
        for k, shift in enumerate(shifts):
            out.append(
                EvalImage(
                    key=f"{source.key}@{shift.name}",
                    label=source.label,
                    regions=source.regions,
                    study_id=source.study_id,
                    boxes=source.boxes,
                    load=loader(source, shift),
                )
            )
            origin.append((index, k))
    return out, origin


# --------------------------------------------------------------------------------------------
# (b) how far negatives move


@dataclass(frozen=True, slots=True)
class Crossing:
    """Negatives that change side of one operating point under a shift."""

    name: str
    threshold: float  # NaN: each group at its own model's threshold
    called_before: float  # share of negatives called positive on the original images
    called_after: float
    up: Interval  # share newly called positive (Wilson)
    down: Interval  # share no longer called positive


@dataclass(frozen=True, slots=True)
class ShiftRow:
    subset: Subset
    shift: str
    negatives: int
    median_abs_delta: float
    p90_abs_delta: float
    mean_delta: float  # signed: > 0 when the shift raises the probability of normal images
    crossings: tuple[Crossing, ...]


@dataclass(frozen=True, slots=True)
class ShiftReport:
    """Rows of one probability source (a model, a stack, or the node's deciding probability)."""

    name: str
    rows: tuple[ShiftRow, ...]


def _crossings(
    before: NDArray[np.float64],
    after: NDArray[np.float64],
    thresholds: dict[str, NDArray[np.float64]],
    confidence: float,
) -> tuple[Crossing, ...]:
    out = []
    for name, values in thresholds.items():
        was, now = before >= values, after >= values
        n = int(before.size)
        same = values.size > 0 and bool(np.all(values == values[0]))
        out.append(
            Crossing(
                name=name,
                threshold=float(values[0]) if same else math.nan,
                called_before=float(was.mean()) if n else math.nan,
                called_after=float(now.mean()) if n else math.nan,
                up=wilson_interval(int((~was & now).sum()), n, confidence),
                down=wilson_interval(int((was & ~now).sum()), n, confidence),
            )
        )
    return tuple(out)


def _rows(
    images: Sequence[EvalImage],
    indices: NDArray[np.int64],
    before: NDArray[np.float64],
    after: dict[str, NDArray[np.float64]],
    thresholds: dict[str, NDArray[np.float64]],
    home: frozenset[AnatomicalGroup],
    config: EvaluationConfig,
) -> tuple[ShiftRow, ...]:
    rows = []
    for subset, positions in subsets_of(images, indices, home, config.table):
        if subset.scope == Scope.REGION:
            continue
        for shift, values in after.items():
            delta = values[positions] - before[positions]
            finite = np.isfinite(delta)
            magnitude = np.abs(delta[finite])
            rows.append(
                ShiftRow(
                    subset=subset,
                    shift=shift,
                    negatives=int(finite.sum()),
                    median_abs_delta=float(np.median(magnitude)) if magnitude.size else math.nan,
                    p90_abs_delta=float(np.quantile(magnitude, 0.9)) if magnitude.size else math.nan,
                    mean_delta=float(delta[finite].mean()) if magnitude.size else math.nan,
                    crossings=_crossings(
                        before[positions][finite],
                        values[positions][finite],
                        {k: v[positions][finite] for k, v in thresholds.items()},
                        config.confidence,
                    ),
                )
            )
    return tuple(rows)


def _point_thresholds(run: ModelRun, count: int) -> dict[str, NDArray[np.float64]]:
    points = dict(thresholds_of(run.card, UNCALIBRATED_THRESHOLD))
    names = [n for n in POINT_NAMES if n in points] or list(points)
    return {n: np.full(count, points[n]) for n in names}


def shift_rows(
    images: Sequence[EvalImage],
    runs: Sequence[ModelRun],
    shifted: Sequence[ModelRun],
    origin: Sequence[tuple[int, int]],
    shifts: Sequence[Shift],
    config: EvaluationConfig,
    node: bool = False,
) -> tuple[ShiftReport, ...]:
    """Per run (and, with ``node``, for the node's deciding probability) the movement of the
    probabilities of the negatives between ``runs`` (original images) and ``shifted`` (the same
    runs on the shifted copies; ``origin`` maps each copy to its source image and shift)."""
    if len(runs) != len(shifted):
        raise ShiftError(f"{len(runs)} runs but {len(shifted)} shifted runs")
    reports = []
    per_run: list[tuple[NDArray[np.int64], NDArray[np.float64], dict[str, NDArray[np.float64]]]] = []
    for run, moved in zip(runs, shifted, strict=True):
        negatives = np.array([i for i in run.indices if images[i].label == 0], dtype=np.int64)
        where = {int(i): p for p, i in enumerate(run.indices)}
        before = np.array([run.probabilities[where[int(i)]] for i in negatives], dtype=np.float64)
        slot = {int(i): k for k, i in enumerate(negatives)}
        after = {s.name: np.full(negatives.size, math.nan) for s in shifts}
        for p, copy in enumerate(moved.indices):
            source, k = origin[int(copy)]
            if source in slot:
                after[shifts[k].name][slot[source]] = moved.probabilities[p]
        per_run.append((negatives, before, after))
        if negatives.size == 0:
            continue
        reports.append(
            ShiftReport(
                name=run.card.name,
                rows=_rows(
                    images,
                    negatives,
                    before,
                    after,
                    _point_thresholds(run, negatives.size),
                    home_groups(run.card, config.table),
                    config,
                ),
            )
        )
    if node:
        deciding = deciding_runs(list(runs))
        if deciding:
            available = frozenset(deciding)
            lookup = {id(run): k for k, run in enumerate(runs)}
            kept: list[int] = []
            before_values: list[float] = []
            after_values: dict[str, list[float]] = {s.name: [] for s in shifts}
            thresholds: dict[str, list[float]] = {n: [] for n in POINT_NAMES}
            for index, image in enumerate(images):
                group = config.table.route(image.region, available)[0]
                if image.label != 0 or group is None:
                    continue
                run = deciding[group]
                negatives, before, after = per_run[lookup[id(run)]]
                hits = np.flatnonzero(negatives == index)
                if hits.size == 0:
                    continue
                k = int(hits[0])
                kept.append(index)
                before_values.append(float(before[k]))
                for name, values in after.items():
                    after_values[name].append(float(values[k]))
                points = dict(thresholds_of(run.card, UNCALIBRATED_THRESHOLD))
                for name in POINT_NAMES:
                    thresholds[name].append(points.get(name, UNCALIBRATED_THRESHOLD))
            reports.insert(
                0,
                ShiftReport(
                    name=NODE,
                    rows=_rows(
                        images,
                        np.asarray(kept, dtype=np.int64),
                        np.asarray(before_values),
                        {k: np.asarray(v) for k, v in after_values.items()},
                        {k: np.asarray(v) for k, v in thresholds.items()},
                        available,
                        config,
                    ),
                ),
            )
    return tuple(reports)


# --------------------------------------------------------------------------------------------
# (a) a second source with positives only


@dataclass(frozen=True, slots=True)
class SensitivityAt:
    name: str
    threshold: float  # NaN: each group at its own model's threshold
    sensitivity: Interval


@dataclass(frozen=True, slots=True)
class SecondSourceRow:
    subset: Subset
    positives: int
    points: tuple[SensitivityAt, ...]
    boxes: tuple[LesionLevel, ...] = ()  # box recall at the box points, IoU 0.3 (FP counts not meaningful)
    median_probability: float = math.nan


@dataclass(frozen=True, slots=True)
class SecondSourceReport:
    name: str
    rows: tuple[SecondSourceRow, ...]


def _sensitivity_rows(
    images: Sequence[EvalImage],
    indices: NDArray[np.int64],
    probabilities: NDArray[np.float64],
    thresholds: dict[str, NDArray[np.float64]],
    detections: list[ImageDetections] | None,
    box_thresholds: dict[str, NDArray[np.float64]],
    home: frozenset[AnatomicalGroup],
    config: EvaluationConfig,
    iou: float,
) -> tuple[SecondSourceRow, ...]:
    rows = []
    for subset, positions in subsets_of(images, indices, home, config.table):
        points = []
        for name, values in thresholds.items():
            called = probabilities[positions] >= values[positions]
            same = positions.size > 0 and bool(np.all(values[positions] == values[positions][0]))
            points.append(
                SensitivityAt(
                    name,
                    float(values[positions][0]) if same else math.nan,
                    wilson_interval(int(called.sum()), int(positions.size), config.confidence),
                )
            )
        boxes: list[LesionLevel] = []
        if detections is not None:
            chosen = [detections[p] for p in positions]
            for name, values in box_thresholds.items():
                held = [
                    ImageDetections(
                        d.image_id,
                        d.case_id,
                        d.label,
                        d.truth,
                        tuple(b for b in d.predictions if b.score >= values[p]),
                    )
                    for d, p in zip(chosen, positions, strict=True)
                ]
                level = lesion_level(held, name, 0.0, iou, config.confidence)
                same = positions.size > 0 and bool(np.all(values[positions] == values[positions][0]))
                boxes.append(
                    LesionLevel(
                        level.name,
                        float(values[positions][0]) if same else math.nan,
                        level.true_positives,
                        level.false_positives,
                        level.lesions,
                        level.precision,
                        level.recall,
                        level.false_positives_per_image,
                    )
                )
        rows.append(
            SecondSourceRow(
                subset=subset,
                positives=int(positions.size),
                points=tuple(points),
                boxes=tuple(boxes),
                median_probability=float(np.median(probabilities[positions])) if positions.size else math.nan,
            )
        )
    return tuple(rows)


def _detections(
    images: Sequence[EvalImage], run: ModelRun, positions: Sequence[int]
) -> list[ImageDetections]:
    assert run.boxes is not None
    return [
        ImageDetections(
            images[run.indices[p]].key,
            images[run.indices[p]].study_id,
            1,
            images[run.indices[p]].boxes,
            run.boxes[p],
        )
        for p in positions
    ]


def second_source_rows(
    images: Sequence[EvalImage],
    runs: Sequence[ModelRun],
    config: EvaluationConfig,
    node: bool = False,
    iou: float = 0.3,
) -> tuple[SecondSourceReport, ...]:
    """Sensitivity at both operating points (and box recall at the box points) on the positives
    of a source without confirmed negatives, per run and, with ``node``, as the node decides."""
    reports = []
    for run in runs:
        positions = [p for p, i in enumerate(run.indices) if images[i].label == 1]
        if not positions:
            continue  # it read no image of this source
        indices = run.indices[positions]
        points = dict(thresholds_of(run.card, UNCALIBRATED_THRESHOLD))
        names = [n for n in POINT_NAMES if n in points] or list(points)
        thresholds = {n: np.full(indices.size, points[n]) for n in names}
        has_boxes = run.boxes is not None and not run.is_stack
        detections = _detections(images, run, positions) if has_boxes else None
        box_thresholds = {n: np.full(indices.size, t) for n, t in box_points(run.card)} if has_boxes else {}
        reports.append(
            SecondSourceReport(
                run.card.name,
                _sensitivity_rows(
                    images,
                    indices,
                    run.probabilities[positions],
                    thresholds,
                    detections,
                    box_thresholds,
                    home_groups(run.card, config.table),
                    config,
                    iou,
                ),
            )
        )
    if node:
        deciding = deciding_runs(list(runs))
        if deciding:
            available = frozenset(deciding)
            lookup = {id(run): {int(i): p for p, i in enumerate(run.indices)} for run in deciding.values()}
            kept, values = [], []
            thresholds_node: dict[str, list[float]] = {n: [] for n in POINT_NAMES}
            for index, image in enumerate(images):
                group = config.table.route(image.region, available)[0]
                if image.label != 1 or group is None:
                    continue
                run = deciding[group]
                where = lookup[id(run)].get(index)
                if where is None:
                    continue
                kept.append(index)
                values.append(float(run.probabilities[where]))
                points = dict(thresholds_of(run.card, UNCALIBRATED_THRESHOLD))
                for name in POINT_NAMES:
                    thresholds_node[name].append(points.get(name, UNCALIBRATED_THRESHOLD))
            reports.insert(
                0,
                SecondSourceReport(
                    NODE,
                    _sensitivity_rows(
                        images,
                        np.asarray(kept, dtype=np.int64),
                        np.asarray(values, dtype=np.float64),
                        {k: np.asarray(v) for k, v in thresholds_node.items()},
                        None,
                        {},
                        available,
                        config,
                        iou,
                    ),
                ),
            )
    return tuple(reports)


__all__ = [
    "SHIFTS",
    "Crossing",
    "SecondSourceReport",
    "SecondSourceRow",
    "SensitivityAt",
    "Shift",
    "ShiftError",
    "ShiftReport",
    "ShiftRow",
    "collimation",
    "contrast",
    "gamma",
    "jpeg",
    "marker",
    "resample",
    "second_source_rows",
    "shift_rows",
    "shifted_images",
    "shifts_named",
]
