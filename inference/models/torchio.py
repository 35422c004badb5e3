"""Saving and loading the weights of the torchvision models of a package.

Weights are a plain ``state_dict`` in ``model.pt``, floating tensors stored as float16 to halve
the bundle (the networks run in float32; the rounding moves logits by about 1e-3). Loading uses
``torch.load(weights_only=True)``: a package never runs pickled code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from inference.models import ModelLoadError
from inference.models.backbones import BackboneError, GreyNet
from inference.packages import ModelPackage

WEIGHTS_FILE = "model.pt"


def save_weights(module: torch.nn.Module, path: Path, half: bool = True) -> Path:
    state = {
        key: (value.detach().cpu().half() if half and value.is_floating_point() else value.detach().cpu())
        for key, value in module.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def select_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}") from exc


def load_greynet(package: ModelPackage, outputs: int, device: torch.device) -> GreyNet:
    """The package's network with its weights, in eval mode on ``device``."""
    path = package.weight_path(WEIGHTS_FILE if WEIGHTS_FILE in package.card.weights else None)
    try:
        module = GreyNet(package.card.architecture, outputs)
    except BackboneError as exc:
        raise ModelLoadError(str(exc), package.path) from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (RuntimeError, OSError, AttributeError) as exc:
        raise ModelLoadError(f"weights do not fit {package.card.architecture}: {exc}", package.path) from exc
    return module.to(device).eval()
