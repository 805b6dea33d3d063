"""The model card (model.json's ``card`` and MODEL_CARD.md), what every answer says about the
model, and the out-of-distribution flag (issue 17).

References are computed here without cxr's code: counts with pandas from the split tables,
features with torchvision's DenseNet layers, distances with SciPy's ``mahalanobis``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.numpy import load_file, save_file
from scipy.spatial.distance import mahalanobis
from support.media import untrained_bundle
from typer.testing import CliRunner

from cxr.cli import app
from cxr.engine.inference import load_predictor, predict_files
from cxr.errors import ModelError
from cxr.model.bundle import BundleMeta, load_bundle, read_bundle_meta
from cxr.model.card import ModelCard, TrainingData
from cxr.model.ood import MAX_OOD_BYTES, load_ood
from cxr.serve.app import create_app
from cxr.workflows.evaluate import evaluate_run, predictions_are_fresh

BUNDLE_FILES = ("model.json", "model.safetensors", "ood.safetensors")
RUN_FILES = ("config.json", "run.json", "log.csv", *BUNDLE_FILES)


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "split", target / "split")
    return target


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------------------- the schema


def test_old_bundles_load_and_the_card_is_strict(tmp_path):
    folder = untrained_bundle(tmp_path / "model", 64)
    values = json.loads((folder / "model.json").read_text())
    assert values["card"]["training_data"]["origin"] == "untrained"
    old = {k: v for k, v in values.items() if k not in ("card", "ood")}
    (folder / "model.json").write_text(json.dumps(old))
    assert read_bundle_meta(folder).card is None  # a bundle from before issue 17 still loads
    load_bundle(folder)
    for bad, problem in [
        ({"card": {**values["card"], "secret": 1}}, "card.secret: not a field"),
        ({"card": {**values["card"], "cxr_version": 3}}, "card.cxr_version: expected a string"),
        (
            {"ood": {"file": "../../etc/passwd", "sha256": "0" * 64}},
            "ood.file: input should be 'ood.safetensors'",
        ),
    ]:
        with pytest.raises(ModelError, match=problem.replace("(", r"\(")):
            BundleMeta.from_dict({**old, **bad})


# ---------------------------------------------------------------------------- the card


def test_training_writes_a_card_that_says_synthetic_with_the_split_counts(trained_run):
    meta = read_bundle_meta(trained_run)
    card = meta.card
    data = card.training_data
    assert data.origin == "synthetic" and data.synthetic
    assert "SYNTHETIC" in data.description
    for split in ("train", "val", "test"):
        table = pd.read_csv(trained_run / "split" / f"{split}.csv", dtype={"Patient ID": str})
        assert data.images[split] == len(table)
        assert data.patients[split] == table["Patient ID"].nunique()
    train = pd.read_csv(trained_run / "split" / "train.csv")
    assert data.demographics["sex"] == train["Patient Gender"].value_counts().to_dict()
    assert data.demographics["view"] == train["View Position"].value_counts().to_dict()
    assert sum(data.demographics["age"].values()) == len(train)
    assert data.prevalence["Effusion"] == pytest.approx((train["Effusion"] == 1).mean())
    text = (trained_run / "MODEL_CARD.md").read_text()
    assert "**Trained on:** SYNTHETIC" in text and "not for diagnosis" in text.lower()
    assert "Frontal views (PA / AP) only" in text
    assert "text-mined" not in text  # NIH's label caveat belongs to NIH-trained models
    assert card.ood is not None and card.ood.reference_images == data.images["val"]


@pytest.mark.slow
def test_evaluate_and_report_fill_the_test_metrics_and_keep_predictions_fresh(
    trained_run, tmp_path
):
    from cxr.workflows.report import report_run

    run = copy_run(trained_run, tmp_path / "run")
    result = evaluate_run(run, "test", device="cpu")
    card = read_bundle_meta(run).card
    assert card.test_metrics.auroc_mean == pytest.approx(result["auroc_mean"])
    assert card.test_metrics.auroc_mean_ci is None  # no report yet: no interval claimed
    groups = result["subgroups"]["groupings"]
    assert len(card.subgroups["rows"]) == sum(len(g["groups"]) for g in groups)
    assert card.subgroups["comparisons"] == result["subgroups"]["test"]["comparisons"]
    assert "## Subgroup results\n\nTest split" in (run / "MODEL_CARD.md").read_text()
    report_run(run, resamples=50, gallery=0, device="cpu")
    assert predictions_are_fresh(run, "test")  # the card's refresh is not a new model
    report = json.loads((run / "metrics.json").read_text())["test"]["report"]
    card = read_bundle_meta(run).card
    assert card.test_metrics.auroc_mean_ci == pytest.approx(report["auroc_mean_ci"])
    effusion = card.test_metrics.per_class["Effusion"]
    assert effusion.auroc_ci == report["per_class"]["Effusion"]["auroc_ci"]
    # The report's OOD numbers are the predictions table's.
    predictions = pd.read_csv(run / "predictions-test.csv")
    assert report["ood"]["flagged"] == int(predictions["ood_flag"].sum())
    assert report["ood"]["most_unusual"][0]["distance"] == predictions["ood_distance"].max()
    assert "Images unlike the validation images" in (run / "report.html").read_text()
    # `cxr card` rebuilds the same card from the run folder.
    before = read_bundle_meta(run).card.subgroups
    assert CliRunner().invoke(app, ["card", str(run)]).exit_code == 0
    assert read_bundle_meta(run).card.subgroups == before


# ---------------------------------------------------------------------------- every answer


def nih_described_bundle(folder: Path) -> Path:
    """An untrained bundle whose card says NIH (what a real NIH run's card says)."""
    card = ModelCard(
        training_data=TrainingData(
            origin="nih",
            synthetic=False,
            description="NIH ChestX-ray14 (frontal chest radiographs, NIH Clinical Center)",
        ),
        cxr_version="test",
    )
    return untrained_bundle(folder, 64, card=card)


@pytest.mark.slow
def test_page_and_api_say_what_the_model_was_trained_on(trained_run, tmp_path, sample_images):
    image = png_bytes(sample_images / "00001369_000.png")
    cases = [
        (trained_run, "SYNTHETIC", True),
        (untrained_bundle(tmp_path / "untrained", 64), "nothing: untrained", False),
        (nih_described_bundle(tmp_path / "nih"), "NIH ChestX-ray14", False),
    ]
    for bundle, words, synthetic in cases:
        client = TestClient(create_app(bundle, backend="torch", device="cpu", decode_workers=1))
        with client:
            page = client.get("/").text
            heading = page[page.index("<h1>") : page.index("</details>")]
            assert f"Research software trained on {words}" in heading
            assert ("NIH ChestX-ray14" in heading) == (words == "NIH ChestX-ray14")
            assert ('id="synthetic"' in page) == synthetic
            assert "About this model" in page and "Known limitations" in page
            answer = client.post("/v1/predict", files={"file": ("x.png", image)}).json()
            assert answer["model"]["synthetic"] is synthetic
            assert words in answer["model"]["trained_on"]
            assert client.get("/healthz").json()["model"]["about"] == answer["model"]


def test_a_hostile_card_text_is_escaped_on_the_page(tmp_path):
    card = ModelCard(
        training_data=TrainingData(
            origin="other", synthetic=False, description="<script>alert(1)</script>"
        ),
        cxr_version="test",
    )
    bundle = untrained_bundle(tmp_path / "model", 64, card=card)
    page = TestClient(create_app(bundle, backend="torch", device="cpu", decode_workers=1)).get("/")
    assert "<script>alert(1)</script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


def test_cli_predict_prints_the_intended_use_once_and_flags(trained_run, sample_images, tmp_path):
    out = tmp_path / "p.json"
    result = CliRunner().invoke(
        app,
        ["predict", str(trained_run), str(sample_images / "00001369_000.png"),
         "--backend", "torch", "--device", "cpu", "--workers", "0", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("Not a medical device; not for diagnosis.") == 1
    assert "SYNTHETIC-data model: model trained on SYNTHETIC" in text
    written = json.loads(out.read_text())
    assert written["model"]["synthetic"] is True
    assert written["predictions"][0]["ood"]["flagged"] is True  # a real X-ray


# ---------------------------------------------------------------------------- OOD


def reference_features(bundle: Path, images: torch.Tensor) -> np.ndarray:
    """torchvision's DenseNet layers by hand: features -> ReLU -> global average pool."""
    model = load_bundle(bundle).model
    with torch.no_grad():
        maps = torch.relu(model.features(images))
        return maps.mean(dim=(2, 3)).double().numpy()


def test_real_nih_images_are_flagged_and_held_out_synthetic_ones_are_not(
    trained_run, sample_images
):
    from conftest import reference_batch

    predictor = load_predictor(trained_run, backend="torch", device="cpu")
    nih = sorted(sample_images.glob("*.png"))[:30]
    test = pd.read_csv(trained_run / "split" / "test.csv")["path"].map(Path).tolist()
    real = predict_files(predictor, nih, batch_size=8, workers=0)
    held_out = predict_files(predictor, test, batch_size=8, workers=0)
    assert sum(s["flagged"] for s in real.ood) >= 0.9 * len(nih)
    assert sum(s["flagged"] for s in held_out.ood) <= 1
    # The distances, recomputed from the stored summary with SciPy on features by hand.
    stored = load_file(str(trained_run / "ood.safetensors"))
    features = reference_features(trained_run, reference_batch(test[:4], 32))
    expected = [mahalanobis(f, stored["mean"], stored["precision"]) for f in features]
    got = [s["distance"] for s in held_out.ood[:4]]
    assert got == pytest.approx(expected, rel=1e-4)
    reference = stored["reference"]
    assert held_out.ood[0]["percentile"] == pytest.approx(
        100 * np.mean(reference <= held_out.ood[0]["distance"])
    )


def test_the_onnx_backend_scores_the_same(trained_run, sample_images, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path / "cache"))
    files = sorted(sample_images.glob("*.png"))[:3]
    torch_result = predict_files(
        load_predictor(trained_run, backend="torch", device="cpu"), files, workers=0
    )
    onnx_result = predict_files(load_predictor(trained_run, backend="onnx"), files, workers=0)
    for a, b in zip(torch_result.ood, onnx_result.ood):
        assert b["distance"] == pytest.approx(a["distance"], rel=1e-3)
        assert b["flagged"] == a["flagged"]


def test_a_changed_or_oversized_ood_file_is_refused(trained_run, tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    for name in BUNDLE_FILES:
        shutil.copy2(trained_run / name, bundle / name)
    entry = read_bundle_meta(bundle).ood.model_dump()
    tensors = load_file(str(bundle / "ood.safetensors"))
    tensors["mean"] = tensors["mean"][:10]
    save_file(tensors, str(bundle / "ood.safetensors"))
    with pytest.raises(ModelError, match="SHA-256 differs"):
        load_predictor(bundle, backend="torch", device="cpu")
    import hashlib

    entry["sha256"] = hashlib.sha256((bundle / "ood.safetensors").read_bytes()).hexdigest()
    with pytest.raises(ModelError, match="mean: expected 1024 features"):
        load_ood(bundle, entry)
    with (bundle / "ood.safetensors").open("r+b") as handle:
        handle.truncate(MAX_OOD_BYTES + 1)  # sparse: nothing is written or read
    with pytest.raises(ModelError, match="over the limit"):
        load_ood(bundle, entry)


@pytest.mark.slow
def test_cxr_ood_gives_an_old_bundle_its_summary_and_card(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    (run / "ood.safetensors").unlink()
    values = json.loads((run / "model.json").read_text())
    old = {k: v for k, v in values.items() if k not in ("card", "ood")}
    (run / "model.json").write_text(json.dumps(old))
    assert load_predictor(run, backend="torch", device="cpu").about()["synthetic"] is None
    result = CliRunner().invoke(
        app, ["ood", str(run), "--device", "cpu", "--workers", "0", "--flag-percentile", "95"]
    )
    assert result.exit_code == 0, result.output
    meta = read_bundle_meta(run)
    assert meta.ood.flag_percentile == 95.0 and meta.card.training_data.synthetic
    assert (run / "MODEL_CARD.md").is_file()
    assert load_predictor(run, backend="torch", device="cpu").ood.flag_percentile == 95.0


def test_a_bundle_copied_without_its_ood_file_answers_without_the_flag(
    trained_run, sample_images, tmp_path
):
    bundle = tmp_path / "b"
    bundle.mkdir()
    for name in ("model.json", "model.safetensors"):  # the two files a bundle used to be
        shutil.copy2(trained_run / name, bundle / name)
    result = CliRunner().invoke(
        app,
        ["predict", str(bundle), str(sample_images / "00001369_000.png"),
         "--backend", "torch", "--device", "cpu", "--workers", "0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "listed in model.json but missing" in " ".join(result.output.split())
    assert "unlike training data?" not in result.output
