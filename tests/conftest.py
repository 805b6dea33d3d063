"""Shared fixtures.

Real NIH data lives OUTSIDE the repository, at ``<repo>/../shared/data`` (see its README.md).
Tests read it in place and never copy it into the repository; anything else they need is
generated under ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA GPU, or ``CXR_TEST_DEVICE`` naming a device to run them
    on (``cpu``: tiny sizes, what ``benchmarks/gpu_check.sh --dry-run`` does). Elsewhere they
    are deselected rather than skipped: a pass on a machine without a GPU runs what it can and
    skips nothing."""
    import torch

    if os.environ.get("CXR_TEST_DEVICE") or torch.cuda.is_available():
        return
    kept = [item for item in items if item.get_closest_marker("gpu") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


def pytest_configure(config):
    """Under pytest-xdist, share the cores among the workers instead of letting each worker's
    torch use them all: ``-n 2`` on 2 cores otherwise runs 4 spinning OpenMP threads on 2
    cores, and training the tiny ``trained_run`` took 16-26 s instead of 3 s."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        torch.set_num_threads(max(1, (cores or os.cpu_count() or 1) // workers))


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
    from cxr.data.layouts.nih import read_table

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


# ---------------------------------------------------------------------------- training


def tiny_train_config(**overrides):
    """The smallest configuration that still trains the real DenseNet121 on CPU."""
    from cxr.config import TrainConfig

    values = dict(
        weights="none", image_size=32, batch_size=8, workers=0, device="cpu", max_epochs=2
    )
    values.update(overrides)
    return TrainConfig(**values).validate()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny SYNTHETIC dataset in NIH's layout (16 patients, about 46 images of 64 px)."""
    from cxr.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(out, patients=16, image_size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_frames(synth_data: Path) -> dict[str, pd.DataFrame]:
    """A patient-level split of ``synth_data`` (4 val and 4 test patients, 8 train)."""
    from cxr.data.layouts.nih import load_nih
    from cxr.data.split import split_by_patients

    nih = load_nih(synth_data)
    split = split_by_patients(nih.table, val_fraction=0.25, test_fraction=0.25, seed=0)
    return split.frames()


@pytest.fixture(scope="session")
def make_run(synth_data: Path, synth_frames):
    """``make_run(folder, **config)`` prepares (does not train) a run on ``synth_data``."""
    from cxr.workflows.train import prepare_run

    def make(folder: Path, **overrides) -> Path:
        prepare_run(
            folder,
            {name: frame.copy() for name, frame in synth_frames.items()},
            tiny_train_config(**overrides),
            data_source=str(synth_data),
            split_note={"method": "test"},
        )
        return Path(folder)

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, make_run) -> Path:
    """A run trained for 2 epochs without interruption (workers=0).

    Tests only add evaluation outputs (predictions, metrics.json); nothing else changes it.
    """
    from cxr.workflows.train import train_run

    run = make_run(tmp_path_factory.mktemp("trained") / "run")
    state = train_run(run)
    assert state.epoch == 2
    return run


# ---------------------------------------------------------------------------- inference

# With these thresholds the first 7 pathologies are always called positive (p >= 0) and the
# last 7 never (p < 1), whatever the untrained weights say.
FIXED_CALL_THRESHOLDS = [0.0] * 7 + [1.0] * 7


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory) -> Path:
    """An untrained DenseNet121 bundle (64 px): enough to test inference plumbing.

    Shared by several test files: tests must not write into it.
    """
    from support.media import untrained_bundle as write_bundle

    folder = tmp_path_factory.mktemp("bundle") / "model"
    return write_bundle(folder, 64, thresholds=FIXED_CALL_THRESHOLDS, threshold_rule="youden")


# ---------------------------------------------------------------------------- references
# What the model sees, computed with PIL, pydicom and numpy directly: independent of cxr's
# decoding and preprocessing code, following the contract cxr documents (cxr.data.images:
# one 8-bit gray image per file; cxr.data.transforms.Preprocess: shorter side to S, centre
# crop, [0, 1], ImageNet mean/std, 3 channels).

