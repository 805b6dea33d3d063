"""Generators of test material, shared by the test suite and the benchmarks: awkward image
files and untrained model bundles.

They live in the package (not in tests/) so that benchmarks and users' own tests can build
the same corpus without committed binaries.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr.model.bundle import BundleMeta, save_bundle
from cxr.model.network import build_model


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims ``width`` x ``height`` pixels (CRC correct).

    What a decompression bomb's first bytes look like: a decoder that trusts the header
    allocates width x height before it finds out the pixel data is missing.
    """
    data = bytearray(png_bytes(Image.new("L", (4, 4))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # over type + data
    return bytes(data)


def untrained_bundle(folder: str | os.PathLike, image_size: int, *, seed: int = 0, **meta) -> Path:
    """An untrained DenseNet121 bundle (weights seeded by ``seed``) written into ``folder``:
    a model to time or to exercise the code with, whose outputs mean nothing."""
    torch.manual_seed(seed)
    description = BundleMeta(image_size=image_size, normalization="imagenet", **meta)
    save_bundle(folder, build_model(), description)
    return Path(folder)
