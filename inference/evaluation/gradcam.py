"""Grad-CAM maps of a classifier's fracture decision (Selvaraju et al., ICCV 2017).

The map weights the channels of the classifier's last convolutional block by the mean gradient
of the fracture logit and keeps the positive part: where the features that raised the logit
are. A reviewer reads it to see whether a model looked at bone or at text labels and image
borders, the failure the zero-shot study found.

The classifier is the node's own object (:func:`inference.models.load_model`): its ``module``
(a torch module in eval mode taking the prepared pixels ``(N, S, S)`` in [0, 1]) and ``device``.
The target block is the module's ``target_layer`` when it names one (the bundled backbones do),
otherwise the last block whose output is a feature map larger than 1 x 1.

:func:`gradcam` gives a map of the prepared image's size; :func:`cam_to_source` maps it back
through the letterbox transform to the source image; :func:`overlay` blends it into the image
as RGB for a PNG or a Secondary Capture.

Errors::

    GradCamError            the classifier exposes no torch module, or no feature map was found
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from inference.pixels import LetterboxTransform, PreprocessConfig, enhance, prepare
from inference.protocols import FractureClassifier

FloatImage = NDArray[np.float32]


class GradCamError(RuntimeError):
    """Grad-CAM cannot be computed for this classifier."""


def _feature_target(module: Any) -> Any:
    """The module's named Grad-CAM target, else None (found by running the model instead)."""
    return getattr(module, "target_layer", None)


def gradcam(classifier: FractureClassifier, prepared: FloatImage) -> FloatImage:
    """The Grad-CAM map of the fracture logit for one prepared ``(S, S)`` image, in [0, 1], ``(S, S)``.

    A map that is zero everywhere means no feature raised the fracture logit.
    """
    import torch
    from torch import nn

    module = getattr(classifier, "module", None)
    if not isinstance(module, nn.Module):
        raise GradCamError(f"{classifier.card.name} exposes no torch module")
    if prepared.ndim != 2 or prepared.shape[0] != prepared.shape[1]:
        raise GradCamError(f"expected a square prepared image, got shape {prepared.shape}")
    device = getattr(classifier, "device", "cpu")
    target = _feature_target(module)
    maps: list[torch.Tensor] = []

    def keep(_module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            maps.append(output)

    if target is not None:
        handles = [target.register_forward_hook(keep)]
    else:
        handles = [m.register_forward_hook(keep) for m in module.modules() if m is not module]
    try:
        with torch.enable_grad():
            pixels = torch.from_numpy(np.ascontiguousarray(prepared, dtype=np.float32))[None].to(device)
            pixels.requires_grad_(True)  # gradients reach the features even with frozen weights
            output = module(pixels)
            if not maps:
                raise GradCamError(f"{classifier.card.name}: no feature map larger than 1 x 1")
            features = maps[-1]
            logit = _fracture_logit(output)
            (gradients,) = torch.autograd.grad(logit.sum(), features)
    finally:
        for handle in handles:
            handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True)).detach()
    size = prepared.shape[0]
    cam = torch.nn.functional.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)
    out = cam[0, 0].to("cpu").numpy().astype(np.float32)
    peak = float(out.max())
    return (out / peak).astype(np.float32) if peak > 0 else np.zeros_like(out)


def _fracture_logit(output: Any) -> Any:
    """The fracture logit of each image: the single output, or the second of two classes."""
    if output.dim() == 1:
        return output
    if output.shape[-1] == 1:
        return output[:, 0]
    if output.shape[-1] == 2:
        return output[:, 1] - output[:, 0]
    raise GradCamError(f"cannot read a fracture logit from outputs of shape {tuple(output.shape)}")


def cam_to_source(cam: FloatImage, transform: LetterboxTransform) -> FloatImage:
    """The map over the source image: padding removed, resized to the source's height x width."""
    new_w = max(1, round(transform.source_width * transform.scale))
    new_h = max(1, round(transform.source_height * transform.scale))
    x, y = int(transform.pad_x), int(transform.pad_y)
    crop = np.ascontiguousarray(cam[y : y + new_h, x : x + new_w], dtype=np.float32)
    resized = cv2.resize(
        crop, (transform.source_width, transform.source_height), interpolation=cv2.INTER_LINEAR
    )
    return np.clip(resized, 0.0, 1.0).astype(np.float32)


def overlay(image: FloatImage, cam: FloatImage, strength: float = 0.6) -> NDArray[np.uint8]:
    """The grey image with the map in a jet colour scale, blended where the map is high: RGB uint8."""
    if image.shape != cam.shape:
        raise GradCamError(f"image {image.shape} and map {cam.shape} differ in size")
    grey = np.clip(image, 0.0, 1.0)
    heat_bgr = cv2.applyColorMap(np.round(np.clip(cam, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = heat_bgr[..., ::-1].astype(np.float32) / 255.0
    alpha = (strength * np.clip(cam, 0.0, 1.0))[..., None]
    blended = (1.0 - alpha) * grey[..., None] + alpha * heat
    return np.round(blended * 255.0).astype(np.uint8)


def write_png(path: Path, rgb: NDArray[np.uint8]) -> Path:
    """Write an RGB (or grey) uint8 array as PNG."""
    array = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise GradCamError(f"PNG encoding failed for {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded.tobytes())
    return path


@dataclass(frozen=True, slots=True)
class Explanation:
    """One image explained: the calibrated probability and the map over the source image."""

    probability: float
    cam: FloatImage  # source size, [0, 1]
    overlay: NDArray[np.uint8]  # source size, RGB


def explain_image(classifier: FractureClassifier, image: FloatImage) -> Explanation:
    """Prepare ``image`` as the node does for this classifier, then Grad-CAM back on the source.

    The overlay is drawn on the enhanced source (range stretch / CLAHE of the card), the image
    the model was shown before the letterbox.
    """
    config = PreprocessConfig.from_dict(classifier.card.preprocessing)
    prepared = prepare(image, config, classifier.card.input_size)
    probability = float(np.asarray(classifier.probabilities(prepared.pixels[None]))[0])
    cam = cam_to_source(gradcam(classifier, prepared.pixels), prepared.transform)
    return Explanation(probability=probability, cam=cam, overlay=overlay(enhance(image, config), cam))
