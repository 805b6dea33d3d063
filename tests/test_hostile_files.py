"""``cxr predict`` and ``cxr explain`` on hostile file-system entries: named pipes, sockets,
symbolic-link loops, broken links, names that are not UTF-8 and names holding terminal escape
sequences. Everything is generated under ``tmp_path``; nothing binary is committed.

The commands that could hang run in a child process with a timeout, so that a regression
fails the test instead of hanging the suite.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr.cli import app
from cxr.cli.common import printable
from cxr.data.files import FileError, _looks_dicom, find_images
from cxr.errors import CxrError
from cxr.utils import path_text

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX file types")

# Fast and deterministic in a test: PyTorch on the CPU (no ONNX export), decoding in-process.
FAST = ["--backend", "torch", "--device", "cpu", "--workers", "0"]
ESC_NAME = "\x1b[31m"  # what a hostile name carries: "switch the terminal to red"
# What cxr shows for ESC_NAME: the escape as four characters, then "[31m" as text.
ESC_SHOWN = "\\x1b[31m"
CHILD_TIMEOUT_S = 120  # a prompt run takes seconds; a hang is killed and fails the test


def write_png(path: Path) -> Path:
    """A small gray gradient PNG (64 x 80), saved with an explicit format: the name may
    hold anything."""
    pixels = np.add.outer(np.arange(64), np.arange(80)).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def raw(name: bytes) -> str:
    """A file name from its bytes, as Python spells it (bytes that are not UTF-8 become lone
    surrogates)."""
    return os.fsdecode(name)


def run_cxr(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m cxr ARGS`` in a child process with a plain, wide, colourless terminal."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE")
    }
    env.update(COLUMNS="200", PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "cxr", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )


def within(seconds: float, func, *args, **kwargs):
    """``func(*args, **kwargs)``, failing the test if it has not returned after ``seconds``
    (it goes on in a daemon thread, which the process abandons)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = func(*args, **kwargs)
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{getattr(func, '__name__', func)} did not return within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


# ---------------------------------------------------------------------------- named pipes


@pytest.mark.slow  # a child process that imports torch: several seconds
def test_a_named_pipe_in_a_folder_is_named_in_a_warning_and_does_not_fail_the_run(
    tmp_path, untrained_bundle
):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_png(scans / "chest.png")
    os.mkfifo(scans / "IM0002")  # no suffix: sniffed for a DICOM header, which used to block
    os.mkfifo(scans / "pipe.png")

    child = run_cxr(["predict", str(untrained_bundle), "scans", *FAST], cwd=tmp_path)

    stdout, stderr = child.stdout.decode(), child.stderr.decode()
    assert child.returncode == 0, stderr
    assert "warning: skipped scans/IM0002: not a regular file (named pipe)" in stderr
    assert "warning: skipped scans/pipe.png: not a regular file (named pipe)" in stderr
    assert "scans/chest.png" in stdout
    assert "failed" not in stderr


@pytest.mark.slow  # a child process that imports torch: several seconds
def test_a_named_pipe_given_on_the_command_line_fails_the_run_promptly(
    tmp_path, untrained_bundle, runner
):
    write_png(tmp_path / "chest.png")
    os.mkfifo(tmp_path / "pipe")

    child = run_cxr(["predict", str(untrained_bundle), "chest.png", "pipe", *FAST], tmp_path)

    stderr = child.stderr.decode()
    assert child.returncode == 1, stderr
    assert "error: pipe: not a regular file (named pipe)" in stderr
    assert "1 file(s) failed, 1 predicted" in stderr
    assert "chest.png" in child.stdout.decode()

    # Alone, nothing can run (exit 2). The path is only looked at (stat), never opened, so
    # this runs in-process.
    alone = runner.invoke(app, ["predict", str(untrained_bundle), str(tmp_path / "pipe"), *FAST])
    assert alone.exit_code == 2, alone.output
    assert f"error: {tmp_path}/pipe: not a regular file (named pipe)" in alone.stderr
    assert "error: no PNG, JPEG or DICOM files to predict" in alone.stderr


