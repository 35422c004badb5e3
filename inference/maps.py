"""From a fracture map to outputs: boxes, flip TTA and the classifier + map stack; pure numpy/scipy.

A map model (kind ``segmenter``) gives a logit per pixel of the prepared (letterboxed) image.

- **Boxes** are the 8-connected regions of the map at or above a threshold; each box is the
  region's bounding rectangle in prepared-image pixel coordinates with corners on pixel edges
  (pixel ``i`` spans ``[i, i + 1)``, the convention of
  :meth:`inference.pixels.LetterboxTransform.to_source`, which maps it back to source pixels
  exactly), and its score is the region's peak logit, calibrated.
- **Thresholds** are stated as calibrated probabilities ``p = sigmoid(z / T + b)``; since that is
  increasing in the logit ``z``, the map is cut at ``z = T * (logit(p) - b)`` instead.
- **Flip TTA** averages the logits of the image and of its mirror image mirrored back, so the
  result for a mirrored image is exactly the mirror of the result.
- **Stack**: ``sigmoid(w_c * classifier_logit + w_m * map_logit + bias)``
  (:class:`inference.modelcard.Stack`).

Errors: ``ValueError`` for arrays of the wrong shape or a non-positive temperature.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from inference.calibration import apply_calibration, logit, sigmoid
from inference.modelcard import Stack
from inference.protocols import RawBox

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def logit_threshold(probability: float, temperature: float, offset: float = 0.0) -> float:
    """The map logit at which the calibrated probability reaches ``probability``."""
    if not temperature > 0.0:
        raise ValueError(f"temperature {temperature} must be positive")
    return float(temperature * (float(logit(probability)) - offset))


def map_boxes(
    map_logits: NDArray[np.floating],
    threshold: float,
    temperature: float = 1.0,
    offset: float = 0.0,
) -> list[RawBox]:
    """Boxes of the 8-connected regions of ``map_logits`` (H, W) at or above probability ``threshold``.

    Each box is ``(x0, y0, x1, y1, p)``: the region's bounding rectangle in pixel-edge
    coordinates (a region of the single pixel (row 2, column 3) gives ``(3, 2, 4, 3)``) and
    ``p`` its peak logit calibrated by ``temperature`` and ``offset``. Highest ``p`` first.
    """
    z = np.asarray(map_logits, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"expected one (H, W) map, got shape {z.shape}")
    cut = logit_threshold(threshold, temperature, offset)
    labels, count = ndimage.label(z >= cut, structure=EIGHT_CONNECTED)
    if count == 0:
        return []
    peaks = ndimage.maximum(z, labels=labels, index=np.arange(1, count + 1))
    probabilities = apply_calibration(np.asarray(peaks, dtype=np.float64), temperature, offset)
    boxes: list[RawBox] = []
    for where, p in zip(ndimage.find_objects(labels), probabilities, strict=True):
        if where is None:
            continue
        rows, columns = where
        boxes.append(
            (float(columns.start), float(rows.start), float(columns.stop), float(rows.stop), float(p))
        )
    boxes.sort(key=lambda b: -b[4])
    return boxes


def mirror_average(maps: NDArray[np.float32], mirrored_maps: NDArray[np.float32]) -> NDArray[np.float32]:
    """Flip TTA of (N, H, W) maps: the mean of each map and its mirror image's map mirrored back."""
    a = np.asarray(maps, dtype=np.float32)
    b = np.asarray(mirrored_maps, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two (N, H, W) maps of one shape, got {a.shape} and {b.shape}")
    return ((a + b[:, :, ::-1]) / 2.0).astype(np.float32)


def stacked_probabilities(
    stack: Stack, classifier_logits: NDArray[np.floating], map_logits: NDArray[np.floating]
) -> NDArray[np.float64]:
    """``sigmoid(w_c * classifier_logit + w_m * map_logit + bias)`` per image."""
    c = np.asarray(classifier_logits, dtype=np.float64).ravel()
    m = np.asarray(map_logits, dtype=np.float64).ravel()
    if c.shape != m.shape:
        raise ValueError(f"{c.size} classifier logits for {m.size} map logits")
    return sigmoid(stack.weights[0] * c + stack.weights[1] * m + stack.bias)
