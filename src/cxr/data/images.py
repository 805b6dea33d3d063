"""Decode PNG / JPEG / DICOM files to one 8-bit grayscale array, whatever the file holds."""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxr.errors import ImageError
from cxr.utils import FileTooLarge, NotARegularFile, read_regular_file

# A real NIH PNG is 1024x1024 (1 Mpx); DICOM CR/DX can reach ~4300x3500 (15 Mpx).
# Anything far above that is a decompression bomb, not an X-ray.
MAX_PIXELS = 40_000_000
# A 15 Mpx 16-bit DICOM is 30 MB uncompressed; a file far larger is not a radiograph.
MAX_FILE_BYTES = 256 * 2**20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def decode_gray(source: str | os.PathLike | bytes, *, name: str | None = None) -> np.ndarray:
    """Return an ``(H, W) uint8`` array. ``source`` is a path or the file's bytes.

    Raises :class:`ImageError` naming the file and the reason for anything unreadable.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = read_regular_file(source, MAX_FILE_BYTES)
        except FileNotFoundError:
            raise ImageError(f"{label}: file not found") from None
        except NotARegularFile:
            raise ImageError(f"{label}: not a regular file (a pipe, socket or device)") from None
        except FileTooLarge:
            raise ImageError(
                f"{label}: file is larger than {MAX_FILE_BYTES // 2**20} MiB (not an X-ray)"
            ) from None
        except OSError as exc:
            raise ImageError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(f"{label}: file is empty (0 bytes)")
    if is_dicom_bytes(data[:132]):
        return _decode_dicom(data, label)
    return _decode_pil(data, label)


def _decode_pil(data: bytes, label: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"{label}: image is {width}x{height} pixels, more than the limit of "
                    f"{MAX_PIXELS:,} (a corrupt file or a decompression bomb)"
                )
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a readable image (PNG, JPEG or DICOM expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{label}: decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({exc})") from None
    if min(image.size) < 1:
        raise ImageError(f"{label}: image has no pixels")
    return _to_uint8_gray(image, label)


def _to_uint8_gray(image: Image.Image, label: str) -> np.ndarray:
    mode = image.mode
    if mode in ("L",):
        return np.asarray(image, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return scale_to_uint8(np.asarray(image).astype(np.float64))
    if mode in ("1", "P", "PA", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "La"):
        # ITU-R 601 luma; exact for NIH's RGBA files, where R = G = B.
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()
    raise ImageError(f"{label}: unsupported image mode {mode!r}")


def scale_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Map the array's own value range linearly onto 0..255 (flat images become 0)."""
    pixels = np.asarray(pixels, dtype=np.float64)
    low, high = float(np.min(pixels)), float(np.max(pixels))
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    scaled = (pixels - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _decode_dicom(data: bytes, label: str) -> np.ndarray:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageError(f"{label}: not a readable DICOM file ({exc})") from None
    if "PixelData" not in dataset:
        raise ImageError(f"{label}: DICOM has no pixel data (not an image object)")
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"{label}: multi-frame DICOM ({frames} frames) is not a radiograph")
    rows, cols = int(getattr(dataset, "Rows", 0)), int(getattr(dataset, "Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise ImageError(f"{label}: DICOM is {cols}x{rows} pixels, more than {MAX_PIXELS:,}")
    try:
        pixels = dataset.pixel_array
    except Exception as exc:
        raise ImageError(f"{label}: cannot decode DICOM pixel data ({exc})") from None
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and pixels.shape[-1] == 3:
            return np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("L"))
        raise ImageError(f"{label}: DICOM pixel array has shape {pixels.shape}, expected 2-D")
    values = apply_modality_lut(pixels, dataset)
    values = apply_voi_lut(values, dataset)
    gray = scale_to_uint8(values)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray


def find_unreadable(
    paths: list[str],
    *,
    workers: int | None = None,
    progress=None,
) -> list[tuple[str, str]]:
    """Decode every file once and return ``(path, reason)`` for each that fails.

    Run before training so that a damaged file stops the run in its first second, not in
    epoch 3. Threads suffice: zlib, libjpeg and pydicom's decoders release the GIL.
    """

    def check(path: str) -> tuple[str, str] | None:
        try:
            decode_gray(path)
        except ImageError as exc:
            return path, str(exc).removeprefix(f"{path}: ")
        return None

    workers = workers or min(8, (os.cpu_count() or 1))
    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, result in enumerate(pool.map(check, paths, chunksize=16), start=1):
            if result is not None:
                failures.append(result)
            if progress is not None and (done % 64 == 0 or done == len(paths)):
                progress(done, len(paths))
    return failures
