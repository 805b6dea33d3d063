"""The training loop, as small functions: a :class:`Trainer` (model, weighted loss, SGD,
LR/10 on plateaus, mixed precision, DDP) whose :meth:`Trainer.step` is one update;
:func:`train_one_epoch`, :func:`validate` and :func:`fit`, which runs epochs until the
stopping rule and hands each epoch's record to the caller (who writes the run folder)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from cxr.config import TrainConfig
from cxr.data.loaders import EpochSampler
from cxr.engine.inference import predict_outputs
from cxr.errors import ModelError
from cxr.metrics import auroc_per_class, mean_defined, probabilities
from cxr.model.loss import WeightedBCELoss
from cxr.model.network import unwrap
from cxr.model.registry import freeze_backbone
from cxr.runtime import Distributed, mixed_precision, precision_name, rng_state, set_rng_state

CheckpointDict = dict[str, Any]


class TrainCallbacks:
    """Hooks through which a caller (the CLI) shows progress; library code never prints."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_epoch_start(self, epoch: int, max_epochs: int, steps: int) -> None: ...
    def on_step(self, step: int, steps: int, loss: float, images_per_s: float) -> None: ...
    def on_validation_start(self, images: int) -> None: ...
    def on_validation_step(self, images: int) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Everything besides the weights that a resume needs (stored in checkpoint.pt)."""

    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf
    best_epoch: int = -1
    lr_reductions: int = 0
    stopped: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Validation:
    """One pass over the validation split: its loss, probabilities and per-class AUROC."""

    loss: float
    probabilities: np.ndarray
    auroc: list[float | None]
    features: np.ndarray | None = None  # pooled features [N, 1024]: the OOD summary's input


@dataclass
class Trainer:
    """The model being trained and everything that updates it."""

    model: nn.Module  # the plain model: validated, saved
    train_model: nn.Module  # what a step runs: the model, wrapped by DDP and/or compiled
    loss_fn: WeightedBCELoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    amp_dtype: torch.dtype
    channels_last: bool
    dist: Distributed

    @classmethod
    def create(
        cls,
        model: nn.Module,
        config: TrainConfig,
        train_labels: np.ndarray,
        device: torch.device,
        dist: Distributed | None = None,
        *,
        masked: bool = False,
    ) -> Trainer:
        """The method: class-weighted BCE from the training labels, SGD with momentum,
        ReduceLROnPlateau on the validation loss, autocast where the hardware has it.
        ``masked``: validation labels hold unknowns even if the training labels do not.
        With ``config.freeze_backbone`` only the classifier learns (linear probing)."""
        dist = dist or Distributed()
        model.to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        loss_fn = WeightedBCELoss.from_labels(train_labels).to(device)
        loss_fn.masked = loss_fn.masked or masked
        if config.freeze_backbone:
            freeze_backbone(model)
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.lr_factor, patience=config.plateau_patience
        )
        amp, amp_dtype = mixed_precision(config.amp, device)
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
        train_model = model
        if dist.enabled:
            index = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=index)
        if config.compile:
            train_model = torch.compile(train_model)
        return cls(
            model, train_model, loss_fn, optimizer, scheduler, scaler, device, amp, amp_dtype,
            config.channels_last, dist,
        )  # fmt: skip

    @property
    def precision(self) -> str:
        return precision_name(self.amp, self.amp_dtype)

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One training step on a batch; returns the batch's (detached) loss."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            logits = self.train_model(images)
        loss = self.loss_fn(logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def checkpoint(self, state: TrainState, config: TrainConfig) -> CheckpointDict:
        """What ``checkpoint.pt`` holds: enough to resume exactly where this epoch ended."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "state": state.__dict__,
            "rng": rng_state(),
            "config": config.to_dict(),
        }

    def restore(self, checkpoint: CheckpointDict) -> TrainState:
        """Load a checkpoint's optimiser, scheduler, scaler and RNG; return its state."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint.get("rng", {}))
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        return TrainState(**checkpoint["state"])


def load_checkpoint(path) -> CheckpointDict:
    """A ``checkpoint.pt``, read without unpickling code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot load checkpoint ({exc.__class__.__name__}); it is damaged or not "
            "a cxr checkpoint, and files that would run code are refused"
        ) from None