REFERENCE_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
REFERENCE_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def reference_gray(path: Path) -> np.ndarray:
    """The file as an (H, W) uint8 gray image, decoded without cxr.

    DICOM: modality LUT, then VOI LUT, then the value range mapped linearly onto 0..255
    (rounded), inverted for MONOCHROME1. PNG / JPEG: 8-bit gray as is, 16-bit gray by its
    value range, colour by ITU-R 601 luma (PIL's ``convert("L")``).
    """
    with open(path, "rb") as handle:
        is_dicom = handle.read(132)[128:132] == b"DICM"
    if is_dicom:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        dataset = pydicom.dcmread(path)
        values = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
        gray = _range_to_uint8(values)
        return 255 - gray if dataset.PhotometricInterpretation == "MONOCHROME1" else gray
    from PIL import Image

    with Image.open(path) as image:
        if image.mode == "L":
            return np.array(image, dtype=np.uint8)
        if image.mode.startswith("I"):
            return _range_to_uint8(np.asarray(image))
        return np.array(image.convert("L"), dtype=np.uint8)


def _range_to_uint8(values) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)


def reference_input(gray: np.ndarray, size: int) -> np.ndarray:
    """The (3, size, size) float32 model input for a gray image ("imagenet" normalisation).

    The shorter side is resized to ``size`` (PIL bilinear, the longer side in proportion,
    rounded), the centre ``size`` x ``size`` square is cut out (top = (new_h - size) // 2,
    left = (new_w - size) // 2), scaled to [0, 1] and normalised per channel.
    """
    from PIL import Image

    height, width = gray.shape
    if height <= width:
        new_h, new_w = size, round(width * size / height)
    else:
        new_h, new_w = round(height * size / width), size
    image = Image.fromarray(gray)
    if (new_h, new_w) != (height, width):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    resized = np.asarray(image, dtype=np.uint8)
    assert resized.shape == (new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = resized[top : top + size, left : left + size].astype(np.float32) / np.float32(255)
    return (crop[None] - REFERENCE_MEAN[:, None, None]) / REFERENCE_STD[:, None, None]


def reference_batch(paths, size: int):
    """A float32 torch batch of :func:`reference_input` for each file."""
    import torch

    return torch.from_numpy(np.stack([reference_input(reference_gray(p), size) for p in paths]))


# ---------------------------------------------------------------------------- browser

# Debian's chromium (installed by .ci/run), never a downloaded browser. Without the
# background-networking flags it keeps trying to reach hosts this sandbox cannot.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# Caps a child process's address space: it may grow by ``sys.argv[1]`` bytes at most over
# its size at that point (after its imports), and the limit is checked to bind.
_MEMORY_CAP = """
import resource, sys
from pathlib import Path

headroom = int(sys.argv[1])
now = next(
    int(line.split()[1]) * 1024
    for line in Path("/proc/self/status").read_text().splitlines()
    if line.startswith("VmSize:")
)
resource.setrlimit(resource.RLIMIT_AS, (now + headroom, now + headroom))
try:
    bytearray(2 * headroom)
except MemoryError:
    pass
else:
    sys.exit("the address-space limit does not bind")
"""


def run_with_memory_cap(
    imports: str, code: str, headroom: int, *args: str, stdin: bytes = b""
) -> str:
    """Run ``imports``, then ``code`` in the same child Python, which may then allocate at
    most ``headroom`` more bytes (``sys.argv[2:]`` are ``args``); it must exit 0; returns
    what it printed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's /proc/self/status and RLIMIT_AS")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", imports + _MEMORY_CAP + code, str(headroom), *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    return result.stdout.decode().strip()


# Decodes ``sys.argv[3]`` (a file, or "-" for stdin's bytes, named ``sys.argv[2]``) and
# prints the ImageError.
_DECODE_IMPORTS = """
from cxr.data.images import decode_gray
from cxr.errors import ImageError
"""
_DECODE = """
name, source = sys.argv[2], sys.argv[3]
data = sys.stdin.buffer.read() if source == "-" else None
try:
    decode_gray(data if data is not None else source, name=name)
except ImageError as exc:
    print(exc)
    sys.exit(0)
sys.exit("decoded without an error")
"""


def decode_with_little_memory(
    source: Path | bytes, name: str, claimed_bytes: int, headroom: int | None = None
) -> str:
    """The ImageError message of decoding ``source`` in a child process that may allocate
    far less than the ``claimed_bytes`` its header asks for (``headroom``; by default a
    quarter, 64 MiB at most).

    A refusal from the header passes; a decoder that allocated the pixels first would die
    of MemoryError instead, however fast the machine is.
    """
    headroom = headroom or min(claimed_bytes // 4, 64 << 20)
    stdin = source if isinstance(source, bytes) else b""
    source_arg = "-" if isinstance(source, bytes) else str(source)
    return run_with_memory_cap(_DECODE_IMPORTS, _DECODE, headroom, name, source_arg, stdin=stdin)
