"""Small real model packages for tests: torchvision networks with seeded random weights.

They run the real model code (loading, verification, preprocessing, inference) in seconds; their
probabilities mean nothing. The bundled, trained models are tested where a test says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inference.modelcard import HIGH_SENSITIVITY, HIGH_SPECIFICITY, ModelCard, ModelKind, OperatingPoint
from inference.models.backbones import GreyNet
from inference.models.torchio import WEIGHTS_FILE, save_weights
from inference.packages import ModelPackage, new_device_uid, write_package
from inference.pixels import PreprocessConfig
from inference.regions import DEFAULT_GROUP_TABLE, AnatomicalGroup, Region


def classifier_package(
    directory: Path,
    group: AnatomicalGroup,
    regions: tuple[Region, ...] | None = None,
    *,
    size: int = 64,
    seed: int = 0,
    thresholds: tuple[float, float] = (0.3, 0.7),
) -> ModelPackage:
    torch.manual_seed(seed)
    net = GreyNet("mobilenet_v3_small", 1).eval()
    out = directory / f"test-{group}"
    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(net, out / WEIGHTS_FILE)
    card = ModelCard(
        name=f"test-{group}",
        version="0.0.1",
        device_uid=new_device_uid(),
        kind=ModelKind.CLASSIFIER,
        architecture="mobilenet_v3_small",
        group=group,
        regions=regions if regions is not None else DEFAULT_GROUP_TABLE.regions_of(group),
        input_size=size,
        preprocessing=PreprocessConfig().as_dict(),
        temperature=1.0,
        operating_points=(
            OperatingPoint(HIGH_SENSITIVITY, thresholds[0], 0.9, 0.5),
            OperatingPoint(HIGH_SPECIFICITY, thresholds[1], 0.5, 0.9),
        ),
        notes="random weights, for tests only",
    )
    return write_package(out, card, {WEIGHTS_FILE: weights})


def all_groups(directory: Path, size: int = 64) -> Path:
    """One test classifier per anatomical group under ``directory``; returns ``directory``."""
    for index, group in enumerate(AnatomicalGroup):
        classifier_package(directory, group, size=size, seed=index)
    return directory
