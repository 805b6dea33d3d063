"""``cxr report``: numbers in metrics.json, a self-contained page that a real headless Chromium
(Debian's ``chromium``, driven by Playwright) opens offline with every figure loaded."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS
from playwright.sync_api import sync_playwright
from sklearn.metrics import average_precision_score, roc_auc_score
from typer.testing import CliRunner

from cxr.cli import app
from cxr.labels import PATHOLOGIES
from cxr.report import BASELINES, REPORT_KEY, data_origin
from cxr.run import RunFolder
from cxr.workflows.report import report_run

# The report fixture bootstraps 1,000 resamples and draws a Grad-CAM gallery on a trained run;
# one test opens the page in Chromium.
pytestmark = pytest.mark.slow

RUN_FILES = ("config.json", "run.json", "log.csv", "model.json", "model.safetensors")
PROB = [f"prob_{name}" for name in PATHOLOGIES]
TRUE = [f"true_{name}" for name in PATHOLOGIES]


def copy_run(source: Path, target: Path) -> Path:
    """The parts of a trained run that evaluation needs (not checkpoint.pt, not outputs)."""
    target.mkdir(parents=True)
    for name in RUN_FILES:
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "split", target / "split")
    return target


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory) -> dict:
    """A report (1,000 patient resamples, 2 Grad-CAM cases per kind) on a copy of the run."""
    run = copy_run(trained_run, tmp_path_factory.mktemp("report") / "run")
    result = report_run(run, "test", gallery=2, device="cpu")
    return {**result, "run": run}


def _stored(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["test"][REPORT_KEY]


def _predictions(run: Path) -> pd.DataFrame:
    return pd.read_csv(RunFolder(run).predictions("test"), dtype={"Patient ID": str})


# ---------------------------------------------------------------------------- numbers


def test_numbers_are_in_metrics_json_and_equal_scikit_learn(report):
    run = report["run"]
    stored = _stored(run)
    assert stored == report["report"]
    predictions = _predictions(run)
    truth, prob = predictions[TRUE].to_numpy(), predictions[PROB].to_numpy()
    meta = json.loads((run / "model.json").read_text())
    evaluation = json.loads((run / "metrics.json").read_text())["test"]
    assert stored["images"] == len(predictions) == evaluation["images"]
    assert stored["patients"] == predictions["Patient ID"].nunique()
    assert stored["bootstrap"] == {
        "unit": "patient",
        "resamples": 1000,
        "seed": 0,
        "confidence": 0.95,
        "method": "percentile",
    }
    defined = []
    for c, name in enumerate(PATHOLOGIES):
        entry = stored["per_class"][name]
        assert entry["threshold"] == meta["thresholds"][c]
        assert entry["prevalence"] == pytest.approx(truth[:, c].mean())
        # The counts at the threshold are evaluate's.
        for key in ("tp", "fp", "fn", "tn", "sensitivity", "specificity"):
            assert entry[key] == evaluation["per_class"][name][key]
        if 0 < truth[:, c].sum() < len(truth):
            expected = roc_auc_score(truth[:, c], prob[:, c])
            assert entry["auroc"] == pytest.approx(expected, abs=1e-12)
            low, high = entry["auroc_ci"]
            assert 0.0 <= low <= high <= 1.0
            defined.append(expected)
        else:
            assert entry["auroc"] is None and entry["auroc_ci"] == [None, None]
        if truth[:, c].sum():
            expected = average_precision_score(truth[:, c], prob[:, c])
            assert entry["auprc"] == pytest.approx(expected, abs=1e-12)
        assert entry["ppv"] == (
            entry["tp"] / (entry["tp"] + entry["fp"]) if entry["tp"] + entry["fp"] else None
        )
        assert sum(entry["reliability"]["count"]) == len(truth)
    assert len(defined) >= 5
    assert stored["auroc_mean"] == pytest.approx(np.mean(defined), abs=1e-12)
    assert stored["auroc_mean"] == pytest.approx(evaluation["auroc_mean"], abs=1e-12)
    low, high = stored["auroc_mean_ci"]
    assert 0.0 <= low <= high <= 1.0


def test_synthetic_data_is_said_and_gets_no_published_baselines(report):
    stored = _stored(report["run"])
    # The fixture's run.json does not flag the data; the data folder's README does.
    assert stored["data"]["synthetic"] and not stored["data"]["chestxray14"]
    assert "README.txt says the data is SYNTHETIC" in stored["data"]["note"]
    assert stored["baselines"] is None
    page = report["html"].read_text()
    assert "SYNTHETIC DATA." in page
    assert "are not shown: this run's data is synthetic" in page
    assert "0.8094" not in page
    splits = stored["data"]["splits"]
    assert set(splits) == {"train", "val", "test"}
    assert splits["test"]["images"] == stored["images"]


# ---------------------------------------------------------------------------- the page


def _img_sources(page: str) -> list[str]:
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", page)


def test_page_is_self_contained_and_its_figures_are_written_beside_it(report):
    run, page_path = report["run"], report["html"]
    assert page_path == run / "report.html"
    page = page_path.read_text()
    # Nothing on the page refers to the network.
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page, re.I)
    assert not re.search(r"url\(\s*[\"']?\s*(?:https?:)?//", page, re.I)
    assert "<script" not in page and "<link" not in page
    stored = _stored(run)
    figures = stored["figures"]
    assert {"roc.png", "precision-recall.png", "reliability.png", "scores.png"} <= set(figures)
    assert "training.png" in figures
    gallery = [f for f in figures if f.startswith("gallery-")]
    cases = [
        case
        for entry in stored["gallery"].values()
        for kind in ("true_positives", "false_positives")
        for case in entry[kind]
    ]
    assert gallery and sorted(gallery) == sorted(case["figure"] for case in cases)
    assert all(len(entry[k]) <= 2 for entry in stored["gallery"].values() for k in entry)
    sources = _img_sources(page)
    assert len(sources) == len(figures) == len(report["figures"])
    written = {path.name: path.read_bytes() for path in report["figures"]}
    embedded = []
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        embedded.append(data)
    for name, relative in figures.items():
        path = run / relative
        assert path.is_file() and path.parent == run / "figures"
        assert written[name] in embedded  # the file beside the page is the embedded figure


def test_every_table_number_is_the_stored_one(report):
    """The per-class table's cells are the values in metrics.json, formatted."""
    stored = _stored(report["run"])
    page = report["html"].read_text()
    table = re.search(r'<table id="per-class">(.*?)</table>', page, re.S).group(1)
    rows = [
        [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td>(.*?)</td>", r)]
        for r in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)
    ]
    rows = [r for r in rows if r]
    assert len(rows) == len(PATHOLOGIES) + 1

    def f(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    for name, row in zip(PATHOLOGIES, rows):
        v = stored["per_class"][name]
        low, high = v["auroc_ci"]
        assert row[0] == name
        assert row[1] == ("undefined" if v["auroc"] is None else f(v["auroc"]))
        assert row[2] == ("" if low is None else f"{low:.3f} – {high:.3f}")
        assert row[3] == f(v["auprc"])
        assert row[4] == f"{100 * v['prevalence']:.1f} %"
        assert row[5] == f"{v['positives']:,}"
        keys = ("threshold", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "ece")
        assert row[6:14] == [f(v[k]) for k in keys]
    assert rows[-1][1] == f(stored["auroc_mean"])
    low, high = stored["auroc_mean_ci"]
    assert rows[-1][2] == f"{low:.3f} – {high:.3f}"


def test_page_opens_offline_in_headless_chromium_with_every_figure_loaded(report):
    assert Path(CHROMIUM).is_file() or shutil.which("chromium"), (
        "Debian's chromium is needed: apt-get install chromium"
    )
    expected = len(_img_sources(report["html"].read_text()))
    requests: list[str] = []
    failures: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(offline=True)
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.on("request", lambda request: requests.append(request.url))
            page.on("requestfailed", lambda request: failures.append(request.url))
            page.goto(report["html"].as_uri(), wait_until="load")
            images = page.evaluate(
                """() => Array.from(document.images).map(img => ({
                    complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
                    alt: img.alt }))"""
            )
            title = page.title()
            headings = page.locator("h2").all_inner_texts()
        finally:
            browser.close()
    assert title.startswith("cxr evaluation report")
    assert len(images) == expected > 5
    broken = [image["alt"] for image in images if not image["complete"] or image["width"] == 0]
    assert not broken, f"images that did not load: {broken}"
    assert all(image["height"] > 0 for image in images)
    assert not failures
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    for heading in ("Per-class results", "Calibration", "Grad-CAM gallery", "Training", "Data"):
        assert heading in headings


# ---------------------------------------------------------------------------- ChestX-ray14


def test_published_baselines_only_for_chestxray14(trained_run, tmp_path):
    """A run whose data is NIH-sized and carries no synthetic marker gets the published
    AUROCs beside its own, with the statement that they used other splits."""
    run = copy_run(trained_run, tmp_path / "run")
    elsewhere = tmp_path / "nih"
    elsewhere.mkdir()
    info = json.loads((run / "run.json").read_text())
    info["data"] = str(elsewhere)  # no README.txt there
    (run / "run.json").write_text(json.dumps(info))
    assert data_origin(run)["synthetic"]  # the 64 px images still give it away
    for name in ("train", "val", "test"):
        path = run / "split" / f"{name}.csv"
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        frame["OriginalImage[Width"] = "2500"
        frame["Height]"] = "2048"
        frame.to_csv(path, index=False)
    origin = data_origin(run)
    assert origin["chestxray14"] and not origin["synthetic"]

    options = ["--resamples", "100", "--gallery", "0", "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(app, ["report", str(run), *options])
    assert result.exit_code == 0, result.output
    assert f"wrote {run / 'report.html'}" in " ".join(result.output.split())
    stored = _stored(run)
    assert stored["bootstrap"]["resamples"] == 100
    assert [b["key"] for b in stored["baselines"]] == ["wang2017", "chexnet"]
    chexnet = stored["baselines"][1]
    assert chexnet["mean"] == 0.841
    assert chexnet["auroc"]["Cardiomegaly"] == 0.9248
    assert stored["baselines"][0]["auroc"]["Infiltration"] == 0.609
    assert stored["baselines"][0]["mean"] == pytest.approx(np.mean(BASELINES[0]["auroc"]))
    assert "other splits" in stored["baselines_note"].lower()
    page = (run / "report.html").read_text()
    assert "Other splits." in page and "SYNTHETIC DATA." not in page
    assert "0.9248" in page and "0.841" in page and "CheXNet (Rajpurkar et al. 2017)" in page
    assert not list((run / "figures").glob("gallery-*"))
