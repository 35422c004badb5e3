"""The fracture detector runtime: an ultralytics YOLOv8 model behind :class:`FractureDetector`.

Boxes come back in the prepared image's pixel coordinates with confidences calibrated by the
card's temperature and logit offset (``sigmoid(logit(conf) / T + b)``). Prepared grey pixels are
fed as uint8 three-channel arrays: ultralytics accepts uint16 silently and then finds nothing
(STACK-NOTES). An image's fracture probability, for a group served by the detector alone, is
its highest calibrated box confidence (:meth:`YoloDetector.image_probabilities`).

Errors::

    ModelLoadError (inference.models)   a checkpoint ultralytics cannot read
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from inference.calibration import apply_calibration, logit
from inference.modelcard import ModelCard
from inference.models import ModelLoadError
from inference.models.classifier import check_batch
from inference.models.ultralytics_env import prepare_ultralytics
from inference.packages import ModelPackage
from inference.protocols import RawBox

DEFAULT_MIN_CONFIDENCE = 0.01
WEIGHTS_FILE = "model.pt"


def calibrate_confidence(
    confidence: NDArray[np.float64], temperature: float, offset: float = 0.0
) -> NDArray[np.float64]:
    """``sigmoid(logit(confidence) / T + b)``, the confidence clipped away from 0 and 1."""
    return apply_calibration(logit(confidence), temperature, offset)


def to_uint8_rgb(image: NDArray[np.float32]) -> NDArray[np.uint8]:
    grey = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


class YoloDetector:
    def __init__(
        self, card: ModelCard, model: Any, device: str, min_confidence: float = DEFAULT_MIN_CONFIDENCE
    ) -> None:
        self.card = card
        self.model = model
        self.device = device
        self.min_confidence = min_confidence

    @classmethod
    def load(cls, package: ModelPackage, device: str = "cpu") -> YoloDetector:
        prepare_ultralytics()
        import torch
        from ultralytics import YOLO  # type: ignore[attr-defined]

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for but CUDA is not available", package.path)
        try:
            model = YOLO(str(package.weight_path(WEIGHTS_FILE)), task="detect")
        except (RuntimeError, OSError, KeyError, AttributeError, TypeError) as exc:
            raise ModelLoadError(f"ultralytics cannot read the weights: {exc}", package.path) from exc
        return cls(package.card, model, "cpu" if device == "cpu" else "0" if device == "cuda" else device)

    def raw_boxes(self, batch: NDArray[np.float32]) -> list[list[RawBox]]:
        """Uncalibrated boxes (the network's own confidences) per image."""
        array = check_batch(batch, self.card.input_size)
        if len(array) == 0:
            return []
        results = self.model.predict(
            [to_uint8_rgb(image) for image in array],
            imgsz=self.card.input_size,
            conf=self.min_confidence,
            device=self.device,
            verbose=False,
        )
        out: list[list[RawBox]] = []
        for result in results:
            xyxy = result.boxes.xyxy.cpu().numpy().astype(np.float64)
            conf = result.boxes.conf.cpu().numpy().astype(np.float64)
            out.append(
                [
                    (float(a), float(b), float(c), float(d), float(p))
                    for (a, b, c, d), p in zip(xyxy, conf, strict=True)
                ]
            )
        return out

    def detect(self, batch: NDArray[np.float32]) -> list[list[RawBox]]:
        out: list[list[RawBox]] = []
        for boxes in self.raw_boxes(batch):
            if not boxes:
                out.append([])
                continue
            calibrated = calibrate_confidence(
                np.array([b[4] for b in boxes]), self.card.temperature, self.card.logit_offset
            )
            out.append([(b[0], b[1], b[2], b[3], float(p)) for b, p in zip(boxes, calibrated, strict=True)])
        return out

    def image_probabilities(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Highest calibrated box confidence per image; an image without a box scores 0."""
        return np.array(
            [max((b[4] for b in boxes), default=0.0) for boxes in self.detect(batch)], dtype=np.float32
        )
