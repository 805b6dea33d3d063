"""What the model sees of an image: resize the shorter side, centre-crop a square,
normalise, 1 -> 3 channels; the training augmentation; and the same geometry for boxes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

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


def map_box(
    box: Sequence[float], orig_h: int, orig_w: int, preprocess: Preprocess
) -> tuple[float, float, float, float]:
    """``(x, y, w, h)`` in the original image's pixels -> the same box in the model's crop.

    The image is resized so its shorter side is ``image_size`` and centre-cropped
    (:meth:`Preprocess.geometry`); the mapped box is clipped to the crop, so a box wholly
    outside it comes back with zero width or height.
    """
    x, y, w, h = (float(v) for v in box)
    new_h, new_w, top, left = preprocess.geometry(int(orig_h), int(orig_w))
    sx, sy = new_w / orig_w, new_h / orig_h
    size = float(preprocess.image_size)
    x0 = min(max(x * sx - left, 0.0), size)
    y0 = min(max(y * sy - top, 0.0), size)
    x1 = min(max((x + w) * sx - left, 0.0), size)
    y1 = min(max((y + h) * sy - top, 0.0), size)
    return x0, y0, x1 - x0, y1 - y0


@dataclass
class PreparedImage:
    path: str
    gray_crop: np.ndarray  # [S, S] uint8, what the model sees before normalisation
    tensor: torch.Tensor  # [3, S, S]
    original_size: tuple[int, int]  # (height, width)
    geometry: tuple[int, int, int, int]  # (resized height, resized width, crop top, left)


def prepare_image(path: str | os.PathLike, preprocess: Preprocess) -> PreparedImage:
    gray = decode_gray(path)
    crop = preprocess.crop_resized(gray)
    height, width = gray.shape
    return PreparedImage(
        path=str(path),
        gray_crop=crop,
        tensor=preprocess.to_tensor(crop),
        original_size=(height, width),
        geometry=preprocess.geometry(height, width),
    )
