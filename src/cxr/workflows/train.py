"""``cxr train`` over a run folder: create the run (split, image check, cache check, the
folder itself), then train it with :func:`cxr.engine.trainer.fit`, writing the best bundle,
the log, TensorBoard events and a checkpoint after every epoch (rank 0 only)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from cxr import __version__
from cxr.config import TrainConfig
from cxr.data.cache import open_cache
from cxr.data.datasets import DatasetSpec, LabeledData, label_matrix, read_dataset
from cxr.data.images import find_unreadable
from cxr.data.layouts import get_layout
from cxr.data.loaders import default_train_workers, split_loader
from cxr.data.schema import PATH_COLUMN, PATIENT_COLUMN
from cxr.data.split import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    NIH_INFO,
    Split,
    check_split,
    read_split,
    read_split_info,
    split_by_patients,
)
from cxr.data.transforms import Augment, Preprocess
from cxr.engine.inference import predict_outputs
from cxr.engine.trainer import (
    TrainCallbacks,
    Trainer,
    TrainState,
    Validation,
    fit,
    load_checkpoint,
)
from cxr.errors import ConfigError, DataError
from cxr.metrics import choose_thresholds
from cxr.model.bundle import BUNDLE_WEIGHTS, BundleMeta, read_bundle_meta, save_bundle
from cxr.model.factory import SCRATCH, create_model
from cxr.model.network import build_model
from cxr.model.ood import MIN_REFERENCE_IMAGES, fit_ood_summary, save_ood
from cxr.model.registry import DEFAULT_ARCHITECTURE, build, freeze_backbone, get_architecture
from cxr.run import SPLIT_NAMES, RunFolder, require_paths
from cxr.runtime import Distributed, resolve_device, setup_distributed
from cxr.utils import atomic_write_bytes, atomic_write_csv
from cxr.workflows.card import update_model

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

THRESHOLD_RULE = "youden"


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
    device = resolve_device(config.device, local_rank=dist.local_rank)
    train_frame, val_frame = _training_splits(run)
    labels = run.labels
    train_labels = label_matrix(train_frame, labels, uncertain=config.uncertain)
    # Validation scores known labels only, whatever the training policy for uncertain ones.
    val_labels = label_matrix(val_frame, labels)
    torch.manual_seed(config.seed)
    checkpoint = _checkpoint_to_resume(run) if resume else None
    model, init_note = _starting_model(run, config, checkpoint, labels)
    trainer = Trainer.create(
        model, config, train_labels, device, dist, masked=bool(np.isnan(val_labels).any())
    )
    state = trainer.restore(checkpoint) if checkpoint is not None else TrainState()
    loaders, cache_note = _loaders(
        config, (train_frame, train_labels), (val_frame, val_labels), dist, device
    )
    writer = None
    if dist.is_main:
        notes = {"init": init_note, "cache": cache_note, "workers": loaders[0].num_workers}
        writer = _record_start(run, trainer, device, dist, notes)
    callbacks.on_start(
        {
            "device": str(device),
            "world_size": dist.world_size,
            "train_images": len(train_frame),
            "val_images": len(val_frame),
            "start_epoch": state.epoch,
            "amp": trainer.amp,
            "precision": trainer.precision,
        }
    )

    # The best epoch's validation features: its out-of-distribution summary (six Ledoit-Wolf
    # fits of 1024 features, seconds on a small CPU) is fitted once, when this call ends,
    # not at every improving epoch; the summary is the same.
    best_features: list[np.ndarray | None] = []

    def persist(record: dict[str, Any], validation: Validation) -> None:
        if dist.is_main:
            best = (train_frame, val_frame) if record["best"] else None
            _persist_epoch(
                run, trainer, config, state, record, validation, writer, best, val_labels
            )
            if best is not None:
                best_features[:] = [validation.features]

    try:
        state = fit(
            trainer, loaders, val_labels, state, config=config, labels=labels,
            callbacks=callbacks, on_epoch_end=persist, stop_after_epochs=stop_after_epochs,
        )  # fmt: skip
    finally:
        if writer is not None:
            writer.close()
    if dist.is_main:
        _describe_best_bundle(run, trainer, state, best_features, loaders[2])
    return state


def _record_start(run: RunFolder, trainer: Trainer, device, dist, notes: dict[str, Any]):
    """What this training call runs on, into run.json; the TensorBoard writer it logs to."""
    info = {
        "cxr_version": __version__,
        "torch_version": torch.__version__,
        "device": str(device),
        "world_size": dist.world_size,
        "distributed": dist.backend,  # the process group's backend under torchrun
        "init": notes["init"],
        "cache": notes["cache"],
        "precision": trainer.precision,
        "workers": notes["workers"],
    }
    run.write_json(run.info, {**run.load_info(), **info})
    from torch.utils.tensorboard import SummaryWriter  # here: a second to import

    return SummaryWriter(log_dir=str(run.tensorboard))


def _describe_best_bundle(
    run: RunFolder, trainer: Trainer, state: TrainState, best_features: list, bundle_loader
) -> None:
    """The best bundle's out-of-distribution summary, from the features its epoch kept."""
    if best_features:
        _describe_bundle(run, best_features[0])
    elif state.best_epoch > 0 and read_bundle_meta(run.root).ood is None:
        # Resumed after a kill that came before the summary: the best bundle's features.
        _describe_bundle(run, _bundle_features(run, trainer, bundle_loader))


