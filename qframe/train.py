"""The training loop (FP32 fine-tuning today; QAT reuses it) and evaluation.

Each epoch ends with an atomic checkpoint of model, optimizer, schedule and RNG state, so a run
killed at any moment resumes from its last finished epoch and reaches the same state as an
uninterrupted one (shuffling and augmentation are seeded per epoch).

Started by ``torchrun`` (``WORLD_SIZE`` > 1), the same loop trains with DistributedDataParallel:
each process draws its own shard of every epoch through a seeded ``DistributedSampler``,
``train.batch_size`` is the batch of one process, gradients are averaged by DDP, reported losses
and accuracies are reduced over all ranks, and only rank 0 writes checkpoints. A single process
runs exactly the loop it always did.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from qframe import distributed as dist
from qframe.errors import QFrameError, check_field_types, first_line, one_of, require_device, require_module
from qframe.utils.batches import cross_entropy, is_data_bundle, logits_of, run_batch
from qframe.utils.io import atomic_torch_save, load_checkpoint, load_model_state
from qframe.quant.frozen import frozen_weights

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """How the FP32 model is trained (or where a trained one is loaded from)."""

    epochs: int = 15
    batch_size: int = 64  # per process: under torchrun the global batch is batch_size * WORLD_SIZE
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    label_smoothing: float = 0.05
    warmup_epochs: float = 1.0
    checkpoint: Optional[str] = None  # a trained FP32 checkpoint to evaluate instead of training
    # a checkpoint of an interrupted run to continue from; on the command line "auto" (each stage its own in the
    # run directory) or a path (the FP32 stage's, or the stage whose checkpoint has that file name)
    resume: Optional[str] = None
    freeze_backbone_epochs: int = 0  # transfer learning: train only the classifier for these first epochs
    channels_last: bool = False  # model and input batches in torch.channels_last (NHWC) memory format
    bf16: bool = False  # forward pass and loss under bfloat16 autocast; weights and optimizer stay fp32
    # The schedule follows the data: at least min_steps optimizer steps (a small data set gets more
    # epochs than `epochs`), and with patience > 0 training stops once validation accuracy has not
    # improved for that many epochs, and the best epoch's weights are kept.
    min_steps: int = 0
    patience: int = 0

    def __post_init__(self):
        check_field_types(self, "train", kinds=())  # numpy's numbers become Python's; the checks below name the rest
        if self.optimizer not in OPTIMIZERS:
            raise one_of("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("epochs", "batch_size", "min_steps", "patience", "freeze_backbone_epochs"):
            value = getattr(self, name)
            least = 1 if name == "batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise QFrameError(f"train.{name}={value!r} is invalid; valid: an integer >= {least}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (self.lr > 0 and math.isfinite(self.lr)):
            raise QFrameError(f"train.lr={self.lr!r} is invalid; valid: a number > 0")
        # the ranges torch's optimizers and loss take (they would raise mid-run), and a finite warm-up
        for name, low, high, valid in (("weight_decay", 0.0, math.inf, "a number >= 0"),
                                       ("momentum", 0.0, 1.0, "a number in [0, 1]"),
                                       ("label_smoothing", 0.0, 1.0, "a number in [0, 1]"),
                                       ("warmup_epochs", 0.0, math.inf, "a number >= 0")):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and low <= value <= high and math.isfinite(value)):
                raise QFrameError(f"train.{name}={value!r} is invalid; valid: {valid}")
        if self.optimizer == "sgd" and self.momentum == 0:  # build_optimizer's SGD is Nesterov's
            raise QFrameError("train.momentum=0 is invalid with train.optimizer=sgd (Nesterov momentum); valid: a "
                              "number in (0, 1]")
        for name in ("channels_last", "bf16"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise QFrameError(f"train.{name}={value!r} is invalid; valid: true or false")


# Where a run is resumed from and its memory layout do not change what it computes; every other
# training setting does, so a checkpoint records them and resuming under other values is refused.
_NOT_RECORDED = ("checkpoint", "resume", "channels_last")


def recorded_settings(cfg: TrainConfig) -> dict:
    """The settings of ``cfg`` that a checkpoint records (see :func:`check_settings`)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_RECORDED}


