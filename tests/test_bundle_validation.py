"""A bundle's model.json is checked when it is loaded (cxr.model.bundle.BundleMeta): every
edit a review made to a run folder's model.json is refused with one line naming the file and
the field, by the library and by each command that loads a bundle; the ONNX cache follows
model.json as well as the weights."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import uvicorn
from conftest import run_with_memory_cap
from support.media import untrained_bundle
from typer.testing import CliRunner

from cxr.cli import app
from cxr.engine.inference import load_predictor, predict_files
from cxr.errors import ModelError
from cxr.labels import PATHOLOGIES
from cxr.model.bundle import (
    BUNDLE_META,
    BundleMeta,
    load_bundle,
    meta_digest,
    read_bundle_meta,
    update_bundle_meta,
)
from cxr.model.onnx import ONNX_META_DIGEST_KEY, export_onnx, onnx_bytes

NAN = math.nan


def _set(**changes) -> Callable[[dict], object]:
    return lambda values: {**values, **changes}


def _drop(key: str) -> Callable[[dict], object]:
    return lambda values: {k: v for k, v in values.items() if k != key}


# (id, edit of model.json's content, what the error must say): the review's edits and their
# neighbours. Each message names a field; the file is checked separately.
EDITS = [
    ("image_size-huge", _set(image_size=100000), "image_size: expected at most 1024, got 100000"),
    ("image_size-small", _set(image_size=8), "image_size: expected at least 32, got 8"),
    ("image_size-missing", _drop("image_size"), "image_size: missing"),
    ("image_size-null", _set(image_size=None), "image_size: expected an integer, got null"),
    ("image_size-text", _set(image_size="abc"), 'image_size: expected an integer, got "abc"'),
    ("image_size-float", _set(image_size=224.0), "image_size: expected an integer, got 224.0"),
    ("image_size-bool", _set(image_size=True), "image_size: expected an integer, got true"),
    ("labels-missing", _drop("labels"), "labels: missing"),
    ("labels-null", _set(labels=None), "labels: expected a list, got null"),
    ("labels-empty", _set(labels=[]), "labels: expected at least one label"),
    (
        "labels-duplicate",
        _set(labels=[*PATHOLOGIES[:13], "Atelectasis"]),
        "labels: expected distinct labels, got repeated Atelectasis",
    ),
    ("labels-blank", _set(labels=[*PATHOLOGIES[:13], " "]), "labels: expected non-empty labels"),
    ("labels-number", _set(labels=[*PATHOLOGIES[:13], 7]), "labels[13]: expected a string, got 7"),
    ("json-list", lambda values: [1, 2], "expected a JSON object describing the model, got a list"),
    (
        "thresholds-short",
        _set(thresholds=[0.5] * 13),
        "thresholds: expected 14 values (one per label), got 13",
    ),
    (
        "thresholds-long",
        _set(thresholds=[0.5] * 15),
        "thresholds: expected 14 values (one per label), got 15",
    ),
    (
        "thresholds-nulls",
        _set(thresholds=[None] * 14),
        "thresholds[0]: expected a number, got null",
    ),
    (
        "thresholds-text",
        _set(thresholds=["0.5"] * 14),
        'thresholds[0]: expected a number, got "0.5"',
    ),
    ("thresholds-scalar", _set(thresholds=0.5), "thresholds: expected a list, got 0.5"),
    (
        "thresholds-nan",
        _set(thresholds=[0.5] * 13 + [NAN]),
        "thresholds[13]: expected a finite number, got nan",
    ),
    ("thresholds-above-1", _set(thresholds=[1.5] * 14), "thresholds[0]: expected at most 1"),
    ("thresholds-negative", _set(thresholds=[-0.1] * 14), "thresholds[0]: expected at least 0"),
    ("temperature-text", _set(temperature="1.0"), 'temperature: expected a number, got "1.0"'),
    ("temperature-nan", _set(temperature=NAN), "temperature: expected a finite number, got nan"),
    ("temperature-negative", _set(temperature=-1), "temperature: expected more than 0, got -1"),
    ("temperature-zero", _set(temperature=0), "temperature: expected more than 0, got 0"),
    (
        "normalization-unknown",
        _set(normalization="zscore"),
        'normalization: expected one of imagenet, sample, xrv, got "zscore"',
    ),
    ("format-unknown", _set(format="cxr-bundle/9"), "format: expected one of cxr-bundle/1"),
    ("architecture-unknown", _set(architecture="alexnet"), "architecture: expected one of"),
    ("output-unknown", _set(output="softmax"), "output: expected one of sigmoid"),
    ("epoch-negative", _set(epoch=-1), "epoch: expected at least 0, got -1"),
]
SOME_EDITS = [
    e for e in EDITS if e[0] in ("image_size-huge", "labels-duplicate", "thresholds-short")
]
# What each command is run with; the bundle's folder is inserted after the verb.
COMMANDS = {
    "predict": ["--backend", "torch", "--device", "cpu", "--workers", "0"],
    "explain": ["--device", "cpu"],
    "serve": ["--backend", "torch", "--device", "cpu"],
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A valid 32 px bundle; tests edit copies of it."""
    return untrained_bundle(tmp_path_factory.mktemp("pristine") / "model", 32)


