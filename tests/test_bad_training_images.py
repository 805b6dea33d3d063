"""Unreadable images stop `cxr train` before anything is trained (or are skipped when asked)."""

from __future__ import annotations

import shutil

from typer.testing import CliRunner

from cxr.cli import app


def _damaged_copy(synth_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    images = sorted((data / "images").glob("*.png"))
    truncated, empty, text = images[0], images[1], images[2]
    truncated.write_bytes(truncated.read_bytes()[:100])
    empty.write_bytes(b"")
    text.write_text("this is not a PNG\n")
    return data, [truncated.name, empty.name, text.name]


def _train(data, out, *extra):
    args = ["train", str(data), "--out", str(out), "--weights", "none", "--image-size", "32"]
    args += ["--batch-size", "8", "--max-epochs", "1", "--workers", "0", "--device", "cpu"]
    return CliRunner().invoke(app, args + list(extra))


def test_unreadable_images_refuse_the_run_up_front(synth_data, tmp_path):
    data, bad_names = _damaged_copy(synth_data, tmp_path)
    result = _train(data, tmp_path / "run")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "3 of" in result.output and "cannot be read" in result.output
    for name in bad_names:
        assert name in result.output
    assert "truncated" in result.output and "0 bytes" in result.output
    assert "--skip-bad-images" in result.output
    assert not (tmp_path / "run").exists(), "nothing may be created for a refused run"


def test_skip_bad_images_trains_without_them_and_warns(synth_data, tmp_path):
    data, bad_names = _damaged_copy(synth_data, tmp_path)
    result = _train(data, tmp_path / "run", "--skip-bad-images")
    assert result.exit_code == 0, result.output
    assert "training without 3 unreadable image(s)" in result.output
    used = "".join(
        (tmp_path / "run" / "split" / f"{name}.csv").read_text()
        for name in ("train", "val", "test")
    )
    for name in bad_names:
        assert name not in used
