"""The preprocessed image cache: every image decoded once, stored as uint8 pixels on disk.

Each image is decoded (any mode, :func:`cxr.data.images.decode_gray`), centre-cropped to a
square (what the training transform's centre crop keeps anyway) and resized with PIL's
antialiased bilinear filter to ``S x S``. All images go into one raw, headerless file read
through a NumPy memory map, so training reads a row (``S*S`` bytes) without decoding and
without loading the dataset into memory.

Layout of a cache folder::

    cache.json     format, image size, image count, dtype, sha256 of index.csv, complete flag
    index.csv      row, Image Index, bytes (the source file's size when it was cached)
    pixels.u8      N * S * S bytes; row i is image i in C order
    progress.json  only while building: the chunks already written (a killed build resumes)

A cache is validated when opened (format, complete flag, image count, size, dtype, the file
size of ``pixels.u8`` and the index checksum): a stale, truncated or foreign cache raises
:class:`CacheError` and is never used.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from cxr.data.images import decode_gray
from cxr.data.schema import IMAGE_COLUMN, PATH_COLUMN
from cxr.errors import CacheError
from cxr.safety import csv_text, restored_frame
from cxr.utils import atomic_write_text

FORMAT = "cxr-cache/1"
META_NAME = "cache.json"
INDEX_NAME = "index.csv"
PIXELS_NAME = "pixels.u8"
PROGRESS_NAME = "progress.json"
DEFAULT_IMAGE_SIZE = 256
DEFAULT_CHUNK_SIZE = 64
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096
RESAMPLE = "centre square crop, PIL bilinear (antialiased)"


def square_resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop ``gray`` to a square and resize it (antialiased) to ``size x size``."""
    height, width = gray.shape
    side = min(height, width)
    image = Image.fromarray(gray)
    if height != width:
        top, left = (height - side) // 2, (width - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != size:
        # PIL's bilinear filter widens its support when shrinking: antialiased.
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def cache_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """The ``(size, size) uint8`` array the cache stores for one file."""
    return square_resize(decode_gray(path), size)


@dataclass
class CacheSummary:
    path: Path
    images: int
    image_size: int
    decoded: int  # images decoded by this call (0 when the cache was already complete)
    reused: int  # images already in the cache from an earlier, interrupted build
    bytes: int


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def index_table(table: pd.DataFrame) -> pd.DataFrame:
    """The cache's index for a table with ``Image Index`` and resolved ``path`` columns."""
    for column in (IMAGE_COLUMN, PATH_COLUMN):
        if column not in table.columns:
            raise CacheError(f"the image table has no {column!r} column to cache from")
    if (table[PATH_COLUMN] == "").any():
        raise CacheError("some images of the table have no resolved path")
    names = table[IMAGE_COLUMN].astype(str)
    if names.duplicated().any():
        raise CacheError(f"image {names[names.duplicated()].iloc[0]!r} is listed twice")
    sizes = []
    for path in table[PATH_COLUMN]:
        try:
            sizes.append(os.stat(path).st_size)
        except OSError as exc:
            raise CacheError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return pd.DataFrame({"row": np.arange(len(table)), IMAGE_COLUMN: names, "bytes": sizes})