@pytest.fixture
def bundle(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture(scope="module")
def image(sample_images) -> Path:
    return sorted(sample_images.glob("*.png"))[0]


def edit(folder: Path, change: Callable[[dict], object]) -> Path:
    """Rewrite ``folder``'s model.json with ``change`` applied; its path."""
    path = folder / BUNDLE_META
    # allow_nan: NaN is what a hand edit or a diverged fit writes, and Python reads it back.
    path.write_text(json.dumps(change(json.loads(path.read_text())), allow_nan=True))
    return path


def cli_error(args: list[str]) -> str:
    """The one ``error:`` line of a command that must exit 2 without a traceback."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize(("change", "message"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_a_bad_model_json_is_refused_naming_file_and_field(bundle, image, change, message):
    path = edit(bundle, change)
    for load in (read_bundle_meta, load_bundle):
        with pytest.raises(ModelError) as info:
            load(bundle)
        assert str(info.value).startswith(f"{path}: ")
        assert message in str(info.value)
        assert "\n" not in str(info.value)
    line = cli_error(["predict", str(bundle), str(image), *COMMANDS["predict"]])
    assert line == f"error: {info.value}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("change", "message"), [e[1:] for e in SOME_EDITS], ids=[e[0] for e in SOME_EDITS]
)
def test_each_command_that_loads_a_bundle_says_one_line(
    bundle, image, tmp_path, monkeypatch, command, change, message
):
    path = edit(bundle, change)
    # A bundle that passed would start a server that never returns: fail the test instead.
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    args = [command, str(bundle), *COMMANDS[command]]
    if command in ("predict", "explain"):
        args.insert(2, str(image))
    if command == "explain":
        args += ["--out", str(tmp_path / "out")]
    line = cli_error(args)
    assert line.startswith(f"error: {path}: ") and message in line


def test_evaluate_refuses_a_run_whose_model_json_is_bad(make_run, pristine, tmp_path):
    run = make_run(tmp_path / "run")
    for name in os.listdir(pristine):
        shutil.copy(pristine / name, run / name)
    path = edit(run, _set(temperature=-1))
    line = cli_error(["evaluate", str(run), "--device", "cpu", "--workers", "0"])
    assert line == f"error: {path}: temperature: expected more than 0, got -1"
    assert not (run / "metrics.json").exists()


def test_labels_must_match_the_weights_outputs(bundle, image):
    path = edit(bundle, _set(labels=PATHOLOGIES[:13]))
    assert len(read_bundle_meta(bundle).labels) == 13  # a valid description by itself
    with pytest.raises(ModelError) as info:
        load_bundle(bundle)
    message = str(info.value)
    assert message.startswith(f"{path}: labels: expected 14 labels (one per output of ")
    assert message.endswith("got 13")
    line = cli_error(["predict", str(bundle), str(image), *COMMANDS["predict"]])
    assert line == f"error: {message}"


def test_an_impossible_description_cannot_be_made_or_written(bundle):
    with pytest.raises(ModelError, match="image_size: expected at most 1024"):
        BundleMeta(image_size=100000)
    with pytest.raises(ModelError, match="temperature: expected more than 0, got 0"):
        BundleMeta(image_size=64, temperature=0)
    before = (bundle / BUNDLE_META).read_bytes()
    for change in (
        {"thresholds": [0.5] * 13},
        {"temperature": 0.0},
        {"temperature": NAN},
        {"labels": ["A", "A"]},
        {"image_size": 4096},
        {"normalization": "zscore"},
    ):
        field = next(iter(change))
        with pytest.raises(ModelError, match=rf"{BUNDLE_META} \(update\): {field}"):
            update_bundle_meta(bundle, **change)
        assert (bundle / BUNDLE_META).read_bytes() == before  # nothing reached the disk
    # A good update still goes through, and is what the next reader sees.
    update_bundle_meta(bundle, temperature=2, thresholds=[0.25] * 14)
    meta = read_bundle_meta(bundle)
    assert meta.effective_temperature == 2.0 and meta.decision_thresholds == [0.25] * 14


def test_what_a_bundle_may_say(bundle):
    # null thresholds: the default for every label; null temperature: unscaled, like no key.
    meta = read_bundle_meta(bundle)
    assert meta.thresholds is None and meta.decision_thresholds == [0.5] * 14
    edit(bundle, _set(temperature=None, thresholds=[0, 1] * 7, image_size=1024))
    meta = read_bundle_meta(bundle)
    assert meta.effective_temperature == 1.0 and meta.decision_thresholds == [0.0, 1.0] * 7
    assert meta.image_size == 1024


# Loads the bundle ``sys.argv[2]`` and predicts ``sys.argv[3]`` with an address space that may
# grow by ``sys.argv[1]`` bytes at most; prints the ModelError, or "predicted".
_LOAD_IMPORTS = """
from cxr.engine.inference import load_predictor, predict_files
from cxr.errors import ModelError
"""
_LOAD = """
bundle, image = sys.argv[2], sys.argv[3]
try:
    predictor = load_predictor(bundle, backend="torch", device="cpu")
    result = predict_files(predictor, [Path(image)], batch_size=1, workers=0)
except ModelError as exc:
    print(exc)
    sys.exit(0)
if result.errors:
    sys.exit(f"failed: {result.errors[0]}")
print("predicted")
"""


def load_with_little_memory(bundle: Path, image: Path, headroom: int) -> str:
    return run_with_memory_cap(_LOAD_IMPORTS, _LOAD, headroom, str(bundle), str(image))


@pytest.mark.slow  # a child process that imports torch: several seconds
def test_a_huge_image_size_is_refused_before_anything_is_allocated(bundle, image):
    """image_size 100000 once made `cxr predict` allocate 22.6 GB. With 2 GiB to spare, the
    same bundle at 32 px predicts (the limit leaves room for real work) and at 100000 px is
    refused with a ModelError: had anything image-sized been allocated first, the child
    would have died of MemoryError instead."""
    headroom = 2 << 30
    assert load_with_little_memory(bundle, image, headroom) == "predicted"
    path = edit(bundle, _set(image_size=100000))
    message = load_with_little_memory(bundle, image, headroom)
    assert message == f"{path}: image_size: expected at most 1024, got 100000"


# ---------------------------------------------------------------------------- ONNX


def onnx_files(cache: Path) -> set[Path]:
    return set((cache / "onnx").glob("*.onnx"))


def input_size(predictor) -> list:
    return predictor.session.get_inputs()[0].shape[2:]


@pytest.mark.slow
def test_the_onnx_cache_follows_model_json(bundle, image, tmp_path):
    """Editing image_size once reused the ONNX model exported for the old size: the service
    started healthy and answered every request 500."""
    cache = tmp_path / "cache"
    first = load_predictor(bundle, backend="onnx", device="cpu", cache_dir=cache)
    old = onnx_files(cache)
    assert len(old) == 1 and input_size(first) == [32, 32]
    mtime = next(iter(old)).stat().st_mtime_ns
    edit(bundle, _set(image_size=48))
    second = load_predictor(bundle, backend="onnx", device="cpu", cache_dir=cache)
    new = onnx_files(cache) - old
    assert len(new) == 1, "a new export for the new model.json"
    assert input_size(second) == [48, 48]
    stored = second.session.get_modelmeta().custom_metadata_map[ONNX_META_DIGEST_KEY]
    assert stored == meta_digest(second.meta)
    result = predict_files(second, [image], batch_size=1, workers=0)
    assert not result.errors and result.probabilities.shape == (1, 14)
    assert next(iter(old)).stat().st_mtime_ns == mtime  # the old export is left as it was
    # Back to 32 px: the first export is the right one again, and is reused.
    edit(bundle, _set(image_size=32))
    third = load_predictor(bundle, backend="onnx", device="cpu", cache_dir=cache)
    assert onnx_files(cache) == old | new and input_size(third) == [32, 32]


@pytest.mark.slow
def test_model_onnx_beside_the_weights_is_reused_only_for_the_same_model_json(bundle, tmp_path):
    export_onnx(bundle, bundle / "model.onnx")
    cache = tmp_path / "cache"
    load_predictor(bundle, backend="onnx", device="cpu", cache_dir=cache)
    assert not onnx_files(cache), "the export beside the weights was used"
    edit(bundle, _set(image_size=64))
    predictor = load_predictor(bundle, backend="onnx", device="cpu", cache_dir=cache)
    assert len(onnx_files(cache)) == 1 and input_size(predictor) == [64, 64]


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (
            BundleMeta(image_size=32, labels=PATHOLOGIES[:13]),
            "labels: expected 14 labels (one per output of the ONNX model), got 13",
        ),
        (BundleMeta(image_size=48), "image_size: expected 32 (the ONNX model's input), got 48"),
    ],
    ids=["labels", "image_size"],
)
@pytest.mark.slow
def test_an_onnx_file_whose_description_does_not_fit_it_is_refused(
    bundle, image, tmp_path, meta, message
):
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_bytes(load_bundle(bundle).model, 32, meta))
    with pytest.raises(ModelError) as info:
        load_predictor(path, backend="onnx", device="cpu")
    assert str(info.value) == f"{path} (metadata cxr_bundle): {message}"
    line = cli_error(["predict", str(path), str(image), "--backend", "onnx", "--workers", "0"])
    assert line == f"error: {info.value}"
