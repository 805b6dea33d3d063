"""The training loop: weighted BCE, SGD, LR/10 on validation-loss plateaus, best-weights
bundle, per-epoch checkpoints, exact resume, mixed precision (CUDA; bf16 on CPUs that have
it natively) and DistributedDataParallel."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from cxr import __version__
from cxr.config import TrainConfig
from cxr.data.dataset import Augment, EpochSampler, Preprocess, XrayDataset
from cxr.data.nih import PATH_COLUMN, label_matrix
from cxr.errors import CxrError, DataError, ModelError
from cxr.evaluate import auroc_per_class, choose_thresholds, mean_defined, predict_logits
from cxr.labels import PATHOLOGIES
from cxr.loss import WeightedBCELoss
from cxr.model import build_model, bundle_meta, create_model, save_bundle, unwrap
from cxr.run import RunFolder, require_paths
from cxr.utils import atomic_save_torch, atomic_write_csv

THRESHOLD_RULE = "youden"


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
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> Distributed:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return Distributed(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank
    )


def teardown_distributed() -> None:
    """Wait for every rank, then leave the process group (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _sync_buffers(model: torch.nn.Module, dist: Distributed) -> None:
    """Give every rank rank 0's BatchNorm running statistics.

    DDP broadcasts buffers at the start of each forward, but each rank then updates its own
    running statistics with its own batch; without this, ranks would validate slightly
    different models and the gathered predictions would not be those of the saved weights.
    """
    if not dist.enabled:
        return
    import torch.distributed as dist_module

    for buffer in unwrap(model).buffers():
        dist_module.broadcast(buffer.data, src=0)


def resolve_device(name: str, dist: Distributed) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CxrError("--device cuda was asked for but no CUDA device is available")
        return torch.device("cuda", dist.local_rank) if name == "cuda" else torch.device(name)
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX).

    Where it does, oneDNN runs DenseNet121's training step about twice as fast under bf16
    autocast (``benchmarks/cpu_precision.py``); where it does not, bf16 is emulated and slower
    than float32, so autocast stays off.
    """
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except RuntimeError:  # pragma: no cover - a torch build without the probes
        return False


def mixed_precision(requested: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """``(enabled, dtype)`` for ``torch.autocast``: bf16 where the hardware has it, else fp16
    on CUDA, else off."""
    if not requested:
        return False, torch.float32
    if device.type == "cuda":
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return True, torch.bfloat16
    return False, torch.float32


def make_loader(
    frame: pd.DataFrame,
    config: TrainConfig,
    *,
    train: bool,
    dist: Distributed,
    device: torch.device,
    reader=None,
    pad: bool = True,
) -> tuple[DataLoader, EpochSampler]:
    preprocess = Preprocess(config.image_size, config.normalization)
    augment = Augment(config.scale_min, config.scale_max, config.hflip) if train else None
    dataset = XrayDataset(
        frame[PATH_COLUMN].tolist(),
        label_matrix(frame),
        preprocess,
        augment,
        seed=config.seed,
        reader=reader,
    )
    sampler = EpochSampler(
        len(dataset),
        shuffle=train,
        seed=config.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        pad=pad,
    )
    # Throughput without changing what is computed: worker processes decode and augment
    # (each sample seeded by (seed, epoch, index), so results do not depend on the count),
    # stay alive across epochs, prefetch 4 batches each, and pin memory for async CUDA copies.
    workers = config.workers
    batch_size = config.batch_size if train else config.batch_size * 2
    # BatchNorm cannot train on a single value per channel: below 64 pixels DenseNet121's last
    # feature maps are 1x1, so a last training batch of one image would stop the run.
    samples = len(sampler)
    drop_last = train and samples > 1 and samples % batch_size == 1
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=drop_last,
    )
    return loader, sampler


def _gather(dist: Distributed, value):
    """Every rank's ``value``, in rank order (a list of one without distribution)."""
    if not dist.enabled:
        return [value]
    import torch.distributed as dist_module

    gathered = [None] * dist.world_size
    dist_module.all_gather_object(gathered, value)
    return gathered


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot load checkpoint ({exc.__class__.__name__}); it is damaged or not "
            "a cxr checkpoint, and files that would run code are refused"
        ) from None


