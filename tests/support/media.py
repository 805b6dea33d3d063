"""Generators of test material, shared by the test suite and the benchmarks: awkward image
files (PNG and DICOM decompression bombs, truncated files) and untrained model bundles.

Generated, not committed as binaries; here in tests/, not in the package, so that nothing
test-only ships in the wheel (the benchmarks import it through ``benchmarks/support``).
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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from cxr import __version__
from cxr.model.bundle import BundleMeta, save_bundle
from cxr.model.card import untrained_card
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
    meta.setdefault("card", untrained_card(__version__))
    description = BundleMeta(image_size=image_size, normalization="imagenet", **meta)
    save_bundle(folder, build_model(len(description.labels)), description)
    return Path(folder)


def _dx_dataset(rows: int, cols: int, transfer_syntax: str) -> Dataset:
    """A DX dataset (no pixel data yet) of an 8-bit MONOCHROME2 image, frontal PA."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality, dataset.ViewPosition, dataset.PatientID = "DX", "PA", "anon"
    dataset.Rows, dataset.Columns = rows, cols
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    return dataset


def _file_bytes(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_bytes(pixels: np.ndarray, **attributes) -> bytes:
    """An uncompressed 8-bit DX DICOM of ``pixels`` (``[rows, cols]`` uint8)."""
    dataset = _dx_dataset(*pixels.shape, ExplicitVRLittleEndian)
    dataset.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    return _file_bytes(dataset)


def jpeg_dicom_claiming(width: int, height: int, *, rows: int = 1024, cols: int = 1024) -> bytes:
    """A JPEG-compressed DX DICOM whose Rows x Columns say ``rows`` x ``cols`` while the JPEG
    inside claims ``width`` x ``height``: a decoder that trusts the JPEG header allocates
    ``width * height`` before finding out the data is a few bytes."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, format="JPEG")
    jpeg = bytearray(buffer.getvalue())
    sof = jpeg.find(b"\xff\xc0")  # baseline start of frame: length, precision, height, width
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    dataset = _dx_dataset(rows, cols, JPEGBaseline8Bit)
    dataset.PixelData = encapsulate([bytes(jpeg)])
    dataset["PixelData"].is_undefined_length = True
    return _file_bytes(dataset)


def deflated_dicom_bomb(payload_bytes: int, *, rows: int = 64, cols: int = 64) -> bytes:
    """A small valid DX DICOM in the Deflated Explicit VR Little Endian transfer syntax that
    also carries ``payload_bytes`` zero bytes in a private element: a few hundred KB on disk
    per GiB it inflates to. Compressed in 1 MiB steps, so generating it needs no more memory
    than the file itself."""
    dataset = _dx_dataset(rows, cols, DeflatedExplicitVRLittleEndian)
    dataset.PixelData = (np.arange(rows * cols) % 251).astype(np.uint8).tobytes()
    head, tail = Dataset(), Dataset()
    for element in dataset:
        (head if element.tag.group < 0x0009 else tail).add(element)
    head.add_new(0x00090010, "LO", "cxr test bomb")  # private creator
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = bytearray(compressor.compress(_explicit_le(head)))
    # (0009,1000) OB: tag, VR, 2 reserved bytes, 4-byte length, then the zeros.
    deflated += compressor.compress(struct.pack("<HH2sHI", 0x0009, 0x1000, b"OB", 0, payload_bytes))
    zeros = bytes(2**20)
    for start in range(0, payload_bytes, len(zeros)):
        deflated += compressor.compress(zeros[: min(len(zeros), payload_bytes - start)])
    deflated += compressor.compress(_explicit_le(tail)) + compressor.flush()
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, dataset.file_meta, enforce_standard=True)
    out.write(bytes(deflated))
    return out.getvalue()


def _explicit_le(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def radiograph_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    view: str | None = "PA",
    sop_class: str = DigitalXRayImageStorageForPresentation,
    **attributes,
) -> bytes:
    """A complete, uncompressed radiograph DICOM (study, series and instance UIDs, patient)
    of ``pixels``: ``uint8`` gives 8 bits stored, ``uint16`` 16 (stored as given; for
    MONOCHROME1 pass the pixels already inverted, as a modality would store them)."""
    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim != 2:
        raise ValueError(f"expected 2-D uint8 or uint16 pixels, got {pixels.dtype} {pixels.shape}")
    dataset = _dx_dataset(*pixels.shape, ExplicitVRLittleEndian)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
    bits = pixels.dtype.itemsize * 8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = bits, bits, bits - 1
    dataset.PhotometricInterpretation, dataset.Modality = photometric, modality
    if view is None:
        del dataset.ViewPosition
    else:
        dataset.ViewPosition = view
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.PatientName, dataset.PatientID = "Test^Patient", "cxr-test"
    dataset.StudyDate, dataset.StudyTime, dataset.AccessionNumber = "20240101", "120000", ""
    dataset.ReferringPhysicianName, dataset.StudyID = "", "1"
    dataset.SeriesNumber, dataset.InstanceNumber = 1, 1
    dataset.PatientBirthDate, dataset.PatientSex = "", "O"
    dataset.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    return _file_bytes(dataset)
