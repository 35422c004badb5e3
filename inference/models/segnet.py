"""The fracture-map network: a small U-Net-like decoder on a torchvision encoder, from scratch.

The encoder is torchvision's MobileNetV3-Small or ResNet18 (``weights=None``, one-channel stem,
the input normalisation of :class:`inference.models.backbones.GreyNet`). A light feature-pyramid
decoder merges the stride-4, 8, 16 and 32 features into one map at stride 4, and a second head
reads the deepest features for an image-level logit (multi-task: the map teaches *where*, the
image head *whether*). :meth:`SegNet.forward` returns both: ``(map_logits (N, 1, S/4, S/4),
image_logits (N,))``; :meth:`SegNet.map_logits` upsamples the map to the input size.

Errors::

    BackboneError (inference.models.backbones)   an unknown architecture name
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from inference.models.backbones import PIXEL_MEAN, PIXEL_STD, BackboneError

SEGMENTER_BACKBONES: tuple[str, ...] = ("mobilenet_v3_small", "resnet18")
DECODER_CHANNELS = 64


def _conv(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class _MobileNetEncoder(nn.Module):
    """Stride-4/8/16/32 features of MobileNetV3-Small (16, 24, 48, 576 channels)."""

    channels = (16, 24, 48, 576)
    taps = (1, 3, 8, 12)

    def __init__(self) -> None:
        super().__init__()
        net = models.mobilenet_v3_small(weights=None)
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(1, stem.out_channels, 3, stride=2, padding=1, bias=False)
        self.features = net.features
        for module in self.features.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                out.append(x)
        return out


class _ResNetEncoder(nn.Module):
    """Stride-4/8/16/32 features of ResNet18 (64, 128, 256, 512 channels)."""

    channels = (64, 128, 256, 512)

    def __init__(self) -> None:
        super().__init__()
        net = models.resnet18(weights=None)
        net.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layers = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        out: list[torch.Tensor] = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class SegNet(nn.Module):
    """Fracture map (stride 4) and image logit from ``(N, 1, S, S)`` pixels in [0, 1]."""

    def __init__(self, architecture: str = "mobilenet_v3_small") -> None:
        super().__init__()
        if architecture not in SEGMENTER_BACKBONES:
            raise BackboneError(
                f"unknown segmenter backbone {architecture!r}; choose one of {', '.join(SEGMENTER_BACKBONES)}"
            )
        self.architecture = architecture
        self.encoder: _MobileNetEncoder | _ResNetEncoder = (
            _MobileNetEncoder() if architecture == "mobilenet_v3_small" else _ResNetEncoder()
        )
        c = DECODER_CHANNELS
        self.lateral = nn.ModuleList([nn.Conv2d(ch, c, 1) for ch in self.encoder.channels])
        self.smooth = nn.ModuleList([_conv(c, c) for _ in self.encoder.channels[:-1]])
        self.head = nn.Sequential(_conv(c, c), nn.Conv2d(c, 1, 1))
        self.image_head = nn.Linear(self.encoder.channels[-1] + c, 1)
        # Start the map near "no fracture anywhere" (a prior of ~1 %), as detection heads do.
        final = self.head[-1]
        assert isinstance(final, nn.Conv2d) and final.bias is not None
        nn.init.constant_(final.bias, -4.6)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.dim() == 3:
            pixels = pixels.unsqueeze(1)
        features = self.encoder((pixels - PIXEL_MEAN) / PIXEL_STD)
        top = self.lateral[-1](features[-1])
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            top = F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            top = self.smooth[level](lateral + top)
        map_logits: torch.Tensor = self.head(top)
        pooled = torch.cat(
            [features[-1].mean(dim=(2, 3)), top.amax(dim=(2, 3))],
            dim=1,
        )
        image_logits: torch.Tensor = self.image_head(pooled)[:, 0]
        return map_logits, image_logits

    def map_logits(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The map upsampled to the input size ``(N, S, S)`` and the image logits ``(N,)``."""
        coarse, image = self(pixels)
        size = pixels.shape[-2:]
        full = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[:, 0]
        return full, image
