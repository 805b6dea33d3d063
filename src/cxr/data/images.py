"""Decode PNG / JPEG / DICOM files to one 8-bit grayscale array, whatever the file holds.

Every size a file declares is checked against the pixel budget before anything that size
is allocated: the PNG / JPEG header; a DICOM's Rows x Columns x frames and, for encapsulated
(compressed) pixel data, the JPEG / JPEG-LS / JPEG 2000 header inside it, which must agree
with Rows and Columns; a deflated DICOM is inflated once, incrementally, up to a cap on the
inflated bytes. Compressed pixel data without its end-of-image marker (a truncated file) and
native pixel data shorter than declared are refused, never padded. Over-budget files raise
:class:`~cxr.errors.ImageTooLarge`; anything else unreadable :class:`~cxr.errors.ImageError`.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxr.errors import ImageError, ImageTooLarge
from cxr.utils import FileTooLarge, NotARegularFile, open_regular, read_regular_file

# A real NIH PNG is 1024x1024 (1 Mpx); DICOM CR/DX can reach ~4300x3500 (15 Mpx).
# Anything far above that is a decompression bomb, not an X-ray.
MAX_PIXELS = 40_000_000
# A 15 Mpx 16-bit DICOM is 30 MB uncompressed; a file far larger is not a radiograph.
MAX_FILE_BYTES = 256 * 2**20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# The formats PIL may open: never whatever a file's bytes name (an EPS file named .png would
# run Ghostscript; PSD, FITS and others are parsers nobody here needs).
PIL_FORMATS = ("PNG", "JPEG")


def is_dicom_bytes(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def decode_gray(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Return an ``(H, W) uint8`` array. ``source`` is a path or the file's bytes.

    Raises :class:`ImageError` naming the file and the reason for anything unreadable, and
    :class:`ImageTooLarge` for an image declaring more than ``max_pixels`` pixels.
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
        return _decode_dicom(data, label, max_pixels)
    return _decode_pil(data, label, max_pixels)


def _check_size(size: tuple[int, int], label: str, max_pixels: int) -> None:
    """Refuse a declared (width, height) over the budget, or without pixels."""
    if size[0] * size[1] > max_pixels:
        raise ImageTooLarge(
            f"{label}: image is {size[0]}x{size[1]} pixels, more than the limit of "
            f"{max_pixels:,} (a corrupt file or a decompression bomb)"
        )
    if min(size) < 1:
        raise ImageError(f"{label}: image has no pixels")


def _decode_pil(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            _check_size(image.size, label, max_pixels)
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not a readable image (PNG, JPEG or DICOM expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"{label}: decompression bomb refused ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: corrupt or truncated image ({_short(exc)})") from None
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


# ---------------------------------------------------------------------------- DICOM

# Bytes a deflated DICOM may inflate to, per pixel of the budget: 16-bit gray or 8-bit RGB
# pixel data plus room for the other elements. Anything larger is refused while inflating.
_INFLATED_BYTES_PER_PIXEL = 3
_INFLATED_OVERHEAD = 16 * 2**20
_INFLATE_STEP = 2**20
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little-endian byte order
_SUPPORTED_SYNTAXES = (
    *pydicom.uid.UncompressedTransferSyntaxes,
    *pydicom.uid.JPEGTransferSyntaxes,
    *pydicom.uid.JPEGLSTransferSyntaxes,
    *pydicom.uid.JPEG2000TransferSyntaxes,
    *pydicom.uid.RLETransferSyntaxes,
)


def _read_dicom(data: bytes, label: str, max_pixels: int):
    """The dataset, its pixel data read but not decoded, every declared size checked."""
    data = _inflated(data, label, max_pixels)
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageError(f"{label}: not a readable DICOM file ({_short(exc)})") from None
    if "PixelData" not in dataset:
        if _PIXEL_DATA_TAG in data:  # the element starts, but pydicom could not read it whole
            raise ImageError(f"{label}: DICOM pixel data is truncated or malformed")
        raise ImageError(f"{label}: DICOM has no pixel data (not an image object)")
    _check_declared_size(dataset, label, max_pixels)
    return dataset


def read_dicom(data: bytes, *, name: str, max_pixels: int = MAX_PIXELS):
    """A DICOM file's dataset with its pixel data read but not decoded, after the checks
    decoding makes first (every declared size within the budget and matching the pixel data,
    a supported transfer syntax): what a receiver checks before accepting an instance."""
    return _read_dicom(data, name, max_pixels)


def _decode_dicom(data: bytes, label: str, max_pixels: int) -> np.ndarray:
    dataset = _read_dicom(data, label, max_pixels)
    try:
        pixels = dataset.pixel_array
    except Exception as exc:
        raise ImageError(f"{label}: cannot decode DICOM pixel data ({_short(exc)})") from None
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:
        if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422") and pixels.shape[-1] == 3:
            return np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("L"))
        raise ImageError(f"{label}: DICOM pixel array has shape {pixels.shape}, expected 2-D")
    gray = scale_to_uint8(_apply_luts(pixels, dataset, label))
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _inflated(data: bytes, label: str, max_pixels: int) -> bytes:
    """``data`` itself, or for the Deflated Explicit VR Little Endian transfer syntax the same
    file inflated (as Explicit VR Little Endian), inflating once and incrementally: a file
    whose dataset inflates past the budget's bytes is refused before it gets there."""
    handle = io.BytesIO(data)
    try:
        read_preamble(handle, False)
        meta = _read_file_meta_info(handle)
    except Exception as exc:
        raise ImageError(f"{label}: not a readable DICOM file ({_short(exc)})") from None
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return data
    cap = max_pixels * _INFLATED_BYTES_PER_PIXEL + _INFLATED_OVERHEAD
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = bytearray()
    pending = data[handle.tell() :]
    try:
        while pending and not inflater.eof:
            inflated += inflater.decompress(pending, _INFLATE_STEP)
            if len(inflated) > cap:
                raise ImageTooLarge(
                    f"{label}: deflated DICOM inflates to more than {cap:,} bytes (the limit "
                    f"for {max_pixels:,} pixels): a decompression bomb"
                )
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ImageError(f"{label}: corrupt deflated DICOM ({exc})") from None
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    rebuilt = DicomBytesIO()
    rebuilt.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(rebuilt, meta, enforce_standard=False)
    rebuilt.write(bytes(inflated))
    return rebuilt.getvalue()


