"""Model runtimes behind the :mod:`inference.protocols` interfaces, and the one factory that loads them.

:func:`load_model` verifies a package's checksums, then builds the runtime its card's ``kind``
names: a torchvision classifier (:class:`~inference.models.classifier.TorchClassifier`), a
region classifier (:class:`~inference.models.region.TorchRegionClassifier`), a YOLOv8 detector
(:class:`~inference.models.detector.YoloDetector`) or a fracture-map model
(:class:`~inference.models.segmenter.TorchSegmenter`). torch and ultralytics are imported when a
model is loaded, not when this package is imported.

Errors::

    PackageError / ChecksumError (inference.packages)   a package that fails verification
    ModelLoadError (PackageError)                        weights that do not fit the card, a bad device
"""

from __future__ import annotations

from inference.modelcard import ModelKind
from inference.packages import ModelPackage, PackageError, verify_package
from inference.protocols import FractureClassifier, FractureDetector, FractureSegmenter, RegionClassifier


class ModelLoadError(PackageError):
    """Verified weights that cannot be loaded into the architecture the card names."""


def load_model(
    package: ModelPackage, device: str = "cpu"
) -> FractureClassifier | FractureDetector | FractureSegmenter | RegionClassifier:
    """Verify ``package`` and load it; ``device`` "auto" picks CUDA when available."""
    verified = verify_package(package.path)
    kind = verified.card.kind
    if kind is ModelKind.CLASSIFIER:
        from inference.models.classifier import TorchClassifier

        return TorchClassifier.load(verified, device)
    if kind is ModelKind.REGION:
        from inference.models.region import TorchRegionClassifier

        return TorchRegionClassifier.load(verified, device)
    if kind is ModelKind.DETECTOR:
        from inference.models.detector import YoloDetector

        return YoloDetector.load(verified, device)
    if kind is ModelKind.SEGMENTER:
        from inference.models.segmenter import TorchSegmenter

        return TorchSegmenter.load(verified, device)
    raise ModelLoadError(f"unknown model kind {kind!r}", package.path)


__all__ = ["ModelLoadError", "load_model"]