def train_run(
    run_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: TrainCallbacks | None = None,
    stop_after_epochs: int | None = None,
) -> TrainState:
    """Train the run in ``run_dir`` (prepared by :func:`prepare_run`) to its stopping rule.

    ``stop_after_epochs`` ends this call early (as an interruption would) - for tests.
    """
    callbacks = callbacks or TrainCallbacks()
    run = RunFolder(run_dir).require()
    config = run.load_config()
    dist = setup_distributed(config.device)
    if dist.is_main:
        run.clear_stale_temp_files()
    device = resolve_device(config.device, dist)
    train_frame = require_paths(run.read_split("train"), str(run.split_file("train")))
    val_frame = require_paths(run.read_split("val"), str(run.split_file("val")))
    if train_frame.empty or val_frame.empty:
        raise DataError(f"{run.split_dir}: the train and val splits must both have images")

    torch.manual_seed(config.seed)
    state = TrainState()
    checkpoint = None
    if resume:
        if not run.checkpoint.exists():
            raise DataError(f"{run.root}: nothing to resume (no checkpoint.pt yet)")
        checkpoint = load_checkpoint(run.checkpoint)
        model = build_model()
        model.load_state_dict(checkpoint["model"])
        init_note = run.load_info().get("init", {})
    else:
        model, init_note = create_model(config.weights)
    use_cuda = device.type == "cuda"
    model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)

    train_labels = label_matrix(train_frame)
    loss_fn = WeightedBCELoss.from_labels(train_labels).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.plateau_patience
    )
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = TrainState(**checkpoint["state"])
        _set_rng_state(checkpoint.get("rng", {}))

    amp, amp_dtype = mixed_precision(config.amp, device)
    precision = f"{str(amp_dtype).removeprefix('torch.')} autocast" if amp else "float32"
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    if checkpoint is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])

    train_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if use_cuda else None
        )
    if config.compile:
        train_model = torch.compile(train_model)

    train_reader = val_reader = None
    cache_note = None
    if config.cache:
        from cxr.data.cache import open_cache

        cache = open_cache(config.cache, min_size=config.image_size)
        train_reader, val_reader = cache.reader(train_frame), cache.reader(val_frame)
        cache_note = {"path": str(cache.root), "image_size": cache.image_size}
    if use_cuda:
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels

    train_loader, train_sampler = make_loader(
        train_frame, config, train=True, dist=dist, device=device, reader=train_reader
    )
    val_loader, _ = make_loader(
        val_frame, config, train=False, dist=dist, device=device, reader=val_reader, pad=False
    )
    val_labels = label_matrix(val_frame)

    writer = None
    if dist.is_main:
        run.write_json(
            run.info,
            {
                **run.load_info(),
                "cxr_version": __version__,
                "torch_version": torch.__version__,
                "device": str(device),
                "world_size": dist.world_size,
                "init": init_note,
                "cache": cache_note,
                "precision": precision,
            },
        )
        writer = _tensorboard_writer(run.tensorboard)
    callbacks.on_start(
        {
            "device": str(device),
            "world_size": dist.world_size,
            "train_images": len(train_frame),
            "val_images": len(val_frame),
            "start_epoch": state.epoch,
            "amp": amp,
            "precision": precision,
        }
    )

    epochs_this_call = 0
    try:
        while state.epoch < config.max_epochs and not state.stopped:
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                break
            epoch = state.epoch
            started = time.perf_counter()
            train_sampler.set_epoch(epoch)
            train_model.train()
            steps = len(train_loader)
            callbacks.on_epoch_start(epoch + 1, config.max_epochs, steps)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            step_clock = time.perf_counter()
            for step, (images, targets, _indices) in enumerate(train_loader, start=1):
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                if config.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    logits = train_model(images)
                loss = loss_fn(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach().double() * len(images)
                seen += len(images)
                if step == steps or step % 5 == 0:
                    elapsed = time.perf_counter() - step_clock
                    callbacks.on_step(
                        step,
                        steps,
                        float(loss_sum.item() / max(seen, 1)),
                        seen * dist.world_size / max(elapsed, 1e-9),
                    )
            train_seconds = time.perf_counter() - step_clock
            totals = _gather(dist, (float(loss_sum.item()), seen))
            train_loss = sum(t[0] for t in totals) / max(sum(t[1] for t in totals), 1)
            images_per_s = sum(t[1] for t in totals) / max(train_seconds, 1e-9)

            callbacks.on_validation_start(len(val_frame))
            _sync_buffers(model, dist)
            # Validation runs in float32 even when training uses autocast: the kept epoch, its
            # val loss and the thresholds fitted on val must be what `cxr evaluate` (float32)
            # recomputes from the saved weights; bf16 logits moved thresholds by ~5e-4.
            val_indices, val_logits = predict_logits(
                unwrap(model), val_loader, device, on_batch=callbacks.on_validation_step
            )
            parts = _gather(dist, (val_indices, val_logits))
            order = np.concatenate([p[0] for p in parts])
            logits_all = np.concatenate([p[1] for p in parts])[np.argsort(order, kind="stable")]
            with torch.no_grad():
                val_loss = float(
                    loss_fn(
                        torch.from_numpy(logits_all).to(device),
                        torch.from_numpy(val_labels).to(device),
                    ).item()
                )
            val_prob = 1.0 / (1.0 + np.exp(-logits_all.astype(np.float64)))
            val_auroc = auroc_per_class(val_labels, val_prob)

            lr_before = optimizer.param_groups[0]["lr"]
            scheduler.step(val_loss)
            lr_after = optimizer.param_groups[0]["lr"]
            if lr_after < lr_before:
                state.lr_reductions += 1
            improved = val_loss < state.best_val_loss
            state.epoch = epoch + 1
            epochs_this_call += 1
            if improved:
                state.best_val_loss = val_loss
                state.best_epoch = epoch + 1
            if state.lr_reductions > config.max_plateaus:
                state.stopped = f"validation loss plateaued {state.lr_reductions} times"
            record = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_auroc_mean": mean_defined(val_auroc),
                "lr": lr_before,
                "next_lr": lr_after,
                "images_per_s": images_per_s,
                "seconds": time.perf_counter() - started,
                "best": improved,
                **{f"val_auroc_{name}": v for name, v in zip(PATHOLOGIES, val_auroc)},
            }
            state.history.append(record)
            if dist.is_main:
                if improved:
                    thresholds = choose_thresholds(val_labels, val_prob, THRESHOLD_RULE)
                    _save_best_bundle(
                        run, model, config, thresholds, record, train_frame, val_frame
                    )
                _write_log(run, state.history, writer, record)
                atomic_save_torch(
                    {
                        "model": unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                        "state": state.__dict__,
                        "rng": _rng_state(),
                        "config": config.to_dict(),
                    },
                    run.checkpoint,
                )
            callbacks.on_epoch_end(record)
        if not state.stopped and state.epoch >= config.max_epochs:
            state.stopped = f"reached max_epochs={config.max_epochs}"
    finally:
        if writer is not None:
            writer.close()
    return state


