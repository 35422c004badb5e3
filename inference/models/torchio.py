"""Saving and loading the weights of the torchvision models of a package.

Weights are a plain ``state_dict`` in ``model.pt``, floating tensors stored as float16 to halve
the bundle (the networks run in float32; the rounding moves logits by about 1e-3). Loading uses
``torch.load(weights_only=True)``: a package never runs pickled code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

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


def forward_batched(
    module: torch.nn.Module, array: NDArray[np.float32], device: torch.device, batch_size: int, outputs: int
) -> NDArray[np.float32]:
    """Logits of a prepared (N, S, S) array in chunks of ``batch_size``, shape (N, outputs)."""
    out: list[NDArray[np.float32]] = []
    with torch.inference_mode():
        for start in range(0, len(array), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size])).to(device)
            out.append(module(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, outputs), dtype=np.float32)
