"""Names of the architectures the trainers build; importable without torch (for the CLI)."""

from __future__ import annotations

BACKBONES: tuple[str, ...] = ("mobilenet_v3_small", "resnet18", "efficientnet_b0")
YOLO_VARIANTS: tuple[str, ...] = ("n", "s", "m")
SEGMENTER_BACKBONES: tuple[str, ...] = ("mobilenet_v3_small", "resnet18")  # inference.models.segnet