def _check_declared_size(dataset, label: str, max_pixels: int) -> None:
    """Refuse, before decoding, pixel data whose declared size is over the budget or does not
    match what the pixel data holds (a compressed header claiming another size, a truncated
    codestream, native data shorter than Rows x Columns)."""
    try:
        _check_sizes(dataset, label, max_pixels)
    except ImageError:
        raise
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:  # e.g. Rows "ab"
        raise ImageError(f"{label}: DICOM has an invalid size attribute ({_short(exc)})") from None


def _short(exc: BaseException, limit: int = 120) -> str:
    """An exception's message, cut: it may quote the file's own bytes."""
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_sizes(dataset, label: str, max_pixels: int) -> None:
    rows, cols = int(getattr(dataset, "Rows", 0) or 0), int(getattr(dataset, "Columns", 0) or 0)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if rows <= 0 or cols <= 0:
        raise ImageError(f"{label}: DICOM declares {cols}x{rows} pixels")
    if rows * cols * frames > max_pixels:
        raise ImageTooLarge(
            f"{label}: DICOM is {cols}x{rows} pixels"
            f"{f' x {frames} frames' if frames > 1 else ''}, more than {max_pixels:,}"
        )
    if frames > 1:
        raise ImageError(f"{label}: multi-frame DICOM ({frames} frames) is not a radiograph")
    syntax = dataset.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)
    if syntax not in _SUPPORTED_SYNTAXES:
        raise ImageError(f"{label}: DICOM transfer syntax {str(syntax)[:64]} is not supported")
    if not syntax.is_compressed:
        samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
        bits = int(getattr(dataset, "BitsAllocated", 8) or 8)
        expected = (rows * cols * samples * bits + 7) // 8  # 1-bit data packs 8 per byte
        if len(dataset.PixelData) < expected:
            raise ImageError(
                f"{label}: DICOM pixel data is truncated ({len(dataset.PixelData):,} of "
                f"{expected:,} bytes)"
            )
        return
    try:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception as exc:
        raise ImageError(
            f"{label}: malformed compressed DICOM pixel data ({_short(exc)})"
        ) from None
    if syntax in pydicom.uid.RLETransferSyntaxes:
        return  # RLE decodes into Rows x Columns, already checked
    size = codestream_size(frame, syntax)
    if size is None:
        raise ImageError(f"{label}: compressed pixel data has no readable image header")
    if size[0] * size[1] > max_pixels:
        raise ImageTooLarge(
            f"{label}: compressed pixel data declares {size[0]}x{size[1]} pixels, more than "
            f"{max_pixels:,} (a decompression bomb)"
        )
    if size != (cols, rows):
        raise ImageError(
            f"{label}: compressed pixel data declares {size[0]}x{size[1]} pixels but the DICOM "
            f"says {cols}x{rows}"
        )
    if not frame.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise ImageError(f"{label}: compressed pixel data is truncated (no end-of-image marker)")


# JPEG start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC)
# and JPEG-LS's SOF55: each is followed by length, precision, height, width.
_SOF_MARKERS = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7}
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: no length field