def _save_best_bundle(run, model, config, thresholds, record, train_frame, val_frame) -> None:
    meta = bundle_meta(
        image_size=config.image_size,
        normalization=config.normalization,
        thresholds=thresholds,
        threshold_rule=f"{THRESHOLD_RULE} (Youden's J on the validation split)",
        epoch=record["epoch"],
        val_loss=record["val_loss"],
        val_auroc_mean=record["val_auroc_mean"],
        training_data={
            "train_images": len(train_frame),
            "train_patients": int(train_frame["Patient ID"].nunique()),
            "val_images": len(val_frame),
            "val_patients": int(val_frame["Patient ID"].nunique()),
            "train_positives": {n: int(train_frame[n].sum()) for n in PATHOLOGIES},
            "data": run.load_info().get("data"),
        },
    )
    save_bundle(run.root, model, meta)


def _write_log(run: RunFolder, history, writer, record) -> None:
    atomic_write_csv(pd.DataFrame(history), run.log_csv)
    if writer is None:
        return
    epoch = record["epoch"]
    for key in ("train_loss", "val_loss", "val_auroc_mean", "lr", "images_per_s"):
        if record[key] is not None:
            writer.add_scalar(key, record[key], epoch)
    for name in PATHOLOGIES:
        value = record[f"val_auroc_{name}"]
        if value is not None:
            writer.add_scalar(f"val_auroc/{name}", value, epoch)
    writer.flush()


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install only loses the events
        return None
    return SummaryWriter(log_dir=str(directory))


