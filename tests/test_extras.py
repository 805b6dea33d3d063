"""A command whose extra is not installed: one line naming the ``pip install "cxr[...]"``
that fixes it, a non-zero exit, no traceback. Each case runs the real ``cxr`` in a fresh
interpreter in which the extra's packages cannot be imported, as if they were not
installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.media import untrained_bundle

from cxr.errors import CxrError, MissingExtraError
from cxr.extras import EXTRAS, import_extra, installed, require

SRC = Path(__file__).resolve().parents[1] / "src"

# argv[1]: the top-level packages to hide, comma-separated; the rest is cxr's command line.
# A None in sys.modules is how Python marks a module that cannot be imported: `import` raises
# ModuleNotFoundError and importlib.util.find_spec answers None, as for a missing package.
WITHOUT = """
import sys

for name in sys.argv.pop(1).split(","):
    sys.modules[name] = None
sys.argv[0] = "cxr"
from cxr.cli import app
app()
"""


def cxr_without(hidden: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT, hidden, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "80"},
    )


def assert_one_line(done: subprocess.CompletedProcess, feature: str, extra: str, module: str):
    expected = (
        f"error: {feature} needs the {extra} extra ({module} is not installed): "
        f'pip install "cxr[{extra}]"'
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.strip().splitlines() == [expected]


def test_serve_without_the_serve_extra(tmp_path):
    done = cxr_without("fastapi", "serve", str(tmp_path / "run"))
    assert_one_line(done, "cxr serve", "serve", "fastapi")


def test_dicom_listen_without_the_dicom_extra(tmp_path):
    done = cxr_without(
        "pynetdicom", "dicom", "listen", str(tmp_path / "run"), "--forward", "127.0.0.1:1:PACS"
    )
    assert_one_line(done, "cxr dicom listen", "dicom", "pynetdicom")


def test_dicom_results_without_sqlalchemy(tmp_path):
    done = cxr_without("sqlalchemy", "results", str(tmp_path))
    assert_one_line(done, "cxr results", "dicom", "sqlalchemy")


@pytest.mark.slow
def test_a_postgres_url_without_the_postgres_extra():
    done = cxr_without("psycopg", "results", "postgresql://cxr@127.0.0.1:1/results")
    assert_one_line(done, "a PostgreSQL results store", "postgres", "psycopg")


def test_a_parquet_table_without_the_parquet_extra(tmp_path):
    table = tmp_path / "labels.parquet"
    table.write_bytes(b"PAR1")  # refused before it is read: its content does not matter
    done = cxr_without(
        "pyarrow", "data", "stats", str(table), "--layout", "generic", "--image-col", "path",
        "--patient-col", "patient",
    )  # fmt: skip
    feature = f"reading a Parquet table ({table}; or give it as CSV)"
    assert_one_line(done, feature, "parquet", "pyarrow")


def test_export_without_the_onnx_extra(tmp_path):
    done = cxr_without("onnx", "export", str(tmp_path / "run"), "--onnx", str(tmp_path / "m.onnx"))
    assert_one_line(done, "cxr export", "onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def bundle_and_image(tmp_path_factory) -> tuple[Path, Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("extras")
    untrained_bundle(folder / "bundle", image_size=64)
    image = folder / "x.png"
    Image.new("L", (80, 80), 128).save(image)
    return folder / "bundle", image


@pytest.mark.slow
def test_predict_on_the_onnx_backend_without_the_onnx_extra(bundle_and_image):
    bundle, image = bundle_and_image
    done = cxr_without(
        "onnxruntime", "predict", str(bundle), str(image), "--backend", "onnx", "--device", "cpu",
    )  # fmt: skip
    assert_one_line(done, "the onnx backend", "onnx", "onnxruntime")


@pytest.mark.slow
def test_predict_on_auto_without_the_onnx_extra_runs_on_torch(bundle_and_image, tmp_path):
    bundle, image = bundle_and_image
    out = tmp_path / "predictions.csv"
    done = cxr_without(
        "onnx,onnxruntime", "predict", str(bundle), str(image), "--device", "cpu", "--out",
        str(out), "--workers", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_text().count("\n") == 2  # the header and the one image


# ---------------------------------------------------------------------------- the helper


def test_require_names_the_extra_and_the_missing_module(monkeypatch):
    monkeypatch.setitem(EXTRAS, "imaginary", ("json", "cxr_no_such_module"))
    with pytest.raises(MissingExtraError) as caught:
        require("imaginary", "cxr imagine")
    assert isinstance(caught.value, CxrError)
    assert (caught.value.extra, caught.value.module) == ("imaginary", "cxr_no_such_module")
    assert str(caught.value) == (
        "cxr imagine needs the imaginary extra (cxr_no_such_module is not installed): "
        'pip install "cxr[imaginary]"'
    )
    assert not installed("imaginary")
    assert import_extra("json", "imaginary", "x").dumps([]) == "[]"


def test_every_extra_is_declared_in_pyproject():
    import tomllib

    pyproject = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]
    assert set(EXTRAS) <= set(declared)
    # all: every extra the commands use; docs (the site's build) and dev (the tests') are tools
    runtime = [e for e in declared if e not in ("all", "dev", "docs")]
    assert declared["all"] == [f"cxr[{','.join(runtime)}]"]
    assert "cxr[all,docs]" in declared["dev"]
