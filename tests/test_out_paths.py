"""Every ``--out`` of every command, given an existing folder, an existing file, a path below
a file, a missing parent and a read-only place (a read-only tmpfs: root writes anywhere
else): one line naming the path, a non-zero exit, no traceback, nothing written. The check
runs before any work, so the commands' other arguments need not exist."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxr.cli import app
from cxr.outputs import output_file

# command line before --out, the option, and the kind of output
COMMANDS = {
    "data split": (["data", "split", "nowhere"], "--out", "folder"),
    "data synth": (["data", "synth"], "--out", "folder"),
    "data cache": (["data", "cache", "nowhere"], "--out", "folder"),
    "explain": (["explain", "run", "x.png"], "--out", "folder"),
    "train": (["train", "nowhere"], "--out", "folder"),
    "demo": (["demo"], "--out", "folder"),
    "localize": (["localize", "run"], "--out", "file"),
    "predict": (["predict", "run", "x.png"], "--out", "file"),
    "export": (["export", "run"], "--onnx", "file"),
}
SUFFIX = {"localize": ".json", "predict": ".csv", "export": ".onnx"}


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    folder = tmp_path_factory.mktemp("read-only")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)])
    assert mounted.returncode == 0, "the read-only case needs root to mount a tmpfs"
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def cases(tmp_path: Path, read_only: Path, name: str) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("keep me")
    if COMMANDS[name][2] == "folder":  # a missing parent is created: not a failure
        return {
            "a file": tmp_path / "a-file",
            "below a file": tmp_path / "a-file" / "x" / "y",
            "a read-only place": read_only / "out",
        }
    suffix = SUFFIX[name]
    return {
        "below a file": tmp_path / "a-file" / f"out{suffix}",
        "a missing parent": tmp_path / "missing" / f"out{suffix}",
        "a read-only place": read_only / f"out{suffix}",
    }


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_out_refuses_what_it_cannot_write_with_a_clear_error(name, tmp_path, read_only):
    prefix, option, _ = COMMANDS[name]
    for case, path in cases(tmp_path, read_only, name).items():
        result = CliRunner().invoke(app, [*prefix, option, str(path)])
        assert result.exit_code != 0, (name, case, result.output)
        assert "Traceback" not in result.output and "error:" in result.output, (name, case)
        shown = result.output.replace("\n", "")
        assert str(path.parent) in shown or str(path) in shown, (name, case, result.output)
    assert (tmp_path / "a-file").read_text() == "keep me"
    assert not list(read_only.iterdir())


@pytest.mark.parametrize("name", ["predict", "export"])
def test_a_file_output_given_an_existing_folder_is_refused_or_written_inside(name, tmp_path):
    prefix, option, _ = COMMANDS[name]
    result = CliRunner().invoke(app, [*prefix, option, str(tmp_path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    if name == "predict":
        assert "is a folder" in result.output


def test_localization_in_an_existing_folder_goes_inside_it(tmp_path):
    assert output_file(tmp_path, default_name="localization.json") == (
        tmp_path / "localization.json"
    )
    with pytest.raises(Exception, match=r"must end in \.json"):
        output_file(tmp_path / "x.txt", suffixes=(".json",))
