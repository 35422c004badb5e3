"""Decode and prepare every training image once, then train from uint8 arrays in memory.

The pixels are those of serving: :func:`inference.pixels.prepare` with the model's
:class:`PreprocessConfig` and input size, quantised to uint8. Each prepared image is kept in
``<cache_dir>/<size>-<config hash>/<sha1 of the path, mtime and size>.npz`` with its letterbox
transform, so a second run (or another model on the same images) decodes nothing.

Errors::

    DatasetError (from inference.datasets)   an image that cannot be read or decoded
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from inference.datasets import LabelledImage, read_image
from inference.pixels import LetterboxTransform, PreprocessConfig, prepare

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PreparedSet:
    """Prepared pixels of a list of images, in its order; ``transforms`` map boxes to pixels."""

    images: tuple[LabelledImage, ...]
    pixels: NDArray[np.uint8]  # (N, S, S)
    transforms: tuple[LetterboxTransform, ...]

    @property
    def size(self) -> int:
        return int(self.pixels.shape[-1])

    def labels(self) -> NDArray[np.int64]:
        return np.array([-1 if i.label is None else i.label for i in self.images], dtype=np.int64)

    def boxes_in_pixels(self, index: int) -> list[tuple[float, float, float, float]]:
        """The image's boxes in the prepared image's pixel coordinates."""
        transform = self.transforms[index]
        w, h = transform.source_width, transform.source_height
        return [
            transform.to_model(x0 * w, y0 * h, x1 * w, y1 * h) for x0, y0, x1, y1 in self.images[index].boxes
        ]


def _key(path: Path) -> str:
    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"
    return hashlib.sha1(raw.encode()).hexdigest()


def _folder(cache_dir: Path, size: int, config: PreprocessConfig) -> Path:
    digest = hashlib.sha1(json.dumps(config.as_dict(), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{size}-{digest}"


def prepare_one(
    image: LabelledImage, size: int, config: PreprocessConfig
) -> tuple[NDArray[np.uint8], LetterboxTransform]:
    prepared = prepare(read_image(image.path), config, size)
    pixels = np.round(np.clip(prepared.pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return pixels, prepared.transform


def prepare_set(
    images: Sequence[LabelledImage],
    size: int,
    config: PreprocessConfig,
    cache_dir: Path | None,
    progress: bool = True,
) -> PreparedSet:
    """Prepared pixels for ``images``, from ``cache_dir`` where present (``None``: no cache)."""
    folder = None if cache_dir is None else _folder(cache_dir, size, config)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((len(images), size, size), dtype=np.uint8)
    transforms: list[LetterboxTransform] = []
    for index, image in enumerate(
        tqdm(images, desc=f"prepare {size}px", disable=not progress, mininterval=5)
    ):
        entry = None if folder is None else folder / f"{_key(image.path)}.npz"
        loaded = False
        if entry is not None and entry.is_file():
            try:
                with np.load(entry) as stored:
                    pixels[index] = stored["pixels"]
                    t = stored["transform"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                log.warning("ignoring a damaged cache entry %s: %s", entry, exc)
            else:
                transforms.append(
                    LetterboxTransform(float(t[0]), float(t[1]), float(t[2]), int(t[3]), int(t[4]), size)
                )
                loaded = True
        if loaded:
            continue
        array, transform = prepare_one(image, size, config)
        pixels[index] = array
        transforms.append(transform)
        if entry is not None:
            values = np.array(
                [
                    transform.scale,
                    transform.pad_x,
                    transform.pad_y,
                    transform.source_width,
                    transform.source_height,
                ],
                dtype=np.float64,
            )
            _store(entry, array, values)
    return PreparedSet(images=tuple(images), pixels=pixels, transforms=tuple(transforms))


def _store(entry: Path, pixels: NDArray[np.uint8], transform: NDArray[np.float64]) -> None:
    """Write one cache entry atomically under a temporary name of its own.

    Two trainings (or threads) may fill one cache at the same time; each writes its own file and
    the last rename wins, with identical content.
    """
    with tempfile.NamedTemporaryFile(
        dir=entry.parent, prefix=f"{entry.stem}.", suffix=".tmp.npz", delete=False
    ) as handle:
        np.savez(handle, pixels=pixels, transform=transform)
    Path(handle.name).replace(entry)
