"""Labelled radiograph sets for training and calibration, read into one typed record.

Four layouts are understood, and :func:`load_source` tells them apart:

- **FracAtlas** (``labels.csv`` with a ``fractured`` column, ``images/``, ``yolo/``): confirmed
  positives and negatives, YOLO boxes, regions hand / leg / hip / shoulder ('+'-joined when an
  image shows several).
- **upper-limb-web** (``labels.csv`` with an ``n_boxes`` column): teaching-file images with
  fracture boxes. An image without a box is NOT a confirmed normal, so its label is ``None``.
- **MURA v1.1** (``*_image_paths.csv``, ``*_labeled_studies.csv``,
  ``XR_<REGION>/patient*/study*_{positive,negative}/``): study-level labels, given to every
  image of the study.
- **CSV** (``path,label,region[,study_id][,split][,boxes]``): a site's own data; paths relative
  to the CSV's folder; an empty label means unknown; ``boxes``, when present, the image's fracture
  boxes as normalised ``x0 y0 x1 y1`` in [0, 1], several separated by ``;`` (for box operating
  points and localisation).

Pixels are read by :func:`read_image` as grey float32 in [0, 1]; truncated JPEGs (see the
datasets README) decode with what their scan holds.

Errors::

    DatasetError            a missing file, an unknown layout, a bad row (names file and row)
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFile

from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, GroupTable, Region

SOURCE_FRACATLAS = "fracatlas"
SOURCE_WEB = "upper-limb-web"
SOURCE_MURA = "mura"
SOURCE_CSV = "csv"

NormalisedBox = tuple[float, float, float, float]

MURA_REGIONS: dict[str, Region] = {
    "XR_ELBOW": Region.ELBOW,
    "XR_FINGER": Region.FINGER,
    "XR_FOREARM": Region.FOREARM,
    "XR_HAND": Region.HAND,
    "XR_HUMERUS": Region.HUMERUS,
    "XR_SHOULDER": Region.SHOULDER,
    "XR_WRIST": Region.WRIST,
}


class DatasetError(Exception):
    """A data set that cannot be read; the message names the file and, where it applies, the row."""

    def __init__(self, message: str, path: Path | None = None, row: int | None = None) -> None:
        where = "" if path is None else f"{path}" + ("" if row is None else f" row {row}") + ": "
        super().__init__(where + message)
        self.path = path
        self.row = row


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """One radiograph and what its source says about it."""

    path: Path
    label: int | None  # 1 fracture, 0 no fracture, None = not a confirmed negative/unknown
    region: Region
    study_id: str  # images of one study share it (MURA study; FracAtlas: image id)
    split: str | None  # "train" / "valid" / ... as the source defines
    boxes: tuple[NormalisedBox, ...]  # normalised (x0, y0, x1, y1) in [0, 1]
    source: str  # "fracatlas", "upper-limb-web", "mura", "csv"
    # Every region the image shows (FracAtlas marks some images with several); ``region`` first.
    regions: tuple[Region, ...] = field(default=())

    @property
    def all_regions(self) -> tuple[Region, ...]:
        return self.regions or (self.region,)


# --------------------------------------------------------------------------------------------
# pixels

_TRUNCATED_LOCK = threading.Lock()


def _pil_array(path: Path) -> NDArray[np.generic]:
    with Image.open(path) as img:
        return np.asarray(img.convert("I;16") if img.mode.startswith("I") else img.convert("L"))


def _decode_with_pil(path: Path) -> NDArray[np.generic]:
    """PIL decode; a truncated file is decoded again with PIL's truncated-image tolerance.

    PIL keeps that tolerance in a module flag (``ImageFile.LOAD_TRUNCATED_IMAGES``); it is set
    only around the one decode, under a lock, and restored.
    """
    try:
        return _pil_array(path)
    except OSError as first:
        if "truncated" not in str(first):
            raise DatasetError(f"cannot decode image: {first}", path) from first
    with _TRUNCATED_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return _pil_array(path)
        except OSError as exc:
            raise DatasetError(f"cannot decode image: {exc}", path) from exc
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def read_image(path: Path) -> NDArray[np.float32]:
    """Decode an image file into a grey HxW float32 array in [0, 1].

    OpenCV decodes first; what it refuses goes to PIL, which decodes a truncated JPEG (FracAtlas'
    ``source_truncated`` images, datasets README) with the rows its scan holds, the rest grey.
    """
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read image: {exc}", path) from exc
    decoded = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    array: NDArray[Any] = _decode_with_pil(path) if decoded is None else np.asarray(decoded)
    if array.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if array.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        array = cv2.cvtColor(array, code)
    if array.dtype == np.uint8:
        return (array.astype(np.float32) / 255.0).astype(np.float32)
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 65535.0).astype(np.float32)
    out = array.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    return np.zeros_like(out) if hi <= lo else ((out - lo) / (hi - lo)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# loaders


def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read CSV: {exc}", path) from exc


def _require(rows: list[dict[str, str]], path: Path, columns: Iterable[str]) -> None:
    present = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in present]
    if rows and missing:
        raise DatasetError(f"missing column(s) {', '.join(missing)}", path)


def _region(value: str, path: Path, row: int) -> Region:
    try:
        return Region(value.strip().lower())
    except ValueError as exc:
        raise DatasetError(f"unknown region {value!r}", path, row) from exc


def read_yolo_boxes(path: Path) -> tuple[NormalisedBox, ...]:
    """``class cx cy w h`` lines (normalised) into clipped ``(x0, y0, x1, y1)``; no file: no boxes."""
    if not path.is_file():
        return ()
    boxes: list[NormalisedBox] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            cx, cy, w, h = (float(v) for v in parts[1:5])
        except ValueError as exc:
            raise DatasetError(f"bad YOLO box line {line!r}", path, number) from exc
        if len(parts) < 5:
            raise DatasetError(f"bad YOLO box line {line!r}", path, number)
        x0, y0 = max(0.0, cx - w / 2), max(0.0, cy - h / 2)
        x1, y1 = min(1.0, cx + w / 2), min(1.0, cy + h / 2)
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    return tuple(boxes)


def _matches(split: str | None, wanted: str | None) -> bool:
    return wanted is None or split == wanted


def load_fracatlas(root: Path, split: str | None = None) -> list[LabelledImage]:
    """FracAtlas as laid out in ``../shared/datasets/fracatlas``; ``split`` filters train/valid."""
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DatasetError("not a FracAtlas folder (no labels.csv)", root)
    rows = _read_rows(labels)
    _require(rows, labels, ("image_id", "region", "fractured", "split"))
    out: list[LabelledImage] = []
    for number, row in enumerate(rows, start=2):
        if not _matches(row["split"] or None, split):
            continue
        regions = tuple(_region(part, labels, number) for part in row["region"].split("+") if part)
        if not regions:
            raise DatasetError("empty region", labels, number)
        if row["fractured"] not in ("0", "1"):
            raise DatasetError(f"fractured must be 0 or 1, got {row['fractured']!r}", labels, number)
        image_id = row["image_id"]
        out.append(
            LabelledImage(
                path=root / "images" / image_id,
                label=int(row["fractured"]),
                region=regions[0],
                study_id=Path(image_id).stem,
                split=row["split"] or None,
                boxes=read_yolo_boxes(root / "yolo" / (Path(image_id).stem + ".txt")),
                source=SOURCE_FRACATLAS,
                regions=regions,
            )
        )
    return out


def load_upper_limb_web(root: Path, split: str | None = None) -> list[LabelledImage]:
    """The web teaching-file set: boxed images are positives; unboxed ones are unknown (``None``)."""
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DatasetError("not an upper-limb-web folder (no labels.csv)", root)
    rows = _read_rows(labels)
    _require(rows, labels, ("image_id", "region", "split"))
    out: list[LabelledImage] = []
    for number, row in enumerate(rows, start=2):
        if not _matches(row["split"] or None, split):
            continue
        image_id = row["image_id"]
        boxes = read_yolo_boxes(root / "yolo" / (Path(image_id).stem + ".txt"))
        out.append(
            LabelledImage(
                path=root / "images" / image_id,
                label=1 if boxes else None,
                region=_region(row["region"], labels, number),
                study_id=Path(image_id).stem,
                split=row["split"] or None,
                boxes=boxes,
                source=SOURCE_WEB,
            )
        )
    return out


def _mura_dir(root: Path) -> Path:
    if (root / "train_image_paths.csv").is_file() or (root / "valid_image_paths.csv").is_file():
        return root
    for child in sorted(root.glob("*/")):
        if (child / "train_image_paths.csv").is_file() or (child / "valid_image_paths.csv").is_file():
            return child
    raise DatasetError("not a MURA folder (no *_image_paths.csv)", root)


def _mura_resolve(directory: Path, relative: str) -> Path:
    parts = Path(relative).parts
    if parts and parts[0] == directory.name:
        return directory.joinpath(*parts[1:])
    return directory / relative


def load_mura(root: Path, split: str | None = None) -> list[LabelledImage]:
    """MURA v1.1 with study-level labels from ``<split>_labeled_studies.csv``.

    ``root`` is the ``MURA-v1.1`` folder or its parent. Every image of a study gets the study's
    label; ``study_id`` is the study folder, so images of one study stay in one fold.
    """
    directory = _mura_dir(root)
    splits = [s for s in ("train", "valid") if (directory / f"{s}_image_paths.csv").is_file()]
    if split is not None:
        if split not in splits:
            raise DatasetError(f"no {split}_image_paths.csv", directory)
        splits = [split]
    out: list[LabelledImage] = []
    for name in splits:
        studies: dict[str, int] = {}
        studies_csv = directory / f"{name}_labeled_studies.csv"
        if not studies_csv.is_file():
            raise DatasetError(f"missing {studies_csv.name}", directory)
        with studies_csv.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row:
                    continue
                if len(row) < 2 or row[1].strip() not in ("0", "1"):
                    raise DatasetError(f"expected 'study_path,0|1', got {row!r}", studies_csv, number)
                studies[row[0].strip().rstrip("/")] = int(row[1].strip())
        paths_csv = directory / f"{name}_image_paths.csv"
        with paths_csv.open(newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or not row[0].strip():
                    continue
                relative = row[0].strip()
                study = str(Path(relative).parent)
                label = studies.get(study)
                if label is None:
                    raise DatasetError(f"image of unlabelled study {study!r}", paths_csv, number)
                kind = next((p for p in Path(relative).parts if p.startswith("XR_")), None)
                if kind not in MURA_REGIONS:
                    raise DatasetError(f"no known XR_<REGION> folder in {relative!r}", paths_csv, number)
                out.append(
                    LabelledImage(
                        path=_mura_resolve(directory, relative),
                        label=label,
                        region=MURA_REGIONS[kind],
                        study_id=study,
                        split=name,
                        boxes=(),
                        source=SOURCE_MURA,
                    )
                )
    return out


def parse_csv_boxes(text: str, path: Path, row: int) -> tuple[NormalisedBox, ...]:
    """``"x0 y0 x1 y1; ..."`` (normalised, x1 > x0 and y1 > y0 within [0, 1]) into boxes."""
    boxes: list[NormalisedBox] = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            x0, y0, x1, y1 = (float(v) for v in part.split())
        except ValueError as exc:
            raise DatasetError(f"bad box {part.strip()!r} (expected 'x0 y0 x1 y1')", path, row) from exc
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise DatasetError(
                f"box {part.strip()!r} is not normalised x0 < x1, y0 < y1 in [0, 1]", path, row
            )
        boxes.append((x0, y0, x1, y1))
    return tuple(boxes)


def load_csv(path: Path, split: str | None = None) -> list[LabelledImage]:
    """A site's own list: ``path,label,region[,study_id][,split][,boxes]``, paths relative to the CSV."""
    if not path.is_file():
        raise DatasetError("no such CSV file", path)
    rows = _read_rows(path)
    _require(rows, path, ("path", "label", "region"))
    out: list[LabelledImage] = []
    for number, row in enumerate(rows, start=2):
        row_split = (row.get("split") or "").strip() or None
        if not _matches(row_split, split):
            continue
        raw_label = (row["label"] or "").strip()
        if raw_label not in ("", "0", "1"):
            raise DatasetError(f"label must be 0, 1 or empty, got {raw_label!r}", path, number)
        image = Path((row["path"] or "").strip())
        if not str(image) or str(image) == ".":
            raise DatasetError("empty path", path, number)
        full = image if image.is_absolute() else path.parent / image
        out.append(
            LabelledImage(
                path=full,
                label=int(raw_label) if raw_label else None,
                region=_region(row["region"] or "", path, number),
                study_id=(row.get("study_id") or "").strip() or str(image),
                split=row_split,
                boxes=parse_csv_boxes(row.get("boxes") or "", path, number),
                source=SOURCE_CSV,
            )
        )
    return out


