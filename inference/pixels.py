"""Array maths of the pixel pipeline: the DICOM grey-scale transforms, then the enhancements.

The node reads the DICOM attributes and calls the first group in this order (PS3.3 C.11):
stored values -> :func:`restrict_bits` (BitsStored, sign) -> :func:`padding_mask` ->
Modality LUT (:func:`rescale` or :func:`lookup`) -> VOI LUT (:func:`lookup` normalised,
:func:`window` with the LINEAR / LINEAR_EXACT / SIGMOID functions of C.11.2.1.2, or the
:func:`percentile_window` fallback) -> :func:`invert` for MONOCHROME1; colour images go
through :func:`rgb_to_grey` instead. The result is a 2-D float32 array in [0, 1],
MONOCHROME2 (bright bone), the input of everything below.

Then the seeds' enhancements: grey-level range stretching (percentile clip and stretch, as in
the multi-site Faster R-CNN study) and CLAHE (as in the FAMO study), then an aspect-preserving
resize with padding (letterbox) whose transform maps boxes back to source pixels exactly.
Everything here is deterministic and pure.

Errors: ValueError for arguments no image can have (a window narrower than the standard
allows, an empty LUT, a non-2-D image); callers check with :func:`window_is_valid` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np
from numpy.typing import NDArray

FloatImage = NDArray[np.float32]
Mask = NDArray[np.bool_]

# ITU-R BT.601 luma weights, the Y of DICOM's YBR_FULL (PS3.3 C.7.6.3.1.2).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class WindowFunction(StrEnum):
    """VOI LUT Function (0028,1056); LINEAR when absent (PS3.3 C.11.2.1.3)."""

    LINEAR = "LINEAR"
    LINEAR_EXACT = "LINEAR_EXACT"
    SIGMOID = "SIGMOID"


# ---------------------------------------------------------------------------------------------
# DICOM grey-scale transforms (the node reads the attributes and calls these)
# ---------------------------------------------------------------------------------------------


def restrict_bits(stored: NDArray[np.integer], bits_stored: int, signed: bool) -> NDArray[np.signedinteger]:
    """Keep the low ``bits_stored`` bits of each value, sign-extended when ``signed``.

    Bits above BitsStored (old overlays, garbage) are not pixel data (PS3.5 8.1.1). Decoders
    differ in whether they clear them; this makes every path agree.
    """
    if not 1 <= bits_stored <= 32:
        raise ValueError(f"BitsStored must be 1..32, got {bits_stored}")
    wide = np.int64 if bits_stored > 31 else np.int32
    values = stored.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        sign = 1 << (bits_stored - 1)
        values = (values ^ sign) - sign
    return values.astype(wide)


def padding_mask(stored: NDArray[np.integer], value: int, limit: int | None = None) -> Mask:
    """Pixels equal to Pixel Padding Value, or between it and Pixel Padding Range Limit inclusive.

    Both are stored pixel values, compared before the Modality LUT (PS3.3 C.7.5.1.1.2).
    """
    low, high = sorted((value, value if limit is None else limit))
    return np.asarray((stored >= low) & (stored <= high), dtype=np.bool_)


def rescale(stored: NDArray[np.integer], slope: float, intercept: float) -> NDArray[np.float64]:
    """Modality LUT by Rescale Slope and Intercept: ``stored * slope + intercept``."""
    return stored.astype(np.float64) * float(slope) + float(intercept)


def lookup(values: NDArray[np.generic], first_mapped: int, table: NDArray[np.generic]) -> NDArray[np.float64]:
    """A DICOM LUT: values below ``first_mapped`` take the first entry, above the range the last.

    Used for the Modality LUT (output in modality units) and the VOI LUT (PS3.3 C.11.1, C.11.2).
    """
    entries = np.asarray(table, dtype=np.float64).ravel()
    if entries.size == 0:
        raise ValueError("a LUT needs at least one entry")
    index = np.clip(np.rint(values).astype(np.int64) - int(first_mapped), 0, entries.size - 1)
    mapped: NDArray[np.float64] = entries[index]
    return mapped


def window_is_valid(width: float, function: WindowFunction = WindowFunction.LINEAR) -> bool:
    """Whether Window Width is allowed: >= 1 for LINEAR, > 0 otherwise (PS3.3 C.11.2.1.2)."""
    if not np.isfinite(width):
        return False
    return width >= 1.0 if function is WindowFunction.LINEAR else width > 0.0


def window(
    values: NDArray[np.generic],
    center: float,
    width: float,
    function: WindowFunction = WindowFunction.LINEAR,
) -> FloatImage:
    """Window Center/Width applied to Modality LUT output, mapped to [0, 1] (PS3.3 C.11.2.1.2)."""
    if not window_is_valid(width, function) or not np.isfinite(center):
        raise ValueError(f"invalid window center {center} / width {width} for {function}")
    x = np.asarray(values, dtype=np.float64)
    c, w = float(center), float(width)
    if function is WindowFunction.LINEAR:
        if w == 1.0:  # the formula's (w - 1) vanishes: a threshold at c - 0.5
            out = (x > c - 0.5).astype(np.float64)
        else:
            out = np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
    elif function is WindowFunction.LINEAR_EXACT:
        out = np.clip((x - c) / w + 0.5, 0.0, 1.0)
    else:
        out = 1.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -700.0, 700.0)))  # no overflow
    return out.astype(np.float32)


def percentile_window(
    values: NDArray[np.generic],
    mask: Mask | None = None,
    low: float = 0.5,
    high: float = 99.5,
) -> FloatImage:
    """A robust window when the header has none: the [low, high] percentiles of the pixels in
    ``mask`` (all when None or empty; pass the non-padding pixels) stretched to [0, 1]."""
    x = np.asarray(values, dtype=np.float64)
    sample = x[mask] if mask is not None and bool(mask.any()) else x
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def invert(image: FloatImage) -> FloatImage:
    """MONOCHROME1 to MONOCHROME2: the minimum value is white in MONOCHROME1 (PS3.3 C.7.6.3.1.2)."""
    return (1.0 - np.asarray(image, dtype=np.float32)).astype(np.float32)


def rgb_to_grey(rgb: NDArray[np.generic], max_value: float) -> FloatImage:
    """An RGB image (H, W, 3) of values 0..``max_value`` as luma in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
    r, g, b = LUMA_WEIGHTS
    x = np.asarray(rgb, dtype=np.float64)
    grey = (r * x[..., 0] + g * x[..., 1] + b * x[..., 2]) / float(max_value)
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Enhancement and letterbox (model preprocessing; recorded in each model card)
# ---------------------------------------------------------------------------------------------


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
    lo, hi = (float(v) for v in np.percentile(image, [low, high]))
    if hi <= lo:
        return np.zeros(image.shape, dtype=np.float32)
    stretched: FloatImage = np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return stretched