def train_one_epoch(
    trainer: Trainer,
    loader: DataLoader,
    sampler: EpochSampler,
    epoch: int,
    max_epochs: int,
    callbacks: TrainCallbacks,
) -> tuple[float, float]:
    """One pass over the training split (shuffled for ``epoch``): (mean loss, images/s),
    both over every rank."""
    sampler.set_epoch(epoch)
    trainer.train_model.train()
    features = getattr(unwrap(trainer.model), "features", None)
    if features is not None and not any(p.requires_grad for p in features.parameters()):
        # A frozen backbone keeps its batch-norm statistics too (linear probing).
        features.eval()
    steps = len(loader)
    callbacks.on_epoch_start(epoch + 1, max_epochs, steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
    seen = 0
    clock = time.perf_counter()
    for step, (images, targets, _indices) in enumerate(loader, start=1):
        loss = trainer.step(images, targets)
        loss_sum += loss.double() * len(images)
        seen += len(images)
        if step == steps or step % 5 == 0:
            elapsed = time.perf_counter() - clock
            rate = seen * trainer.dist.world_size / max(elapsed, 1e-9)
            callbacks.on_step(step, steps, float(loss_sum.item() / max(seen, 1)), rate)
    seconds = time.perf_counter() - clock
    totals = trainer.dist.gather((float(loss_sum.item()), seen))
    images = sum(t[1] for t in totals)
    return sum(t[0] for t in totals) / max(images, 1), images / max(seconds, 1e-9)


def validate(
    trainer: Trainer,
    loader: DataLoader,
    labels: np.ndarray,
    on_batch: Callable[[int], None] | None = None,
) -> Validation:
    """The weighted loss, probabilities and AUROC of the whole validation split.

    Runs in float32 even when training uses autocast: the kept epoch, its val loss and the
    thresholds fitted on val must be what ``cxr evaluate`` (float32) recomputes from the
    saved weights; bf16 logits moved thresholds by ~5e-4. Under DDP each rank predicts its
    shard and the logits of all ranks are gathered, in the split's order.
    """
    trainer.dist.sync_buffers(trainer.model)
    outputs = predict_outputs(trainer.model, loader, trainer.device, on_batch=on_batch)
    parts = trainer.dist.gather(outputs)
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    logits = np.concatenate([p[1] for p in parts])[order]
    features = np.concatenate([p[2] for p in parts])[order]
    with torch.no_grad():
        loss = trainer.loss_fn(
            torch.from_numpy(logits).to(trainer.device),
            torch.from_numpy(labels).to(trainer.device),
        )
    prob = probabilities(logits)
    return Validation(float(loss.item()), prob, auroc_per_class(labels, prob), features)


def fit(
    trainer: Trainer,
    loaders: tuple[DataLoader, EpochSampler, DataLoader],
    val_labels: np.ndarray,
    state: TrainState,
    *,
    config: TrainConfig,
    labels: Sequence[str],
    callbacks: TrainCallbacks,
    on_epoch_end: Callable[[dict[str, Any], Validation], None],
    stop_after_epochs: int | None = None,
) -> TrainState:
    """Epochs until ``config.max_epochs`` or the plateau rule stops training.

    ``loaders`` is (training loader, its sampler, validation loader). After each epoch,
    ``on_epoch_end(record, validation)`` persists what the caller keeps (the best bundle,
    the log, the checkpoint). ``stop_after_epochs`` ends this call early, as an
    interruption would (for tests).
    """
    train_loader, train_sampler, val_loader = loaders
    epochs_this_call = 0
    while state.epoch < config.max_epochs and not state.stopped:
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
            break
        started = time.perf_counter()
        train_loss, images_per_s = train_one_epoch(
            trainer, train_loader, train_sampler, state.epoch, config.max_epochs, callbacks
        )
        callbacks.on_validation_start(len(val_labels))
        validation = validate(trainer, val_loader, val_labels, callbacks.on_validation_step)
        record = _end_epoch(trainer, state, config, validation, labels)
        record.update(
            train_loss=train_loss,
            images_per_s=images_per_s,
            seconds=time.perf_counter() - started,
        )
        record = _ordered_record(record, labels)
        state.history.append(record)
        epochs_this_call += 1
        on_epoch_end(record, validation)
        callbacks.on_epoch_end(record)
    if not state.stopped and state.epoch >= config.max_epochs:
        state.stopped = f"reached max_epochs={config.max_epochs}"
    return state


def _end_epoch(
    trainer: Trainer,
    state: TrainState,
    config: TrainConfig,
    validation: Validation,
    labels: Sequence[str],
) -> dict[str, Any]:
    """Step the scheduler on the validation loss, update the state, and describe the epoch."""
    lr_before = trainer.optimizer.param_groups[0]["lr"]
    trainer.scheduler.step(validation.loss)
    lr_after = trainer.optimizer.param_groups[0]["lr"]
    if lr_after < lr_before:
        state.lr_reductions += 1
    improved = validation.loss < state.best_val_loss
    state.epoch += 1
    if improved:
        state.best_val_loss = validation.loss
        state.best_epoch = state.epoch
    if state.lr_reductions > config.max_plateaus:
        state.stopped = f"validation loss plateaued {state.lr_reductions} times"
    return {
        "epoch": state.epoch,
        "val_loss": validation.loss,
        "val_auroc_mean": mean_defined(validation.auroc),
        "lr": lr_before,
        "next_lr": lr_after,
        "best": improved,
        **{f"val_auroc_{name}": v for name, v in zip(labels, validation.auroc)},
    }


_RECORD_ORDER = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_auroc_mean",
    "lr",
    "next_lr",
    "images_per_s",
    "seconds",
    "best",
)


def _ordered_record(record: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """The record in ``log.csv``'s column order."""
    keys = [*_RECORD_ORDER, *(f"val_auroc_{name}" for name in labels)]
    return {key: record[key] for key in keys}