def detect_layout(path: Path) -> str:
    """Which of the four layouts ``path`` holds; :class:`DatasetError` when none."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return SOURCE_CSV
    if not path.is_dir():
        raise DatasetError("no such data folder or CSV file", path)
    labels = path / "labels.csv"
    if labels.is_file():
        with labels.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        if "fractured" in header:
            return SOURCE_FRACATLAS
        if "n_boxes" in header:
            return SOURCE_WEB
        raise DatasetError(f"labels.csv with unknown columns {header}", labels)
    try:
        _mura_dir(path)
    except DatasetError:
        raise DatasetError(
            "unknown layout (expected FracAtlas, upper-limb-web, MURA or a CSV file)", path
        ) from None
    return SOURCE_MURA


def load_source(path: Path, split: str | None = None) -> list[LabelledImage]:
    """Load ``path`` with the loader its layout calls for."""
    loaders = {
        SOURCE_FRACATLAS: load_fracatlas,
        SOURCE_WEB: load_upper_limb_web,
        SOURCE_MURA: load_mura,
        SOURCE_CSV: load_csv,
    }
    return loaders[detect_layout(path)](path, split)


def load_sources(paths: Sequence[Path], split: str | None = None) -> list[LabelledImage]:
    """Every image of every source, in the order given."""
    out: list[LabelledImage] = []
    for path in paths:
        out.extend(load_source(path, split))
    return out


# --------------------------------------------------------------------------------------------
# selections


def in_group(image: LabelledImage, group: AnatomicalGroup, table: GroupTable = DEFAULT_GROUP_TABLE) -> bool:
    """Whether any region the image shows belongs to ``group``."""
    return any(table.group_of(region) == group for region in image.all_regions)


def select(
    images: Iterable[LabelledImage],
    *,
    groups: Iterable[AnatomicalGroup] | None = None,
    regions: Iterable[Region] | None = None,
    labelled_only: bool = False,
    table: GroupTable = DEFAULT_GROUP_TABLE,
) -> list[LabelledImage]:
    """The images in any of ``groups`` (or showing any of ``regions``), optionally labelled only."""
    wanted_groups = None if groups is None else set(groups)
    wanted_regions = None if regions is None else set(regions)
    out = []
    for image in images:
        if labelled_only and image.label is None:
            continue
        if wanted_groups is not None and not any(in_group(image, g, table) for g in wanted_groups):
            continue
        if wanted_regions is not None and not wanted_regions & set(image.all_regions):
            continue
        out.append(image)
    return out


def summarise(images: Sequence[LabelledImage]) -> dict[str, object]:
    """Counts for a model card: per source, per region, positives / negatives / unknown."""
    by_source: dict[str, dict[str, int]] = {}
    by_region: dict[str, int] = {}
    for image in images:
        entry = by_source.setdefault(image.source, {"images": 0, "positive": 0, "negative": 0, "unknown": 0})
        entry["images"] += 1
        key = {1: "positive", 0: "negative", None: "unknown"}[image.label]
        entry[key] += 1
        by_region[image.region.value] = by_region.get(image.region.value, 0) + 1
    return {"images": len(images), "sources": by_source, "regions": dict(sorted(by_region.items()))}
