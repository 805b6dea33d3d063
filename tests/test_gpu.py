"""What only a CUDA GPU exercises: fp16 + GradScaler and bf16 autocast training steps,
channels_last, ``torch.compile``, NCCL under torchrun, and evaluation, prediction and
Grad-CAM on CUDA agreeing with the CPU.

Marked ``gpu``: where CUDA is absent and ``CXR_TEST_DEVICE`` is unset they are deselected
(tests/conftest.py), not skipped, so CI's normal pass neither runs nor skips them (with
``CXR_TEST_DEVICE=cuda`` a missing GPU is an error instead).
``CXR_TEST_DEVICE=cpu`` runs them on the CPU with tiny sizes (``benchmarks/gpu_check.sh
--dry-run``, which CI runs): the same code paths, minus what a CPU cannot do (fp16 with a
GradScaler, NCCL, inductor's kernels), so the GPU check cannot rot between GPU sessions.
With ``CXR_GPU_FACTS=FILE`` the measured differences and times are written there as JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxr import runtime

REQUESTED = os.environ.get("CXR_TEST_DEVICE")
DEVICE = REQUESTED or "cuda"
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"CXR_TEST_DEVICE must be cuda or cpu, not {DEVICE!r}")
ON_CUDA = DEVICE == "cuda"
if REQUESTED == "cuda" and not torch.cuda.is_available():
    # Asked for by name (benchmarks/gpu_check.sh does): a GPU check that skipped everything
    # would pass while checking nothing.
    raise RuntimeError("CXR_TEST_DEVICE=cuda, but torch sees no CUDA device")

pytestmark = pytest.mark.gpu

# Sizes: large enough on a GPU that its kernels (cuDNN, fp16, NCCL) do real work, small on a
# CPU. Not smaller than 64 px and 8 images: at 32 px DenseNet121's last BatchNorms normalise
# 1x1 maps over a batch of 4 values, and float32 rounding alone then moved two runs of the
# same steps apart by a fifth of their update. 96 px gives Grad-CAM a 3x3 map, 64 px 2x2.
STEP_SIZE, STEP_BATCH = (128, 16) if ON_CUDA else (64, 8)
RUN_SIZE = 96 if ON_CUDA else 64
# Evaluation on CUDA in float32 against the CPU (the bar), with TF32 off: cuDNN's
# default TF32 convolutions round to 10 mantissa bits, and that difference is recorded apart.
PROB_TOLERANCE = 1e-3
ROOT = Path(__file__).resolve().parents[1]

_FACTS: dict[str, object] = {"device": DEVICE}


@pytest.fixture(scope="session")
def facts():
    """A dict the tests put measured numbers in; written to ``$CXR_GPU_FACTS`` at the end."""
    if ON_CUDA:
        _FACTS["gpu"] = torch.cuda.get_device_name()
        _FACTS["capability"] = list(torch.cuda.get_device_capability())
    _FACTS["torch"] = torch.__version__
    yield _FACTS
    target = os.environ.get("CXR_GPU_FACTS")
    if target:
        Path(target).write_text(json.dumps(_FACTS, indent=1, default=str) + "\n")


@pytest.fixture
def strict_fp32():
    """cuDNN convolutions and cuBLAS products in IEEE float32 (no TF32) for this test.

    The legacy flags only: torch refuses a mix of them and the newer ``fp32_precision`` API.
    Set and restored by hand: pytest's monkeypatch cannot restore cuBLAS's flag (it is no
    plain attribute)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


def labels_for_loss() -> np.ndarray:
    """Training labels with positives and negatives in every class (for the loss weights)."""
    rng = np.random.default_rng(0)
    labels = (rng.random((64, 14)) < 0.3).astype(np.float32)
    labels[0], labels[1] = 1.0, 0.0
    return labels


def make_trainer(**overrides):
    from conftest import tiny_train_config

    from cxr.engine.trainer import Trainer
    from cxr.model.network import build_model

    torch.manual_seed(0)
    values = dict(image_size=STEP_SIZE, batch_size=STEP_BATCH, device=DEVICE)
    config = tiny_train_config(**{**values, **overrides})
    return Trainer.create(build_model(), config, labels_for_loss(), torch.device(DEVICE))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(STEP_BATCH, 3, STEP_SIZE, STEP_SIZE, generator=generator)
    targets = (torch.rand(STEP_BATCH, 14, generator=generator) < 0.3).float()
    return images, targets


def parameters(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().clone() for n, p in trainer.model.named_parameters()}


def largest_change(before: dict, after: dict) -> float:
    return max(float((after[n] - before[n]).abs().max()) for n in before)


