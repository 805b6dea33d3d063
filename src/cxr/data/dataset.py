"""The torch Dataset and the train / evaluation transforms."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from cxr.data.images import decode_gray

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop a square, scale to [0, 1], normalise, 1 -> 3 channels.

    Training adds a random scale (the resize target grows before the same centre crop) and a
    random horizontal flip; evaluation uses scale 1 and no flip, so nothing is random.
    """

    image_size: int
    normalization: str = "imagenet"

    def geometry(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int, int, int]:
        """(resized height, resized width, crop top, crop left) for an image of this size."""
        short = max(int(round(self.image_size * scale)), self.image_size)
        if height <= width:
            new_h, new_w = short, max(int(round(width * short / height)), short)
        else:
            new_h, new_w = max(int(round(height * short / width)), short), short
        top = (new_h - self.image_size) // 2
        left = (new_w - self.image_size) // 2
        return new_h, new_w, top, left

    def crop_resized(self, gray: np.ndarray, scale: float = 1.0, flip: bool = False) -> np.ndarray:
        """The uint8 (S, S) crop the model sees, before normalisation."""
        height, width = gray.shape
        new_h, new_w, top, left = self.geometry(height, width, scale)
        image = Image.fromarray(gray)
        if (new_h, new_w) != (height, width):
            # PIL's bilinear filter widens its support when shrinking: antialiased.
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(image)  # writable, so torch.from_numpy can share it

    def to_tensor(self, crop: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(np.ascontiguousarray(crop)).to(torch.float32).div_(255.0)
        if self.normalization == "sample":
            std = pixels.std()
            pixels = (pixels - pixels.mean()) / torch.clamp(std, min=1e-6)
            return pixels.unsqueeze(0).repeat(3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (pixels.unsqueeze(0).expand(3, -1, -1) - mean) / std

    def __call__(self, gray: np.ndarray, scale: float = 1.0, flip: bool = False) -> torch.Tensor:
        return self.to_tensor(self.crop_resized(gray, scale, flip))


@dataclass(frozen=True)
class Augment:
    scale_min: float = 1.0
    scale_max: float = 1.15
    hflip: bool = True

    def draw(self, rng: np.random.Generator) -> tuple[float, bool]:
        scale = float(rng.uniform(self.scale_min, self.scale_max))
        flip = bool(self.hflip and rng.random() < 0.5)
        return scale, flip


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