def screen_images(
    frames: dict[str, pd.DataFrame],
    *,
    skip_bad: bool,
    progress=None,
) -> tuple[dict[str, pd.DataFrame], list[tuple[str, str]]]:
    """Decode every image of every split once, before anything trains.

    Unreadable files raise a :class:`DataError` listing them, or, with ``skip_bad``, are
    dropped from their split and returned so the caller can warn.
    """
    from cxr.data.images import find_unreadable

    paths = [p for frame in frames.values() for p in frame[PATH_COLUMN].tolist()]
    failures = find_unreadable(paths, progress=progress)
    if not failures:
        return frames, []
    if not skip_bad:
        shown = "; ".join(f"{path}: {reason}" for path, reason in failures[:10])
        more = f"; and {len(failures) - 10:,} more" if len(failures) > 10 else ""
        raise DataError(
            f"{len(failures):,} of {len(paths):,} images cannot be read: {shown}{more}. "
            "Fix or remove them, or pass --skip-bad-images to train without them"
        )
    bad = {path for path, _ in failures}
    kept = {name: f[~f[PATH_COLUMN].isin(bad)].reset_index(drop=True) for name, f in frames.items()}
    for name in ("train", "val"):
        if name in kept and kept[name].empty:
            raise DataError(f"no readable image is left in the {name} split")
    return kept, failures


def create_run(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    split_dir: str | Path | None = None,
    on_image_check=None,
) -> list[str]:
    """Everything before the first step: resolve the images of ``data``, make the
    patient-level split (or read ``split_dir``), decode every image once, check the cache,
    and create the run folder. Returns warnings for the caller to show (dropped images)."""
    from cxr.data.nih import attach_image_paths, load_nih
    from cxr.data.split import read_split, split_by_patients

    out, data = Path(out), Path(data)
    if RunFolder(out).config.exists():
        raise DataError(
            f"{out}: already holds a run; use `cxr train --resume {out}` to continue it, "
            "or choose another --out"
        )
    notes: list[str] = []
    if split_dir is not None:
        root = data if data.is_dir() else data.parent
        frames = {}
        for name, frame in read_split(split_dir).items():
            nih = attach_image_paths(
                frame.drop(columns=[PATH_COLUMN], errors="ignore"),
                root,
                drop_missing=config.drop_missing,
                table_path=Path(split_dir) / f"{name}.csv",
            )
            if nih.dropped_missing:
                notes.append(f"{name}: dropped {len(nih.dropped_missing):,} image(s) not on disk")
            frames[name] = nih.table
        split_note = {"method": "given", "from": os.path.abspath(split_dir)}
    else:
        nih = load_nih(data, drop_missing=config.drop_missing)
        if nih.dropped_missing:
            notes.append(f"dropped {len(nih.dropped_missing):,} image(s) not found on disk")
        split = split_by_patients(nih.table, seed=config.seed)
        frames = split.frames()
        split_note = {"method": split.method, "seed": split.seed}
    if config.cache:
        # A cache that is stale, incomplete or lacks a training image fails before the run
        # folder exists, not after. Its build decoded every image, so no second check.
        from cxr.data.cache import open_cache

        image_cache = open_cache(config.cache, min_size=config.image_size)
        for name in ("train", "val"):
            image_cache.rows_for(frames[name])
    elif config.check_images:
        frames, failures = screen_images(
            frames, skip_bad=config.skip_bad_images, progress=on_image_check
        )
        if failures:
            shown = "; ".join(f"{path}: {reason}" for path, reason in failures[:5])
            notes.append(f"training without {len(failures):,} unreadable image(s): {shown}")
    prepare_run(out, frames, config, data_source=os.path.abspath(data), split_note=split_note)
    return notes


def prepare_run(
    run_dir: str | Path,
    frames: dict[str, pd.DataFrame],
    config: TrainConfig,
    *,
    data_source: str,
    split_note: dict[str, Any],
) -> RunFolder:
    """Create the run folder: resolved config, split tables (with image paths), run.json."""
    run = RunFolder(run_dir)
    if run.checkpoint.exists() or run.config.exists():
        raise DataError(
            f"{run.root}: already holds a run; use `cxr train --resume {run.root}` to continue "
            "it, or choose another --out"
        )
    # Starting weights that cannot be loaded (offline ImageNet, a missing or refused file) fail
    # here, before a run folder exists that a retry with other --weights would be refused on.
    if config.weights not in ("none", "scratch", ""):
        create_model(config.weights)
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_json(run.config, config.to_dict())
    run.write_split(frames)
    run.write_json(run.info, {"data": data_source, "split": split_note, "cxr_version": __version__})
    return run