def check_resume_cache(run_dir: str | Path, cache: str | None) -> None:
    """Refuse a ``--cache`` on ``--resume`` that would change what the run reads part-way:
    a run that started from the image files stays on them (a cache's images are resized
    twice), and a run that started from a cache may move to a copy of that cache only."""
    if cache is None:
        return
    run = RunFolder(run_dir).require()
    config = run.load_config()
    if config.cache is None:
        raise ConfigError(
            f"{run.root}: this run reads the image files; --cache on --resume would switch it "
            "to a cache part-way (its images are resized twice). Resume without --cache, or "
            "start a new run with --cache"
        )
    new = open_cache(cache, min_size=config.image_size)
    note = run.load_info().get("cache") or {}
    started = (note.get("index_sha256"), note.get("image_size"))
    if started[1] is not None and (
        new.image_size != started[1]
        or (started[0] is not None and new.meta.get("index_sha256") != started[0])
    ):
        raise ConfigError(
            f"{cache}: not the cache this run started with ({note.get('path')}, "
            f"{started[1]} px); a resumed run must read the same images"
        )


def _training_splits(run: RunFolder) -> tuple[pd.DataFrame, pd.DataFrame]:
    train_frame = require_paths(run.read_split("train"), str(run.split_file("train")))
    val_frame = require_paths(run.read_split("val"), str(run.split_file("val")))
    if train_frame.empty or val_frame.empty:
        raise DataError(f"{run.split_dir}: the train and val splits must both have images")
    return train_frame, val_frame


def _checkpoint_to_resume(run: RunFolder) -> dict[str, Any]:
    if not run.checkpoint.exists():
        raise DataError(f"{run.root}: nothing to resume (no checkpoint.pt yet)")
    return load_checkpoint(run.checkpoint)


def _starting_model(
    run: RunFolder, config: TrainConfig, checkpoint, labels: tuple[str, ...]
) -> tuple[Any, dict]:
    """The model to train and where its weights came from (the checkpoint on a resume)."""
    if checkpoint is None:
        if config.arch == DEFAULT_ARCHITECTURE:
            return create_model(config.weights, labels)
        return create_model(config.weights, labels, arch=config.arch, image_size=config.image_size)
    if config.arch == DEFAULT_ARCHITECTURE:
        model = build_model(len(labels))
    else:
        model = build(config.arch, len(labels), image_size=config.image_size)
    if config.freeze_backbone:
        freeze_backbone(model)
    model.load_state_dict(checkpoint["model"])
    return model, run.load_info().get("init", {})


def _loaders(
    config: TrainConfig,
    train: tuple[pd.DataFrame, np.ndarray],
    val: tuple[pd.DataFrame, np.ndarray],
    dist: Distributed,
    device: torch.device,
) -> tuple[tuple, dict[str, Any] | None]:
    """(training loader, its sampler, validation loader) over (table, label matrix) pairs,
    reading the cache if the run has one, and a note of the cache for run.json."""
    (train_frame, train_labels), (val_frame, val_labels) = train, val
    train_reader = val_reader = cache_note = None
    if config.cache:
        cache = open_cache(config.cache, min_size=config.image_size)
        train_reader, val_reader = cache.reader(train_frame), cache.reader(val_frame)
        cache_note = {
            "path": str(cache.root),
            "image_size": cache.image_size,
            "index_sha256": cache.meta.get("index_sha256"),
        }
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: pick the fastest kernels
    preprocess = Preprocess(config.image_size, config.normalization)
    shared = dict(
        workers=default_train_workers() if config.workers is None else config.workers,
        seed=config.seed,
        rank=dist.rank,
        world_size=dist.world_size,
        pin_memory=device.type == "cuda",
    )
    train_loader, train_sampler = split_loader(
        train_frame,
        preprocess,
        batch_size=config.batch_size,
        augment=Augment(config.scale_min, config.scale_max, config.hflip),
        reader=train_reader,
        targets=train_labels,
        **shared,
    )
    val_loader, _ = split_loader(
        val_frame, preprocess, batch_size=config.batch_size * 2, reader=val_reader, pad=False,
        targets=val_labels, **shared,
    )  # fmt: skip
    return (train_loader, train_sampler, val_loader), cache_note


