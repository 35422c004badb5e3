"""Training-time augmentation, applied on whole batches of prepared pixels in torch.

The transforms of the seeds: horizontal and vertical flips, small rotations, scale jitter and
small shifts (one affine warp), and the "grey-level" transforms (brightness, contrast, gamma).
They act on letterboxed pixels in [0, 1], after :func:`inference.pixels.prepare`, so serving
needs none of them. A ``torch.Generator`` makes every draw reproducible from the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    hflip: float = 0.5  # probability
    vflip: float = 0.1
    rotation_deg: float = 10.0  # uniform in [-r, r]
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05  # fraction of the size, uniform in [-s, s]
    brightness: float = 0.08  # additive, uniform in [-b, b]
    contrast: tuple[float, float] = (0.8, 1.25)
    gamma: tuple[float, float] = (0.7, 1.4)

    def as_dict(self) -> dict[str, object]:
        return {
            "hflip": self.hflip,
            "vflip": self.vflip,
            "rotation_deg": self.rotation_deg,
            "scale": list(self.scale),
            "shift": self.shift,
            "brightness": self.brightness,
            "contrast": list(self.contrast),
            "gamma": list(self.gamma),
        }


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment(
    batch: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Augment ``(N, 1, S, S)`` pixels in [0, 1]; the random draws come from ``generator`` (CPU).

    With ``masks`` (``(N, 1, S, S)``, a fracture map per image), use :func:`augment_with_masks`.
    """
    return augment_with_masks(batch, config, generator, masks)[0]


def augment_with_masks(
    batch: torch.Tensor,
    config: AugmentConfig,
    generator: torch.Generator,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`augment`, and the same geometric warp applied to ``masks`` (no grey-level change)."""
    n = batch.shape[0]
    angle = _uniform(n, -config.rotation_deg, config.rotation_deg, generator) * (math.pi / 180.0)
    scale = _uniform(n, config.scale[0], config.scale[1], generator)
    flip_x = torch.where(torch.rand(n, generator=generator) < config.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < config.vflip, -1.0, 1.0)
    shift = _uniform(2 * n, -2 * config.shift, 2 * config.shift, generator).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = cos * flip_x
    theta[:, 0, 1] = -sin * flip_y
    theta[:, 1, 0] = sin * flip_x
    theta[:, 1, 1] = cos * flip_y
    theta[:, :, 2] = shift
    theta = theta.to(batch.device, batch.dtype)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_masks = None
    if masks is not None:
        warped_masks = F.grid_sample(
            masks.to(batch.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )

    def per_image(values: torch.Tensor) -> torch.Tensor:
        return values.to(batch.device, batch.dtype).view(n, 1, 1, 1)

    gamma = per_image(_uniform(n, config.gamma[0], config.gamma[1], generator))
    contrast = per_image(_uniform(n, config.contrast[0], config.contrast[1], generator))
    brightness = per_image(_uniform(n, -config.brightness, config.brightness, generator))
    out = out.clamp(0.0, 1.0).pow(gamma)
    mean = out.mean(dim=(2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    return out.clamp(0.0, 1.0), warped_masks
