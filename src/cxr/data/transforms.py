"""What the model sees of an image: resize the shorter side, centre-crop a square,
normalise, 1 -> 3 channels; the training augmentation; and the same geometry for boxes.

One :class:`Preprocess` serves every model a bundle can hold. cxr's own rule (``shorter-side``)
resizes with PIL's antialiased bilinear filter and crops; ``xrv`` is torchxrayvision's
documented pipeline (``XRayCenterCrop`` then ``XRayResizer``: the centred square, resized by
``skimage.transform.resize``), computed with scikit-image as torchxrayvision does, so an
imported torchxrayvision model sees the pixels it was trained on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cxr.data.images import as_uint8, decode_gray
from cxr.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
XRV_RANGE = 1024.0  # torchxrayvision's pixel scale: [0, 255] -> [-1024, 1024]
RESIZE_RULES = ("shorter-side", "xrv")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop a square, scale to [0, 1], normalise, 1 -> 3 channels.

    Training adds a random scale (the resize target grows before the same centre crop) and a
    random horizontal flip; evaluation uses scale 1 and no flip, so nothing is random.

    ``normalization``: ``imagenet`` (mean/std per channel), ``sample`` (each image to mean 0,
    std 1) or ``xrv`` (torchxrayvision's ``(2 x / 255 - 1) * 1024``). ``channels``: 3 (the
    grey image repeated) or 1. ``resize_to``: the shorter side before the centre crop (CheXNet
    resized to 256 and cropped 224); ``None`` is ``image_size``. ``resize_rule``: see the module.
    """

    image_size: int
    normalization: str = "imagenet"
    channels: int = 3
    resize_to: int | None = None
    resize_rule: str = "shorter-side"

    def geometry(self, height: int, width: int, scale: float = 1.0) -> tuple[int, int, int, int]:
        """(resized height, resized width, crop top, crop left) for an image of this size."""
        if self.resize_rule == "xrv":
            # The centred square (torchxrayvision's offsets), then that square -> image_size.
            side = min(height, width)
            factor = self.image_size / side
            top, left = height // 2 - side // 2, width // 2 - side // 2
            return (
                int(round(height * factor)),
                int(round(width * factor)),
                int(round(top * factor)),
                int(round(left * factor)),
            )
        target = self.resize_to or self.image_size
        short = max(int(round(target * scale)), self.image_size)
        if height <= width:
            new_h, new_w = short, max(int(round(width * short / height)), short)
        else:
            new_h, new_w = max(int(round(height * short / width)), short), short
        top = (new_h - self.image_size) // 2
        left = (new_w - self.image_size) // 2
        return new_h, new_w, top, left

    def crop_resized(self, gray: np.ndarray, scale: float = 1.0, flip: bool = False) -> np.ndarray:
        """The (S, S) crop the model sees, before normalisation: uint8, or for the ``xrv``
        rule float32 on the same 0..255 scale (scikit-image's resize does not round)."""
        if self.resize_rule == "xrv":
            return self._xrv_crop(gray, flip)
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

    def _xrv_crop(self, gray: np.ndarray, flip: bool) -> np.ndarray:
        try:
            from skimage.transform import resize
        except ImportError:
            raise ModelError(
                "this bundle uses torchxrayvision's preprocessing, which needs scikit-image: "
                'pip install "cxr[xrv]"'
            ) from None
        height, width = gray.shape
        side = min(height, width)
        top, left = height // 2 - side // 2, width // 2 - side // 2
        square = gray[top : top + side, left : left + side]
        # Resized on xrv's [-1024, 1024] scale, as torchxrayvision does: the antialiasing
        # filter pads with zeros ("constant"), and zero is mid-grey on that scale only.
        scaled = (2 * (square.astype(np.float32) / 255.0) - 1.0) * XRV_RANGE
        size = (self.image_size, self.image_size)
        resized = resize(scaled, size, mode="constant", preserve_range=True).astype(np.float32)
        crop = ((resized.astype(np.float64) / XRV_RANGE + 1.0) * 127.5).astype(np.float32)
        return np.ascontiguousarray(crop[:, ::-1]) if flip else crop

    def to_tensor(self, crop: np.ndarray) -> torch.Tensor:
        """``[channels, S, S]`` float32 from a crop of :meth:`crop_resized`."""
        pixels = torch.from_numpy(np.ascontiguousarray(crop)).to(torch.float32).div_(255.0)
        if self.normalization == "xrv":
            pixels = (2.0 * pixels - 1.0) * XRV_RANGE
            return pixels.unsqueeze(0).repeat(self.channels, 1, 1)
        if self.normalization == "sample":
            std = pixels.std()
            pixels = (pixels - pixels.mean()) / torch.clamp(std, min=1e-6)
            return pixels.unsqueeze(0).repeat(self.channels, 1, 1)
        if self.channels == 1:  # one channel: the grey image against ImageNet's grey statistics
            mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
            return ((pixels - mean) / std).unsqueeze(0)
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
    tensor: torch.Tensor  # [channels, S, S]
    original_size: tuple[int, int]  # (height, width)
    geometry: tuple[int, int, int, int]  # (resized height, resized width, crop top, left)


def prepare_image(path: str | os.PathLike, preprocess: Preprocess) -> PreparedImage:
    gray = decode_gray(path)
    crop = preprocess.crop_resized(gray)
    height, width = gray.shape
    return PreparedImage(
        path=str(path),
        gray_crop=as_uint8(crop),
        tensor=preprocess.to_tensor(crop),
        original_size=(height, width),
        geometry=preprocess.geometry(height, width),
    )