def _persist_epoch(
    run: RunFolder,
    trainer: Trainer,
    config: TrainConfig,
    state: TrainState,
    record: dict[str, Any],
    validation: Validation,
    writer: SummaryWriter | None,
    best: tuple[pd.DataFrame, pd.DataFrame] | None,
    val_labels: np.ndarray,
) -> None:
    """The log, the checkpoint and, when the epoch improved (``best`` holds the train and
    val tables), the best bundle with thresholds chosen on the validation split."""
    if best is not None:
        thresholds = choose_thresholds(val_labels, validation.probabilities, THRESHOLD_RULE)
        meta = _best_bundle_meta(run, config, thresholds, record, *best)
        save_bundle(run.root, trainer.model, meta)
        update_model(run.root)  # its card; the OOD summary when training ends (train_run)
    _write_log(run, state.history, writer, record, run.labels)
    buffer = io.BytesIO()
    torch.save(trainer.checkpoint(state, config), buffer)
    atomic_write_bytes(run.checkpoint, buffer.getvalue())


def _best_bundle_meta(
    run: RunFolder, config: TrainConfig, thresholds, record, train_frame, val_frame
) -> BundleMeta:
    labels = run.labels
    info = run.dataset_info()
    return BundleMeta(
        labels=list(labels),
        image_size=config.image_size,
        normalization=config.normalization,
        architecture=config.arch,
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
            "train_positives": {n: int((train_frame[n] == 1).sum()) for n in labels},
            "data": run.load_info().get("data"),
            "layout": info["layout"],
            "uncertain": config.uncertain,
        },
    )


def _describe_bundle(run: RunFolder, val_features: np.ndarray | None) -> None:
    """The new best bundle's out-of-distribution summary (from this epoch's validation
    features; none for a split of fewer than 4 images) and its model card."""
    if val_features is not None and len(val_features) >= MIN_REFERENCE_IMAGES:
        update_model(run.root, ood=save_ood(run.root, fit_ood_summary(val_features)))
    else:
        update_model(run.root)


def _bundle_features(run: RunFolder, trainer: Trainer, val_loader) -> np.ndarray:
    """The pooled validation features of the run's saved best weights, computed as the
    epoch that saved them did (the trained model's layout, the validation loader)."""
    import copy

    from safetensors.torch import load_file

    model = copy.deepcopy(trainer.model)
    model.load_state_dict(load_file(str(run.root / BUNDLE_WEIGHTS)))
    return predict_outputs(model, val_loader, trainer.device)[2]


def _write_log(run: RunFolder, history, writer: SummaryWriter | None, record, labels) -> None:
    atomic_write_csv(pd.DataFrame(history), run.log_csv)
    if writer is None:
        return
    epoch = record["epoch"]
    for key in ("train_loss", "val_loss", "val_auroc_mean", "lr", "images_per_s"):
        if record[key] is not None:
            writer.add_scalar(key, record[key], epoch)
    for name in labels:
        value = record[f"val_auroc_{name}"]
        if value is not None:
            writer.add_scalar(f"val_auroc/{name}", value, epoch)
    writer.flush()


