"""Finding the image files a user names: files as given, folders searched recursively."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cxr.data.images import IMAGE_SUFFIXES, is_dicom_bytes


@dataclass(frozen=True)
class FileError:
    """A file (or a path given on the command line) that produced no prediction, and why."""

    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[FileError]]:
    """The image files named by ``paths``: files as given, folders searched recursively.

    In folders, files ending in .png/.jpg/.jpeg/.dcm/.dicom are taken, and so are files without
    an image suffix that start like a DICOM file (PACS exports often have no extension). Hidden
    files and folders are skipped. A path that does not exist, or a folder without images, is
    reported as an error. Each file is listed once, in a stable (sorted) order per argument.
    """
    files: list[Path] = []
    errors: list[FileError] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = _images_below(path)
            if not found:
                errors.append(FileError(str(path), "folder holds no PNG, JPEG or DICOM files"))
        elif path.is_file():
            found = [path]
        elif path.exists():
            found = []
            errors.append(FileError(str(path), "not a regular file or folder"))
        else:
            found = []
            errors.append(FileError(str(path), "no such file or folder"))
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files, errors


def _images_below(folder: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = Path(root, name)
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES or (suffix not in _OTHER_SUFFIXES and _looks_dicom(path)):
                found.append(path)
    return found


# Common non-image companions of X-ray folders; not worth opening to sniff.
_OTHER_SUFFIXES = {".csv", ".gz", ".txt", ".json", ".md", ".zip", ".tar", ".xml", ".html", ".py"}


def _looks_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return is_dicom_bytes(handle.read(132))
    except OSError:
        return False
