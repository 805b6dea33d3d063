"""One device rule for every command (cxr.runtime), the typed bundle description
(cxr.model.bundle.BundleMeta), and a CLI that starts without the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from support.media import untrained_bundle

from cxr.errors import ConfigError, ModelError
from cxr.labels import PATHOLOGIES
from cxr.model.bundle import BundleMeta, read_bundle_meta, update_bundle_meta
from cxr.runtime import resolve_device


def test_auto_is_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a numbered one must exist
    assert resolve_device("auto") == torch.device("cuda", 0)
    # Under torchrun a bare `cuda` is this process's GPU; a numbered one is kept.
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)
    given = torch.device("cpu")
    assert resolve_device(given) is given


def test_a_device_that_is_not_there_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda was asked for but no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_bundle_description_round_trips_and_keeps_unknown_keys(tmp_path):
    folder = untrained_bundle(tmp_path / "b", 32, thresholds=[0.25] * 14, epoch=2)
    written = json.loads((folder / "model.json").read_text())
    # What a fresh bundle's model.json holds, in this order (a hand-written reference).
    assert list(written) == [
        "format", "architecture", "labels", "image_size", "normalization", "output",
        "thresholds", "threshold_rule", "temperature", "epoch", "card",
    ]  # fmt: skip
    assert written["labels"] == list(PATHOLOGIES) and written["temperature"] == 1.0
    # A newer cxr's key survives an update by this one, in its place.
    (folder / "model.json").write_text(json.dumps({**written, "future_key": {"a": 1}}))
    update_bundle_meta(folder, temperature=1.5, threshold_fit={"rule": "f1"})
    after = json.loads((folder / "model.json").read_text())
    assert after["future_key"] == {"a": 1} and after["temperature"] == 1.5
    assert list(after)[-3:] == ["threshold_fit", "card", "future_key"]
    meta = read_bundle_meta(folder)
    assert meta.decision_thresholds == [0.25] * 14 and meta.epoch == 2
    assert BundleMeta.from_dict(meta.to_dict()) == meta


def test_bundle_description_defaults_and_errors_name_the_file(tmp_path):
    meta = BundleMeta(image_size=64)
    assert meta.decision_thresholds == [0.5] * 14 and meta.effective_temperature == 1.0
    assert meta.labels == list(PATHOLOGIES) and meta.normalization == "imagenet"
    folder = untrained_bundle(tmp_path / "b", 32)
    values = json.loads((folder / "model.json").read_text())
    del values["image_size"]
    (folder / "model.json").write_text(json.dumps(values))
    with pytest.raises(ModelError, match=r"model\.json: image_size: missing"):
        read_bundle_meta(folder)
    (folder / "model.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="expected a JSON object"):
        read_bundle_meta(folder)


def test_the_cli_starts_without_torch():
    """`cxr --help` and `cxr data ...` import no deep-learning library."""
    code = "import sys; import cxr.cli; print(sorted(m for m in ('torch', 'captum', "
    code += "'onnxruntime', 'fastapi', 'matplotlib') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"