def clahe(image: FloatImage, clip_limit: float = 2.0, tiles: int = 8) -> FloatImage:
    """Contrast-limited adaptive histogram equalisation on a 16-bit quantisation of the image."""
    quantised = np.round(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    equaliser = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    equalised = np.asarray(equaliser.apply(quantised), dtype=np.float32)
    return (equalised / 65535.0).astype(np.float32)


def enhance(image: FloatImage, config: PreprocessConfig) -> FloatImage:
    out = np.asarray(image, dtype=np.float32)
    if config.stretch:
        out = stretch_range(out, config.stretch_low_percentile, config.stretch_high_percentile)
    if config.clahe:
        out = clahe(out, config.clahe_clip_limit, config.clahe_tiles)
    return out


def letterbox(image: FloatImage, size: int) -> PreparedImage:
    """Resize keeping the aspect ratio so the long side is ``size``; pad the rest with 0, centred.

    The resize is by the factor ``scale`` on both axes (not to a rounded size), so
    ``model = source * scale + pad`` holds exactly for every coordinate on both axes; the last
    model row or column may be partly covered. (Resizing to a rounded size instead shifts the
    short axis by up to half a model pixel, several source pixels on a large radiograph.)
    """
    height, width = image.shape
    scale = size / max(height, width)
    source = np.ascontiguousarray(image, dtype=np.float32)
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    if round(width * scale) >= 1 and round(height * scale) >= 1:
        resized = cv2.resize(source, None, fx=scale, fy=scale, interpolation=interpolation)
    else:  # a sliver thinner than one model pixel: keep one row/column, exactness is moot
        dsize = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = cv2.resize(source, dsize, interpolation=interpolation)
    new_h, new_w = resized.shape
    pad_x = (size - new_w) // 2
    pad_y = (size - new_h) // 2
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
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
