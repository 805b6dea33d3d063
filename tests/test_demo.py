"""``cxr demo``'s time budget: the settings follow the measured throughput (injected here, never
timed), and a given setting gives the same numbers every time."""

from __future__ import annotations

import dataclasses
import json

import pytest

import cxr.workflows.demo as demo
from cxr.workflows.demo import (
    DEFAULT_BUDGET_S,
    DEMO_SIZES,
    DemoSettings,
    Throughput,
    choose_demo_size,
    demo_settings,
    estimate_seconds,
    plan_demo,
    run_demo,
)


def _cost(size) -> float:
    """Training image-passes of a row: what a slower machine must afford less of."""
    return size.patients * size.epochs * size.image_size**2


def test_the_table_goes_from_the_largest_settings_to_the_smallest():
    costs = [_cost(size) for size in DEMO_SIZES]
    assert costs == sorted(costs, reverse=True) and len(set(costs)) == len(costs)
    for size in DEMO_SIZES:
        assert size.synth_image_size >= size.image_size
        assert size.settings().train.max_epochs == size.epochs
        assert size.settings().train.image_size == size.image_size


def test_lower_throughput_picks_smaller_settings():
    chosen = []
    for rate in (400.0, 120.0, 60.0, 40.0, 30.0, 20.0, 10.0, 2.0):
        size, estimate = choose_demo_size(Throughput(train=rate, infer=3 * rate), 300.0)
        chosen.append(DEMO_SIZES.index(size))
        if size is not DEMO_SIZES[-1]:
            assert estimate <= 300.0
    assert chosen == sorted(chosen), "a slower machine never gets larger settings"
    assert chosen[0] == 0 and chosen[-1] == len(DEMO_SIZES) - 1
    assert len(set(chosen)) >= 3
    # Too slow for any row: the smallest one, with its (over-budget) estimate.
    size, estimate = choose_demo_size(Throughput(train=1.0, infer=3.0), 300.0)
    assert size == DEMO_SIZES[-1] and estimate > 300.0


def test_a_larger_budget_never_picks_smaller_settings():
    speed = Throughput(train=25.0, infer=80.0)
    picks = [DEMO_SIZES.index(choose_demo_size(speed, budget)[0]) for budget in (60, 300, 3000)]
    assert picks == sorted(picks, reverse=True) and picks[0] > picks[-1]


def test_the_estimate_scales_with_throughput_and_image_size():
    size = DEMO_SIZES[0]
    slow = estimate_seconds(size, Throughput(train=10.0, infer=30.0))
    fast = estimate_seconds(size, Throughput(train=20.0, infer=60.0))
    assert slow["training"] == pytest.approx(2 * fast["training"], rel=0.05)
    assert slow["total"] == pytest.approx(
        sum(value for key, value in slow.items() if key != "total")
    )
    # Measured at 96 px: 192 px costs four times the pixels.
    speed = Throughput(train=40.0, infer=120.0, image_size=96)
    assert speed.at(192) == pytest.approx((10.0, 30.0))


def test_the_plan_uses_an_injected_throughput_and_says_what_it_chose(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("an injected throughput must not be measured")

    monkeypatch.setattr(demo, "measure_throughput", no_timing)
    speed = Throughput(train=30.0, infer=90.0)
    plan = plan_demo(device="cpu", throughput=speed)
    size, estimate = choose_demo_size(speed, DEFAULT_BUDGET_S)
    assert plan.name == size.name and plan.estimate_s == estimate
    assert plan.settings == size.settings()
    described = plan.describe()
    assert described["image_size"] == size.image_size and described["epochs"] == size.epochs
    assert described["train_images_per_s"] == 30.0 and described["budget_s"] == DEFAULT_BUDGET_S
    # --quick and the CUDA demo are fixed settings: nothing is timed.
    assert plan_demo(quick=True).settings == demo_settings(quick=True)
    assert plan_demo(device="cuda").settings == demo_settings(quick=False, device="cuda")


@pytest.mark.slow
def test_measuring_throughput_leaves_the_random_state_alone():
    import torch

    config = dataclasses.replace(demo_settings(quick=True).train, batch_size=2)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    speed = demo.measure_throughput(config, "cpu", image_size=32, steps=1)
    assert speed.train > 0 and speed.infer > 0 and speed.image_size == 32
    assert torch.equal(torch.rand(3), expected)


TINY = DemoSettings(
    patients=16,
    synth_image_size=64,
    train=dataclasses.replace(
        demo_settings(quick=True).train, image_size=32, batch_size=8, max_epochs=1
    ),
    localize_shifts=1,
)


@pytest.mark.slow
def test_a_given_setting_gives_the_same_numbers_every_time(tmp_path):
    results = [run_demo(tmp_path / name, settings=TINY) for name in ("a", "b")]
    first, again = (result["evaluation"] for result in results)
    assert first["auroc_mean"] == again["auroc_mean"]
    assert first["per_class"] == again["per_class"]
    assert results[0]["localization"]["overall"] == results[1]["localization"]["overall"]
    logs = [(result["run"] / "log.csv").read_text() for result in results]
    strip = [[line.split(",")[:6] for line in log.splitlines()] for log in logs]
    assert strip[0] == strip[1]  # epoch, losses, val AUROC, learning rates (not the times)
    # The settings that ran are in run.json (and from there in the report).
    info = json.loads((results[0]["run"] / "run.json").read_text())
    assert info["split"]["demo"]["patients"] == TINY.patients
    assert info["split"]["demo"]["image_size"] == 32
    assert info["cache"]["image_size"] == TINY.synth_image_size


@pytest.mark.slow
def test_the_ood_summary_of_a_run_resumed_after_a_kill_is_the_same(tmp_path, make_run):
    """Training fits the best bundle's out-of-distribution summary once, when it ends; a run
    killed before that gets it on resume, from the saved weights: the same file."""
    from cxr.model.bundle import read_bundle_meta, update_bundle_meta
    from cxr.workflows.train import train_run

    run = make_run(tmp_path / "run", max_epochs=1)
    train_run(run)
    assert read_bundle_meta(run).ood is not None
    fitted = (run / "ood.safetensors").read_bytes()
    update_bundle_meta(run, ood=None)  # as if killed after the bundle, before the summary
    (run / "ood.safetensors").unlink()
    train_run(run, resume=True)
    assert read_bundle_meta(run).ood is not None
    assert (run / "ood.safetensors").read_bytes() == fitted