def test_a_named_pipe_put_in_place_of_a_file_is_not_opened_for_sniffing(tmp_path):
    """The race the search cannot see coming: listed as a regular file, a named pipe by the
    time it is opened. The sniff opens non-blocking and checks the open file."""
    os.mkfifo(tmp_path / "IM0001")
    assert within(10, _looks_dicom, tmp_path / "IM0001") is False


# ---------------------------------------------------------------------------- links, odd entries


def test_two_links_to_the_folder_itself_search_each_folder_once(tmp_path):
    folder = tmp_path / "scans"
    (folder / "sub").mkdir(parents=True)
    write_png(folder / "a.png")
    write_png(folder / "sub" / "b.png")
    os.symlink(".", folder / "l1")
    os.symlink(".", folder / "l2")
    os.symlink("..", folder / "sub" / "up")

    files, errors, skipped = within(30, find_images, [folder])

    assert files == [folder / "a.png", folder / "sub" / "b.png"]
    assert errors == []
    assert skipped == [
        FileError(f"{folder}/l1", "folder already visited (symbolic link loop)"),
        FileError(f"{folder}/l2", "folder already visited (symbolic link loop)"),
        FileError(f"{folder}/sub/up", "folder already visited (symbolic link loop)"),
    ]


@pytest.mark.slow  # a child process (5-10 s); the search itself is tested just above
def test_two_links_to_the_folder_itself_predict_each_image_once(tmp_path, untrained_bundle):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_png(folder / "a.png")
    write_png(folder / "b.png")
    os.symlink(".", folder / "l1")
    os.symlink(".", folder / "l2")

    # A child process: a walk that followed the links would search 2^40 folders, not hang
    # the suite.
    child = run_cxr(
        ["predict", str(untrained_bundle), "scans", "--out", "out.json", *FAST], tmp_path
    )

    stderr = child.stderr.decode()
    assert child.returncode == 0, stderr
    written = json.loads((tmp_path / "out.json").read_text())
    assert [p["file"] for p in written["predictions"]] == ["scans/a.png", "scans/b.png"]
    assert written["errors"] == []
    assert written["skipped"] == [
        {"file": "scans/l1", "reason": "folder already visited (symbolic link loop)"},
        {"file": "scans/l2", "reason": "folder already visited (symbolic link loop)"},
    ]
    assert "warning: skipped scans/l1: folder already visited (symbolic link loop)" in stderr
    assert "warning: skipped scans/l2: folder already visited (symbolic link loop)" in stderr


def test_a_second_link_to_a_folder_is_named_but_not_a_loop(tmp_path):
    folder = tmp_path / "scans"
    (folder / "2024").mkdir(parents=True)
    write_png(folder / "2024" / "a.png")
    os.symlink("2024", folder / "latest")

    files, errors, skipped = within(30, find_images, [folder])

    assert files == [folder / "2024" / "a.png"]
    assert errors == []
    reason = "folder already visited (reached through another symbolic link)"
    assert skipped == [FileError(f"{folder}/latest", reason)]


def test_sockets_devices_and_broken_links_are_skipped_in_folders_and_errors_when_named(
    tmp_path, monkeypatch
):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_png(folder / "a.png")
    os.symlink("missing.png", folder / "gone.png")
    os.symlink("self", folder / "self")
    os.symlink(os.devnull, folder / "null.dcm")
    monkeypatch.chdir(folder)  # a socket's path is limited to about 100 bytes: bind it relative
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind("sock")
        files, errors, skipped = within(30, find_images, [folder])
        named = within(30, find_images, [folder / "sock", folder / "gone.png", folder / "null.dcm"])
    finally:
        server.close()

    assert files == [folder / "a.png"]
    assert errors == []
    assert skipped == [
        FileError(f"{folder}/gone.png", "broken symbolic link"),
        FileError(f"{folder}/null.dcm", "not a regular file (character device)"),
        FileError(f"{folder}/self", "symbolic link loop"),
        FileError(f"{folder}/sock", "not a regular file (socket)"),
    ]
    assert named.files == [] and named.skipped == []
    assert named.errors == [
        FileError(f"{folder}/sock", "not a regular file (socket)"),
        FileError(f"{folder}/gone.png", "broken symbolic link"),
        FileError(f"{folder}/null.dcm", "not a regular file (character device)"),
    ]


