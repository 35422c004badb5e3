"""Grad-CAM on real torch classifiers: a bundled package, a package written here, and a small
network whose evidence is known, so the map must point at it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from inference.evaluation.gradcam import (
    GradCamError,
    cam_to_source,
    explain_image,
    gradcam,
    overlay,
    write_png,
)
from inference.modelcard import (
    HIGH_SENSITIVITY,
    HIGH_SPECIFICITY,
    YOUDEN,
    ModelCard,
    ModelKind,
    OperatingPoint,
)
from inference.models import load_model
from inference.packages import ModelPackage, bundled_directory, discover, verify_package
from inference.pixels import letterbox, prepare
from inference.protocols import FractureClassifier
from inference.regions import AnatomicalGroup, Region


def write_tiny_classifier(
    directory: Path,
    *,
    name: str = "tiny-upper-distal",
    regions: tuple[Region, ...] = (Region.HAND, Region.WRIST),
    group: AnatomicalGroup | None = AnatomicalGroup.UPPER_DISTAL,
    size: int = 64,
    seed: int = 0,
) -> ModelPackage:
    """A real classifier package (untrained mobilenet_v3_small weights) the node's runtime loads."""
    from inference.models.backbones import GreyNet
    from inference.models.torchio import save_weights
    from inference.packages import write_package

    torch.manual_seed(seed)
    network = GreyNet("mobilenet_v3_small", 1)
    # Untrained, the eval-mode network's activations vanish with depth (every logit ~1e-10);
    # BatchNorm statistics from a few noise batches make its outputs differ between images.
    for layer in network.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # a plain average over the batches below
    network.train()
    with torch.no_grad():
        for _ in range(3):
            network(torch.rand(8, size, size))
    with torch.no_grad():
        network.backbone.classifier[-1].weight.mul_(20.0)
    weights = save_weights(network.eval(), directory / "work" / f"{name}.pt")
    card = ModelCard(
        name=name,
        version="0.0.1",
        device_uid="",
        kind=ModelKind.CLASSIFIER,
        architecture="mobilenet_v3_small",
        group=group,
        regions=regions,
        input_size=size,
        preprocessing={"stretch": True},
        temperature=1.3,
        operating_points=(
            OperatingPoint(HIGH_SENSITIVITY, 0.3, 0.9, 0.5),
            OperatingPoint(YOUDEN, 0.5, 0.7, 0.7),
            OperatingPoint(HIGH_SPECIFICITY, 0.7, 0.5, 0.9),
        ),
    )
    return write_package(directory / name, card, {"model.pt": weights})


def logits_vary(package: ModelPackage, images: list[np.ndarray]) -> bool:
    classifier = load_model(verify_package(package.path), "cpu")
    assert isinstance(classifier, FractureClassifier)
    from inference.pixels import PreprocessConfig

    config = PreprocessConfig.from_dict(classifier.card.preprocessing)
    batch = np.stack([prepare(i, config, classifier.card.input_size).pixels for i in images])
    return float(np.std(classifier.logits(batch))) > 1e-3


def first_bundled_classifier() -> ModelPackage | None:
    for package in discover(bundled_directory()):
        if package.card.kind == ModelKind.CLASSIFIER:
            return package
    return None