def distance(before: dict, after: dict) -> float:
    """The Euclidean distance between two sets of weights, all parameters together."""
    return float(torch.sqrt(sum(((after[n] - before[n]) ** 2).sum() for n in before)))


def output_dtypes(trainer) -> list[torch.dtype]:
    """The dtype of every classifier output from now on (what autocast computed in)."""
    seen: list[torch.dtype] = []
    trainer.model.classifier.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    return seen


def run_steps(trainer, count: int, first_seed: int = 0) -> list[float]:
    return [float(trainer.step(*batch(first_seed + k))) for k in range(count)]


# ---------------------------------------------------------------------------- precision


def test_fp16_with_a_grad_scaler_where_bf16_is_not_native(monkeypatch, facts):
    # A GPU without native bf16 (T4, V100) trains in fp16 with a GradScaler; here the H100
    # is made to look like one.
    monkeypatch.setattr(runtime, "cuda_has_native_bf16", lambda device: False)
    assert runtime.mixed_precision(True, torch.device("cuda")) == (True, torch.float16)
    trainer = make_trainer()
    dtypes = output_dtypes(trainer)
    before = parameters(trainer)
    # On a GPU, steps enough for the scaler to settle (early ones may overflow and be skipped).
    losses = run_steps(trainer, 8 if ON_CUDA else 2)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert largest_change(before, parameters(trainer)) > 0  # some steps were taken
    if not ON_CUDA:
        assert trainer.precision in ("float32", "bfloat16 autocast")  # no fp16 on a CPU
        return
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    assert trainer.precision == "float16 autocast"
    assert set(dtypes) == {torch.float16}
    scale = trainer.scaler.get_scale()
    assert math.isfinite(scale) and scale > 0
    assert trainer.checkpoint(*_state_and_config(trainer))["scaler"]["scale"] == scale

    # An overflow: fp16 gradients of a loss scaled by 2**40 are inf. The scaler must skip
    # the update (the weights stay as they were) and halve its scale.
    trainer.scaler.update(new_scale=2.0**40)
    before = parameters(trainer)
    loss = trainer.step(*batch(100))
    assert math.isfinite(float(loss))
    assert largest_change(before, parameters(trainer)) == 0.0
    assert trainer.scaler.get_scale() == 2.0**39
    # The skipped step left nothing behind: back at the earlier scale, it trains again.
    trainer.scaler.update(new_scale=scale)
    losses += run_steps(trainer, 2, first_seed=200)
    after = parameters(trainer)
    assert largest_change(before, after) > 0
    assert all(torch.isfinite(p).all() for p in after.values())
    facts["fp16"] = {"losses": losses, "scale_after_8_steps": scale}


def _state_and_config(trainer):
    from conftest import tiny_train_config

    from cxr.engine.trainer import TrainState

    return TrainState(), tiny_train_config(device=DEVICE)


