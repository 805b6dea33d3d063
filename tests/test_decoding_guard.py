"""The decoding guard: every size a file declares is checked before anything that size is
allocated (DICOM Rows/Columns and the JPEG / JPEG 2000 header inside encapsulated pixel data),
deflated DICOM is inflated once with a cap, truncated pixel data is refused, never padded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from conftest import decode_with_little_memory
from PIL import Image
from support.media import deflated_dicom_bomb, dicom_bytes, jpeg_dicom_claiming

from cxr.data.images import MAX_PIXELS, codestream_size, decode_gray
from cxr.errors import ImageError, ImageTooLarge

REAL_DICOM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


@pytest.fixture(scope="module")
def real_jpeg_dicom(shared_data) -> bytes:
    """A real chest X-ray DICOM, JPEG baseline compressed, 1024 x 1024."""
    return (shared_data / "misc" / REAL_DICOM).read_bytes()


def test_a_jpeg_header_claiming_gigapixels_inside_a_small_dicom_is_refused_unallocated():
    bomb = jpeg_dicom_claiming(65500, 65500, rows=1024, cols=1024)
    assert len(bomb) < 40_000  # the finding: a 37 KB file that took 16 GB
    # 65500^2 one-byte pixels are 4.3 GB; the child may allocate 64 MiB.
    message = decode_with_little_memory(bomb, "bomb.dcm", 65500 * 65500)
    assert message == (
        "bomb.dcm: compressed pixel data declares 65500x65500 pixels, more than 40,000,000 "
        "(a decompression bomb)"
    )
    with pytest.raises(ImageTooLarge):
        decode_gray(bomb, name="bomb.dcm")


def test_a_jpeg_header_that_disagrees_with_rows_and_columns_is_refused():
    other = jpeg_dicom_claiming(2048, 1536, rows=1024, cols=1024)
    with pytest.raises(ImageError) as info:
        decode_gray(other, name="other.dcm")
    assert not isinstance(info.value, ImageTooLarge)
    assert str(info.value) == (
        "other.dcm: compressed pixel data declares 2048x1536 pixels but the DICOM says 1024x1024"
    )


def test_rows_and_columns_over_the_budget_are_refused_from_the_header():
    pixels = np.zeros((4, 4), np.uint8)
    huge = dicom_bytes(pixels, Rows=30000, Columns=30000)
    message = decode_with_little_memory(huge, "huge.dcm", 30000 * 30000)
    assert message == "huge.dcm: DICOM is 30000x30000 pixels, more than 40,000,000"
    # The service's own, smaller budget applies the same way.
    with pytest.raises(ImageTooLarge, match="more than 10"):
        decode_gray(dicom_bytes(pixels), name="x.dcm", max_pixels=10)


@pytest.mark.slow
def test_a_deflate_bomb_is_inflated_once_up_to_a_cap(monkeypatch):
    bomb = deflated_dicom_bomb(512 * 2**20)  # 512 MiB of zeros in a private element
    assert len(bomb) < 2_000_000
    cap = MAX_PIXELS * 3 + 16 * 2**20
    # The child has 300 MB to spare: less than the 512 MiB the file inflates to, more than
    # the cap at which the guard stops inflating.
    message = decode_with_little_memory(bomb, "deflate.dcm", 512 * 2**20, headroom=300 << 20)
    assert message == (
        f"deflate.dcm: deflated DICOM inflates to more than {cap:,} bytes (the limit for "
        "40,000,000 pixels): a decompression bomb"
    )
    inflaters = []
    real = zlib.decompressobj

    def counting(*args):
        inflaters.append(args)
        return real(*args)

    monkeypatch.setattr(zlib, "decompressobj", counting)
    small = deflated_dicom_bomb(1000, rows=24, cols=32)
    gray = decode_gray(small, name="small.dcm")
    assert gray.shape == (24, 32)
    assert len(inflaters) == 1  # inflated once, not once to look and once to decode


def test_a_valid_deflated_dicom_decodes_to_its_pixels():
    pixels = (np.arange(24 * 32).reshape(24, 32) % 200 + 10).astype(np.uint8)
    deflated = dicom_bytes(pixels)
    dataset = pydicom.dcmread(io.BytesIO(deflated))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    expected = np.rint((pixels - 10.0) * 255.0 / 199.0).astype(np.uint8)  # full range
    assert np.array_equal(decode_gray(buffer.getvalue(), name="d.dcm"), expected)


def test_a_truncated_jpeg_dicom_is_refused_not_padded(real_jpeg_dicom):
    assert decode_gray(real_jpeg_dicom, name="whole.dcm").shape == (1024, 1024)
    third = real_jpeg_dicom[: len(real_jpeg_dicom) // 3]
    with pytest.raises(ImageError, match=r"^third\.dcm: DICOM pixel data is truncated"):
        decode_gray(third, name="third.dcm")
    # The compressed frame of a file cut inside its pixel data, with its item length fixed
    # up so that pydicom reads it: still refused, for the missing end-of-image marker.
    dataset = pydicom.dcmread(io.BytesIO(real_jpeg_dicom))
    frame = next(pydicom.encaps.generate_frames(dataset.PixelData, number_of_frames=1))
    dataset.PixelData = pydicom.encaps.encapsulate([frame[: len(frame) // 3]])
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(ImageError, match="truncated \\(no end-of-image marker\\)"):
        decode_gray(buffer.getvalue(), name="cut.dcm")


def test_codestream_headers_are_read_without_decoding(real_jpeg_dicom):
    dataset = pydicom.dcmread(io.BytesIO(real_jpeg_dicom))
    frame = next(pydicom.encaps.generate_frames(dataset.PixelData, number_of_frames=1))
    # PIL reads the same header: an independent reference.
    assert (
        codestream_size(frame, dataset.file_meta.TransferSyntaxUID)
        == Image.open(io.BytesIO(frame)).size
    )
    # JPEG 2000: SOC, then SIZ with Xsiz, Ysiz, XOsiz, YOsiz (ISO 15444-1 A.5.1).
    siz = b"\xff\x4f\xff\x51" + struct.pack(">HHIIII", 41, 0, 700, 500, 100, 50)
    assert codestream_size(siz + bytes(30), pydicom.uid.JPEG2000Lossless) == (600, 450)
    assert codestream_size(b"\xff\xd8\xff\xda", pydicom.uid.JPEGBaseline8Bit) is None


def test_a_voi_window_of_width_zero_is_refused():
    pixels = np.full((8, 8), 100, np.uint8)
    for width in (0, -10):
        data = dicom_bytes(pixels, WindowCenter=100, WindowWidth=width)
        with pytest.raises(ImageError, match="VOI window width must be positive"):
            decode_gray(data, name="w.dcm")
    assert decode_gray(dicom_bytes(pixels, WindowCenter=100, WindowWidth=50)).shape == (8, 8)


def test_an_unsupported_transfer_syntax_is_refused():
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((8, 8), np.uint8))))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    dataset.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(ImageError, match=r"transfer syntax 1\.2\.840\.10008\.1\.2\.4\.100 is not"):
        decode_gray(buffer.getvalue(), name="video.dcm")


def test_cxr_predict_names_each_bad_dicom_and_predicts_the_rest(
    tmp_path, untrained_bundle, real_jpeg_dicom
):
    from typer.testing import CliRunner

    from cxr.cli import app

    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "good.dcm").write_bytes(real_jpeg_dicom)
    (folder / "jpeg-bomb.dcm").write_bytes(jpeg_dicom_claiming(65500, 65500))
    (folder / "deflate-bomb.dcm").write_bytes(deflated_dicom_bomb(256 * 2**20))
    (folder / "third.dcm").write_bytes(real_jpeg_dicom[: len(real_jpeg_dicom) // 3])
    window = dicom_bytes(np.full((8, 8), 9, np.uint8), WindowCenter=9, WindowWidth=0)
    (folder / "window.dcm").write_bytes(window)
    out = tmp_path / "out.csv"
    args = ["predict", str(untrained_bundle), str(folder), "--out", str(out), "--workers", "0"]
    result = CliRunner().invoke(app, [*args, "--backend", "torch"])
    assert result.exit_code == 1, result.output  # some files failed, the rest predicted
    assert "Traceback" not in result.output
    assert out.read_text().splitlines()[1].startswith(str(folder / "good.dcm") + ",")
    expected = {
        "jpeg-bomb.dcm": "compressed pixel data declares 65500x65500 pixels",
        "deflate-bomb.dcm": "deflated DICOM inflates to more than",
        "third.dcm": "DICOM pixel data is truncated",
        "window.dcm": "VOI window width must be positive",
    }
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    for name, reason in expected.items():
        assert any(str(folder / name) in line and reason in line for line in lines), (name, lines)


@pytest.mark.slow
def test_the_service_answers_each_bad_dicom_with_its_status(untrained_bundle, real_jpeg_dicom):
    from fastapi.testclient import TestClient

    from cxr.serve.app import create_app

    window = dicom_bytes(np.full((8, 8), 9, np.uint8), WindowCenter=9, WindowWidth=0)
    cases = {
        "jpeg-bomb.dcm": (jpeg_dicom_claiming(65500, 65500), 413, "declares 65500x65500"),
        "deflate-bomb.dcm": (deflated_dicom_bomb(256 * 2**20), 413, "deflated DICOM inflates"),
        "third.dcm": (real_jpeg_dicom[: len(real_jpeg_dicom) // 3], 422, "is truncated"),
        "window.dcm": (window, 422, "VOI window width must be positive"),
    }
    app = create_app(untrained_bundle, backend="torch", device="cpu", decode_workers=1)
    with TestClient(app) as client:
        for name, (data, status, reason) in cases.items():
            files = {"file": (name, data, "application/dicom")}
            response = client.post("/v1/predict", files=files)
            assert response.status_code == status, (name, response.text)
            detail = response.json()["detail"]
            assert detail.startswith(f"{name}: ") and reason in detail, detail
        good = {"file": ("good.dcm", real_jpeg_dicom, "application/dicom")}
        assert client.post("/v1/predict", files=good).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_hostile_values_inside_a_file_get_clear_short_refusals(tmp_path):
    """From a review: malformed DICOM values gave ValueError (a 500), PIL opened any format
    a file's bytes named (an EPS named .png runs Ghostscript), and refusals quoted the file."""
    pixels = np.zeros((8, 8), np.uint8)
    # Values pydicom will not write are patched into the bytes: (0028,0008) IS "12" -> "ab",
    # (0028,1051) DS "100 " -> "abc ".
    frames = dicom_bytes(pixels, NumberOfFrames="12")
    frames = frames.replace(b"\x28\x00\x08\x00IS\x02\x0012", b"\x28\x00\x08\x00IS\x02\x00ab")
    window = dicom_bytes(pixels, WindowCenter=5, WindowWidth="100")
    window = window.replace(b"\x51\x10DS\x04\x00100 ", b"\x51\x10DS\x04\x00abc ")
    for data in (frames, window):
        assert b"ab" in data
        with pytest.raises(ImageError, match=r"^bad\.dcm: "):
            decode_gray(data, name="bad.dcm")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(ImageError, match="not a readable image"):
        decode_gray(eps, name="x.png")
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))
    dataset.file_meta.TransferSyntaxUID = "1." + "2" * 3000
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    with pytest.raises(ImageError) as info:
        decode_gray(buffer.getvalue(), name="uid.dcm")
    assert len(str(info.value)) < 200


def test_the_header_check_reads_past_a_large_metadata_segment(tmp_path):
    from cxr.data.images import check_header

    path = tmp_path / "icc.jpg"
    profile = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    Image.fromarray(np.full((40, 30), 90, np.uint8)).save(path, "JPEG", icc_profile=profile)
    assert path.stat().st_size > 200_000
    check_header(path)  # the frame header sits past the first 64 KB
    assert decode_gray(path).shape == (40, 30)
