"""The training loop (FP32 fine-tuning today; QAT reuses it) and evaluation.

Each epoch ends with an atomic checkpoint of model, optimizer, schedule and RNG state, so a run
killed at any moment resumes from its last finished epoch and reaches the same state as an
uninterrupted one (shuffling and augmentation are seeded per epoch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from qframe.errors import QFrameError, one_of
from qframe.utils.io import atomic_torch_save, load_checkpoint

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """How the FP32 model is trained (or where a trained one is loaded from)."""

    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.05
    warmup_epochs: float = 1.0
    checkpoint: Optional[str] = None  # a trained FP32 checkpoint to evaluate instead of training
    resume: Optional[str] = None  # a checkpoint of an interrupted run to continue from
    freeze_backbone_epochs: int = 0  # transfer learning: train only the classifier for these first epochs

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise one_of("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "epochs" else 1):
                raise QFrameError(f"train.{name}={value!r} is invalid; valid: an integer >= {0 if name == 'epochs' else 1}")
        if not self.lr > 0:
            raise QFrameError(f"train.lr={self.lr!r} is invalid; valid: a number > 0")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up, then cosine decay to zero, stepped once per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _classifier_params(model: nn.Module) -> set[int]:
    """ids of the parameters of the last nn.Linear (the head a transfer-learning run trains first)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise QFrameError("train.freeze_backbone_epochs needs a model with an nn.Linear classifier")
    return {id(p) for p in linears[-1].parameters()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    if total == 0:
        raise QFrameError("evaluation split is empty; give a data set with images in every split")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "images": total}


def fit(
    model: nn.Module,
    data,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    checkpoint_path: str | Path | None = None,
    augment=None,
    desc: str = "train",
    on_epoch_start=None,
    on_step=None,
) -> list[dict]:
    """Train ``model`` on ``data.train`` for ``cfg.epochs`` epochs; return per-epoch history.

    ``augment(x, generator)`` transforms a training batch. ``checkpoint_path`` gets an atomic
    checkpoint after every epoch; ``cfg.resume`` continues from one. Methods hook in with
    ``on_epoch_start(epoch, model)`` and ``on_step(global_step, model)`` (called before each
    optimizer step's forward pass); both see the same epochs and steps after a resume.
    """
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    steps = len(data.loader("train", cfg.batch_size, shuffle=True, seed=seed, drop_last=True))
    if steps == 0:
        raise QFrameError(f"train split has fewer images than train.batch_size={cfg.batch_size}; lower the batch size")
    scheduler = warmup_cosine(optimizer, cfg.epochs * steps, int(cfg.warmup_epochs * steps))
    history: list[dict] = []
    start = 0
    if cfg.resume:
        state = load_checkpoint(cfg.resume)
        missing = {"optimizer", "scheduler", "epoch", "rng"} - set(state)
        if missing:
            raise QFrameError(f"checkpoint {cfg.resume!r} cannot resume training: it lacks {', '.join(sorted(missing))}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        history, start = list(state.get("history", [])), state["epoch"] + 1
        log.info("resuming %s from %s at epoch %d/%d", desc, cfg.resume, start + 1, cfg.epochs)
    val_loader = data.loader("val", 256)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    head = _classifier_params(model) if cfg.freeze_backbone_epochs else set()
    for epoch in range(start, cfg.epochs):
        if head:
            frozen = epoch < cfg.freeze_backbone_epochs
            for p in model.parameters():
                p.requires_grad_(id(p) in head or not frozen)
        if on_epoch_start is not None:
            on_epoch_start(epoch, model)
        model.train()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = data.loader("train", cfg.batch_size, shuffle=True, seed=seed * 100_003 + epoch, drop_last=True)
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, disable=None)
        loss_sum = correct = seen = 0.0
        for i, (x, y) in enumerate(bar):
            if on_step is not None:
                on_step(epoch * steps + i, model)
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x, generator)
            logits = model(x)
            loss = criterion(logits, y)
            if not torch.isfinite(loss):
                raise QFrameError(f"training diverged at epoch {epoch + 1}: loss is {loss.item()}; lower train.lr={cfg.lr}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            seen += y.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        val = evaluate(model, val_loader, device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": 100 * correct / seen,
                        "val_accuracy": val["accuracy"], "val_loss": val["loss"]})
        log.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%, val acc %.2f%%", desc, epoch + 1, cfg.epochs,
                 loss_sum / seen, 100 * correct / seen, val["accuracy"])
        if checkpoint_path is not None:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": torch.get_rng_state(),
                               "history": history}, checkpoint_path)
    return history
