"""Finding the image files a user names: files as given, folders searched recursively.

The search is bounded whatever the file system holds: each folder is searched once (by device
and inode, so symbolic links cannot make it loop or repeat), only regular files are taken (a
named pipe is never opened in a way that could block), and the depth and the number of entries
are limited. What it leaves out that a user may want to know about is named, with the reason.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cxr.data.images import IMAGE_SUFFIXES, is_dicom_bytes
from cxr.errors import CxrError
from cxr.utils import read_regular_head

# Folders below a folder argument; real PACS exports and dataset trees are under 10 deep.
MAX_DEPTH = 64
# Entries examined per folder argument: NIH ChestX-ray14 is 112,120 images; ten times that is
# a mistake (a home folder, a mount point), and searching it would take minutes.
MAX_ENTRIES = 1_000_000

# Common non-image companions of X-ray folders; not worth opening to sniff.
_OTHER_SUFFIXES = {".csv", ".gz", ".txt", ".json", ".md", ".zip", ".tar", ".xml", ".html", ".py"}


@dataclass(frozen=True)
class FileError:
    """A file (or a path given on the command line) that produced no prediction, and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


class FoundImages(NamedTuple):
    """What :func:`find_images` found.

    ``files``: the images, each once. ``errors``: paths that may have held images the user
    asked for but produced none (a path given that does not exist or is not a regular file
    or folder, a folder without images, a folder that could not be listed or is too deep).
    ``skipped``: entries inside folders that are not images by nature and were left out
    (named pipes, sockets, devices, broken links, a folder reached a second time through a
    symbolic link); worth a warning, not a failure.
    """

    files: list[Path]
    errors: list[FileError]
    skipped: list[FileError]


def find_images(
    paths: Iterable[str | os.PathLike],
    *,
    max_depth: int = MAX_DEPTH,
    max_entries: int = MAX_ENTRIES,
) -> FoundImages:
    """The image files named by ``paths``: files as given, folders searched recursively.

    A regular file given is taken whatever its name. In folders, files ending in
    .png/.jpg/.jpeg/.dcm/.dicom are taken, and so are files without an image suffix that start
    like a DICOM file (PACS exports often have no extension); hidden files and folders are
    left out silently. Symbolic links are followed, but each folder is searched once; only
    regular files are taken. A path given that does not exist or is a named pipe, socket or
    device is an error, as is a folder without images; see :class:`FoundImages` for what is an
    error and what is merely skipped. Each file is listed once (by device and inode), in a
    stable (sorted) order per argument. More than ``max_entries`` entries below one folder
    raises :class:`~cxr.errors.CxrError`; folders deeper than ``max_depth`` are errors.
    """
    found = FoundImages([], [], [])
    seen: set[tuple[int, int]] = set()
    for raw in paths:
        path = Path(raw)
        try:
            info = path.stat()
        except OSError as exc:
            found.errors.append(FileError(str(path), _missing_reason(path, exc)))
            continue
        if stat.S_ISDIR(info.st_mode):
            try:
                images = _images_below(path, info, found, max_depth, max_entries)
            except OSError as exc:
                images = []
                found.errors.append(FileError(str(path), _unlistable(exc)))
            else:
                if not images:
                    reason = "folder holds no PNG, JPEG or DICOM files"
                    found.errors.append(FileError(str(path), reason))
        elif stat.S_ISREG(info.st_mode):
            images = [(path, _key(info))]
        else:
            images = []
            found.errors.append(FileError(str(path), f"not a regular file ({_kind(info)})"))
        for file, key in images:
            if key not in seen:
                seen.add(key)
                found.files.append(file)
    return found


def _images_below(
    top: Path, info: os.stat_result, found: FoundImages, max_depth: int, max_entries: int
) -> list[tuple[Path, tuple[int, int]]]:
    """(path, key) of the images below ``top``, depth first in name order, each folder once.
    Raises :class:`OSError` when ``top`` itself cannot be listed.

    A stack instead of ``os.walk(followlinks=True)``, which searches a folder again for every
    link that reaches it: two links to ``.`` made that 2^depth folders.
    """
    images: list[tuple[Path, tuple[int, int]]] = []
    visited = {_key(info)}
    # (folder, depth, keys of the folders above it and itself: a link to one of them is a loop)
    stack = [(top, 0, (_key(info),))]
    entries = 0
    while stack:
        folder, depth, above = stack.pop()
        try:
            with os.scandir(folder) as listing:
                children = []
                for entry in listing:  # counted as read: a huge folder stops at the limit
                    children.append(entry)
                    if entries + len(children) > max_entries:
                        break
            children.sort(key=lambda entry: entry.name)
        except OSError as exc:
            if depth == 0:
                raise  # the folder given: the caller names it
            found.errors.append(FileError(str(folder), _unlistable(exc)))
            continue
        entries += len(children)
        if entries > max_entries:
            raise CxrError(
                f"{top}: more than {max_entries:,} files and folders below it; "
                "name the folders that hold the images"
            )
        subfolders = []
        for entry in children:
            if entry.name.startswith("."):
                continue
            path = Path(folder, entry.name)
            try:
                target = entry.stat()  # follows a link
            except OSError as exc:
                found.skipped.append(FileError(str(path), _missing_reason(path, exc)))
                continue
            key = _key(target)
            if stat.S_ISDIR(target.st_mode):
                if key in visited:
                    found.skipped.append(FileError(str(path), _revisit_reason(key, above)))
                elif depth + 1 > max_depth:
                    reason = f"more than {max_depth} folders deep; not searched"
                    found.errors.append(FileError(str(path), reason))
                else:
                    visited.add(key)
                    subfolders.append((path, depth + 1, (*above, key)))
            elif not stat.S_ISREG(target.st_mode):
                found.skipped.append(FileError(str(path), f"not a regular file ({_kind(target)})"))
            elif _is_image_name(path) or _looks_dicom(path):
                images.append((path, key))
        stack.extend(reversed(subfolders))  # popped in name order
    return images


def _key(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _looks_dicom(path: Path) -> bool:
    if path.suffix.lower() in _OTHER_SUFFIXES:
        return False
    try:
        # Non-blocking and fstat-checked: the entry was a regular file when listed, but a
        # named pipe put in its place since must not hang the search.
        return is_dicom_bytes(read_regular_head(path, 132))
    except OSError:
        return False


def _revisit_reason(key: tuple[int, int], above: tuple[tuple[int, int], ...]) -> str:
    if key in above:
        return "folder already visited (symbolic link loop)"
    return "folder already visited (reached through another symbolic link)"


def _missing_reason(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "broken symbolic link" if path.is_symlink() else "no such file or folder"
    if exc.errno == errno.ELOOP:  # links that point at each other
        return "symbolic link loop"
    return f"cannot be read ({exc.strerror or exc})"


def _unlistable(exc: OSError) -> str:
    return f"folder cannot be listed ({exc.strerror or exc})"


def _kind(info: os.stat_result) -> str:
    mode = info.st_mode
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"
