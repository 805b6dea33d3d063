"""Where a command writes: one check of every ``--out`` before any work starts, so that an
existing folder, an existing file, a missing parent or a read-only place gives one clear
error naming the path (and a non-zero exit), never a traceback after minutes of work.

The rules: a *file* output given an existing folder is written inside it under the
command's default name when it has one, else refused; its parent folder must exist. A
*folder* output may not be a file or lie below one; the command creates it and its
parents."""

from __future__ import annotations

import os
from pathlib import Path

from cxr.errors import OutputError


def output_file(
    path: str | os.PathLike,
    *,
    default_name: str | None = None,
    suffixes: tuple[str, ...] = (),
    option: str = "--out",
) -> Path:
    """The file a command will write for ``path`` (see the module's rules)."""
    target = Path(path)
    if target.is_dir():
        if default_name is None:
            raise OutputError(f"{target}: is a folder; {option} needs a file name")
        target = target / default_name
    if suffixes and target.suffix.lower() not in suffixes:
        raise OutputError(f"{target}: {option} must end in {' or '.join(suffixes)}")
    parent = target.parent
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "no such folder"
        raise OutputError(f"{parent}: {what} (for {option} {target})")
    if target.exists() and not target.is_file():
        raise OutputError(f"{target}: exists and is not a regular file")
    _check_writable(parent, target, option)
    return target


def output_folder(path: str | os.PathLike, *, option: str = "--out") -> Path:
    """The folder a command will write into (the command creates it, and decides what an
    existing one means: resume, finish or refuse)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: is a file; {option} needs a folder")
    nearest = target
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise OutputError(f"{nearest}: is a file, not a folder (for {option} {target})")
    _check_writable(nearest, target, option)
    return target


def _check_writable(folder: Path, target: Path, option: str) -> None:
    # os.access says yes to root everywhere; a read-only file system says no to root too.
    if not os.access(folder, os.W_OK) or _read_only_mount(folder):
        raise OutputError(f"{folder}: cannot be written (for {option} {target})")


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