def test_the_search_is_bounded_in_depth_and_in_entries(tmp_path):
    top = tmp_path / "deep"
    deep = top / "a" / "b" / "c"
    deep.mkdir(parents=True)
    write_png(top / "a" / "one.png")
    write_png(top / "a" / "b" / "two.png")
    write_png(deep / "three.png")

    files, errors, skipped = find_images([top], max_depth=2)
    assert files == [top / "a" / "one.png", top / "a" / "b" / "two.png"]
    assert errors == [FileError(f"{top}/a/b/c", "more than 2 folders deep; not searched")]
    assert skipped == []

    wide = tmp_path / "wide"
    wide.mkdir()
    for index in range(6):
        (wide / f"{index}.txt").write_text("x")
    with pytest.raises(CxrError, match=f"{wide}: more than 5 files and folders below it"):
        find_images([wide], max_entries=5)
    assert find_images([wide], max_entries=6).errors == [
        FileError(str(wide), "folder holds no PNG, JPEG or DICOM files")
    ]


# ---------------------------------------------------------------------------- names as text


def test_text_helpers_escape_exactly_the_unwritable_and_the_controls():
    assert path_text(raw(b"scan\xff.png")) == "scan\\xff.png"
    assert path_text("r\u00e9sum\u00e9 \u65e5\u672c.png") == "r\u00e9sum\u00e9 \u65e5\u672c.png"
    assert path_text("\ud800") == "\\ud800"  # a surrogate no file system produced
    assert printable(raw(b"a\x1b[31mb\tc\x7f\xc2\x9b\n\xff") + "\u00e9") == (
        "a\\x1b[31mb\\tc\\x7f\\x9b\\n\\xff\u00e9"
    )
    assert printable("\u00a0plain \u65e5\u672c") == "\u00a0plain \u65e5\u672c"


