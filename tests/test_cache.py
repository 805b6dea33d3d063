"""The preprocessed image cache: build, resume, validation, reading, and training from it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cxr.cli import app
from cxr.data.cache import (
    INDEX_NAME,
    META_NAME,
    PIXELS_NAME,
    PROGRESS_NAME,
    build_cache,
    open_cache,
    square_resize,
)
from cxr.data.datasets import label_matrix
from cxr.data.images import decode_gray
from cxr.data.layouts.nih import load_nih
from cxr.data.loaders import XrayDataset
from cxr.data.schema import IMAGE_COLUMN, PATH_COLUMN
from cxr.data.transforms import Augment, Preprocess
from cxr.errors import CacheError

RGBA_IMAGE = "00001369_000.png"


@pytest.fixture
def small_nih(tmp_path: Path, sample_lines: list[str], sample_images: Path) -> Path:
    """An NIH-layout folder listing 10 real images (one of them RGBA); images linked in place."""
    root = tmp_path / "nih_small"
    root.mkdir()
    rows = sample_lines[1:10] + [line for line in sample_lines if line.startswith(RGBA_IMAGE)]
    (root / "Data_Entry_2017.csv").write_text("\n".join([sample_lines[0], *rows]) + "\n")
    os.symlink(sample_images, root / "images", target_is_directory=True)
    return root


@pytest.fixture
def small_table(small_nih: Path) -> pd.DataFrame:
    return load_nih(small_nih).table


def reference(table: pd.DataFrame, size: int) -> np.ndarray:
    return np.stack([square_resize(decode_gray(p), size) for p in table[PATH_COLUMN]])


def test_parallel_build_stores_every_image_resized(tmp_path, small_table):
    out = tmp_path / "cache"
    seen = []
    summary = build_cache(
        small_table,
        out,
        image_size=64,
        workers=2,
        chunk_size=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert (summary.images, summary.decoded, summary.reused) == (10, 10, 0)
    assert seen[-1] == (10, 10)
    assert (out / PIXELS_NAME).stat().st_size == 10 * 64 * 64 == summary.bytes
    assert not (out / PROGRESS_NAME).exists()
    meta = json.loads((out / META_NAME).read_text())
    assert meta["complete"] is True and meta["images"] == 10 and meta["image_size"] == 64
    cache = open_cache(out)
    stored = np.stack([cache.read(row) for row in range(10)])
    assert np.array_equal(stored, reference(small_table, 64))
    assert cache.names == small_table[IMAGE_COLUMN].tolist()
    rgba_row = cache.names.index(RGBA_IMAGE)
    assert stored[rgba_row].std() > 10  # a real radiograph, not a blank from a failed decode
    # A complete cache is not decoded again.
    again = build_cache(small_table, out, image_size=64, workers=2, chunk_size=3)
    assert (again.decoded, again.reused) == (0, 10)


def test_square_resize_keeps_the_centre_square_without_distortion():
    gray = np.zeros((40, 80), dtype=np.uint8)
    gray[:, 20:60] = 200  # the centre square is bright, the sides dark
    out = square_resize(gray, 32)
    assert out.shape == (32, 32) and out.min() == 200
    # The training transform's centre crop of a non-square image sees the same pixels (up to
    # the filter's reach across the crop's edge, which the cache does not blend in).
    from_png, from_cache = Preprocess(32).crop_resized(gray), Preprocess(32).crop_resized(out)
    assert np.array_equal(from_png[:, 1:-1], from_cache[:, 1:-1])


def test_cached_crops_match_png_crops_up_to_resize_differences(tmp_path, small_table):
    frame = small_table.iloc[:3]
    cache = open_cache(build_cache(frame, tmp_path / "c", image_size=256, workers=0).path)
    reader = cache.reader(frame)
    preprocess = Preprocess(224)
    for index, path in enumerate(frame[PATH_COLUMN]):
        for scale, flip in ((1.0, False), (1.15, True)):
            png = preprocess.crop_resized(decode_gray(path), scale, flip).astype(int)
            cached = preprocess.crop_resized(reader(index), scale, flip).astype(int)
            difference = np.abs(png - cached)
            assert difference.mean() < 1.5
            assert np.percentile(difference, 99) <= 8


def test_killed_build_resumes_without_decoding_finished_images(
    tmp_path, small_nih, small_table, monkeypatch
):
    out = tmp_path / "cache"
    # A real kill (SIGKILL, no cleanup) right after the second chunk of 3 images is recorded.
    script = textwrap.dedent(
        f"""
        import os, signal
        from cxr.data.cache import build_cache
        from cxr.data.layouts.nih import load_nih

        def progress(done, total):
            if done >= 6:
                os.kill(os.getpid(), signal.SIGKILL)

        table = load_nih({str(small_nih)!r}).table
        build_cache(table, {str(out)!r}, image_size=48, workers=0, chunk_size=3,
                    progress=progress)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((out / PROGRESS_NAME).read_text())["done"] == [0, 1]
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(out)

    import cxr.data.cache as cache_module

    decoded = []
    real_decode = cache_module.decode_gray
    monkeypatch.setattr(
        cache_module, "decode_gray", lambda path: decoded.append(path) or real_decode(path)
    )
    summary = build_cache(small_table, out, image_size=48, workers=0, chunk_size=3)
    assert (summary.decoded, summary.reused) == (4, 6)
    assert decoded == small_table[PATH_COLUMN].tolist()[6:]
    cache = open_cache(out)
    stored = np.stack([cache.read(row) for row in range(10)])
    assert np.array_equal(stored, reference(small_table, 48))


