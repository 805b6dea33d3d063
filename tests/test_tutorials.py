"""Each tutorial's commands run as written (issue 25).

Every fenced ``bash`` and ``python`` block of a tutorial without a ``title`` runs, in order,
in one empty folder (``bash -euo pipefail``; Python with this interpreter). A block with a
title (``once``, ``in a second terminal``) is shown only: an install line, or a server that
runs until it is stopped. Sizes shrink where the tutorial's would take hours: a ``cxr`` shim
first on ``PATH`` appends smaller options to some commands (click keeps an option's last
value), listed in ``SMALLER``, and paths to data a tutorial assumes on disk are replaced by
a small synthetic stand-in (``PATHS``). The commands are otherwise run exactly as printed.
``docs/tutorials/python.md``'s example runs in ``tests/test_api.py``
(``test_the_documented_example_runs``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"

# The options appended to a command (after what the tutorial gives): the sizes of a test.
SMALLER = {
    ("data", "synth"): ["--patients", "40", "--image-size", "64"],
    ("data", "cache"): ["--image-size", "64", "--workers", "1"],
    ("train",): ["--image-size", "64", "--max-epochs", "1", "--batch-size", "8", "--workers",
                 "0", "--device", "cpu", "--check-images", "none"],
    ("report",): ["--resamples", "50"],
}  # fmt: skip

# Paths a tutorial assumes: replaced in its text by a stand-in the test makes first.
PATHS = {
    "train-nih.md": {"/data/nih": "nih", "/fast/nih-256": "nih-cache"},
}
SETUP = {
    "train-nih.md": "cxr data synth --out nih",
}

SHIM = '''#!{python}
"""cxr with the test's smaller sizes (tests/test_tutorials.py)."""
import os, sys

SMALLER = {smaller!r}
given = sys.argv[1:]
words = tuple(word for word in given[:2] if not word.startswith("-"))
args = list(given)
if "--resume" not in given:
    for key, extra in SMALLER.items():
        if words[: len(key)] == key:
            args += extra
    if words[:1] == ("train",) and "--weights" not in given:
        args += ["--weights", "none"]
    if words[:2] == ("data", "split") and "--val-patients" in given:
        args += ["--val-patients", "8", "--test-patients", "8"]
os.execv(sys.executable, [sys.executable, "-m", "cxr", *args])
'''


def blocks(page: Path) -> list[tuple[str, str]]:
    """The page's untitled ``bash`` and ``python`` blocks at the start of a line, in order."""
    found = re.findall(r"^```(bash|python)([^\n]*)\n(.*?)^```", page.read_text(), re.S | re.M)
    return [(language, code) for language, info, code in found if "title=" not in info]


def run_tutorial(name: str, folder: Path) -> None:
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    shim = bin_dir / "cxr"
    shim.write_text(SHIM.format(python=sys.executable, smaller=SMALLER))
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CXR_TEST_DEVICE", None)
    steps = [("bash", SETUP[name])] if name in SETUP else []
    for language, code in blocks(TUTORIALS / name):
        for old, new in PATHS.get(name, {}).items():
            code = code.replace(old, new)
        steps.append((language, code))
    assert steps, f"{name}: no block to run"
    for language, code in steps:
        if language == "bash":
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            command = [sys.executable, "-c", code]
        result = subprocess.run(
            command, cwd=folder, env=env, capture_output=True, text=True, timeout=1800
        )
        assert result.returncode == 0, (
            f"{name}: this block failed:\n{textwrap.indent(code, '    ')}\n"
            f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
        )


def test_every_tutorial_has_blocks_to_run():
    pages = sorted(TUTORIALS.glob("*.md"))
    assert {page.name for page in pages} >= {"demo.md", "train-nih.md", "own-data.md"}
    for page in pages:
        assert blocks(page), page.name


@pytest.mark.slow
def test_demo_tutorial(tmp_path):
    run_tutorial("demo.md", tmp_path)
    assert (tmp_path / "demo" / "run" / "report-val.html").is_file()
    assert (tmp_path / "explained" / "00000001_000" / "Effusion.png").is_file()


@pytest.mark.slow
def test_train_nih_tutorial(tmp_path):
    run_tutorial("train-nih.md", tmp_path)
    assert (tmp_path / "runs" / "chexnet" / "report.html").is_file()
    assert (tmp_path / "runs" / "official" / "localization.json").is_file()


@pytest.mark.slow
def test_own_data_tutorial(tmp_path):
    run_tutorial("own-data.md", tmp_path)
    for run in ("chexpert", "mimic", "hosp"):
        assert (tmp_path / "runs" / run / "model.json").is_file(), run
    assert (tmp_path / "runs" / "hosp" / "metrics.json").is_file()