def screen_images(
    frames: dict[str, pd.DataFrame],
    *,
    skip_bad: bool,
    mode: str = "header",
    progress=None,
) -> tuple[dict[str, pd.DataFrame], list[tuple[str, str]]]:
    """Check every image of every split once, before anything trains: its header (``mode``
    ``header``) or a full decode (``full``).

    Unreadable files raise a :class:`DataError` listing them, or, with ``skip_bad``, are
    dropped from their split and returned so the caller can warn.
    """
    paths = [p for frame in frames.values() for p in frame[PATH_COLUMN].tolist()]
    failures = find_unreadable(paths, mode=mode, progress=progress)
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
    dataset: DatasetSpec | None = None,
    found: LabeledData | None = None,
    split: Split | None = None,
) -> list[str]:
    """Everything before the first step: resolve the images of ``data`` (any layout
    :func:`cxr.data.datasets.read_dataset` reads, as ``dataset`` says), make the
    patient-level split (or read ``split_dir``), decode every image once, check the cache,
    and create the run folder. Returns warnings for the caller to show (dropped images).

    ``found`` is ``data`` already read (the Python API's :class:`cxr.Dataset`, perhaps a
    subset), used instead of reading it again; ``split`` a split of it already made."""
    out, data = Path(out), Path(data)
    get_architecture(config.arch)  # an unknown name fails before any work
    if RunFolder(out).config.exists():
        raise DataError(
            f"{out}: already holds a run; use `cxr train --resume {out}` to continue it, "
            "or choose another --out"
        )
    dataset = dataset or DatasetSpec()
    notes: list[str] = []
    if split is not None:
        frames = {name: require_paths(frame, name) for name, frame in split.frames().items()}
        check_split(frames)
        info = {"layout": split.layout, "labels": list(split.labels)}
        split_note = {"method": split.method, "seed": split.seed, "made": "in Python"}
    elif split_dir is not None:
        frames, info = _given_split(data, Path(split_dir), config.drop_missing, notes, dataset)
        split_note = {"method": "given", "from": os.path.abspath(split_dir)}
    else:
        frames, info, split_note = _default_split(data, dataset, config, notes, found)
    if config.cache:
        # A cache that is stale, incomplete or lacks a training image fails before the run
        # folder exists, not after. Its build decoded every image, so no second check.
        image_cache = open_cache(config.cache, min_size=config.image_size)
        for name in ("train", "val"):
            image_cache.rows_for(frames[name])
    elif config.check_images != "none":
        frames, failures = screen_images(
            frames,
            skip_bad=config.skip_bad_images,
            mode=config.check_images,
            progress=on_image_check,
        )
        if failures:
            shown = "; ".join(f"{path}: {reason}" for path, reason in failures[:5])
            notes.append(f"training without {len(failures):,} unreadable image(s): {shown}")
    prepare_run(
        out, frames, config, data_source=os.path.abspath(data), split_note=split_note,
        dataset_info={**info, "spec": dataset.to_dict()},
    )  # fmt: skip
    return notes


def _default_split(
    data: Path,
    dataset: DatasetSpec,
    config: TrainConfig,
    notes: list[str],
    found: LabeledData | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, Any], dict[str, Any]]:
    """No --split: the dataset split by patient with the default fractions."""
    if found is None:
        found = read_dataset(data, dataset, drop_missing=config.drop_missing)
    notes.extend(found.notes)
    split = split_by_patients(
        found.table, seed=config.seed, labels=found.labels, layout=found.layout
    )
    frames = split.frames()
    split_note = {
        "method": split.method,
        "seed": split.seed,
        "val_fraction": DEFAULT_VAL_FRACTION,
        "test_fraction": DEFAULT_TEST_FRACTION,
    }
    sizes = " / ".join(f"{frames[n][PATIENT_COLUMN].nunique():,}" for n in SPLIT_NAMES)
    notes.append(
        f"no --split given: {data} split by patient into {sizes} train / val / test "
        f"patients ({DEFAULT_VAL_FRACTION:.0%} val, {DEFAULT_TEST_FRACTION:.0%} test, seed "
        f"{split.seed}); to choose, make one with `cxr data split` (e.g. --val-patients 1672 "
        "--test-patients 389, the method's) and pass it with --split"
    )
    return frames, found.info(), split_note


def _given_split(
    data: Path, split_dir: Path, drop_missing: bool, notes: list[str], dataset: DatasetSpec
) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The split tables in ``split_dir`` with their images found below the image root of
    ``data``, all three at once as its layout finds them (NIH's by name, with one walk of the
    image tree: NIH's is 112,120 files in 12 folders)."""
    info = read_split_info(split_dir)
    split = read_split(split_dir)
    layout = get_layout(info["layout"])
    source = read_dataset(data, dataset, require_images=False)
    tables = [
        LabeledData(
            frame.drop(columns=[PATH_COLUMN], errors="ignore"),
            tuple(info["labels"]),
            layout.name,
            split_dir / f"{name}.csv",
            image_root=source.image_root,
        )
        for name, frame in split.items()
    ]
    frames = {}
    for name, found in zip(split, layout.find_images(tables, drop_missing=drop_missing)):
        notes.extend(f"{name}: {note}" for note in found.notes)
        frames[name] = found.table
    return frames, info


def prepare_run(
    run_dir: str | Path,
    frames: dict[str, pd.DataFrame],
    config: TrainConfig,
    *,
    data_source: str,
    split_note: dict[str, Any],
    dataset_info: dict[str, Any] | None = None,
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
    info = dataset_info or dict(NIH_INFO)
    if config.weights not in SCRATCH:
        create_model(config.weights, info["labels"])
    run.root.mkdir(parents=True, exist_ok=True)
    run.write_json(run.config, config.to_dict())
    run.write_split(frames, {"layout": info["layout"], "labels": list(info["labels"])})
    run.write_json(
        run.info,
        {"data": data_source, "dataset": info, "split": split_note, "cxr_version": __version__},
    )
    return run