def test_bf16_autocast_steps_match_float32(monkeypatch, strict_fp32, facts):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # the CPU run: bf16 too
    fp32 = make_trainer(amp=False)
    bf16 = make_trainer()
    assert (fp32.amp, bf16.amp, bf16.amp_dtype) == (False, True, torch.bfloat16)
    assert not bf16.scaler.is_enabled()  # bf16 has fp32's range: nothing to scale
    dtypes = output_dtypes(bf16)
    before = parameters(bf16)
    # The same weights and batch: the first loss within bf16's precision of float32's.
    first_fp32, first_bf16 = float(fp32.step(*batch(0))), float(bf16.step(*batch(0)))
    assert first_bf16 == pytest.approx(first_fp32, rel=2e-2)
    losses = [first_bf16, *run_steps(bf16, 2, first_seed=1)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert set(dtypes) == {torch.bfloat16}
    assert largest_change(before, parameters(bf16)) > 0
    facts["bf16"] = {"first_loss_fp32": first_fp32, "first_loss_bf16": first_bf16}


def test_channels_last_trains_like_channels_first(strict_fp32, facts):
    nchw, nhwc = make_trainer(amp=False, channels_last=False), make_trainer(amp=False)
    assert nhwc.model.features.conv0.weight.is_contiguous(memory_format=torch.channels_last)
    layouts: list[bool] = []
    nhwc.model.features.register_forward_hook(
        lambda m, i, out: layouts.append(out.is_contiguous(memory_format=torch.channels_last))
    )
    before = parameters(nchw)
    losses_nchw, losses_nhwc = run_steps(nchw, 2), run_steps(nhwc, 2)
    assert layouts and all(layouts)  # the features really ran in NHWC
    # The same function: the first loss to float32 rounding, the second after one update.
    assert losses_nhwc[0] == pytest.approx(losses_nchw[0], rel=1e-4)
    assert losses_nhwc[1] == pytest.approx(losses_nchw[1], rel=1e-3)
    # The same updates: two steps apart by a small fraction of how far they moved (1 % on
    # the CPU run; a layout mix-up moves them apart by about the update itself).
    after_nchw, after_nhwc = parameters(nchw), parameters(nhwc)
    update, difference = distance(before, after_nchw), distance(after_nchw, after_nhwc)
    assert update > 0 and difference < 0.05 * update, (update, difference)
    facts["channels_last"] = {"update": update, "difference": difference, "losses": losses_nhwc}


# ---------------------------------------------------------------------------- torchrun


def test_torchrun_one_process_trains_through_ddp(tmp_path, synth_data, facts):
    """``torchrun --nproc_per_node=1`` joins a process group of one: DDP with NCCL on CUDA
    (gloo on the CPU run), rank 0 writing a run that loads as a plain bundle."""
    from cxr.model.bundle import load_bundle

    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
        "-m", "cxr", "train", str(synth_data), "--out", str(run), "--weights", "none",
        "--image-size", str(RUN_SIZE), "--batch-size", "8", "--workers", "2",
        "--max-epochs", "2", "--device", DEVICE,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        "CXR_OFFLINE": "1",
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "2",
    }
    started = time.perf_counter()
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "processes: 1" in output
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 1
    assert info["distributed"] == ("nccl" if ON_CUDA else "gloo")
    assert info["device"] == ("cuda:0" if ON_CUDA else "cpu")
    if ON_CUDA:
        assert info["precision"] == "bfloat16 autocast"
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [1, 2]
    assert np.isfinite(log["train_loss"]).all() and np.isfinite(log["val_loss"]).all()
    # Saved from the plain model, not DDP's wrapper: the bundle loads and predicts.
    bundle = load_bundle(run)
    with torch.no_grad():
        logits = bundle.model(torch.randn(2, 3, RUN_SIZE, RUN_SIZE))
    assert torch.isfinite(logits).all()
    facts["torchrun"] = {"seconds": seconds, "backend": info["distributed"]}


# ---------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def device_run(tmp_path_factory, make_run) -> Path:
    """A tiny run trained on the device under test (AMP and channels_last on CUDA)."""
    from cxr.workflows.train import train_run

    run = make_run(tmp_path_factory.mktemp("gpu") / "run", image_size=RUN_SIZE, device=DEVICE)
    assert train_run(run).epoch == 2
    return run


def real_images() -> list[Path]:
    """A few real NIH PNGs and the JPEG-compressed DICOM: ``.gpu-data`` (what
    ``benchmarks/gpu_prepare.sh`` copies for the GPU machine) or ``../shared/data``."""
    for base in (ROOT / ".gpu-data", ROOT.parent / "shared" / "data"):
        pngs = sorted((base / "nih" / "images").glob("*.png"))[:3]
        dicoms = sorted((base / "misc").glob("*.dcm"))[:1]
        if pngs and dicoms:
            return pngs + dicoms
    pytest.fail("no real images: run `bash benchmarks/gpu_prepare.sh` (and carry .gpu-data)")


def split_images(run: Path, count: int) -> list[Path]:
    return [Path(p) for p in pd.read_csv(run / "split" / "test.csv")["path"][:count]]


def probability_columns(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if c.startswith("prob_")]].to_numpy(np.float64)


def test_evaluate_on_the_device_matches_the_cpu(runner, device_run, request, facts):
    from cxr.cli import app

    def evaluate(device: str) -> np.ndarray:
        outcome = runner.invoke(
            app, ["evaluate", str(device_run), "--device", device, "--workers", "0"]
        )
        assert outcome.exit_code == 0, outcome.output
        return probability_columns(pd.read_csv(device_run / "predictions-test.csv"))

    default = evaluate(DEVICE)  # torch's default: TF32 convolutions on CUDA
    request.getfixturevalue("strict_fp32")
    strict, cpu = evaluate(DEVICE), evaluate("cpu")
    assert strict.shape == cpu.shape and len(cpu) > 0
    assert np.abs(strict - cpu).max() <= PROB_TOLERANCE
    facts["evaluate"] = {
        "images": len(cpu),
        "max_prob_diff_fp32": float(np.abs(strict - cpu).max()),
        "max_prob_diff_tf32_default": float(np.abs(default - cpu).max()),
    }


