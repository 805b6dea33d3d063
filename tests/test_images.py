"""decode_gray on every image kind in ../shared/data, and on awkward files made in tmp_path."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import decode_with_little_memory
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from support.media import png_claiming_size

from cxr.data.images import MAX_PIXELS, decode_gray, is_dicom_bytes, scale_to_uint8
from cxr.errors import ImageError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RGBA_NAMES = ["00001369_000", "00002578_000", "00004934_000", "00005224_000", "00005813_000"]
DICOM_NAME = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
# misc/nih_downscaled: (mode, size) per file, from shared/data/README.md.
DOWNSCALED = {
    "00000002_000": ("RGB", 128),
    "00000005_000": ("RGB", 128),
    "00000004_000": ("RGBA", 64),
    "00000058_000": ("RGBA", 64),
    "00000072_000": ("RGB", 64),
    "00000147_001": ("RGB", 64),
    "00000211_010": ("RGB", 64),
    "00000231_013": ("RGB", 64),
    "00000234_000": ("RGB", 64),
}


def sample_modes() -> list[tuple[str, str]]:
    """(file name, mode) of the 264 nih/images PNGs, from images_provenance.csv."""
    path = SHARED_DATA / "nih" / "images_provenance.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [(row["Image Index"], row["mode"]) for row in csv.DictReader(f)]


SAMPLE_MODES = sample_modes()


def pil_array(path: Path, mode: str | None = None) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert(mode) if mode else image)


# ------------------------------------------------------------------ real files


def test_sample_has_259_l_and_5_rgba(shared_data):
    assert len(SAMPLE_MODES) == 264
    assert sorted(name for name, mode in SAMPLE_MODES if mode == "RGBA") == [
        f"{stem}.png" for stem in RGBA_NAMES
    ]
    assert sum(mode == "L" for _, mode in SAMPLE_MODES) == 259


@pytest.mark.parametrize(("name", "mode"), SAMPLE_MODES, ids=[n for n, _ in SAMPLE_MODES])
def test_every_nih_sample_png(sample_images, name, mode):
    path = sample_images / name
    gray = decode_gray(path)
    assert gray.shape == (1024, 1024)
    assert gray.dtype == np.uint8
    assert gray.flags.writeable
    raw = pil_array(path)
    assert raw.shape == ((1024, 1024) if mode == "L" else (1024, 1024, 4))
    if mode == "L":
        assert np.array_equal(gray, raw)
    else:
        # NIH's RGBA files: R = G = B, alpha 255 everywhere; gray is exactly R.
        assert np.array_equal(raw[..., 0], raw[..., 1])
        assert np.array_equal(raw[..., 0], raw[..., 2])
        assert (raw[..., 3] == 255).all()
        assert np.array_equal(gray, raw[..., 0])


@pytest.mark.parametrize("stem", RGBA_NAMES)
def test_rgba_from_bytes_equals_red_channel(sample_images, stem):
    path = sample_images / f"{stem}.png"
    gray = decode_gray(path.read_bytes(), name=path.name)
    assert gray.shape == (1024, 1024)
    assert np.array_equal(gray, pil_array(path)[..., 0])
    assert gray.std() > 10  # a real radiograph, not a flat image


@pytest.mark.parametrize("name", ["00000001_000.png", "00027426_000.png"])
def test_misc_512_pngs(shared_data, name):
    path = shared_data / "misc" / name
    gray = decode_gray(path)
    assert gray.shape == (512, 512)
    assert gray.dtype == np.uint8
    assert np.array_equal(gray, pil_array(path))


@pytest.mark.parametrize("stem", sorted(DOWNSCALED))
def test_misc_downscaled(shared_data, stem):
    mode, size = DOWNSCALED[stem]
    path = shared_data / "misc" / "nih_downscaled" / f"{stem}.png"
    with Image.open(path) as image:
        assert image.mode == mode
        assert image.size == (size, size)
    gray = decode_gray(path)
    assert gray.shape == (size, size)
    assert gray.dtype == np.uint8
    assert np.array_equal(gray, pil_array(path, "L"))
    assert gray.max() > gray.min()


def test_misc_rgb_jpeg_not_square(shared_data):
    path = shared_data / "misc" / "16747_3_1.jpg"
    with Image.open(path) as image:
        assert (image.mode, image.size) == ("RGB", (1036, 885))
    gray = decode_gray(path)
    assert gray.shape == (885, 1036)
    assert gray.dtype == np.uint8
    assert np.array_equal(gray, pil_array(path, "L"))


def test_misc_jpeg_compressed_dicom(shared_data):
    path = shared_data / "misc" / DICOM_NAME
    data = path.read_bytes()
    assert is_dicom_bytes(data[:132])
    dataset = pydicom.dcmread(path)
    assert dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG Baseline
    assert dataset.PhotometricInterpretation == "MONOCHROME2"
    gray = decode_gray(path)
    assert gray.shape == (1024, 1024)
    assert gray.dtype == np.uint8
    assert gray.min() < gray.max()
    assert len(np.unique(gray)) > 100
    # 8-bit MONOCHROME2 using the full 0..255 range: the pixels come back unchanged.
    assert np.array_equal(gray, dataset.pixel_array)
    assert np.array_equal(decode_gray(data, name=path.name), gray)


# ------------------------------------------------------------------ generated PNG/JPEG modes


def save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_16bit_png_range_maps_to_0_255(tmp_path):
    values = np.linspace(1000, 3000, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    path = save(Image.fromarray(values), tmp_path / "g16.png")
    with Image.open(path) as image:
        assert image.mode == "I;16"
    gray = decode_gray(path)
    assert gray.dtype == np.uint8
    assert gray.shape == (32, 64)
    assert (gray.min(), gray.max()) == (0, 255)
    assert gray[0, 0] == 0
    assert gray[-1, -1] == 255
    expected = np.rint((values.astype(float) - 1000) * 255 / 2000).astype(np.uint8)
    assert np.array_equal(gray, expected)
    assert (np.diff(gray.ravel().astype(int)) >= 0).all()


def test_16bit_png_full_range_and_flat(tmp_path):
    full = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    full[-1, -1] = 65535  # the whole 16-bit range, 0..65535
    gray = decode_gray(save(Image.fromarray(full), tmp_path / "full.png"))
    assert np.array_equal(gray, np.rint(full / 65535 * 255).astype(np.uint8))
    flat = np.full((8, 8), 4000, dtype=np.uint16)
    assert not decode_gray(save(Image.fromarray(flat), tmp_path / "flat.png")).any()


def test_palette_png(tmp_path):
    indices = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(indices, "L").convert("P")
    image.putpalette([v for i in range(256) for v in (255 - i,) * 3])  # gray, inverted
    path = save(image, tmp_path / "p.png")
    with Image.open(path) as reopened:
        assert reopened.mode == "P"
    gray = decode_gray(path)
    assert np.array_equal(gray, 255 - indices)


def test_la_png_ignores_alpha(tmp_path):
    luma = (np.arange(10 * 12) % 256).astype(np.uint8).reshape(10, 12)
    alpha = np.zeros_like(luma)
    path = save(Image.fromarray(np.stack([luma, alpha], -1), "LA"), tmp_path / "la.png")
    with Image.open(path) as reopened:
        assert reopened.mode == "LA"
    assert np.array_equal(decode_gray(path), luma)


def test_bilevel_png(tmp_path):
    bits = np.zeros((4, 6), dtype=bool)
    bits[1, 2] = True
    path = save(Image.fromarray(bits), tmp_path / "b.png")
    with Image.open(path) as reopened:
        assert reopened.mode == "1"
    assert np.array_equal(decode_gray(path), bits.astype(np.uint8) * 255)


def test_one_pixel_image(tmp_path):
    gray = decode_gray(save(Image.new("L", (1, 1), 123), tmp_path / "one.png"))
    assert gray.shape == (1, 1)
    assert gray.dtype == np.uint8
    assert gray[0, 0] == 123


def test_decode_from_bytes(sample_images):
    path = sample_images / "00000003_000.png"
    from_bytes = decode_gray(path.read_bytes())
    assert np.array_equal(from_bytes, decode_gray(path))
    assert np.array_equal(decode_gray(path.read_bytes(), name="upload.png"), from_bytes)


# ------------------------------------------------------------------ unreadable files


def test_truncated_png(tmp_path, sample_images):
    data = (sample_images / "00000003_000.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as info:
        decode_gray(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"file is empty \(0 bytes\)") as info:
        decode_gray(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match=r"^<upload>: file is empty"):
        decode_gray(b"")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("Image Index,Finding Labels\n00000001_000.png,Cardiomegaly\n")
    with pytest.raises(ImageError, match="not a readable image") as info:
        decode_gray(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match=r"^scan\.png: not a readable image"):
        decode_gray(b"hello", name="scan.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="file not found") as info:
        decode_gray(tmp_path / "nope.png")
    assert str(tmp_path / "nope.png") in str(info.value)
    with pytest.raises(ImageError, match="cannot read file"):
        decode_gray(tmp_path)


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(60_000, 60_000))
    assert path.stat().st_size < 200
    with pytest.raises(ImageError) as info:
        decode_gray(path)
    message = str(info.value)
    assert str(path) in message
    assert "bomb" in message
    assert "3600000000" in message
    # Refused from the header, nothing allocated: the same holds with 64 MiB to spare, not
    # the 3.6 GB the header claims.
    limited = decode_with_little_memory(path, str(path), 60_000 * 60_000)
    assert limited == message


def test_image_over_own_pixel_limit():
    # 48 Mpx: under Pillow's own bomb limit, over cxr's MAX_PIXELS.
    assert MAX_PIXELS < 8000 * 6000
    data = png_claiming_size(8000, 6000)
    with pytest.raises(ImageError) as info:
        decode_gray(data, name="big.png")
    message = str(info.value)
    assert message.startswith("big.png: image is 8000x6000 pixels")
    assert f"limit of {MAX_PIXELS:,}" in message
    assert "bomb" in message
    # Refused from the header: a quarter of the 48 MB it claims is enough.
    assert decode_with_little_memory(data, "big.png", 8000 * 6000) == message


# ------------------------------------------------------------------ generated DICOM


def make_dicom(
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    frames: int | None = None,
    **attributes,
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CR"
    dataset.PatientID = "anon"
    if pixels is not None:
        if frames:
            dataset.NumberOfFrames = frames
        dataset.Rows, dataset.Columns = pixels.shape[-2:]
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = photometric
        bits = pixels.dtype.itemsize * 8
        dataset.BitsAllocated = bits
        dataset.BitsStored = bits
        dataset.HighBit = bits - 1
        dataset.PixelRepresentation = 0
        dataset.PixelData = pixels.tobytes()
    for key, value in attributes.items():
        setattr(dataset, key, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


RAMP8 = (np.arange(24 * 32).reshape(24, 32) % 200 + 10).astype(np.uint8)


def test_dicom_monochrome2_file_and_bytes(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(make_dicom(RAMP8))
    gray = decode_gray(path)
    assert gray.shape == (24, 32)
    assert gray.dtype == np.uint8
    assert np.array_equal(gray, scale_to_uint8(RAMP8))  # 10..209 stretched to 0..255
    assert (gray.min(), gray.max()) == (0, 255)
    assert np.array_equal(decode_gray(path.read_bytes()), gray)


def test_dicom_monochrome1_is_inverted():
    mono2 = decode_gray(make_dicom(RAMP8, photometric="MONOCHROME2"))
    mono1 = decode_gray(make_dicom(RAMP8, photometric="MONOCHROME1"))
    assert np.array_equal(mono1, 255 - mono2)
    assert mono1[0, 0] == 255  # the lowest stored value is white in MONOCHROME1


def test_dicom_16bit_and_window():
    pixels = (np.arange(24 * 32).reshape(24, 32) * 4).astype(np.uint16)
    gray = decode_gray(make_dicom(pixels))
    assert np.array_equal(gray, scale_to_uint8(pixels))
    windowed = decode_gray(make_dicom(pixels, WindowCenter=1000, WindowWidth=800))
    assert (windowed[pixels <= 600] == 0).all()
    assert (windowed[pixels >= 1400] == 255).all()
    inverted = decode_gray(
        make_dicom(pixels, photometric="MONOCHROME1", WindowCenter=1000, WindowWidth=800)
    )
    assert np.array_equal(inverted, 255 - windowed)


def test_dicom_without_pixel_data(tmp_path):
    path = tmp_path / "report.dcm"
    path.write_bytes(make_dicom())
    with pytest.raises(ImageError, match="DICOM has no pixel data") as info:
        decode_gray(path)
    assert str(path) in str(info.value)


def test_multi_frame_dicom(tmp_path):
    path = tmp_path / "cine.dcm"
    path.write_bytes(make_dicom(np.stack([RAMP8] * 3), frames=3))
    with pytest.raises(ImageError, match=r"multi-frame DICOM \(3 frames\)") as info:
        decode_gray(path)
    assert str(path) in str(info.value)


def test_truncated_dicom_pixel_data(tmp_path):
    data = make_dicom(RAMP8)
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 300])
    message = r"DICOM pixel data is truncated \(468 of 768 bytes\)"
    with pytest.raises(ImageError, match=message) as info:
        decode_gray(path)
    assert str(path) in str(info.value)


def test_scale_to_uint8():
    assert np.array_equal(scale_to_uint8(np.array([[-5.0, 0.0, 5.0]])), [[0, 128, 255]])
    assert not scale_to_uint8(np.full((3, 3), 7.0)).any()


def test_the_header_check_reads_headers_and_trailers_not_pixels(tmp_path, monkeypatch, nih_dir):
    from cxr.data.images import check_header, find_unreadable

    real = sorted((nih_dir / "images").glob("*.png"))[:3]
    jpeg = tmp_path / "scan.jpg"
    Image.fromarray(RAMP8).save(jpeg, format="JPEG")
    cut_png, cut_jpeg = tmp_path / "cut.png", tmp_path / "cut.jpg"
    cut_png.write_bytes(real[0].read_bytes()[:-200])
    cut_jpeg.write_bytes(jpeg.read_bytes()[:-10])
    # A PNG whose pixels are damaged but whose ends are whole: only a full decode sees it.
    damaged = bytearray(real[1].read_bytes())
    damaged[5000:5400] = bytes(400)
    inside = tmp_path / "damaged.png"
    inside.write_bytes(bytes(damaged))

    def no_decoding(self, *args):
        raise AssertionError("the header check must not decode pixels")

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "load", no_decoding)
        for path in [*real, jpeg, inside]:
            check_header(path)
    paths = [str(p) for p in (*real, jpeg, cut_png, cut_jpeg, inside)]
    header = dict(find_unreadable(paths, mode="header", workers=1))
    assert set(header) == {str(cut_png), str(cut_jpeg)}
    assert header[str(cut_png)] == "corrupt or truncated image (its end is missing)"
    full = dict(find_unreadable(paths, mode="full", workers=1))
    assert set(full) == {str(cut_png), str(cut_jpeg), str(inside)}


def test_check_images_modes_in_the_training_config():
    from cxr.config import TrainConfig
    from cxr.errors import ConfigError

    assert TrainConfig().check_images == "header"
    # Config files written for cxr 0.1 said true / false.
    assert TrainConfig.from_dict({"check_images": True}).check_images == "header"
    assert TrainConfig.from_dict({"check_images": False}).check_images == "none"
    assert TrainConfig.from_dict({"check_images": "full"}).check_images == "full"
    with pytest.raises(ConfigError, match="check_images must be one of header, full, none"):
        TrainConfig.from_dict({"check_images": "quick"})
