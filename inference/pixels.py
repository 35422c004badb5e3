"""Array maths of the pixel pipeline, after the node has applied the DICOM LUTs.

Input everywhere is a 2-D float32 array in [0, 1], MONOCHROME2 (bright bone). The steps are
the seeds' enhancements: grey-level range stretching (percentile clip and stretch, as in the
multi-site Faster R-CNN study) and CLAHE (as in the FAMO study), then an aspect-preserving
resize with padding (letterbox) whose transform maps boxes back to source pixels exactly.
Everything here is deterministic and pure.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

FloatImage = NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    """The configurable enhancement steps; stored in each model card so serving matches training."""

    stretch: bool = True
    stretch_low_percentile: float = 0.5
    stretch_high_percentile: float = 99.5
    clahe: bool = False
    clahe_clip_limit: float = 2.0
    clahe_tiles: int = 8

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "stretch": self.stretch,
            "stretch_low_percentile": self.stretch_low_percentile,
            "stretch_high_percentile": self.stretch_high_percentile,
            "clahe": self.clahe,
            "clahe_clip_limit": self.clahe_clip_limit,
            "clahe_tiles": self.clahe_tiles,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PreprocessConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class LetterboxTransform:
    """model = source * scale + pad; the inverse maps model boxes back to source pixels."""

    scale: float
    pad_x: float
    pad_y: float
    source_width: int
    source_height: int
    size: int

    def to_source(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        def back(v: float, pad: float, limit: int) -> float:
            return float(min(max((v - pad) / self.scale, 0.0), float(limit)))

        return (
            back(x0, self.pad_x, self.source_width),
            back(y0, self.pad_y, self.source_height),
            back(x1, self.pad_x, self.source_width),
            back(y1, self.pad_y, self.source_height),
        )

    def to_model(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        s = self.scale
        return (x0 * s + self.pad_x, y0 * s + self.pad_y, x1 * s + self.pad_x, y1 * s + self.pad_y)


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A model-ready square float32 image and the transform back to its source."""

    pixels: FloatImage
    transform: LetterboxTransform


def stretch_range(image: FloatImage, low: float = 0.5, high: float = 99.5) -> FloatImage:
    """Clip to the [low, high] percentiles and stretch that range to [0, 1]."""
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def clahe(image: FloatImage, clip_limit: float = 2.0, tiles: int = 8) -> FloatImage:
    """Contrast-limited adaptive histogram equalisation on a 16-bit quantisation of the image."""
    quantised = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    equaliser = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    return (equaliser.apply(quantised).astype(np.float32) / 65535.0).astype(np.float32)


def enhance(image: FloatImage, config: PreprocessConfig) -> FloatImage:
    out = np.asarray(image, dtype=np.float32)
    if config.stretch:
        out = stretch_range(out, config.stretch_low_percentile, config.stretch_high_percentile)
    if config.clahe:
        out = clahe(out, config.clahe_clip_limit, config.clahe_tiles)
    return out


def letterbox(image: FloatImage, size: int) -> PreparedImage:
    """Resize keeping the aspect ratio so the long side is ``size``; pad the rest with 0, centred."""
    height, width = image.shape
    scale = size / max(height, width)
    new_w = max(1, round(width * scale))
    new_h = max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(image.astype(np.float32), (new_w, new_h), interpolation=interpolation)
    pad_x = (size - new_w) // 2
    pad_y = (size - new_h) // 2
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    # The exact per-axis scale of the resize; equal on both axes up to rounding of the new size.
    transform = LetterboxTransform(
        scale=scale,
        pad_x=float(pad_x),
        pad_y=float(pad_y),
        source_width=width,
        source_height=height,
        size=size,
    )
    return PreparedImage(pixels=canvas, transform=transform)


def prepare(image: FloatImage, config: PreprocessConfig, size: int) -> PreparedImage:
    """The whole array pipeline: enhance, then letterbox to ``size`` x ``size``."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {image.shape}")
    return letterbox(enhance(image, config), size)
