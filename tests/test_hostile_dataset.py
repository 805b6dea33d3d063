"""A hostile dataset end to end (issue 22): a generic table of real NIH PNGs whose file
names, patient ids, label names and subgroup values hold formulas, markup, pipes,
backslashes, non-ASCII and a 20,000-character value, through split -> train -> evaluate
(with subgroups) -> report -> card -> predict -> results export. Every file written is then
checked by a reader we did not write: Python's csv (no formula cell), markdown-it and
html.parser (no markup of the data's, tables whole), json, PIL (figures bounded), and the
report and the rendered card in a real Chromium (no script runs)."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS
from markdown_it import MarkdownIt
from PIL import Image
from typer.testing import CliRunner

from cxr.cli import app
from cxr.safety import FORMULA_START

pytestmark = pytest.mark.slow

TINY = ["--image-size", "32", "--max-epochs", "1", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--lr", "0.05"]  # fmt: skip
PAYLOAD = "alert(1)"
LABELS = {
    "Effusion": "=Effusion <img src=x onerror=alert(1)>",
    "Infiltration": "Infiltration|pipe\\back <script>alert(1)</script>",
    "Atelectasis": "Épanchement 胸水 " + "x" * 180,
}
SITES = ['=HYPERLINK("http://x","y")', "<script>alert(1)</script>|a", "s" * 20_000]
PATIENTS = ["=1+1", "+PAT", "@SUM(A1)", "-3", "<b>x</b>", "a|b", "back\\slash", "患者"]
FILE_NAMES = ["=cmd.png", "<img src=x onerror=alert(1)>.png", "a|b.png", "back\\slash.png",
              "Épanchement 胸水.png", "+1.png", "@x.png", "-2.png"]  # fmt: skip


def cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, sample_csv, sample_images) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    nih = pd.read_csv(sample_csv).head(72)
    patients = {pid: f"{PATIENTS[n % len(PATIENTS)]}{n}" for n, pid in
                enumerate(sorted(nih["Patient ID"].unique()))}  # fmt: skip
    rows = []
    for n, row in enumerate(nih.itertuples()):
        name = f"{n:02d}{FILE_NAMES[n % len(FILE_NAMES)]}"
        (root / "images").mkdir(exist_ok=True)
        (root / "images" / name).symlink_to(sample_images / row[1])
        found = row[2].split("|")
        rows.append({"image": f"images/{name}", "patient": patients[row[4]],
                     **{hostile: int(plain in found) for plain, hostile in LABELS.items()},
                     "site": SITES[row[4] % len(SITES)]})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def outputs(hostile, tmp_path_factory) -> dict[str, Path]:
    table = [hostile / "labels.csv", "--image-col", "image", "--patient-col", "patient"]
    work = tmp_path_factory.mktemp("hostile-run")
    cli("data", "split", *table, "--out", work / "split", "--val-fraction", 0.25,
        "--test-fraction", 0.35)  # fmt: skip
    run = work / "run"
    cli("train", *table, "--split", work / "split", "--out", run, "--weights", "none", *TINY)
    cli("evaluate", run, "--subgroup", "site", "--workers", 0, "--device", "cpu")
    cli("report", run, "--workers", 0, "--device", "cpu", "--resamples", 20, "--gallery", 1)
    cli("card", run)
    test = pd.read_csv(run / "split" / "test.csv", dtype=str, keep_default_na=False)
    predicted = work / "predicted.csv"
    cli("predict", run, *[hostile / p for p in sorted(set(
        r["image"] for r in pd.read_csv(hostile / "labels.csv").to_dict("records")))[:6]],
        "--out", predicted, "--backend", "torch")  # fmt: skip
    store = _results_store(work)
    results_csv = work / "results.csv"
    results_csv.write_text(cli("results", store, "--csv"), encoding="utf-8")
    return {"run": run, "predicted": predicted, "results": results_csv, "test_rows": len(test)}


def _results_store(work: Path) -> Path:
    from cxr.results import open_store

    path = work / "results.sqlite"
    store = open_store(str(path))
    try:
        store.admit("1.2.3.4", calling_ae="=cmd|'/C calc'", study_instance_uid="1.2.3")
        store.refuse("1.2.3.5", '=HYPERLINK("x") <script>', calling_ae="@SUM(A1)")
    finally:
        store.close()
    return path


def written_files(outputs) -> list[Path]:
    files = [p for p in outputs["run"].rglob("*") if p.is_file()]
    return [*files, outputs["predicted"], outputs["results"]]


def test_no_csv_cell_is_a_formula(outputs):
    checked = 0
    for path in written_files(outputs):
        if path.suffix != ".csv":
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                for cell in row:
                    if cell and cell[0] in FORMULA_START:
                        float(cell)  # a number may start with - or +; nothing else may
                checked += 1
    assert checked > outputs["test_rows"]


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self.rows = [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if tag == "tr":
            self.rows.append(0)
        elif tag in ("td", "th") and self.rows:
            self.rows[-1] += 1

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def check_page(page: str) -> Tags:
    tags = Tags()
    tags.feed(page)
    assert not any(PAYLOAD in script for script in tags.scripts)
    assert not [a for _, attrs in tags.tags for a in attrs if a.lower().startswith("on")]
    assert not [attrs for tag, attrs in tags.tags if tag == "img" and attrs.get("src") == "x"]
    return tags


def test_markdown_and_html_show_hostile_names_as_text(outputs):
    run = outputs["run"]
    card = (run / "MODEL_CARD.md").read_text(encoding="utf-8")
    tags = check_page(MarkdownIt("commonmark").enable("table").render(card))
    assert len(set(tags.rows)) <= 3  # each table keeps one cell count per row
    page = (run / "report.html").read_text(encoding="utf-8")
    check_page(page)
    assert "&lt;script&gt;" in page and "Épanchement 胸水" in page


def test_json_keeps_every_label_exactly_and_figures_stay_bounded(outputs):
    run = outputs["run"]
    meta = json.loads((run / "model.json").read_text(encoding="utf-8"))
    assert meta["labels"] == list(LABELS.values())
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["test"]["per_class"]) == set(LABELS.values())
    groups = [g["name"] for grouping in metrics["test"]["subgroups"]["groupings"]
              for g in grouping["groups"]]  # fmt: skip
    assert any(len(name) == 20_000 for name in groups)  # the full value, in the numbers
    predicted = pd.read_csv(outputs["predicted"])
    assert f"'prob_{LABELS['Effusion']}" not in predicted.columns  # prob_ does not start one
    assert f"prob_{LABELS['Effusion']}" in predicted.columns
    for path in written_files(outputs):
        if path.suffix == ".png":
            with Image.open(path) as image:
                assert max(image.size) <= 4000, (path.name, image.size)


def test_the_report_and_the_card_run_no_script_in_chromium(outputs, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file() or shutil.which("chromium"), "apt-get install chromium"
    run = outputs["run"]
    card = (
        MarkdownIt("commonmark")
        .enable("table")
        .render((run / "MODEL_CARD.md").read_text(encoding="utf-8"))
    )
    (tmp_path / "card.html").write_text(f"<!doctype html><title>card</title>{card}", "utf-8")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for page_file in (run / "report.html", tmp_path / "card.html"):
                page = browser.new_page()
                dialogs: list[str] = []
                page.on("dialog", lambda d, seen=dialogs: (seen.append(d.message), d.dismiss()))
                page.goto(page_file.as_uri())
                page.wait_for_load_state("load")
                title = page.title()
                assert not dialogs, page_file.name
                assert page.title() == title
                assert page.locator("img[src='x']").count() == 0
                page.close()
        finally:
            browser.close()
