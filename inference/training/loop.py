"""The supervised training loop shared by the fracture classifier and the region classifier.

From uint8 prepared pixels in memory: augmentation on the batch, class weighting or balanced
sampling, AdamW with a linear warm-up and a cosine schedule, early stopping on the score of a
held-apart early-stopping set (AUROC for one output, balanced accuracy for several), CUDA with
automatic mixed precision when present, and a checkpoint after every epoch so that a stopped
run resumes where it was. Every random draw comes from the seed and the epoch number, so a run
and its resumption draw the same batches.

Errors::

    TrainingError           an empty set, one class only, a checkpoint of another run
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn
from tqdm import tqdm

from inference.calibration import CalibrationError, auroc
from inference.models.backbones import GreyNet
from inference.training.augment import AugmentConfig, augment

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot start or resume (no data, one class, a mismatched checkpoint)."""


@dataclass(frozen=True, slots=True)
class LoopConfig:
    backbone: str = "mobilenet_v3_small"
    epochs: int = 20
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    patience: int = 6  # epochs without a better early-stopping score
    # "undersample": each epoch takes every minority image and a fresh random draw of the others
    # (binary: ``negatives_per_positive`` per positive; several classes: at most ``class_cap`` per
    # class), the loss weighted for what is left; "weight": all images, weighted loss;
    # "sample": balanced sampling with replacement; "none".
    balance: str = "undersample"
    negatives_per_positive: float = 2.0
    class_cap: int = 250
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    eval_batch: int = 64
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["augment"] = self.augment.as_dict()
        return data


@dataclass(frozen=True, slots=True)
class FitResult:
    module: GreyNet  # best weights, eval mode, on CPU
    best_epoch: int  # 1-based
    best_score: float
    epochs_run: int
    history: tuple[dict[str, float], ...]
    seconds: float
    device: str


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide the weights; where and how fast they run do not."""
    return {k: v for k, v in config.items() if k not in ("device", "threads", "eval_batch")}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("CUDA was asked for but is not available")
    return torch.device(device)


def predict_logits(
    module: nn.Module, pixels: NDArray[np.uint8] | NDArray[np.float32], device: torch.device, batch: int = 64
) -> NDArray[np.float32]:
    """Logits of ``module`` for (N, S, S) pixels (uint8 0-255 or float 0-1), shape (N, K)."""
    module.eval()
    scale = 255.0 if pixels.dtype == np.uint8 else 1.0
    out: list[NDArray[np.float32]] = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch])).to(device)
            x = (chunk.float() / scale).unsqueeze(1)
            out.append(module(x).float().cpu().numpy())
    if not out:
        return np.zeros((0, getattr(module, "outputs", 1)), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def binary_score(targets: NDArray[np.int64], logits: NDArray[np.float32]) -> float:
    try:
        return auroc(targets, logits[:, 0])
    except CalibrationError:
        return float("nan")


def balanced_accuracy(targets: NDArray[np.int64], logits: NDArray[np.float32]) -> float:
    predicted = logits.argmax(axis=1)
    recalls = [float((predicted[targets == k] == k).mean()) for k in np.unique(targets)]
    return float(np.mean(recalls)) if recalls else float("nan")


def _class_counts(targets: NDArray[np.int64], classes: int) -> NDArray[np.float64]:
    return np.bincount(targets, minlength=max(classes, 2)).astype(np.float64)


def _epoch_counts(targets: NDArray[np.int64], outputs: int, config: LoopConfig) -> NDArray[np.float64]:
    """How many images of each class one epoch draws."""
    counts = _class_counts(targets, outputs)
    if config.balance != "undersample":
        return counts
    if outputs == 1:
        return np.array([min(counts[0], math.ceil(config.negatives_per_positive * counts[1])), counts[1]])
    return np.minimum(counts, float(config.class_cap))


def _loss(targets: NDArray[np.int64], outputs: int, config: LoopConfig, device: torch.device) -> nn.Module:
    counts = _epoch_counts(targets, outputs, config)
    weighted = config.balance in ("weight", "undersample")
    if outputs == 1:
        weight = counts[0] / max(counts[1], 1.0) if weighted else 1.0
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor([weight], device=device))
    if weighted:
        weights = counts.sum() / (outputs * np.maximum(counts[:outputs], 1.0))
        return nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32, device=device))
    return nn.CrossEntropyLoss()


def _order(targets: NDArray[np.int64], outputs: int, config: LoopConfig, epoch: int) -> NDArray[np.int64]:
    """The image indices of one epoch, in order; a pure function of the seed and the epoch."""
    rng = np.random.default_rng([config.seed, epoch])
    balance = config.balance
    if balance == "undersample":
        take = _epoch_counts(targets, outputs, config)
        chosen = []
        for value in range(len(take)):
            members = np.flatnonzero(targets == value)
            chosen.append(rng.choice(members, size=int(min(take[value], members.size)), replace=False))
        return rng.permutation(np.concatenate(chosen)).astype(np.int64)
    if balance != "sample":
        return rng.permutation(targets.size).astype(np.int64)
    counts = np.bincount(targets).astype(np.float64)
    weights = 1.0 / counts[targets]
    return rng.choice(targets.size, size=targets.size, replace=True, p=weights / weights.sum()).astype(
        np.int64
    )


def save_checkpoint(checkpoint: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (a temporary file renamed over the old one), so a
    run stopped mid-write resumes from the previous epoch."""
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    temporary = checkpoint.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(checkpoint)


