"""A bad-input corpus, generated here (nothing binary is committed), through every entry point.

Each file goes where a user would put it: the CSVs through ``cxr data stats``, ``cxr data
split`` and ``cxr train``; the images through ``cxr predict``, ``cxr train`` (swapped into a
synthetic dataset) and the service. Every bad one gets a message naming the file and the
problem, never a traceback; the odd-but-valid images (16-bit, palette, 1x1) are predicted
and trained on, not refused.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from support.problems import problem_detail
from typer.testing import CliRunner

from cxr.cli import app
from cxr.serve.app import create_app

# name -> (what the CLI's reason says, the service's status, what its detail says)
BAD_IMAGES = {
    "truncated.png": ("corrupt or truncated image", 422, "corrupt or truncated image"),
    "empty.png": ("file is empty (0 bytes)", 415, "empty (0 bytes)"),
    "text.png": ("not a readable image", 415, "not a PNG, JPEG or DICOM image"),
    "bomb.png": ("decompression bomb", 413, "image is 60000x60000 pixels, more than the limit"),
    "no_pixels.dcm": ("DICOM has no pixel data", 422, "DICOM has no pixel data"),
}
# Unusual but valid: decoded to 8-bit grayscale and predicted like any other image.
ODD_IMAGES = {
    "sixteen_bit.png": (64, 48),
    "palette.png": (40, 40),
    "one_pixel.png": (1, 1),
}
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
# name -> (lines of the table, what the error says)
BAD_TABLES = {
    "missing_columns.csv": (
        ["Image Index,Patient ID", "00000001_000.png,1"],
        "missing column(s) 'Finding Labels'",
    ),
    "unknown_label.csv": (
        [
            NIH_HEADER,
            "00000001_000.png,Cardiomegaly,0,1,58,M,PA,1024,1024,0.143,0.143",
            "00000002_000.png,Covid|Mass,0,2,81,M,PA,1024,1024,0.143,0.143",
        ],
        "line 3: unknown label 'Covid'",
    ),
    "duplicate_names.csv": (
        [
            NIH_HEADER,
            "00000001_000.png,Cardiomegaly,0,1,58,M,PA,1024,1024,0.143,0.143",
            "00000002_000.png,No Finding,0,2,81,M,PA,1024,1024,0.143,0.143",
            "00000001_000.png,Cardiomegaly,0,1,58,M,PA,1024,1024,0.143,0.143",
        ],
        "image '00000001_000.png' is listed more than once (lines 2, 4)",
    ),
    "two_patients.csv": (
        [
            NIH_HEADER,
            "00000001_000.png,Cardiomegaly,0,1,58,M,PA,1024,1024,0.143,0.143",
            "00000002_000.png,No Finding,0,2,81,M,PA,1024,1024,0.143,0.143",
            "00000001_000.png,Cardiomegaly,0,7,58,M,PA,1024,1024,0.143,0.143",
        ],
        "image '00000001_000.png' is listed with different patients 1, 7",
    ),
}
GOOD_TABLE = [
    NIH_HEADER,
    *(
        f"{p:08d}_000.png,{'Mass' if p % 2 else 'No Finding'},0,{p},50,F,PA,1024,1024,0.1,0.1"
        for p in range(1, 21)
    ),
]


# ---------------------------------------------------------------------------- the corpus


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def good_png(size: int = 128) -> bytes:
    """A chest-sized-enough PNG of noise (incompressible, so a cut lands inside the pixels)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels, mode="L"))