def build_cache(
    table: pd.DataFrame,
    out: str | os.PathLike,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    source: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CacheSummary:
    """Decode every image of ``table`` once into the cache folder ``out``.

    ``workers`` processes (default: all cores; 0 or 1: in this process) each decode chunks
    of ``chunk_size`` images and write them straight into their rows of ``pixels.u8``; this
    process records finished chunks in ``progress.json``. Run again on the same ``out``, a
    killed build decodes only the chunks not recorded; a complete one decodes nothing. A
    folder holding anything else (another cache, other files) is refused.
    ``progress(done, total)`` is called as images are written.
    """
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise CacheError(
            f"image size must be {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, not {image_size}"
        )
    if chunk_size < 1:
        raise CacheError("chunk size must be at least 1")
    if table.empty:
        raise CacheError("no images to cache")
    out = Path(out)
    index = index_table(table)
    index_text = csv_text(index)
    count = len(index)
    meta = {
        "format": FORMAT,
        "images": count,
        "image_size": image_size,
        "dtype": "uint8",
        "layout": "rows of image_size x image_size, C order, no header",
        "index_sha256": _sha256(index_text),
        "resample": RESAMPLE,
        "source": source,
        "complete": False,
    }
    finished = _finished_cache(out, meta)
    if finished is not None:
        if progress:
            progress(count, count)
        return finished
    chunks = [(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]
    done = _start_build(out, meta, index_text, chunk_size, len(chunks))
    reused = sum(chunks[c][1] - chunks[c][0] for c in done)
    written = reused
    if progress:
        progress(written, count)

    def on_chunk(chunk: int, images: int) -> None:
        nonlocal written
        done.add(chunk)
        written += images
        state = {"index_sha256": meta["index_sha256"], "chunk_size": chunk_size}
        _write_json(out / PROGRESS_NAME, {**state, "done": sorted(done)})
        if progress:
            progress(written, count)

    pixels_path = out / PIXELS_NAME
    paths = table[PATH_COLUMN].astype(str).tolist()
    jobs = [
        (str(pixels_path), count, image_size, c, chunks[c][0], paths[slice(*chunks[c])])
        for c in range(len(chunks))
        if c not in done
    ]
    _run_chunks(jobs, os.cpu_count() or 1 if workers is None else workers, on_chunk)
    expected_bytes = count * image_size * image_size
    if pixels_path.stat().st_size != expected_bytes:
        raise CacheError(f"{pixels_path}: changed size while the cache was built")
    _write_json(out / META_NAME, {**meta, "complete": True})
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    return CacheSummary(out, count, image_size, count - reused, reused, expected_bytes)


def _finished_cache(out: Path, meta: dict[str, Any]) -> CacheSummary | None:
    """The summary of ``out`` if it already holds this cache complete; ``None`` if the build
    is to start or go on there. A folder holding anything else is refused."""
    meta_path = out / META_NAME
    old = _read_json(meta_path) if meta_path.exists() else None
    if old is None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise CacheError(f"{out}: exists and is not an image cache; choose another --out")
        return None
    same = all(old.get(k) == meta[k] for k in ("format", "images", "image_size"))
    if not (same and old.get("index_sha256") == meta["index_sha256"]):
        raise CacheError(
            f"{out}: holds a cache of other images or another size "
            f"({old.get('images')} images of {old.get('image_size')} px); choose another "
            "--out or delete that folder"
        )
    if not old.get("complete"):
        return None
    cache = open_cache(out)  # validates; a damaged complete cache is refused here
    count, size = meta["images"], meta["image_size"]
    return CacheSummary(out, count, size, 0, count, cache.pixels_bytes)


def _start_build(
    out: Path, meta: dict[str, Any], index_text: str, chunk_size: int, chunks: int
) -> set[int]:
    """Create or reuse the folder's files; returns the chunks an earlier build finished."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / META_NAME, meta)  # first, so the folder is recognisable as this build's
    index_path = out / INDEX_NAME
    index_sha = meta["index_sha256"]
    if not index_path.exists() or _sha256(index_path.read_text()) != index_sha:
        atomic_write_text(index_path, index_text)
    pixels_path = out / PIXELS_NAME
    expected_bytes = meta["images"] * meta["image_size"] ** 2
    state = _read_json(out / PROGRESS_NAME) or {}
    if not pixels_path.exists() or pixels_path.stat().st_size != expected_bytes:
        with open(pixels_path, "wb") as handle:
            handle.truncate(expected_bytes)  # sparse: no space used until rows are written
        return set()
    if state.get("index_sha256") == index_sha and state.get("chunk_size") == chunk_size:
        return {int(c) for c in state.get("done", []) if 0 <= int(c) < chunks}
    return set()


def _run_chunks(jobs: list[tuple], workers: int, on_chunk: Callable[[int, int], None]) -> None:
    """Decode the chunks, in this process or in ``workers`` processes; ``on_chunk(chunk,
    images)`` after each is written."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_chunk(*_write_chunk(*job))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        pending = set()
        try:
            # A bounded queue: a kill loses at most a few chunks in flight.
            queue = list(reversed(jobs))
            while queue or pending:
                while queue and len(pending) < 2 * workers:
                    pending.add(pool.submit(_write_chunk, *queue.pop()))
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_chunk(*future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _write_chunk(
    pixels_path: str, count: int, size: int, chunk: int, start: int, paths: Sequence[str]
) -> tuple[int, int]:
    """Decode ``paths`` into rows ``start...`` of the pixel file (runs in a worker process)."""
    pixels = np.memmap(pixels_path, dtype=np.uint8, mode="r+", shape=(count, size, size))
    try:
        for offset, path in enumerate(paths):
            pixels[start + offset] = cache_image(path, size)
        pixels.flush()
    finally:
        del pixels
    return chunk, len(paths)


def open_cache(path: str | os.PathLike, *, min_size: int | None = None) -> ImageCache:
    """Open and validate a complete cache; raise :class:`CacheError` saying what is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise CacheError(f"{root}: no such cache folder (build one with `cxr data cache`)")
    meta_path = root / META_NAME
    if not meta_path.exists():
        raise CacheError(f"{root}: not a cxr image cache (no {META_NAME})")
    meta = _read_json(meta_path)
    if meta is None or meta.get("format") != FORMAT:
        found = None if meta is None else meta.get("format")
        raise CacheError(f"{meta_path}: not a cxr image cache (format {found!r}, not {FORMAT!r})")
    if not meta.get("complete"):
        raise CacheError(
            f"{root}: the cache is incomplete (its build was interrupted); run `cxr data cache` "
            f"with --out {root} again to finish it"
        )
    try:
        count, size = int(meta["images"]), int(meta["image_size"])
        index_sha = str(meta["index_sha256"])
    except (KeyError, TypeError, ValueError):
        raise CacheError(f"{meta_path}: damaged cache description") from None
    if meta.get("dtype") != "uint8":
        raise CacheError(f"{meta_path}: pixels of type {meta.get('dtype')!r}, expected uint8")
    if count < 1 or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise CacheError(f"{meta_path}: damaged cache description ({count} images of {size} px)")
    if min_size is not None and size < min_size:
        raise CacheError(
            f"{root}: the cache holds {size} px images, smaller than the {min_size} px the "
            f"model is trained on; build one with --image-size {min_size} or more"
        )
    index_path = root / INDEX_NAME
    try:
        index_text = index_path.read_text()
    except OSError:
        raise CacheError(f"{index_path}: missing; the cache is damaged, rebuild it") from None
    if _sha256(index_text) != index_sha:
        raise CacheError(
            f"{index_path}: does not match the checksum in {META_NAME}; the cache is stale or "
            "was mixed with another one, rebuild it"
        )
    index = restored_frame(
        pd.read_csv(index_path, dtype={IMAGE_COLUMN: str}, keep_default_na=False)
    )
    if len(index) != count or not np.array_equal(index["row"].to_numpy(), np.arange(count)):
        raise CacheError(f"{index_path}: has {len(index)} rows, {META_NAME} says {count}")
    pixels_path = root / PIXELS_NAME
    expected = count * size * size
    actual = pixels_path.stat().st_size if pixels_path.exists() else None
    if actual != expected:
        raise CacheError(
            f"{pixels_path}: {'missing' if actual is None else f'{actual:,} bytes'}, expected "
            f"{expected:,} ({count:,} images of {size}x{size}); the cache is truncated or "
            "damaged, rebuild it"
        )
    return ImageCache(root, meta, index)


class ImageCache:
    """A validated cache. The memory map opens lazily, once per process, and never pickles."""

    def __init__(self, root: Path, meta: dict[str, Any], index: pd.DataFrame):
        self.root = Path(root)
        self.meta = meta
        self.images = int(meta["images"])
        self.image_size = int(meta["image_size"])
        self.names = index[IMAGE_COLUMN].tolist()
        self.source_bytes = index["bytes"].to_numpy(dtype=np.int64)
        self._rows = {name: row for row, name in enumerate(self.names)}
        self._pixels: np.memmap | None = None
        self._pid: int | None = None

    @property
    def pixels_bytes(self) -> int:
        return self.images * self.image_size * self.image_size

    @property
    def pixels(self) -> np.memmap:
        if self._pixels is None or self._pid != os.getpid():
            self._pixels = np.memmap(
                self.root / PIXELS_NAME,
                dtype=np.uint8,
                mode="r",
                shape=(self.images, self.image_size, self.image_size),
            )
            self._pid = os.getpid()
        return self._pixels

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pixels"] = None
        state["_pid"] = None
        return state

    def read(self, row: int) -> np.ndarray:
        """Image ``row`` as a fresh ``(S, S) uint8`` array."""
        return np.array(self.pixels[row])

    def rows_for(self, frame: pd.DataFrame, *, check_sources: bool = True) -> np.ndarray:
        """The cache row of each image of ``frame`` (looked up by ``Image Index``).

        With ``check_sources`` the size of each image file (``path`` column) must still be
        the one cached: a changed file means a stale cache.
        """
        names = frame[IMAGE_COLUMN].astype(str).tolist()
        missing = [name for name in names if name not in self._rows]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise CacheError(
                f"{self.root}: {len(missing):,} of {len(names):,} images are not in the cache "
                f"(first: {shown}); build a cache of this data with `cxr data cache`"
            )
        rows = np.array([self._rows[name] for name in names], dtype=np.int64)
        if check_sources and PATH_COLUMN in frame.columns:
            for path, row in zip(frame[PATH_COLUMN], rows):
                try:
                    size = os.stat(path).st_size
                except OSError:
                    continue  # the image list's own check reports missing files
                if size != self.source_bytes[row]:
                    raise CacheError(
                        f"{self.root}: stale cache: {path} is {size:,} bytes, it was "
                        f"{int(self.source_bytes[row]):,} when cached; rebuild the cache"
                    )
        return rows

    def reader(self, frame: pd.DataFrame, *, check_sources: bool = True) -> CacheReader:
        """A ``reader(i)`` for :class:`~cxr.data.dataset.XrayDataset`: image i of ``frame``."""
        return CacheReader(self, self.rows_for(frame, check_sources=check_sources))


class CacheReader:
    def __init__(self, cache: ImageCache, rows: np.ndarray):
        self.cache = cache
        self.rows = rows

    def __call__(self, index: int) -> np.ndarray:
        return self.cache.read(int(self.rows[index]))

    def __len__(self) -> int:
        return len(self.rows)