def fit(
    train_pixels: NDArray[np.uint8],
    train_targets: NDArray[np.int64],
    stop_pixels: NDArray[np.uint8],
    stop_targets: NDArray[np.int64],
    outputs: int,
    config: LoopConfig,
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FitResult:
    """Train a :class:`GreyNet` and return the weights of the epoch with the best stopping score.

    ``outputs`` 1: binary targets 0/1 with a sigmoid output; otherwise class indices.
    """
    if len(train_targets) == 0 or len(stop_targets) == 0:
        raise TrainingError("the training and the early-stopping sets must not be empty")
    if outputs == 1 and len(np.unique(train_targets)) < 2:
        raise TrainingError("the training set holds one class only")
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % (2**32))
    module = GreyNet(config.backbone, outputs).to(device)
    optimiser = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = int(_epoch_counts(train_targets, outputs, config).sum())
    steps_per_epoch = math.ceil(per_epoch / config.batch)
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(config.warmup_epochs * steps_per_epoch, total // 2)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = _loss(train_targets, outputs, config, device)
    score: Callable[[NDArray[np.int64], NDArray[np.float32]], float] = (
        binary_score if outputs == 1 else balanced_accuracy
    )

    start_epoch = 0
    best_score = -math.inf
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = copy.deepcopy(module.state_dict())
    history: list[dict[str, float]] = []
    elapsed = 0.0
    if resume and checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if (
            _identity(state.get("config", {})) != _identity(config.as_dict())
            or state.get("outputs") != outputs
        ):
            raise TrainingError(
                f"{checkpoint} belongs to a run with other settings; remove it or drop --resume"
            )
        module.load_state_dict(state["module"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"])
        best_score, best_epoch = float(state["best_score"]), int(state["best_epoch"])
        best_state = state["best_state"]
        history = list(state["history"])
        elapsed = float(state["seconds"])
        log.info("resumed from %s after epoch %d", checkpoint, start_epoch)

    pixels_t = torch.from_numpy(train_pixels)
    targets_t = torch.from_numpy(train_targets)
    began = time.monotonic() - elapsed
    for epoch in range(start_epoch, config.epochs):
        if epoch - best_epoch >= config.patience and best_epoch > 0:
            log.info("early stop after epoch %d (best %d)", epoch, best_epoch)
            break
        module.train()
        order = torch.from_numpy(_order(train_targets, outputs, config, epoch))
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        running, seen = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            mininterval=10,
            leave=False,
        )
        for step in bar:
            index = order[step * config.batch : (step + 1) * config.batch]
            if len(index) < 2:
                continue  # BatchNorm cannot train on one image
            x = (pixels_t[index].float() / 255.0).unsqueeze(1)
            x = augment(x, config.augment, generator).to(device, non_blocking=True)
            y = targets_t[index].to(device)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                out = module(x)
                loss = criterion(out[:, 0], y.float()) if outputs == 1 else criterion(out, y)
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            scheduler.step()
            running += float(loss.detach()) * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{running / seen:.4f}", refresh=False)
        bar.close()
        stop_logits = predict_logits(module, stop_pixels, device, config.eval_batch)
        value = score(stop_targets, stop_logits)
        record = {
            "epoch": epoch + 1,
            "loss": running / max(seen, 1),
            "stop_score": value,
            "seconds": time.monotonic() - began,
        }
        history.append(record)
        improved = not math.isnan(value) and value > best_score
        if improved:
            best_score, best_epoch = value, epoch + 1
            best_state = copy.deepcopy(module.state_dict())
        log.info(
            "epoch %d/%d loss %.4f stop score %.4f%s (%.0f s)",
            epoch + 1,
            config.epochs,
            record["loss"],
            value,
            " best" if improved else "",
            record["seconds"],
        )
        if checkpoint is not None:
            save_checkpoint(
                checkpoint,
                {
                    "config": config.as_dict(),
                    "outputs": outputs,
                    "module": module.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "best_state": best_state,
                    "history": history,
                    "seconds": time.monotonic() - began,
                },
            )
    module.load_state_dict(best_state)
    module = module.cpu().eval()
    return FitResult(
        module=module,
        best_epoch=best_epoch,
        best_score=best_score,
        epochs_run=len(history),
        history=tuple(history),
        seconds=time.monotonic() - began,
        device=str(device),
    )
