"""The image-based body-region classifier the router falls back on (:class:`RegionClassifier`).

The card's ``regions`` are the network's outputs in order; its temperature calibrates the
softmax.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from inference.modelcard import ModelCard
from inference.models.backbones import GreyNet
from inference.models.classifier import check_batch
from inference.models.torchio import forward_batched, load_greynet, select_device
from inference.packages import ModelPackage
from inference.regions import Region


class TorchRegionClassifier:
    def __init__(self, card: ModelCard, module: GreyNet, device: torch.device, batch_size: int = 32) -> None:
        self.card = card
        self.module = module
        self.device = device
        self.batch_size = batch_size

    @classmethod
    def load(cls, package: ModelPackage, device: str = "cpu") -> TorchRegionClassifier:
        where = select_device(device)
        return cls(package.card, load_greynet(package, len(package.card.regions), where), where)

    def logits(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        array = check_batch(batch, self.card.input_size)
        return forward_batched(self.module, array, self.device, self.batch_size, len(self.card.regions))

    def probabilities(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """Calibrated probabilities of every region, shape (N, len(card.regions))."""
        z = self.logits(batch).astype(np.float64) / self.card.temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out: NDArray[np.float32] = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        return out

    def predict(self, batch: NDArray[np.float32]) -> list[tuple[Region, float]]:
        p = self.probabilities(batch)
        best = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64)
        return [(self.card.regions[int(k)], float(p[i, k])) for i, k in enumerate(best)]
