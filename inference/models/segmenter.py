"""The fracture-map runtime: a :class:`~inference.models.segnet.SegNet` behind :class:`FractureSegmenter`.

One forward pass gives the coarse map (stride 4) and the image head's logit; with the card's
``flip`` the mirror image goes through in the same batch and both are averaged
(:func:`inference.maps.mirror_average`). Then:

- the image score is read as the card's ``score`` method says
  (:func:`inference.training.segmenter.image_scores`) and calibrated with the card's temperature
  and logit offset: the image probability;
- the coarse map is upsampled to the input size exactly as :meth:`SegNet.map_logits` does
  (bilinear, ``align_corners=False``), and its connected regions at the loosest box operating
  point are the boxes (:func:`inference.maps.map_boxes`), each scored by its peak, calibrated with
  the card's map temperature and offset. Boxes are in prepared-image pixels; the node maps them
  to source pixels with :meth:`inference.pixels.LetterboxTransform.to_source`.

Weights are a plain ``state_dict`` in ``model.pt`` (float16 on disk, float32 in memory), loaded
with ``weights_only=True``.

Errors::

    ModelLoadError (inference.models)   weights that do not fit the card's architecture
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from inference.calibration import apply_calibration
from inference.decision import UNCALIBRATED_THRESHOLD
from inference.maps import map_boxes, mirror_average
from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard, SegmenterSpec
from inference.models import ModelLoadError
from inference.models.backbones import BackboneError
from inference.models.classifier import check_batch
from inference.models.segnet import SegNet
from inference.models.torchio import WEIGHTS_FILE, select_device
from inference.packages import ModelPackage
from inference.protocols import RawBox, SegmenterOutput


def load_segnet(architecture: str, weights: Path, device: torch.device) -> SegNet:
    """A :class:`SegNet` with the state_dict in ``weights``, in eval mode on ``device``."""
    try:
        module = SegNet(architecture)
    except BackboneError as exc:
        raise ModelLoadError(str(exc), weights.parent) from exc
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (RuntimeError, OSError, AttributeError, KeyError) as exc:
        raise ModelLoadError(f"weights do not fit segmenter {architecture}: {exc}", weights.parent) from exc
    return module.to(device).eval()


def upsample_maps(coarse: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    """(N, h, w) coarse map logits to (N, size, size), as :meth:`SegNet.map_logits` upsamples."""
    if coarse.shape[0] == 0:
        return np.zeros((0, size, size), dtype=np.float32)
    with torch.inference_mode():
        full = F.interpolate(
            torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[:, None],
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )
    return np.asarray(full[:, 0].numpy(), dtype=np.float32)


def forward_maps(
    module: SegNet, array: NDArray[np.float32], device: torch.device, batch_size: int, flip: bool
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """``(coarse map logits (N, S/4, S/4), image logits (N,))`` of (N, S, S) pixels in [0, 1]."""
    maps: list[NDArray[np.float32]] = []
    heads: list[NDArray[np.float32]] = []
    with torch.inference_mode():
        for start in range(0, len(array), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size])).to(device)
            x = x[:, None]
            n = x.shape[0]
            if flip:
                x = torch.cat([x, torch.flip(x, dims=(3,))])
            coarse, image = module(x)
            coarse_np = coarse[:, 0].float().cpu().numpy()
            image_np = image.float().cpu().numpy()
            if flip:
                maps.append(mirror_average(coarse_np[:n], coarse_np[n:]))
                heads.append(((image_np[:n] + image_np[n:]) / 2.0).astype(np.float32))
            else:
                maps.append(coarse_np)
                heads.append(image_np)
    if not maps:
        return np.zeros((0, 1, 1), dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(maps).astype(np.float32), np.concatenate(heads).astype(np.float32)


def image_logits(coarse: NDArray[np.float32], heads: NDArray[np.float32], method: str) -> NDArray[np.float32]:
    """The image score the card's ``score`` names, as a logit."""
    from inference.training.segmenter import image_scores

    scores = image_scores(coarse, heads)
    if method not in scores:
        raise ValueError(f"unknown segmenter score {method!r}")
    return scores[method]


def box_cut(spec: SegmenterSpec) -> float:
    """The calibrated map probability regions are cut at: the loosest of the box points."""
    thresholds = [
        p.threshold for p in spec.box_operating_points if p.name in (HIGH_SENSITIVITY, HIGH_SPECIFICITY)
    ]
    return min(thresholds) if thresholds else UNCALIBRATED_THRESHOLD


class TorchSegmenter:
    """Image probabilities and boxes of prepared (N, S, S) batches from one fracture map."""

    def __init__(self, card: ModelCard, module: SegNet, device: torch.device, batch_size: int = 16) -> None:
        self.card = card
        self.spec = card.segmenter if card.segmenter is not None else SegmenterSpec()
        self.module = module
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def load(cls, package: ModelPackage, device: str = "cpu") -> TorchSegmenter:
        where = select_device(device)
        path = package.weight_path(WEIGHTS_FILE if WEIGHTS_FILE in package.card.weights else None)
        return cls(package.card, load_segnet(package.card.architecture, path, where), where)

    def maps(self, batch: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Coarse map logits and image-head logits, flip-averaged when the card says so."""
        array = check_batch(batch, self.card.input_size)
        return forward_maps(self.module, array, self.device, self.batch_size, self.spec.flip)

    def segment(self, batch: NDArray[np.float32]) -> SegmenterOutput:
        coarse, heads = self.maps(batch)
        z = image_logits(coarse, heads, self.spec.score)
        p = apply_calibration(z, self.card.temperature, self.card.logit_offset).astype(np.float32)
        full = upsample_maps(coarse, self.card.input_size)
        cut = box_cut(self.spec)
        boxes = [
            map_boxes(image_map, cut, self.spec.map_temperature, self.spec.map_logit_offset)
            for image_map in full
        ]
        return SegmenterOutput(logits=z, probabilities=p, boxes=boxes)

    def logits(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        coarse, heads = self.maps(batch)
        return image_logits(coarse, heads, self.spec.score)

    def probabilities(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        z = self.logits(batch)
        return apply_calibration(z, self.card.temperature, self.card.logit_offset).astype(np.float32)

    def detect(self, batch: NDArray[np.float32]) -> list[list[RawBox]]:
        return self.segment(batch).boxes