def test_predict_with_torch_on_the_device_matches_the_cpu(
    runner, device_run, tmp_path, strict_fp32, facts
):
    from cxr.cli import app

    files = [*split_images(device_run, 4), *real_images()]
    tables = {}
    for device in (DEVICE, "cpu"):
        out = tmp_path / f"{device}.csv"
        outcome = runner.invoke(
            app,
            ["predict", str(device_run), *map(str, files), "--backend", "torch",
             "--device", device, "--workers", "0", "--out", str(out)],
        )  # fmt: skip
        assert outcome.exit_code == 0, outcome.output  # every file, the DICOM too, decoded
        tables[device] = pd.read_csv(out)
    assert tables[DEVICE]["file"].tolist() == tables["cpu"]["file"].tolist()
    assert len(tables["cpu"]) == len(files)
    difference = np.abs(probability_columns(tables[DEVICE]) - probability_columns(tables["cpu"]))
    assert difference.max() <= PROB_TOLERANCE
    call_columns = [c for c in tables["cpu"].columns if c.startswith("call_")]
    assert set(np.unique(tables["cpu"][call_columns])) <= {0, 1}
    facts["predict"] = {"files": len(files), "max_prob_diff_fp32": float(difference.max())}


def test_explain_on_the_device_matches_the_cpu(runner, device_run, tmp_path, strict_fp32, facts):
    from cxr.cli import app

    images = [*split_images(device_run, 1), *real_images()[-2:]]  # synthetic, NIH PNG, DICOM
    summaries, folders = {}, {}
    for device in (DEVICE, "cpu"):
        folders[device] = tmp_path / device
        outcome = runner.invoke(
            app,
            ["explain", str(device_run), *map(str, images), "--out", str(folders[device]),
             "--all", "--device", device],
        )  # fmt: skip
        assert outcome.exit_code == 0, outcome.output
        summaries[device] = json.loads((folders[device] / "explanations.json").read_text())
    records = {d: s["images"] for d, s in summaries.items()}
    assert len(records[DEVICE]) == len(records["cpu"]) == len(images)
    worst_probability = 0.0
    differences = []
    for ours, theirs in zip(records[DEVICE], records["cpu"]):
        assert ours["image"] == theirs["image"]
        names = list(theirs["probabilities"])
        worst_probability = max(
            worst_probability,
            *(abs(ours["probabilities"][n] - theirs["probabilities"][n]) for n in names),
        )
        assert len(ours["explained"]) == len(theirs["explained"]) == len(names)  # --all
        for mine, reference in zip(ours["explained"], theirs["explained"]):
            map_ours, map_cpu = np.load(mine["npy"]), np.load(reference["npy"])
            assert map_ours.shape == map_cpu.shape == (RUN_SIZE, RUN_SIZE)
            assert np.isfinite(map_ours).all() and map_ours.min() >= 0 and map_ours.max() <= 1
            differences.append(np.abs(map_ours - map_cpu).ravel())
    assert worst_probability <= PROB_TOLERANCE
    # Heatmaps are min-max scaled per map, which magnifies float32 noise where a map is
    # nearly flat, so the bar is on the bulk of the pixels and a looser one on the worst.
    pixels = np.concatenate(differences)
    assert pixels.mean() <= 1e-3 and np.quantile(pixels, 0.99) <= 1e-2, (
        pixels.mean(),
        np.quantile(pixels, 0.99),
    )
    facts["explain"] = {
        "maps": len(differences),
        "max_prob_diff_fp32": worst_probability,
        "map_diff_mean": float(pixels.mean()),
        "map_diff_p99": float(np.quantile(pixels, 0.99)),
        "map_diff_max": float(pixels.max()),
    }


# ---------------------------------------------------------------------------- compile
# Last: inductor's first compilation of DenseNet121 is the longest test on a GPU (about a
# minute), so a time limit that stops it has let everything else report.


def test_torch_compile_trains_the_model(monkeypatch, facts):
    from torch._dynamo.eval_frame import OptimizedModule

    if not ON_CUDA:
        # Inductor's C++ build of DenseNet121 takes over 5 minutes on 2 cores; the CPU run
        # keeps dynamo's graph capture (what model code can break) and runs it eagerly.
        compile_ = torch.compile
        monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    torch._dynamo.reset()
    trainer = make_trainer(compile=True)
    assert isinstance(trainer.train_model, OptimizedModule)
    assert trainer.train_model._orig_mod is trainer.model
    before = parameters(trainer)
    started = time.perf_counter()
    losses = run_steps(trainer, 1)
    compile_seconds = time.perf_counter() - started
    started = time.perf_counter()
    losses += run_steps(trainer, 2, first_seed=1)
    if ON_CUDA:
        torch.cuda.synchronize()
    step_seconds = (time.perf_counter() - started) / 2
    assert all(math.isfinite(loss) for loss in losses), losses
    # The compiled module trains the plain model's parameters: what the bundle saves.
    assert largest_change(before, parameters(trainer)) > 0
    facts["compile"] = {
        "first_step_s": compile_seconds,
        "step_s": step_seconds,
        "losses": losses,
        "precision": trainer.precision,
    }