def radiograph(height: int = 300, width: int = 220, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = (0.2 + 0.1 * rng.random((height, width))).astype(np.float32)
    image[height // 4 : 3 * height // 4, width // 3 : width // 2] = 0.8  # a bone-like band
    return image


def test_gradcam_on_the_first_bundled_classifier() -> None:
    package = first_bundled_classifier()
    if package is None:
        pytest.skip(f"no classifier package committed under {bundled_directory()} yet")
    classifier = load_model(verify_package(package.path), "cpu")
    assert isinstance(classifier, FractureClassifier)
    image = radiograph(350, 260)
    result = explain_image(classifier, image)
    assert result.cam.shape == image.shape
    assert result.overlay.shape == (*image.shape, 3) and result.overlay.dtype == np.uint8
    prepared = prepare(image, classifier_config(classifier), classifier.card.input_size)
    cam = gradcam(classifier, prepared.pixels)
    size = classifier.card.input_size
    assert cam.shape == (size, size) and cam.dtype == np.float32
    assert 0.0 <= cam.min() and cam.max() <= 1.0


def classifier_config(classifier: FractureClassifier):  # type: ignore[no-untyped-def]
    from inference.pixels import PreprocessConfig

    return PreprocessConfig.from_dict(classifier.card.preprocessing)


def test_gradcam_on_a_package_loaded_by_the_node_runtime(tmp_path: Path) -> None:
    package = write_tiny_classifier(tmp_path)
    assert logits_vary(package, [radiograph(seed=s) for s in range(4)] + [radiograph(200, 300)])
    classifier = load_model(verify_package(package.path), "cpu")
    assert isinstance(classifier, FractureClassifier)
    image = radiograph()
    result = explain_image(classifier, image)
    assert result.cam.shape == image.shape
    assert result.cam.min() >= 0.0 and result.cam.max() <= 1.0
    expected = float(
        classifier.probabilities(prepare(image, classifier_config(classifier), 64).pixels[None])[0]
    )
    assert result.probability == pytest.approx(expected)
    png = write_png(tmp_path / "overlay.png", result.overlay)
    assert png.read_bytes()[:4] == b"\x89PNG"


class BrightSpotNet(nn.Module):
    """conv (bright-pixel detector) -> ReLU -> global mean -> logit: evidence is where bright pixels are."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 4, 3, padding=1)
        with torch.no_grad():
            self.features.weight.fill_(1.0 / 9.0)
            self.features.bias.fill_(-0.6)
        self.head = nn.Linear(4, 1)
        with torch.no_grad():
            self.head.weight.fill_(5.0)
            self.head.bias.fill_(-1.0)
        self.target_layer = self.features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.features(pixels.unsqueeze(1)))
        return self.head(maps.mean(dim=(2, 3)))


class BrightSpotClassifier:
    def __init__(self) -> None:
        self.card = ModelCard("spot", "1", "1.2.3", ModelKind.CLASSIFIER, "spot", None, (), 64)
        self.module = BrightSpotNet().eval()
        self.device = torch.device("cpu")

    def logits(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(np.ascontiguousarray(batch)))[:, 0].numpy()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(batch)))


def test_map_points_at_the_evidence_and_maps_back_through_the_letterbox() -> None:
    # Source 100 rows x 50 columns: letterboxed to 64, scale 0.64, 32 columns wide, padded 16 left.
    source = np.zeros((100, 50), dtype=np.float32)
    source[10:30, 5:20] = 1.0  # the bright "fracture", upper left
    prepared = letterbox(source, 64)
    assert (prepared.transform.pad_x, prepared.transform.pad_y) == (16.0, 0.0)
    classifier = BrightSpotClassifier()
    cam = gradcam(classifier, prepared.pixels)
    assert cam.shape == (64, 64)
    inside = cam[7:19, 19:29].mean()
    assert inside > 0.5 and cam[40:, :].max() < 0.05 and cam[:, :16].max() < 0.05
    back = cam_to_source(cam, prepared.transform)
    assert back.shape == source.shape
    assert back[12:28, 7:18].mean() > 0.5
    assert back[60:, :].max() < 0.05
    rgb = overlay(source, back)
    assert rgb.shape == (100, 50, 3)
    assert rgb[80, 40].tolist() == [0, 0, 0]  # no map, no colour: the grey image (black here)


def test_flat_map_and_errors() -> None:
    classifier = BrightSpotClassifier()
    assert gradcam(classifier, np.zeros((64, 64), dtype=np.float32)).max() == 0.0
    with pytest.raises(GradCamError):
        gradcam(classifier, np.zeros((64, 32), dtype=np.float32))

    class NoModule:
        card = classifier.card

    with pytest.raises(GradCamError):
        gradcam(NoModule(), np.zeros((64, 64), dtype=np.float32))  # type: ignore[arg-type]
