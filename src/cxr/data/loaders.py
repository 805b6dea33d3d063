"""The DataLoaders: one factory for training and evaluation over a split table (seeded
augmentation, shuffling every epoch, sharding across ranks), and one for image files given
by a user (a failed decode is reported, not raised)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cxr.data.datasets import label_matrix
from cxr.data.images import decode_gray
from cxr.data.schema import PATH_COLUMN
from cxr.data.transforms import Augment, Preprocess
from cxr.errors import CxrError
from cxr.labels import PATHOLOGIES


class XrayDataset(Dataset):
    """Images by path (or from a cache) with their 14 labels.

    Indices may be ``(index, epoch)`` pairs (see :class:`EpochSampler`): the random
    augmentation of an image is drawn from ``(seed, epoch, index)``, so it is the same
    whatever the worker count and after a resume.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray | None,
        preprocess: Preprocess,
        augment: Augment | None = None,
        seed: int = 0,
        reader: Callable[[int], np.ndarray] | None = None,
    ):
        self.paths = list(paths)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.float32)
        self.preprocess = preprocess
        self.augment = augment
        self.seed = seed
        self.reader = reader

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> np.ndarray:
        if self.reader is not None:
            return self.reader(index)
        return decode_gray(self.paths[index])

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        gray = self.read(index)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
            scale, flip = self.augment.draw(rng)
            image = self.preprocess(gray, scale, flip)
        else:
            image = self.preprocess(gray)
        target = (
            torch.from_numpy(self.labels[index])
            if self.labels is not None
            else torch.zeros(0, dtype=torch.float32)
        )
        return image, target, index


class EpochSampler(Sampler):
    """Reshuffles every epoch from ``(seed, epoch)`` and shards across distributed ranks.

    Yields ``(index, epoch)`` so the dataset can seed its augmentation, which also works with
    persistent workers that never see ``set_epoch`` on their copy of the dataset.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        self.size = size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.world_size > 1 and self.pad:
            # Every rank must run the same number of steps, or DDP's all-reduce hangs.
            per_rank = -(-self.size // self.world_size)
            order += order[: per_rank * self.world_size - len(order)]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(index, self.epoch) for index in self.indices()])

    def __len__(self) -> int:
        return len(self.indices())


def split_loader(
    frame: pd.DataFrame,
    preprocess: Preprocess,
    *,
    batch_size: int,
    workers: int = 0,
    augment: Augment | None = None,
    seed: int = 0,
    reader: Callable[[int], np.ndarray] | None = None,
    rank: int = 0,
    world_size: int = 1,
    pad: bool = True,
    pin_memory: bool = False,
    targets: np.ndarray | None = None,
) -> tuple[DataLoader, EpochSampler]:
    """The DataLoader over a split table (``path`` + label columns) and its sampler.

    ``targets`` is the ``[images, labels]`` matrix the batches carry (NaN for unknown); by
    default NIH's 14 label columns, or none for a table without them (inference).

    With ``augment`` it is a training loader: shuffled every epoch (``sampler.set_epoch``) and
    augmented per (seed, epoch, image); without, the images come in table order, as
    evaluation and validation need. ``rank`` / ``world_size`` shard it across processes.
    """
    training = augment is not None
    if targets is None:
        nih = all(name in frame.columns for name in PATHOLOGIES)
        targets = label_matrix(frame) if nih else np.zeros((len(frame), 0), np.float32)
    dataset = XrayDataset(
        frame[PATH_COLUMN].tolist(),
        targets,
        preprocess,
        augment,
        seed=seed,
        reader=reader,
    )
    sampler = EpochSampler(
        len(dataset), shuffle=training, seed=seed, rank=rank, world_size=world_size, pad=pad
    )
    # Throughput without changing what is computed: worker processes decode and augment
    # (each sample seeded by (seed, epoch, index), so results do not depend on the count),
    # stay alive across epochs, prefetch 4 batches each, and pin memory for async CUDA copies.
    # BatchNorm cannot train on a single value per channel: below 64 pixels DenseNet121's last
    # feature maps are 1x1, so a last training batch of one image would stop the run.
    samples = len(sampler)
    drop_last = training and samples > 1 and samples % batch_size == 1
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=drop_last,
    )
    return loader, sampler


class ImageFiles(Dataset):
    """Decode + preprocess one file; a failure is returned (not raised) so the batch goes on."""

    def __init__(self, files: Sequence[Path], preprocess: Preprocess, keep_crops: bool = False):
        self.files = list(files)
        self.preprocess = preprocess
        self.keep_crops = keep_crops

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            crop = self.preprocess.crop_resized(decode_gray(path))
            image = self.preprocess.to_tensor(crop)
        except CxrError as exc:
            return index, None, None, _reason(str(exc), str(path))
        except Exception as exc:  # a decoder bug must not stop the other files
            return index, None, None, f"cannot decode ({exc.__class__.__name__}: {exc})"
        return index, image, (crop if self.keep_crops else None), None


def _reason(message: str, name: str) -> str:
    prefix = f"{name}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


@dataclass
class Batch:
    indices: list[int]
    images: torch.Tensor | None
    crops: list[np.ndarray | None]
    failed: list[tuple[int, str]]


def collate(items) -> Batch:
    good = [item for item in items if item[3] is None]
    return Batch(
        indices=[item[0] for item in good],
        images=torch.stack([item[1] for item in good]) if good else None,
        crops=[item[2] for item in good],
        failed=[(item[0], item[3]) for item in items if item[3] is not None],
    )


def available_cores() -> int:
    """The cores this process may run on (its affinity, e.g. a container's or a job's share)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_workers() -> int:
    """Decoding processes for prediction: enough to keep ahead of the model, leaving it most
    cores."""
    return max(1, min(4, available_cores() // 2))


def default_train_workers() -> int:
    """Decoding and augmenting processes for training: every core but the one the training
    step runs on, at most 16. A GPU trains thousands of images/s while one worker decodes
    about 35 NIH PNGs/s, so a fixed 2 would starve it; 16 feed it through the cache."""
    return max(1, min(16, available_cores() - 1))


def file_loader(
    files: Sequence[Path],
    preprocess: Preprocess,
    *,
    batch_size: int = 16,
    workers: int | None = None,
    keep_crops: bool = False,
) -> DataLoader:
    workers = default_workers() if workers is None else workers
    workers = min(workers, max(1, -(-len(files) // batch_size))) if files else 0
    return DataLoader(
        ImageFiles(files, preprocess, keep_crops),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=2 if workers else None,
    )