def codestream_size(frame: bytes, syntax: str) -> tuple[int, int] | None:
    """(width, height) declared by a JPEG, JPEG-LS or JPEG 2000 codestream's header, read
    without decoding; ``None`` if no header is found. Written here because no installed
    decoder exposes the header without starting to decode."""
    if syntax in pydicom.uid.JPEG2000TransferSyntaxes:
        start = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (also inside a JP2 box)
        if start < 0 or len(frame) < start + 24:
            return None
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[start + 8 : start + 24])
        return xsiz - xosiz, ysiz - yosiz
    position = 2 if frame.startswith(b"\xff\xd8") else -1
    while 0 <= position < len(frame) - 3:
        if frame[position] != 0xFF:
            return None
        marker = frame[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker == 0xDA:  # start of scan: no frame header before it
            return None
        (length,) = struct.unpack(">H", frame[position + 2 : position + 4])
        if marker in _SOF_MARKERS and len(frame) >= position + 9:
            height, width = struct.unpack(">HH", frame[position + 5 : position + 9])
            return width, height
        position += 2 + length
    return None


def _apply_luts(pixels: np.ndarray, dataset, label: str) -> np.ndarray:
    """The modality LUT (rescale) and the VOI LUT or window, as the file describes them."""
    widths = dataset.get("WindowWidth")
    if widths is not None and "VOILUTSequence" not in dataset:
        values = widths if isinstance(widths, pydicom.multival.MultiValue) else [widths]
        try:
            positive = all(float(v) > 0 for v in values)
        except (TypeError, ValueError):
            positive = False
        if not positive:
            shown = str(widths)[:40]
            raise ImageError(f"{label}: DICOM VOI window width must be positive, not {shown}")
    try:
        return apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    except Exception as exc:  # a malformed LUT or window description
        raise ImageError(f"{label}: invalid DICOM modality or VOI LUT ({_short(exc)})") from None


CHECK_MODES = ("header", "full", "none")
_HEADER_BYTES = 64 * 1024  # PNG's IHDR, a JPEG's frame header
_LONG_HEADER_BYTES = 4 * 2**20  # when metadata pushes the frame header past 64 KB
_TRAILER_BYTES = 64  # PNG's IEND chunk, a JPEG's end-of-image marker (and some padding)


def check_header(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> None:
    """What can be known of an image without decoding its pixels, nearly for free: a
    readable regular file; for PNG / JPEG the header (first 64 KB: a known format, a size
    within the budget) and the trailer (PNG's IEND chunk, JPEG's end-of-image marker: a
    truncated file lacks them); for DICOM everything :func:`decode_gray` checks before
    decoding. Raises :class:`ImageError` like :func:`decode_gray`."""
    label = str(path)
    try:
        with open_regular(path) as (handle, info):
            head = handle.read(_HEADER_BYTES)
            if is_dicom_bytes(head[:132]):
                if info.st_size > MAX_FILE_BYTES:
                    raise ImageError(f"{label}: file is larger than 256 MiB (not an X-ray)")
                rest = handle.read(MAX_FILE_BYTES + 1 - len(head))  # bounded: it may grow
                _read_dicom(head + rest, label, max_pixels)
                return
            if not _pil_size_readable(head) and len(head) == _HEADER_BYTES:
                # A large ICC profile or text chunk before the frame header: read on, bounded.
                head += handle.read(_LONG_HEADER_BYTES - len(head))
            handle.seek(max(info.st_size - _TRAILER_BYTES, 0))
            tail = handle.read(_TRAILER_BYTES)
    except FileNotFoundError:
        raise ImageError(f"{label}: file not found") from None
    except NotARegularFile:
        raise ImageError(f"{label}: not a regular file (a pipe, socket or device)") from None
    except OSError as exc:
        raise ImageError(f"{label}: cannot read file ({exc.strerror or exc})") from None
    if not head:
        raise ImageError(f"{label}: file is empty (0 bytes)")
    _check_pil_header(head, tail, label, max_pixels)


def _pil_size_readable(head: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head), formats=PIL_FORMATS):
                return True
    except Exception:  # any failure: the full check below says what is wrong
        return False


def _check_pil_header(head: bytes, tail: bytes, label: str, max_pixels: int) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head), formats=PIL_FORMATS) as image:
                size, kind = image.size, image.format
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"{label}: decompression bomb refused ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ImageError(f"{label}: not a readable image (PNG, JPEG or DICOM expected)") from None
    _check_size(size, label, max_pixels)
    ends = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}.get(kind)
    if ends is not None and ends not in tail:
        raise ImageError(f"{label}: corrupt or truncated image (its end is missing)")


def find_unreadable(
    paths: list[str],
    *,
    mode: str = "header",
    workers: int | None = None,
    progress=None,
) -> list[tuple[str, str]]:
    """Check every file once and return ``(path, reason)`` for each that fails: ``header``
    (:func:`check_header`, nearly free) or ``full`` (:func:`decode_gray`, a full decode).

    Run before training so that a damaged file stops the run in its first second, not in
    epoch 3. Threads suffice: file reads, zlib, libjpeg and pydicom's decoders release the GIL.
    """
    if mode not in ("header", "full"):
        raise ValueError(f"mode must be header or full, not {mode!r}")
    examine = check_header if mode == "header" else decode_gray

    def check(path: str) -> tuple[str, str] | None:
        try:
            examine(path)
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


def as_uint8(crop: np.ndarray) -> np.ndarray:
    """A crop for display (overlays): uint8 as it is, a float crop rounded into 0..255."""
    if crop.dtype == np.uint8:
        return crop
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)