def flat_settings(sections: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 0.1}, "seed": 0}`` -> ``{"train.lr": 0.1, "seed": 0}``: settings by the names the
    configuration gives them, as a checkpoint records them and a resume error shows them. numpy and
    0-d tensor numbers become Python's (a checkpoint loads with ``weights_only``)."""
    flat = {}
    for key, value in sections.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _plain(value)
    return flat


def _plain(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if not isinstance(value, (str, bytes)) and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def weights_digest(model: nn.Module) -> str:
    """A short hash of ``model``'s state (names, dtypes, shapes, values): which model a run started from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


def check_settings(saved: dict | None, current: dict, source: str, prefix: str = "train.",
                   restart: str = "choose a new hydra.run.dir to start over") -> None:
    """A one-line QFrameError when ``current`` differs from the settings ``saved`` with a checkpoint.

    Continuing a run under other settings would give a model that no single run of either produces
    (a cosine schedule of another length, another batch size): name the differences instead.
    Checkpoints written before settings were recorded (``saved`` None) pass.
    """
    if not saved:
        return
    differ = [k for k in current if k in saved and saved[k] != current[k]]
    if differ:
        was = ", ".join(f"{prefix}{k}={saved[k]!r}" for k in differ)
        now = ", ".join(f"{current[k]!r}" for k in differ)
        raise QFrameError(f"{source} was written with {was} (now {now}); resume with the settings it was written "
                          f"with, or {restart}")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
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
@frozen_weights()
def _evaluation_sums(model: nn.Module, loader, device) -> tuple[float, int, int]:
    """(summed cross-entropy, correct, images) of ``model`` over ``loader``: sums, so shards add up."""
    if is_data_bundle(loader):
        raise QFrameError("evaluation takes batches of (images, labels), got the data bundle; valid: "
                          "data.loader('test', 64)")
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for i, batch in enumerate(loader):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise QFrameError(f"evaluation batch {i} is a {type(batch).__name__}{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; "
                              "valid: (images, labels) pairs")
        x, y = batch[0].to(device), batch[1].to(device)
        logits = logits_of(run_batch(model, x, i, what="evaluation batch"))  # a dict / .logits output too
        loss_sum += cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    return loss_sum, correct, total


def _metrics(loss_sum: float, correct: float, total: float) -> dict:
    if total == 0:
        raise QFrameError("evaluation split is empty; give a data set with images in every split")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "images": int(total)}


def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu") -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``."""
    require_module(model, "qframe.evaluate")
    return _metrics(*_evaluation_sums(model, loader, require_device(device, "qframe.evaluate")))


def _evaluate_sharded(model: nn.Module, split, device) -> dict:
    """``evaluate`` over ``split`` with every rank taking every WORLD_SIZE-th image, sums reduced.

    Unlike a DistributedSampler this pads nothing, so every image counts exactly once and every
    rank gets the same result.
    """
    shard = Subset(split, range(dist.rank(), len(split), dist.world_size()))
    sums = _evaluation_sums(model, DataLoader(shard, batch_size=256, num_workers=0), device)
    total = dist.all_reduce_sum(torch.tensor(sums, dtype=torch.float64)).tolist()
    return _metrics(*total)


def _trainable(model: nn.Module) -> tuple[bool, ...]:
    """Which parameters require a gradient: DDP is built for one such set and must be re-built when it changes."""
    return tuple(p.requires_grad for p in model.parameters())


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel (sharing its parameters), or ``model`` if nothing trains."""
    if not any(p.requires_grad for p in model.parameters()):
        return model  # DDP refuses a module without trainable parameters; there is nothing to sync
    # Only the parameters that require grad now are registered, so a frozen backbone needs no
    # find_unused_parameters (which would also cost a graph traversal every step).
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=False)


_ALGORITHM_KEYS = {"momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "alpha", "centered", "lr_decay",
                   "initial_accumulator_value", "rho", "lambd", "etas", "step_sizes"}


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, source: str, optimizer_name: str) -> None:
    """``optimizer.load_state_dict`` with a one-line error for the state of another optimizer.

    torch loads an AdamW state into SGD without complaint and fails at the first step; the
    hyperparameter names of the parameter groups tell the two apart before that. ``source`` names
    the checkpoint, ``optimizer_name`` the optimizer in the error (``train.optimizer=sgd``).
    """
    # only the hyperparameters that make the algorithm: torch releases add others (fused, differentiable,
    # decoupled_weight_decay) that its load_state_dict fills in with their defaults
    saved = [set(g) & _ALGORITHM_KEYS for g in state.get("param_groups", [])]
    own = [set(g) & _ALGORITHM_KEYS for g in optimizer.param_groups]
    reason = None
    if len(saved) != len(own):
        reason = f"{len(saved)} parameter groups, the optimizer has {len(own)}"
    elif any(o != s for s, o in zip(saved, own)):
        differ = sorted(set().union(*own) ^ set().union(*saved))
        reason = "its hyperparameters are another optimizer's: " + ", ".join(differ)
    if reason is None:
        try:
            optimizer.load_state_dict(state)
        except ValueError as exc:  # other parameter counts per group
            reason = first_line(exc, 160)
    if reason is not None:
        raise QFrameError(f"resume checkpoint {source!r} holds an optimizer state that does not fit "
                          f"{optimizer_name} ({reason}); resume with the settings it was written with")


def save_training(path, model: nn.Module, optimizer, scheduler, epoch: int, history: list, settings: dict,
                  **extra) -> None:
    """An atomic checkpoint after ``epoch`` (0-based) that :func:`restore_training` continues from.

    It holds the model, optimizer, schedule, torch's RNG states (the GPUs' where CUDA is in use), the
    history and the ``settings``
    (:func:`flat_settings` names) that must not change across a resume; ``extra`` entries are stored
    beside them.
    """
    atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": torch.get_rng_state(),
                       "history": history, "settings": settings,
                       "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
                       **extra}, path)


def require_checkpoint_file(path, name: str, valid: str) -> None:
    """One line naming ``name`` (how the caller calls the path) unless ``path`` is a file."""
    if not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise QFrameError(f"{name}={str(path)!r}: that checkpoint {what}; valid: {valid}")


def restore_training(path, model: nn.Module, optimizer, scheduler, settings: dict, *, optimizer_name: str,
                     name: str = "train.resume",
                     valid: str = "'auto' (this run directory's last checkpoint, when there is one) or the path of "
                                  "a checkpoint a run wrote",
                     restart: str = "start over (on the command line in a new hydra.run.dir; in Python without resume)",
                     model_hint: str = "resume with the model and data it was written for (with train.resume=auto: "
                                       "the settings the run directory was started with)") -> dict:
    """Load a :func:`save_training` checkpoint into ``model``, ``optimizer``, ``scheduler`` and torch's RNG.

    Returns the checkpoint (``epoch``, ``history`` and the extra entries). A missing file, a file
    that is not such a checkpoint, other ``settings`` or another optimizer is a one-line
    QFrameError; ``name``, ``valid``, ``restart`` and ``model_hint`` word it for the caller (a config
    key or a function's argument).
    """
    require_checkpoint_file(path, name, valid)
    source = f"resume checkpoint {str(path)!r}"
    # every rank loads the same file, so all start from identical weights, moments and RNG state
    state = load_checkpoint(path)
    missing = {"optimizer", "scheduler", "epoch", "rng"} - set(state)
    if missing:
        raise QFrameError(f"checkpoint {str(path)!r} cannot resume training: it lacks {', '.join(sorted(missing))}")
    # a checkpoint written before settings were recorded by their full names passes, as one without any did
    check_settings(state.get("settings"), settings, source, "", restart)
    load_model_state(model, state["model"], source, f"{model_hint}, or {restart}")
    _load_optimizer_state(optimizer, state["optimizer"], str(path), optimizer_name)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) <= torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda_rng"])  # dropout draws on the GPU
    return state


def require_float32_training(model: nn.Module, desc: str) -> None:
    """A QFrameError for a model whose trained parameters are float16 / bfloat16: an optimizer step there
    underflows (AdamW's eps is 0 in float16: weights and ranges turn NaN) or vanishes (bfloat16's 8 bits)."""
    half = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                   if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)})
    if half:
        raise QFrameError(f"{desc}: the model trains {'/'.join(half)} parameters, whose optimizer steps underflow or "
                          "vanish; valid: a float32 model (model.float()); TrainConfig(bf16=True) runs the forward "
                          "under bfloat16 autocast with float32 weights")


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
    make_optimizer=None,
    settings: dict | None = None,
) -> list[dict]:
    """Train ``model`` on ``data.train`` for ``cfg.epochs`` epochs; return per-epoch history.

    ``augment(x, generator)`` transforms a training batch. ``checkpoint_path`` gets an atomic
    checkpoint after every epoch; ``cfg.resume`` continues from one. Methods hook in with
    ``on_epoch_start(epoch, model)`` and ``on_step(global_step, model)`` (called before each
    optimizer step's forward pass); both see the same epochs and steps after a resume.
    ``make_optimizer(model)`` replaces the optimizer ``cfg.optimizer`` names (RCT brings its own).
    ``settings`` (:func:`flat_settings` names) are what a checkpoint records and a resume must agree
    with; default: ``cfg``'s training settings and ``seed``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is created if needed, ``model`` is
    trained through DistributedDataParallel (it is updated in place and stays the object the hooks
    and checkpoints see), each rank trains on its own shard of ``cfg.batch_size`` batches, the
    history holds metrics over all ranks, and only rank 0 writes ``checkpoint_path``. A bare
    ``cuda`` device becomes ``cuda:LOCAL_RANK``.
    """
    require_float32_training(model, desc)
    distributed = dist.init_if_needed(device)
    device = dist.local_device(device) if distributed else torch.device(device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if make_optimizer is not None and distributed:
        raise QFrameError("this training method does not support distributed training; run it in one process")
    optimizer = make_optimizer(model) if make_optimizer is not None else build_optimizer(model, cfg)
    if distributed:
        # One sampler for the whole run: set_epoch reseeds it, so every rank draws a disjoint,
        # equally long shard of the same per-epoch permutation (seeded as the single-process one).
        sampler = DistributedSampler(data.split("train"), num_replicas=dist.world_size(), rank=dist.rank(),
                                     shuffle=True, seed=seed * 100_003, drop_last=True)
        shard_loader = DataLoader(data.split("train"), batch_size=cfg.batch_size, sampler=sampler,
                                  drop_last=True, num_workers=0)
        steps = len(shard_loader)
        if steps == 0:
            raise QFrameError(f"train split has fewer images than train.batch_size={cfg.batch_size} times "
                              f"{dist.world_size()} processes; lower the batch size")
    else:
        steps = len(data.loader("train", cfg.batch_size, shuffle=True, seed=seed, drop_last=True))
        if steps == 0:
            raise QFrameError(f"train split has fewer images than train.batch_size={cfg.batch_size}; lower the batch size")
    epochs = schedule_epochs(cfg, steps)
    if epochs > cfg.epochs and dist.is_main():
        log.info("%s: %d steps per epoch; training %d epochs (train.min_steps=%d) instead of %d", desc, steps, epochs,
                 cfg.min_steps, cfg.epochs)
    scheduler = warmup_cosine(optimizer, epochs * steps, int(cfg.warmup_epochs * steps))
    best = {"epoch": 0, "accuracy": -1.0, "state": None}
    history: list[dict] = []
    start = 0
    if settings is None:
        settings = flat_settings({"train": recorded_settings(cfg), "seed": seed})
    if cfg.resume:
        state = restore_training(cfg.resume, model, optimizer, scheduler, settings,
                                 optimizer_name=f"train.optimizer={cfg.optimizer}")
        history, start = list(state.get("history", [])), state["epoch"] + 1
        best = state.get("best", best)
        if cfg.patience and best["epoch"] and start - best["epoch"] >= cfg.patience:
            start = epochs  # the run had stopped early (train.patience): its next step was keeping the best epoch
        if dist.is_main() and start < epochs:
            log.info("resuming %s from %s at epoch %d/%d", desc, cfg.resume, start + 1, epochs)
        elif dist.is_main():
            log.info("%s: %s holds a finished run; nothing left to train", desc, cfg.resume)
    val_loader = None if distributed else data.loader("val", 256)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    head = _classifier_params(model) if cfg.freeze_backbone_epochs else set()
    # bf16 autocast covers forward and loss only; backward follows the autocast graph and the
    # optimizer updates the fp32 master weights
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.bf16 else contextlib.nullcontext
    train_model, wrapped_for = model, None  # the DDP wrapper and the trainable set it was built for
    for epoch in range(start, epochs):
        if head:
            frozen = epoch < cfg.freeze_backbone_epochs
            for p in model.parameters():
                p.requires_grad_(id(p) in head or not frozen)
        if on_epoch_start is not None:
            on_epoch_start(epoch, model)
        model.train()
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch + 1_000_003 * dist.rank())
        if distributed:
            sampler.set_epoch(epoch)
            loader = shard_loader
        else:
            loader = data.loader("train", cfg.batch_size, shuffle=True, seed=seed * 100_003 + epoch, drop_last=True)
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=None if dist.is_main() else True)
        loss_sum = correct = seen = 0.0
        for i, (x, y) in enumerate(bar):
            if on_step is not None:
                on_step(epoch * steps + i, model)
            if distributed and _trainable(model) != wrapped_for:
                # freezing (or a hook) changed which parameters train: DDP's reducer expects a
                # gradient for every parameter it registered, so build a wrapper for the new set
                # (every rank changes it at the same step, as required by the collective inside)
                train_model = model  # drop the old wrapper first: its reducer's gradient hooks go with it
                train_model = _wrap_ddp(model, device)
                wrapped_for = _trainable(model)
                train_model.train()
            x, y = x.to(device), y.to(device)
            if augment is not None:
                x = augment(x, generator)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                logits = train_model(x)
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
        if distributed:
            loss_sum, correct, seen = dist.all_reduce_sum(torch.tensor([loss_sum, correct, seen], dtype=torch.float64)).tolist()
            # each rank updated BatchNorm statistics on its own shard; adopt rank 0's (as DDP's next
            # forward would) so evaluation and the checkpoint are the same everywhere
            dist.broadcast_buffers(model)
            val = _evaluate_sharded(model, data.split("val"), device)
        else:
            val = evaluate(model, val_loader, device)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": 100 * correct / seen,
                        "val_accuracy": val["accuracy"], "val_loss": val["loss"]})
        (log.info if dist.is_main() else log.debug)(
            "%s epoch %d/%d: loss %.4f, train acc %.2f%%, val acc %.2f%%", desc, epoch + 1, epochs,
            loss_sum / seen, 100 * correct / seen, val["accuracy"])
        if cfg.patience and val["accuracy"] > best["accuracy"]:
            best = {"epoch": epoch + 1, "accuracy": val["accuracy"],
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        stop = bool(cfg.patience) and epoch + 1 - best["epoch"] >= cfg.patience
        if checkpoint_path is not None:
            if dist.is_main():
                save_training(checkpoint_path, model, optimizer, scheduler, epoch, history, settings, best=best)
            # the others wait, so no rank runs ahead (or resumes) while rank 0 is still writing
            dist.barrier()
        if stop:
            (log.info if dist.is_main() else log.debug)(
                "%s: validation accuracy has not improved for %d epochs (train.patience); stopping", desc, cfg.patience)
            break
    if cfg.patience and best["state"] is not None:
        model.load_state_dict(best["state"])
        (log.info if dist.is_main() else log.debug)("%s: keeping epoch %d's weights (val acc %.2f%%)", desc,
                                                    best["epoch"], best["accuracy"])
    return history


def schedule_epochs(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """``cfg.epochs``, or more where that gives fewer than ``cfg.min_steps`` optimizer steps."""
    if cfg.min_steps and steps_per_epoch:
        return max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    return cfg.epochs
