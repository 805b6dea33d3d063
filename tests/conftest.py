"""Shared fixtures.

Real NIH data lives OUTSIDE the repository, at ``<repo>/../shared/data`` (see its README.md).
Tests read it in place and never copy it into the repository; anything else they need is
generated under ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NIH_DIR = SHARED_DATA / "nih"
V2020_CSV = NIH_DIR / "metadata" / "Data_Entry_2017_v2020.csv.gz"
SAMPLE_CSV = NIH_DIR / "images.csv"
SAMPLE_IMAGES = NIH_DIR / "images"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder ``../shared/data`` (relative to the repository root)."""
    if not (SHARED_DATA / "README.md").is_file():
        # CI lays ../shared beside the clone; a missing folder is a broken setup, not a skip.
        pytest.fail(f"real NIH test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nih_dir(shared_data: Path) -> Path:
    return shared_data / "nih"


@pytest.fixture(scope="session")
def v2020_csv(nih_dir: Path) -> Path:
    """NIH's full Data_Entry_2017_v2020 table: 112,120 rows."""
    return nih_dir / "metadata" / "Data_Entry_2017_v2020.csv.gz"


@pytest.fixture(scope="session")
def v2020_table(v2020_csv: Path) -> pd.DataFrame:
    """The full table read once per session. Do not modify it in a test."""
    from cxr.data.nih import read_table

    return read_table(v2020_csv)


@pytest.fixture(scope="session")
def sample_csv(nih_dir: Path) -> Path:
    """``nih/images.csv``: the 264 Data_Entry v2020 rows of the images in ``nih/images``."""
    return nih_dir / "images.csv"


@pytest.fixture(scope="session")
def sample_images(nih_dir: Path) -> Path:
    """``nih/images``: 264 real 1024x1024 NIH PNGs (259 L, 5 RGBA)."""
    return nih_dir / "images"


@pytest.fixture(scope="session")
def sample_lines(sample_csv: Path) -> list[str]:
    """Header and the 264 data lines of ``nih/images.csv``, as text."""
    return sample_csv.read_text().splitlines()


@pytest.fixture
def write_csv(tmp_path: Path):
    """Write lines (header first) to ``tmp_path/name`` and return the path."""

    def write(name: str, lines: list[str]) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


@pytest.fixture
def mini_nih(tmp_path: Path, sample_csv: Path, sample_images: Path) -> Path:
    """A folder in NIH's archive layout: ``Data_Entry_2017.csv`` + ``images_001/images/``.

    The table is the text of ``nih/images.csv``; the image folder is a symlink to the real
    ``nih/images`` (nothing is copied).
    """
    root = tmp_path / "nih_mini"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text(sample_csv.read_text())
    (root / "images_001").mkdir()
    os.symlink(sample_images, root / "images_001" / "images", target_is_directory=True)
    return root
