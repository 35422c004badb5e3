"""The torchvision backbones, built without pretrained weights and with a one-channel stem.

No weights can be downloaded here, so every network starts from random initialisation
(``weights=None``). Radiographs are grey: the first convolution takes one channel instead of
three. :class:`GreyNet` wraps the backbone with the input normalisation, so the module takes the
prepared pixels of :func:`inference.pixels.prepare` as they are, ``(N, 1, S, S)`` in [0, 1].

Errors::

    BackboneError           an unknown architecture name
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models

from inference.models.catalog import BACKBONES

# Radiograph pixels after range stretching spread over [0, 1]; centre them for the first conv.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


__all__ = ["BACKBONES", "BackboneError", "GreyNet"]


class BackboneError(ValueError):
    """An architecture name this module cannot build."""


def _grey_stem(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(
        1,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


def _mobilenet(outputs: int) -> tuple[nn.Module, nn.Module]:
    net = models.mobilenet_v3_small(weights=None, num_classes=outputs)
    net.features[0][0] = _grey_stem(net.features[0][0])
    return net, net.features[-1]


def _resnet(outputs: int) -> tuple[nn.Module, nn.Module]:
    net = models.resnet18(weights=None, num_classes=outputs)
    net.conv1 = _grey_stem(net.conv1)
    return net, net.layer4


def _efficientnet(outputs: int) -> tuple[nn.Module, nn.Module]:
    net = models.efficientnet_b0(weights=None, num_classes=outputs)
    net.features[0][0] = _grey_stem(net.features[0][0])
    return net, net.features[-1]


_BUILDERS: dict[str, Callable[[int], tuple[nn.Module, nn.Module]]] = {
    "mobilenet_v3_small": _mobilenet,
    "resnet18": _resnet,
    "efficientnet_b0": _efficientnet,
}


class GreyNet(nn.Module):
    """A backbone that takes ``(N, 1, S, S)`` or ``(N, S, S)`` pixels in [0, 1] and returns logits.

    ``target_layer`` is the last convolutional block, the usual Grad-CAM target.
    """

    def __init__(self, architecture: str, outputs: int) -> None:
        super().__init__()
        if architecture not in _BUILDERS:
            raise BackboneError(f"unknown backbone {architecture!r}; choose one of {', '.join(BACKBONES)}")
        self.architecture = architecture
        self.outputs = outputs
        self.backbone, self.target_layer = _BUILDERS[architecture](outputs)
        # torchvision's MobileNetV3 keeps BatchNorm statistics with momentum 0.01, tuned for long
        # ImageNet runs; short from-scratch runs need the running statistics to catch up faster.
        for module in self.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(1)
        out: torch.Tensor = self.backbone((pixels - PIXEL_MEAN) / PIXEL_STD)
        return out