@pytest.mark.slow
def test_a_name_that_is_not_utf8_is_written_the_same_in_csv_and_json(
    tmp_path, untrained_bundle, runner
):
    folder = tmp_path / "scans"
    folder.mkdir()
    write_png(folder / raw(b"scan\xff.png"))
    (folder / raw(b"bad\xfe.png")).write_bytes(b"not a PNG at all")
    good, bad = f"{folder}/scan\\xff.png", f"{folder}/bad\\xfe.png"
    args = ["predict", str(untrained_bundle), str(folder), *FAST]

    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 1, result.output  # bad\xfe.png failed; the rest was written
    with open(tmp_path / "x.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [good]
    assert f"error: {bad}: not a readable image" in result.stderr

    cams = tmp_path / "cams"
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x.json"), "--explain", str(cams)])
    assert result.exit_code == 1, result.output
    written = json.loads((tmp_path / "x.json").read_text(encoding="utf-8"))
    assert [p["file"] for p in written["predictions"]] == [good]
    assert [e["file"] for e in written["errors"]] == [bad]
    overlays = written["predictions"][0]["overlays"]
    assert len(overlays) == 7  # the 7 always-positive classes of the test bundle
    assert all(p.startswith(f"{cams}/scan/") for p in overlays)
    assert sorted(os.listdir(cams)) == ["scan"]


def test_explain_names_folders_and_tables_safely(tmp_path, untrained_bundle, runner):
    image = write_png(tmp_path / raw(b"scan\x1b[31m\xff.png"))
    cams = tmp_path / "cams"

    result = runner.invoke(
        app,
        ["explain", str(untrained_bundle), str(image), "--out", str(cams), "--device", "cpu",
         "--pathology", "Atelectasis"],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(cams)) == ["explanations.json", "scan__31m"]
    assert sorted(os.listdir(cams / "scan__31m")) == ["Atelectasis.npy", "Atelectasis.png"]
    summary = json.loads((cams / "explanations.json").read_text(encoding="utf-8"))
    record = summary["images"][0]
    assert record["image"] == f"{tmp_path}/scan\x1b[31m\\xff.png"
    assert record["folder"] == f"{cams}/scan__31m"
    assert f"scan{ESC_SHOWN}\\xff.png" in result.output
    assert "scan\x1b" not in result.output


# ---------------------------------------------------------------------------- the terminal


@pytest.mark.slow  # a child process (5-10 s); the in-process test below runs in the fast loop
def test_escape_bytes_in_names_never_reach_the_terminal(tmp_path, untrained_bundle):
    scans = tmp_path / "in"
    scans.mkdir()
    write_png(scans / f"ok{ESC_NAME}.png")
    write_png(scans / raw(b"ok\xff.png"))
    (scans / f"bad{ESC_NAME}.png").write_bytes(b"not a PNG at all")
    os.mkfifo(scans / f"pipe{ESC_NAME}")

    child = run_cxr(
        ["predict", str(untrained_bundle), "in", f"gone{ESC_NAME}.png", *FAST], cwd=tmp_path
    )

    assert child.returncode == 1, child.stderr.decode(errors="replace")
    assert b"\x1b" not in child.stdout
    assert b"\x1b" not in child.stderr
    stdout, stderr = child.stdout.decode(), child.stderr.decode()
    assert f"in/ok{ESC_SHOWN}.png" in stdout
    assert "in/ok\\xff.png" in stdout
    assert f"error: gone{ESC_SHOWN}.png: no such file or folder" in stderr
    assert f"error: in/bad{ESC_SHOWN}.png: not a readable image" in stderr
    assert f"warning: skipped in/pipe{ESC_SHOWN}: not a regular file (named pipe)" in stderr
    assert "2 file(s) failed, 2 predicted" in stderr


def test_names_and_library_errors_are_escaped_in_process(tmp_path, untrained_bundle, runner):
    """The fast-loop version of the test above: the consoles are the test process's, so only
    the names are checked (a forced colour terminal would add ESC bytes of its own)."""
    write_png(tmp_path / f"ok{ESC_NAME}.png")
    (tmp_path / f"bad{ESC_NAME}.png").write_bytes(b"not a PNG at all")
    images = [str(tmp_path / f"ok{ESC_NAME}.png"), str(tmp_path / f"bad{ESC_NAME}.png")]

    result = runner.invoke(app, ["predict", str(untrained_bundle), *images, *FAST])

    assert result.exit_code == 1, result.output
    assert f"{tmp_path}/ok{ESC_SHOWN}.png" in result.stdout
    assert f"error: {tmp_path}/bad{ESC_SHOWN}.png: not a readable image" in result.stderr
    assert "ok\x1b" not in result.output and "bad\x1b" not in result.output

    model = tmp_path / f"model{ESC_NAME}"
    result = runner.invoke(app, ["predict", str(model), images[0], *FAST])
    assert result.exit_code == 2
    assert f"error: {tmp_path}/model{ESC_SHOWN}: no such model" in result.stderr
    assert "model\x1b" not in result.output


def test_bidirectional_overrides_are_escaped_for_display():
    from cxr.utils import printable_text

    # U+202E would show "gnp.exe" reversed; it is escaped like a control character.
    assert printable_text("scan\u202egnp.exe") == "scan\\u202egnp.exe"
    assert printable_text("naïve 胸部.png") == "naïve 胸部.png"  # other Unicode is kept