def bomb_png(base: bytes, width: int = 60_000, height: int = 60_000) -> bytes:
    """``base`` with its IHDR claiming ``width x height`` and a correct CRC: a valid header."""
    assert base[12:16] == b"IHDR"
    ihdr = bytearray(base[12:29])  # type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return base[:12] + bytes(ihdr) + crc + base[33:]


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "SR"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def corpus_bytes() -> dict[str, bytes]:
    """Every corpus image by name."""
    good = good_png()
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 20).astype(np.uint16)
    sixteen = Image.fromarray(ramp)
    assert sixteen.mode.startswith("I;16")
    palette = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (40, 1)), mode="L")
    palette = palette.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files = {
        "good.png": good,
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
        "text.png": b"this is a text file, not a PNG\n",
        "bomb.png": bomb_png(good),
        "no_pixels.dcm": dicom_without_pixels(),
        "sixteen_bit.png": png_bytes(sixteen),
        "palette.png": png_bytes(palette),
        "one_pixel.png": png_bytes(Image.new("L", (1, 1), 128)),
    }
    # The corpus is what it claims to be.
    assert Image.open(io.BytesIO(files["sixteen_bit.png"])).mode.startswith("I;16")
    assert Image.open(io.BytesIO(files["palette.png"])).mode == "P"
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(files["bomb.png"]))
    return files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The whole corpus as files: the images above and the tables, in one folder."""
    folder = tmp_path_factory.mktemp("corpus")
    for name, data in corpus_bytes().items():
        (folder / name).write_bytes(data)
    for name, (lines, _message) in BAD_TABLES.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    (folder / "good.csv").write_text("\n".join(GOOD_TABLE) + "\n")
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """An untrained DenseNet121 bundle (64 px)."""
    from support.media import untrained_bundle

    return untrained_bundle(tmp_path_factory.mktemp("bundle") / "model", 64)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def assert_clean_failure(result, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# ---------------------------------------------------------------------------- tables


def test_the_good_table_passes(corpus, tmp_path):
    """The baseline the bad tables are cut from is itself fine, so each failure is its own."""
    assert invoke("data", "stats", corpus / "good.csv").exit_code == 0
    result = invoke("data", "split", corpus / "good.csv", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_bad_tables_in_data_stats_and_split(corpus, tmp_path, name):
    path = corpus / name
    message = BAD_TABLES[name][1]
    for args in (["stats", path], ["split", path, "--out", tmp_path / "split"]):
        result = invoke("data", *args)
        assert_clean_failure(result)
        assert str(path) in result.output and message in result.output
    assert not (tmp_path / "split").exists()


@pytest.mark.parametrize("name", sorted(BAD_TABLES))
def test_bad_tables_in_train(corpus, tmp_path, name):
    data = tmp_path / "data"
    data.mkdir()
    table = data / "Data_Entry_2017.csv"
    shutil.copyfile(corpus / name, table)
    result = invoke("train", data, "--out", tmp_path / "run", "--weights", "none")
    assert_clean_failure(result)
    assert str(table) in result.output and BAD_TABLES[name][1] in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- cxr predict


def test_predict_reports_each_bad_image_and_predicts_the_rest(corpus, bundle, tmp_path):
    images = [
        corpus / "good.png",
        *(corpus / n for n in ODD_IMAGES),
        *(corpus / n for n in BAD_IMAGES),
    ]
    out = tmp_path / "predictions.json"
    result = invoke(
        "predict", bundle, *images, "--out", out, "--backend", "torch", "--workers", "0"
    )
    assert_clean_failure(result, code=1)
    written = json.loads(out.read_text())
    predicted = {Path(p["file"]).name for p in written["predictions"]}
    assert predicted == {"good.png", *ODD_IMAGES}
    for record in written["predictions"]:
        assert all(0.0 <= v <= 1.0 for v in record["probabilities"].values())
    errors = {Path(e["file"]).name: e["reason"] for e in written["errors"]}
    assert set(errors) == set(BAD_IMAGES)
    for name, (reason, _status, _detail) in BAD_IMAGES.items():
        assert reason in errors[name], errors[name]
        # On the terminal too: the file's path, then its reason, on one line.
        assert f"{corpus / name}: {errors[name]}" in result.output
    assert f"{len(BAD_IMAGES)} file(s) failed" in result.output


# ---------------------------------------------------------------------------- cxr train


def _corpus_dataset(synth_data: Path, tmp_path: Path, files: dict[str, bytes]):
    """A copy of the synthetic dataset with corpus files in place of some of its images."""
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    images = sorted((data / "images").glob("*.png"))
    swapped = {}
    for path, name in zip(images, [*BAD_IMAGES, *ODD_IMAGES]):
        path.write_bytes(files[name])
        swapped[name] = path.name
    return data, swapped


def _train(data: Path, out: Path, *extra: str):
    return invoke(
        "train", data, "--out", out, "--weights", "none", "--image-size", "32",
        "--batch-size", "8", "--max-epochs", "1", "--workers", "0", "--device", "cpu", *extra,
    )  # fmt: skip


def test_train_refuses_the_bad_images_up_front_and_lists_them(synth_data, tmp_path):
    data, swapped = _corpus_dataset(synth_data, tmp_path, corpus_bytes())
    result = _train(data, tmp_path / "run")
    assert_clean_failure(result)
    assert f"{len(BAD_IMAGES)} of" in result.output and "cannot be read" in result.output
    for name, (reason, _status, _detail) in BAD_IMAGES.items():
        assert f"{swapped[name]}: {reason}" in result.output, name
    for name in ODD_IMAGES:
        assert swapped[name] not in result.output, f"{name} is valid and must not be refused"
    assert not (tmp_path / "run").exists()


def test_train_skips_the_bad_images_and_trains_on_the_odd_ones(synth_data, tmp_path):
    data, swapped = _corpus_dataset(synth_data, tmp_path, corpus_bytes())
    result = _train(data, tmp_path / "run", "--skip-bad-images")
    assert result.exit_code == 0, result.output
    assert f"training without {len(BAD_IMAGES)} unreadable image(s)" in result.output
    used = "".join(
        (tmp_path / "run" / "split" / f"{split}.csv").read_text()
        for split in ("train", "val", "test")
    )
    for name in BAD_IMAGES:
        assert swapped[name] not in used
    for name in ODD_IMAGES:
        assert swapped[name] in used
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def client(bundle) -> TestClient:
    return TestClient(create_app(bundle, backend="torch", device="cpu"))


def _post(client: TestClient, name: str, data: bytes):
    return client.post("/v1/predict", files={"file": (name, data, "application/octet-stream")})


def _assert_no_leaks(text: str) -> None:
    repo = str(Path(__file__).resolve().parents[1])
    for secret in ("/tmp", "Traceback", "site-packages", repo, 'File "'):
        assert secret not in text


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_service_answers_each_bad_upload_with_a_4xx_naming_it(client, name):
    data = corpus_bytes()[name]
    _reason, status, detail = BAD_IMAGES[name]
    # The client's name is a label only: directories are dropped, never used as a path.
    response = _post(client, f"../../uploads/{name}", data)
    assert response.status_code == status, response.text
    said = problem_detail(response)  # an RFC 9457 problem, nothing else
    assert said.startswith(f"{name}: ") and detail in said, said
    _assert_no_leaks(response.text)


@pytest.mark.parametrize("name", ["good.png", *sorted(ODD_IMAGES)])
def test_service_predicts_the_valid_odd_images(client, name):
    response = _post(client, name, corpus_bytes()[name])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["file"] == name
    assert (body["width"], body["height"]) == {"good.png": (128, 128), **ODD_IMAGES}[name]
    assert len(body["probabilities"]) == 14
    assert all(0.0 <= p <= 1.0 for p in body["probabilities"].values())


def test_service_refuses_a_table_and_a_missing_field(client, corpus):
    response = _post(client, "two_patients.csv", (corpus / "two_patients.csv").read_bytes())
    assert response.status_code == 415
    assert problem_detail(response) == "two_patients.csv: not a PNG, JPEG or DICOM image"
    response = client.post("/v1/predict", data={"not_file": "x"})
    assert response.status_code == 422
    _assert_no_leaks(response.text)