@pytest.fixture
def built(tmp_path, small_table) -> Path:
    return build_cache(small_table, tmp_path / "cache", image_size=32, workers=0).path


def test_truncated_cache_is_refused(built):
    with open(built / PIXELS_NAME, "r+b") as handle:
        handle.truncate(10 * 32 * 32 - 1)
    with pytest.raises(CacheError, match="truncated"):
        open_cache(built)


def test_edited_index_is_refused(built):
    index = built / INDEX_NAME
    index.write_text(index.read_text().replace("00000003_000.png", "00000003_001.png"))
    with pytest.raises(CacheError, match="checksum"):
        open_cache(built)


def test_incomplete_and_foreign_caches_are_refused(built, tmp_path):
    meta = json.loads((built / META_NAME).read_text())
    (built / META_NAME).write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(CacheError, match="incomplete"):
        open_cache(built)
    (built / META_NAME).write_text(json.dumps({**meta, "format": "lmdb"}))
    with pytest.raises(CacheError, match="not a cxr image cache"):
        open_cache(built)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="not a cxr image cache"):
        open_cache(tmp_path / "empty")
    with pytest.raises(CacheError, match="no such cache"):
        open_cache(tmp_path / "nowhere")


def test_cache_smaller_than_the_training_size_is_refused(built):
    with pytest.raises(CacheError, match="smaller than the 64 px"):
        open_cache(built, min_size=64)


