"""The fracture classifier runtime: a torchvision backbone behind :class:`FractureClassifier`.

``module`` (the :class:`~inference.models.backbones.GreyNet`, eval mode) and ``device`` are
public because Grad-CAM is computed on them (``module.target_layer`` is the last conv block).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from inference.calibration import apply_calibration
from inference.modelcard import ModelCard
from inference.models.backbones import GreyNet
from inference.models.torchio import forward_batched, load_greynet, select_device
from inference.packages import ModelPackage


def check_batch(batch: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    array = np.asarray(batch, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (size, size):
        raise ValueError(f"expected a batch of shape (N, {size}, {size}), got {array.shape}")
    return array


class TorchClassifier:
    """Fracture logits and calibrated probabilities of prepared (N, S, S) batches."""

    def __init__(self, card: ModelCard, module: GreyNet, device: torch.device, batch_size: int = 32) -> None:
        self.card = card
        self.module = module
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def load(cls, package: ModelPackage, device: str = "cpu") -> TorchClassifier:
        where = select_device(device)
        return cls(package.card, load_greynet(package, 1, where), where)

    def logits(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        array = check_batch(batch, self.card.input_size)
        return forward_batched(self.module, array, self.device, self.batch_size, 1)[:, 0]

    def probabilities(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        z = self.logits(batch)
        return apply_calibration(z, self.card.temperature, self.card.logit_offset).astype(np.float32)
