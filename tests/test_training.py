"""The method: weighted BCE, LR/10 on plateaus, best-weights bundle, exact resume, weights
files, configuration, transforms and the ``cxr train`` / ``cxr demo`` commands."""

from __future__ import annotations

import copy
import json
import math
import pickle
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import cxr.engine.trainer
import cxr.runtime
import cxr.workflows.train
from cxr.cli import app
from cxr.config import TrainConfig, load_config
from cxr.data.datasets import label_matrix
from cxr.data.loaders import EpochSampler, XrayDataset
from cxr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Augment, Preprocess
from cxr.engine.trainer import load_checkpoint
from cxr.errors import ConfigError, DataError, ModelError
from cxr.labels import PATHOLOGIES
from cxr.model.bundle import BundleMeta, load_bundle, save_bundle
from cxr.model.factory import create_model
from cxr.model.loss import WeightedBCELoss, class_weights
from cxr.model.network import IMAGENET_WEIGHTS, build_model
from cxr.run import RunFolder
from cxr.runtime import cpu_has_native_bf16, mixed_precision
from cxr.workflows.demo import demo_settings, resolve_demo_device
from cxr.workflows.train import train_run

# Losses and metrics a resumed run must reproduce exactly (not the timings).
LOG_VALUES = ["epoch", "train_loss", "val_loss", "val_auroc_mean", "lr", "next_lr", "best"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _text(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


# ---------------------------------------------------------------------------- loss


def test_mixed_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(cxr.runtime, "cpu_has_native_bf16", lambda: True)
    assert mixed_precision(True, cpu) == (True, torch.bfloat16)
    assert mixed_precision(False, cpu) == (False, torch.float32)
    monkeypatch.setattr(cxr.runtime, "cpu_has_native_bf16", lambda: False)  # emulated: slower
    assert mixed_precision(True, cpu) == (False, torch.float32)
    # Emulated bf16 (T4: 7.5, V100: 7.0) is slower than fp16, whatever torch says it supports.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, dtype in (((7, 0), torch.float16), ((7, 5), torch.float16),
                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert mixed_precision(True, torch.device("cuda", 0)) == (True, dtype), capability


def cpuinfo_flags() -> set[str] | None:
    """The first CPU's feature flags as the Linux kernel reports them; None elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def test_native_bf16_detection_agrees_with_the_kernels_cpu_flags():
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("needs /proc/cpuinfo on an x86-64 Linux machine")
    # AVX512-BF16 or AMX (whose tiles compute bf16) is hardware bfloat16; the kernel lists
    # only what the CPU has and the OS has enabled.
    bf16_flags = sorted(flags & {"avx512_bf16", "amx_tile", "amx_bf16"})
    assert cpu_has_native_bf16() is bool(bf16_flags), bf16_flags


def test_class_weights_are_the_opposite_class_fractions():
    labels = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0], [1, 0, 1]])
    w_pos, w_neg = class_weights(labels)
    # positive fractions 2/5, 1/5, 4/5: positives weigh the negative fraction and vice versa
    assert w_pos.tolist() == pytest.approx([3 / 5, 4 / 5, 1 / 5])
    assert w_neg.tolist() == pytest.approx([2 / 5, 1 / 5, 4 / 5])
    assert w_pos.dtype == w_neg.dtype == torch.float32
    for bad in (np.zeros((0, 3)), np.array([1, 0, 1])):
        with pytest.raises(ValueError, match="non-empty"):
            class_weights(bad)


def test_weighted_bce_equals_the_hand_computed_value():
    train_labels = np.array([[1, 0, 1], [0, 0, 1], [0, 1, 1], [0, 0, 0], [1, 0, 1]])
    loss_fn = WeightedBCELoss.from_labels(train_labels)
    p = [[0.8, 0.3, 0.6], [0.1, 0.55, 0.95]]
    y = [[1, 0, 0], [0, 1, 1]]
    w_pos = [3 / 5, 4 / 5, 1 / 5]  # fraction of negatives per class
    w_neg = [2 / 5, 1 / 5, 4 / 5]  # fraction of positives per class
    terms = [
        -(w_pos[c] * y[i][c] * math.log(p[i][c]) + w_neg[c] * (1 - y[i][c]) * math.log(1 - p[i][c]))
        for i in range(2)
        for c in range(3)
    ]
    expected = sum(terms) / len(terms)
    logits = torch.logit(torch.tensor(p, dtype=torch.float64)).float()
    loss = loss_fn(logits, torch.tensor(y, dtype=torch.float32))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # stays finite for confident outputs (computed on logits)
    confident = loss_fn(torch.tensor([[60.0, -60.0, 60.0]]), torch.tensor([[0.0, 1.0, 0.0]]))
    assert math.isfinite(confident.item()) and confident.item() > 10


def test_weighted_bce_ignores_the_batch_composition_of_weights():
    # The weights come from the training labels given once, not from each batch.
    loss_fn = WeightedBCELoss.from_labels(np.array([[1], [0], [0], [0]]))
    assert loss_fn.w_pos.tolist() == [0.75] and loss_fn.w_neg.tolist() == [0.25]
    positive = loss_fn(torch.zeros(1, 1), torch.ones(1, 1)).item()
    negative = loss_fn(torch.zeros(1, 1), torch.zeros(1, 1)).item()
    assert positive == pytest.approx(0.75 * math.log(2), rel=1e-6)
    assert negative == pytest.approx(0.25 * math.log(2), rel=1e-6)


# ---------------------------------------------------------------------------- schedule


class TinyNet(nn.Module):
    """A stand-in for DenseNet121 where only the loop's bookkeeping is under test."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(3, len(PATHOLOGIES))

    def forward(self, images):
        return self.classifier(self.pool(images).flatten(1))


def _scripted_validation(monkeypatch, margins):
    """Validation returns logits +m for positives and -m for negatives, m = margins[epoch];
    a larger margin gives a lower loss. Returns the weights seen at each validation."""
    seen = []

    def create_model(weights, labels=None):
        return TinyNet(), {"init": "tiny"}

    monkeypatch.setattr(cxr.workflows.train, "create_model", create_model)
    monkeypatch.setattr(cxr.workflows.train, "build_model", lambda n=14: TinyNet())  # resume

    def predict_outputs(model, loader, device, **kwargs):
        seen.append(copy.deepcopy(model.state_dict()))
        labels = loader.dataset.labels
        margin = margins[min(len(seen), len(margins)) - 1]
        logits = (2.0 * labels - 1.0) * margin
        features = np.random.default_rng(len(seen)).random((len(labels), 8))
        return np.arange(len(labels)), logits.astype(np.float32), features

    monkeypatch.setattr(cxr.engine.trainer, "predict_outputs", predict_outputs)
    return seen


@pytest.mark.parametrize(
    ("patience", "max_plateaus", "lrs"),
    [
        (1, 1, [1e-2, 1e-2, 1e-2, 1e-3, 1e-3]),
        (0, 2, [1e-2, 1e-2, 1e-3, 1e-4]),
    ],
)
def test_lr_is_divided_by_ten_on_plateaus_then_training_stops(
    tmp_path, make_run, monkeypatch, patience, max_plateaus, lrs
):
    _scripted_validation(monkeypatch, [2.0])  # the same val loss every epoch
    run = make_run(
        tmp_path / "run", max_epochs=20, plateau_patience=patience, max_plateaus=max_plateaus
    )
    state = train_run(run)

    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == list(range(1, len(lrs) + 1))
    assert log["lr"].tolist() == pytest.approx(lrs, rel=1e-9)
    assert log["next_lr"].tolist() == pytest.approx([*lrs[1:], lrs[-1] / 10], rel=1e-9)
    assert log["val_loss"].nunique() == 1
    assert log["best"].tolist() == [True] + [False] * (len(lrs) - 1)
    assert state.epoch == len(lrs) < 20
    assert state.lr_reductions == max_plateaus + 1
    assert "plateaued" in state.stopped and str(max_plateaus + 1) in state.stopped
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lrs[-1] / 10)
    assert checkpoint["state"]["stopped"] == state.stopped
    # A finished run does not train further when resumed.
    again = train_run(run, resume=True)
    assert again.epoch == state.epoch and len(pd.read_csv(run / "log.csv")) == len(lrs)


def test_kept_model_is_the_lowest_val_loss_epoch(tmp_path, make_run, monkeypatch):
    seen = _scripted_validation(monkeypatch, [1.0, 3.0, 2.0])  # epoch 2 is best
    run = make_run(tmp_path / "run", max_epochs=3)
    state = train_run(run)

    log = pd.read_csv(run / "log.csv")
    assert log["best"].tolist() == [True, True, False]
    meta = json.loads((run / "model.json").read_text())
    assert meta["epoch"] == int(log["epoch"][log["val_loss"].idxmin()]) == 2 == state.best_epoch
    assert meta["val_loss"] == pytest.approx(log["val_loss"].min(), rel=1e-12)
    bundle = load_file(str(run / "model.safetensors"))
    assert set(bundle) == set(seen[1])
    assert all(torch.equal(bundle[k], seen[1][k]) for k in bundle)
    assert not all(torch.equal(bundle[k], seen[2][k]) for k in bundle)  # training went on
    last = load_checkpoint(run / "checkpoint.pt")["model"]
    assert all(torch.equal(last[k], seen[2][k]) for k in last)


def test_trained_run_keeps_its_lowest_val_loss_epoch(trained_run: Path):
    log = pd.read_csv(trained_run / "log.csv")
    meta = json.loads((trained_run / "model.json").read_text())
    assert meta["epoch"] == int(log["epoch"][log["val_loss"].idxmin()])
    assert meta["val_loss"] == pytest.approx(log["val_loss"].min(), rel=1e-12)
    assert meta["image_size"] == 32 and meta["normalization"] == "imagenet"
    assert meta["labels"] == list(PATHOLOGIES) and len(meta["thresholds"]) == 14
    info = json.loads((trained_run / "run.json").read_text())
    expected = "bfloat16 autocast" if cpu_has_native_bf16() else "float32"
    assert info["precision"] == expected  # amp is on by default, bf16 only where native


# ---------------------------------------------------------------------------- resume


def _assert_same_training(run: Path, reference: Path) -> None:
    ours, theirs = (
        load_checkpoint(run / "checkpoint.pt"),
        load_checkpoint(reference / "checkpoint.pt"),
    )
    assert ours["state"]["epoch"] == theirs["state"]["epoch"]
    assert ours["model"].keys() == theirs["model"].keys()
    for key, tensor in theirs["model"].items():
        assert torch.equal(ours["model"][key], tensor), key
    momentum = [s["momentum_buffer"] for s in theirs["optimizer"]["state"].values()]
    assert len(momentum) == len(list(build_model().parameters()))
    for index, state in theirs["optimizer"]["state"].items():
        assert torch.equal(
            ours["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"]
        )
    assert ours["scheduler"] == theirs["scheduler"]
    bundle_a, bundle_b = (
        load_file(str(run / "model.safetensors")),
        load_file(str(reference / "model.safetensors")),
    )
    assert bundle_a.keys() == bundle_b.keys()
    assert all(torch.equal(bundle_a[k], bundle_b[k]) for k in bundle_b)
    pd.testing.assert_frame_equal(
        pd.read_csv(run / "log.csv")[LOG_VALUES],
        pd.read_csv(reference / "log.csv")[LOG_VALUES],
        check_exact=True,
    )
    meta_a = json.loads((run / "model.json").read_text())
    meta_b = json.loads((reference / "model.json").read_text())
    # The model card also holds what later commands add (the reference run is shared, and
    # `cxr evaluate` on it refreshes its card's test metrics) and when it was written: of the
    # card, the method must match; everything else in model.json must match too.
    card_a, card_b = meta_a.pop("card"), meta_b.pop("card")
    assert card_a["method"] == card_b["method"]
    assert meta_a == meta_b


@pytest.mark.slow
def test_resume_equals_uninterrupted_training(tmp_path, make_run, trained_run):
    run = make_run(tmp_path / "run")
    first = train_run(run, stop_after_epochs=1)
    assert first.epoch == 1 and first.stopped == ""
    assert len(pd.read_csv(run / "log.csv")) == 1
    second = train_run(run, resume=True)
    assert second.epoch == 2 and second.stopped == "reached max_epochs=2"
    assert [r["epoch"] for r in second.history] == [1, 2]
    _assert_same_training(run, trained_run)


@pytest.mark.slow
def test_resume_with_worker_processes_equals_training_without(tmp_path, make_run, trained_run):
    # Augmentation is drawn from (seed, epoch, index), not from a worker's random state.
    run = make_run(tmp_path / "run", workers=2)
    train_run(run, stop_after_epochs=1)
    train_run(run, resume=True)
    _assert_same_training(run, trained_run)


def test_a_last_training_batch_of_one_image_is_dropped(synth_frames):
    from cxr.data.loaders import split_loader
    from cxr.data.transforms import Augment, Preprocess

    # At 32 px DenseNet121 ends in 1x1 feature maps: BatchNorm cannot train on one image.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        build_model().train()(torch.zeros(1, 3, 32, 32))
    frames = pd.concat([synth_frames["train"], synth_frames["test"]], ignore_index=True)
    for images, train, sizes in [
        (17, True, [8, 8]),
        (18, True, [8, 8, 2]),
        (16, True, [8, 8]),
        (1, True, [1]),
        (17, False, [16, 1]),  # evaluation keeps every image
    ]:
        loader, _ = split_loader(
            frames.iloc[:images],
            Preprocess(32),
            batch_size=8 if train else 16,
            augment=Augment() if train else None,
        )
        assert [len(batch[0]) for batch in loader] == sizes, (images, train)


def test_resume_without_checkpoint_is_refused(tmp_path, make_run):
    run = make_run(tmp_path / "run")
    with pytest.raises(DataError, match="nothing to resume"):
        train_run(run, resume=True)


def test_prepare_run_refuses_an_existing_run(trained_run, make_run):
    with pytest.raises(DataError, match="--resume"):
        make_run(trained_run)


# ---------------------------------------------------------------------------- bundle


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    meta = BundleMeta(
        image_size=32,
        normalization="sample",
        thresholds=[0.1 * (i % 9) for i in range(14)],
        threshold_rule="youden",
        epoch=3,
    )
    save_bundle(tmp_path / "bundle", model, meta)
    bundle = load_bundle(tmp_path / "bundle")
    assert not bundle.model.training
    with torch.no_grad():
        assert torch.equal(bundle.model(images), expected)
    assert bundle.meta == meta
    assert bundle.image_size == 32 and bundle.normalization == "sample"
    assert bundle.thresholds == pytest.approx(meta.thresholds)
    assert bundle.labels == list(PATHOLOGIES)
    # model.json and model.safetensors name the same bundle
    for path in (tmp_path / "bundle" / "model.json", tmp_path / "bundle" / "model.safetensors"):
        assert torch.equal(load_bundle(path).model(images), expected)


def test_load_bundle_without_a_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(
        ModelError, match=r"no model bundle here \(need model.safetensors and model.json"
    ):
        load_bundle(tmp_path)
    with pytest.raises(ModelError, match="no such model"):
        load_bundle(tmp_path / "missing")


# ---------------------------------------------------------------------------- weights


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No network and an empty torch cache: the ImageNet file is expected here."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("CXR_OFFLINE", "1")
    return home / "hub" / "checkpoints" / Path(IMAGENET_WEIGHTS.url).name


def test_offline_imagenet_weights_error_names_the_file_and_the_way_out(offline):
    with pytest.raises(ModelError) as error:
        create_model("imagenet")
    message = str(error.value)
    assert str(offline) in message
    assert "--weights none" in message
    assert "CXR_OFFLINE" in message
    assert not offline.exists()


def test_cli_train_offline_imagenet_fails_cleanly(runner, offline, synth_data, tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(synth_data), "--out", str(run), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert str(offline) in result.output
    assert "--weights none" in result.output
    assert "Traceback" not in result.output
    # Nothing was created, so the same command with --weights none is not refused.
    assert not (run / "config.json").exists()


def _old_style(key: str) -> str:
    # features.denseblock1.denselayer1.norm1.weight -> ...denselayer1.norm.1.weight
    for name in ("norm", "relu", "conv"):
        for number in ("1", "2"):
            key = key.replace(f".{name}{number}.", f".{name}.{number}.")
    return key


def test_weights_file_with_old_densenet_keys_loads_into_the_features(tmp_path):
    from torchvision.models import densenet121

    state = densenet121(weights=None).state_dict()
    renamed = [
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.conv1.weight",
        "features.denseblock4.denselayer16.norm2.running_mean",
        "features.denseblock4.denselayer16.conv2.weight",
    ]
    for key in renamed:
        state[key] = torch.full_like(state[key], 0.125)
    state["features.conv0.weight"] = torch.full_like(state["features.conv0.weight"], -0.5)
    state = {(_old_style(k) if k in renamed else k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    path = tmp_path / "densenet121-old.pth"
    torch.save(state, path)

    model, note = create_model(str(path))
    assert note == {"init": "file", "file": str(path)}
    loaded = model.state_dict()
    for key in renamed:
        assert torch.equal(loaded[key], torch.full_like(loaded[key], 0.125)), key
    assert torch.equal(loaded["features.conv0.weight"], state["features.conv0.weight"])
    assert loaded["classifier.weight"].shape == (14, 1024)  # a fresh 14-way classifier


def test_weights_file_that_is_not_densenet_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"features.conv0.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelError, match="do not fit DenseNet121"):
        create_model(str(path))
    with pytest.raises(ModelError, match="weights not found"):
        create_model(str(tmp_path / "missing.pth"))


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


@pytest.fixture
def malicious_weights(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({"features.conv0.weight": _Payload(marker)}, path)
    return path, marker


def test_malicious_pickle_weights_are_refused(malicious_weights):
    path, marker = malicious_weights
    with pytest.raises(ModelError, match="refused to load"):
        create_model(str(path))
    assert not marker.exists()
    # The file really would run code if it were unpickled.
    with open(path, "rb") as handle:
        torch.load(handle, weights_only=False)
    assert marker.read_text() == "code ran"


def test_cli_refuses_malicious_weights(runner, malicious_weights, synth_data, tmp_path):
    path, marker = malicious_weights
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(synth_data), "--out", str(run), "--weights", str(path)]
    )
    assert result.exit_code == 2, result.output
    assert "refused to load" in result.output and "Traceback" not in result.output
    assert not marker.exists()
    assert not run.exists()


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=2))
    with pytest.raises(ModelError, match="files that would run code are refused"):
        load_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- config


def test_load_config_from_json_and_toml(tmp_path):
    json_path = tmp_path / "config.json"
    json_path.write_text(json.dumps({"image_size": 48, "lr": 0.02, "normalization": "sample"}))
    config = load_config(json_path)
    assert (config.image_size, config.lr, config.normalization) == (48, 0.02, "sample")
    assert config.batch_size == TrainConfig().batch_size == 16

    toml_path = tmp_path / "config.toml"
    toml_path.write_text('image_size = 64\nweights = "none"\nhflip = false\nlr = 1\n')
    config = load_config(toml_path)
    assert (config.image_size, config.weights, config.hflip) == (64, "none", False)
    assert config.lr == 1.0 and isinstance(config.lr, float)
    table = tmp_path / "table.toml"
    table.write_text("[train]\nmax_epochs = 7\n")
    assert load_config(table).max_epochs == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"imagesize": 48}', "unknown setting.*imagesize"),
        ('{"normalization": "zscore"}', "normalization must be one of imagenet, sample.*zscore"),
        ('{"image_size": 16}', "image_size must be from 32 to 1024 pixels, not 16"),
        ('{"image_size": 100000}', "image_size must be from 32 to 1024 pixels, not 100000"),
        ('{"hflip": "yes"}', "hflip must be true or false"),
        ('{"lr": "fast"}', "lr must be a number"),
        ("{not json", "not valid json"),
        ("[1, 2]", "expected a table"),
    ],
)
def test_bad_config_is_a_config_error(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_bad_toml_and_missing_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("image_size = = 3\n")
    with pytest.raises(ConfigError, match="not valid toml"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")


def test_options_take_precedence_over_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('image_size = 48\nlr = 0.02\nnormalization = "sample"\n')
    config = load_config(path).updated(image_size=32, lr=None, normalization=None)
    assert (config.image_size, config.lr, config.normalization) == (32, 0.02, "sample")
    with pytest.raises(ConfigError, match="normalization"):
        load_config(path).updated(normalization="minmax")


# ---------------------------------------------------------------------------- transforms


def _noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def test_imagenet_normalisation_of_a_constant_gray_image():
    for size in (32, 64):  # without and with resizing
        out = Preprocess(32)(np.full((size, size), 128, dtype=np.uint8))
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        for channel in range(3):
            expected = (128 / 255 - IMAGENET_MEAN[channel]) / IMAGENET_STD[channel]
            assert torch.allclose(out[channel], torch.tensor(expected), atol=1e-6)


def test_sample_normalisation_gives_mean_zero_std_one():
    out = Preprocess(48, "sample")(_noise(60, 70))
    assert out.shape == (3, 48, 48)
    assert abs(out.mean().item()) < 1e-5 and out[0].std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    flat = Preprocess(32, "sample")(np.full((32, 32), 7, dtype=np.uint8))
    assert torch.isfinite(flat).all()  # a constant image does not divide by zero


@pytest.mark.parametrize("shape", [(40, 80), (80, 40)])
def test_non_square_image_is_resized_on_the_shorter_side_and_centre_cropped(shape):
    preprocess = Preprocess(32)
    height, width = shape
    gray = np.zeros(shape, dtype=np.uint8)
    # The central square (the crop) is white, the rest black.
    if width > height:
        gray[:, 20:60] = 255
        assert preprocess.geometry(height, width) == (32, 64, 0, 16)
    else:
        gray[20:60, :] = 255
        assert preprocess.geometry(height, width) == (64, 32, 16, 0)
    crop = preprocess.crop_resized(gray)
    assert crop.shape == (32, 32)
    assert crop[2:-2, 2:-2].min() == 255  # no black borders: cropped, not squashed
    assert crop.mean() > 240


def test_eval_transform_is_deterministic_and_augmentation_is_seeded():
    images = [_noise(64, 72, seed) for seed in range(3)]
    labels = np.eye(3, 14, dtype=np.float32)
    preprocess = Preprocess(32)
    plain = XrayDataset(["a", "b", "c"], labels, preprocess, reader=images.__getitem__)
    image, target, index = plain[(1, 5)]
    assert image.shape == (3, 32, 32) and index == 1
    assert torch.equal(target, torch.from_numpy(labels[1]))
    assert torch.equal(image, plain[(1, 0)][0]) and torch.equal(image, plain[1][0])
    assert torch.equal(image, preprocess(images[1]))

    augment = Augment(1.0, 1.5, True)
    train = XrayDataset(["a", "b", "c"], labels, preprocess, augment, 7, images.__getitem__)
    again = XrayDataset(["a", "b", "c"], labels, preprocess, augment, 7, images.__getitem__)
    other_seed = XrayDataset(["a", "b", "c"], labels, preprocess, augment, 8, images.__getitem__)
    reference = train[(2, 3)][0]
    assert torch.equal(reference, train[(2, 3)][0]) and torch.equal(reference, again[(2, 3)][0])
    assert any(not torch.equal(reference, train[(2, e)][0]) for e in (0, 1, 2, 4))
    assert any(not torch.equal(train[(2, e)][0], other_seed[(2, e)][0]) for e in range(4))
    assert any(not torch.equal(train[(2, e)][0], image) for e in range(4))  # not eval output


def test_dataset_reads_images_from_disk(synth_frames):
    frame = synth_frames["val"]
    dataset = XrayDataset(frame["path"].tolist(), label_matrix(frame), Preprocess(32))
    assert len(dataset) == len(frame)
    image, target, index = dataset[3]
    assert image.shape == (3, 32, 32) and index == 3
    assert target.tolist() == label_matrix(frame)[3].tolist()
    with Image.open(frame["path"].iloc[3]) as source:
        assert source.size[0] > 32  # it was resized


def test_epoch_sampler_reshuffles_every_epoch_and_shards_ranks():
    sampler = EpochSampler(20, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert all(e == epoch for _, e in pairs)
        orders.append([i for i, _ in pairs])
        assert sorted(orders[-1]) == list(range(20))
    assert orders[0] != orders[1] != orders[2] and orders[0] != orders[2]
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] == orders[1]  # reproducible
    assert [i for i, _ in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]

    for size in (20, 21):
        shards = []
        for rank in range(2):
            shard = EpochSampler(size, shuffle=True, seed=3, rank=rank, world_size=2, pad=False)
            shard.set_epoch(1)
            shards.append([i for i, _ in shard])
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(size))
        padded = [EpochSampler(size, shuffle=True, rank=r, world_size=2) for r in range(2)]
        assert len(padded[0]) == len(padded[1]) == -(-size // 2)
        assert set(padded[0].indices()) | set(padded[1].indices()) == set(range(size))


# ---------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_train_resume_and_refusal(runner, synth_data, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(
        'weights = "none"\nimage_size = 48\nbatch_size = 8\nworkers = 0\ndevice = "cpu"\n'
        "max_epochs = 5\nlr = 0.02\n"
    )
    run = tmp_path / "run"
    args = ["train", str(synth_data), "--out", str(run), "--config", str(config)]
    result = runner.invoke(app, [*args, "--image-size", "32", "--max-epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "reached max_epochs=1" in _text(result)
    saved = json.loads((run / "config.json").read_text())
    assert (saved["image_size"], saved["max_epochs"]) == (32, 1)  # options over the file
    assert (saved["lr"], saved["batch_size"], saved["weights"]) == (0.02, 8, "none")
    assert pd.read_csv(run / "log.csv")["lr"].tolist() == [0.02]

    result = runner.invoke(app, ["train", "--resume", str(run), "--max-epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "resuming after epoch 1" in _text(result)
    assert "reached max_epochs=2" in _text(result)
    assert pd.read_csv(run / "log.csv")["epoch"].tolist() == [1, 2]
    assert RunFolder(run).load_config().max_epochs == 2

    result = runner.invoke(app, ["train", "--resume", str(run), "--lr", "0.1"])
    assert result.exit_code == 2 and "only --max-epochs" in _text(result)

    result = runner.invoke(app, args)
    assert result.exit_code != 0
    assert "use `cxr train --resume" in _text(result)
    assert "Traceback" not in result.output


def test_demo_uses_a_gpu_when_there_is_one_with_larger_settings(runner, tmp_path, monkeypatch):
    cpu, gpu = demo_settings(quick=False), demo_settings(quick=False, device="cuda")
    assert (cpu.train.device, gpu.train.device) == ("cpu", "cuda")
    # On a GPU the method's own image size (TrainConfig's default, 224 px); a CPU trains
    # smaller, and the synthetic images are at least as large as what is trained on.
    assert gpu.train.image_size == TrainConfig().image_size
    assert cpu.train.image_size < gpu.train.image_size
    assert gpu.synth_image_size >= gpu.train.image_size
    # More data, more epochs and a finer shift-and-stitch for the pointing game.
    assert gpu.patients > cpu.patients and gpu.train.max_epochs > cpu.train.max_epochs
    assert gpu.localize_shifts > cpu.localize_shifts
    # --quick is the same everywhere.
    assert demo_settings(quick=True, device="cuda") == demo_settings(quick=True)
    assert resolve_demo_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_demo_device("cpu") == "cpu"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_demo_device("auto") == "cpu"
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--device", "cuda", "--out", str(out)])
    assert result.exit_code != 0 and "no CUDA device is available" in _text(result)
    assert not out.exists()  # refused before any work
    result = runner.invoke(app, ["demo", "--device", "tpu", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "device must be one of auto, cpu, cuda" in _text(result)


@pytest.mark.slow
def test_cli_demo_quick(runner, tmp_path):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output
    for name in PATHOLOGIES:
        assert name in result.output, name
    assert "mean test AUROC" in _text(result)
    run = out / "run"
    for name in (
        "config.json",
        "split/train.csv",
        "split/val.csv",
        "split/test.csv",
        "log.csv",
        "checkpoint.pt",
        "model.safetensors",
        "model.json",
        "predictions-test.csv",
        "metrics.json",
    ):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(pd.read_csv(run / "log.csv")) == 2
    metrics = json.loads((run / "metrics.json").read_text())["test"]
    assert set(metrics["per_class"]) == set(PATHOLOGIES)
    assert load_bundle(run).image_size == 64
    localization = json.loads((run / "localization.json").read_text())
    assert localization["shifts"] == demo_settings(quick=True).localize_shifts
    assert localization["overall"]["findings"] > 0
    assert "Grad-CAM pointing game on the planted findings" in _text(result)


def test_a_given_split_finds_its_images_in_one_walk_of_the_tree(
    tmp_path, synth_data, synth_frames, monkeypatch
):
    import cxr.data.layouts.nih
    from cxr.data.split import Split, write_split
    from cxr.workflows.train import create_run

    split_dir = tmp_path / "split"
    frames = {name: frame.drop(columns=["path"]) for name, frame in synth_frames.items()}
    write_split(Split(**frames, method="test", seed=0), split_dir)
    walks = []
    real = cxr.data.layouts.nih.index_images

    def counting(root):
        walks.append(root)
        return real(root)

    monkeypatch.setattr(cxr.data.layouts.nih, "index_images", counting)
    from conftest import tiny_train_config

    config = tiny_train_config(check_images="none")
    create_run(synth_data, tmp_path / "run", config, split_dir=split_dir)
    assert len(walks) == 1  # not one per split
    run = RunFolder(tmp_path / "run")
    for name, frame in synth_frames.items():
        assert run.read_split(name)["path"].tolist() == frame["path"].tolist()


def test_train_without_a_split_says_which_split_it_made(tmp_path, synth_data):
    from conftest import tiny_train_config

    from cxr.data.layouts.nih import load_nih
    from cxr.workflows.train import create_run

    notes = create_run(synth_data, tmp_path / "run", tiny_train_config(check_images="none"))
    run = RunFolder(tmp_path / "run")
    split = run.load_info()["split"]
    assert (split["val_fraction"], split["test_fraction"], split["seed"]) == (0.1, 0.2, 0)
    # 16 patients: 10 % and 20 %, rounded half up, are 2 and 3 (hand-computed).
    patients = [run.read_split(n)["Patient ID"].nunique() for n in ("train", "val", "test")]
    assert patients == [11, 2, 3]
    assert load_nih(synth_data).table["Patient ID"].nunique() == 16
    assert any(
        "no --split given" in note
        and "11 / 2 / 3 train / val / test patients" in note
        and "--val-patients 1672 --test-patients 389" in note
        for note in notes
    ), notes


@pytest.mark.slow
def test_training_workers_default_to_the_cores_available(monkeypatch, tmp_path, make_run):
    import os

    from cxr.data.loaders import default_train_workers

    assert TrainConfig().workers is None  # chosen when the run starts, not fixed at 2
    for cores, workers in ((1, 1), (2, 1), (8, 7), (64, 16)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_train_workers() == workers, cores
    with pytest.raises(ConfigError, match="workers must be a whole number >= 0"):
        TrainConfig(workers="many").validate()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    run = make_run(tmp_path / "run", workers=None, max_epochs=1)
    train_run(run)
    assert RunFolder(run).load_info()["workers"] == 2


def test_unknown_labels_change_neither_the_loss_nor_its_gradient():
    from cxr.model.loss import WeightedBCELoss, class_weights

    nan = float("nan")
    labels = np.array([[1, nan, 0], [0, 1, nan], [nan, 1, 1], [1, 0, 1]])
    w_pos, w_neg = class_weights(labels)
    # Known cells per class: 3, 3, 3; positives 2, 2, 2 (hand-counted): fraction 2/3 each.
    assert w_pos.tolist() == pytest.approx([1 / 3] * 3)
    assert w_neg.tolist() == pytest.approx([2 / 3] * 3)
    assert class_weights(np.full((2, 1), nan))[0].tolist() == [0.5]
    loss_fn = WeightedBCELoss(w_pos, w_neg)
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.tensor(labels, dtype=torch.float32)
    loss = loss_fn(logits, targets)
    loss.backward()
    # Reference: the weighted BCE written out over the 9 known cells.
    known = ~np.isnan(labels)
    p = torch.sigmoid(logits.detach()).double().numpy()
    y = np.nan_to_num(labels)
    wp, wn = w_pos.double().numpy(), w_neg.double().numpy()
    cell = -(wp * y * np.log(p) + wn * (1 - y) * np.log(1 - p))
    assert float(loss) == pytest.approx(cell[known].sum() / known.sum(), rel=1e-6)
    assert (logits.grad.numpy()[~known] == 0).all()  # an unknown cell moves nothing
    # Any value standing in for an unknown label gives the same loss.
    for stand_in in (0.0, 1.0):
        other = torch.where(torch.isnan(targets), torch.tensor(stand_in), targets)
        masked = WeightedBCELoss(w_pos, w_neg)
        weights_known = torch.tensor(known, dtype=torch.float32)
        manual = (
            torch.nn.functional.binary_cross_entropy_with_logits(
                logits.detach(),
                other,
                weight=(other * w_pos + (1 - other) * w_neg) * weights_known,
                reduction="sum",
            )
            / weights_known.sum()
        )
        assert float(masked(logits.detach(), targets)) == pytest.approx(float(manual), rel=1e-6)