def test_build_refuses_a_folder_holding_something_else(built, small_table, tmp_path):
    with pytest.raises(CacheError, match="other images or another size"):
        build_cache(small_table, built, image_size=48, workers=0)
    with pytest.raises(CacheError, match="other images or another size"):
        build_cache(small_table.iloc[:5], built, image_size=32, workers=0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not an image cache"):
        build_cache(small_table, other, image_size=32, workers=0)


def test_reader_looks_images_up_by_name_and_refuses_missing_or_changed_ones(
    built, small_table, tmp_path
):
    cache = open_cache(built)
    shuffled = small_table.iloc[[4, 0, 7]].reset_index(drop=True)
    reader = cache.reader(shuffled)
    for index, name in enumerate(shuffled[IMAGE_COLUMN]):
        assert np.array_equal(reader(index), cache.read(cache.names.index(name)))
    foreign = shuffled.copy()
    foreign.loc[1, IMAGE_COLUMN] = "99999999_000.png"
    with pytest.raises(CacheError, match=r"1 of 3 images are not in the cache .*99999999_000"):
        cache.reader(foreign)
    changed = tmp_path / "changed.png"
    changed.write_bytes(Path(shuffled.loc[0, PATH_COLUMN]).read_bytes() + b"\0")
    stale = shuffled.copy()
    stale.loc[0, PATH_COLUMN] = str(changed)
    with pytest.raises(CacheError, match="stale"):
        cache.reader(stale)


def test_memory_map_is_opened_lazily_and_never_pickled(built, small_table):
    cache = open_cache(built)
    reader = cache.reader(small_table)
    first = reader(0)  # opens the map in this process
    assert cache._pixels is not None
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.cache._pixels is None
    assert np.array_equal(copy(0), first)
    assert isinstance(copy.cache._pixels, np.memmap)
    dataset = XrayDataset(
        small_table[PATH_COLUMN].tolist(),
        label_matrix(small_table),
        Preprocess(32),
        Augment(),
        reader=reader,
    )
    image, _target, _index = dataset[(3, 1)]
    assert tuple(image.shape) == (3, 32, 32)


def test_cli_cache_builds_then_reports_complete(small_nih, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli-cache"
    args = ["data", "cache", str(small_nih), "--out", str(out), "--image-size", "32"]
    result = runner.invoke(app, [*args, "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "cache of 10 images at 32x32 px" in result.stdout
    assert "10 decoded" in result.stdout
    assert open_cache(out).images == 10
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "already complete" in result.stdout
    result = runner.invoke(app, [*args[:-1], "48"])
    assert result.exit_code == 2
    assert "other images or another size" in result.output


# ---------------------------------------------------------------------------- training


@pytest.mark.slow
def test_training_from_the_cache_equals_training_from_the_pngs(tmp_path, synth_data, make_run):
    """Synthetic images are 64 px, so a 64 px cache stores them unchanged: same numbers."""
    from cxr.workflows.train import train_run

    cache = build_cache(load_nih(synth_data).table, tmp_path / "cache", image_size=64).path
    png_run = make_run(tmp_path / "png", max_epochs=1)
    cache_run = make_run(tmp_path / "cached", max_epochs=1, cache=str(cache))
    train_run(png_run)
    train_run(cache_run)
    png_log = pd.read_csv(png_run / "log.csv")
    cache_log = pd.read_csv(cache_run / "log.csv")
    for column in ("train_loss", "val_loss", "val_auroc_mean"):
        assert cache_log[column].tolist() == pytest.approx(png_log[column].tolist(), abs=1e-6)
    info = json.loads((cache_run / "run.json").read_text())
    index_sha = json.loads((cache / "cache.json").read_text())["index_sha256"]
    assert info["cache"] == {"path": str(cache), "image_size": 64, "index_sha256": index_sha}


@pytest.mark.slow
def test_a_resume_cannot_switch_what_the_run_reads(tmp_path, synth_data, make_run):
    import shutil

    from cxr.errors import ConfigError
    from cxr.workflows.train import check_resume_cache, train_run

    table = load_nih(synth_data).table
    cache = build_cache(table, tmp_path / "cache", image_size=64, workers=0).path
    png_run = make_run(tmp_path / "png", max_epochs=2)
    with pytest.raises(ConfigError, match="this run reads the image files"):
        check_resume_cache(png_run, str(cache))
    result = CliRunner().invoke(app, ["train", "--resume", str(png_run), "--cache", str(cache)])
    assert result.exit_code == 2 and "this run reads the image files" in result.output
    assert not (png_run / "checkpoint.pt").exists()  # refused before any training
    cache_run = make_run(tmp_path / "cached", max_epochs=2, cache=str(cache))
    train_run(cache_run, stop_after_epochs=1)
    other = build_cache(table, tmp_path / "other", image_size=48, workers=0).path
    with pytest.raises(ConfigError, match="not the cache this run started with"):
        check_resume_cache(cache_run, str(other))
    moved = tmp_path / "moved"
    shutil.copytree(cache, moved)
    check_resume_cache(cache_run, str(moved))  # the same cache elsewhere is fine
    check_resume_cache(cache_run, None)


def test_train_refuses_a_cache_without_the_split_images(tmp_path, synth_data):
    table = load_nih(synth_data).table
    cache = build_cache(table.iloc[:10], tmp_path / "cache", image_size=64, workers=0).path
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(synth_data),
            "--out",
            str(out),
            "--weights",
            "none",
            "--device",
            "cpu",
            "--image-size",
            "32",
            "--cache",
            str(cache),
        ],
    )
    assert result.exit_code == 2
    assert "not in the cache" in result.output
    assert not (out / "config.json").exists()
