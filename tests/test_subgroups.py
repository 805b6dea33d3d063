"""Subgroup results (issue 17): the numbers against scikit-learn and hand counts, the gap test
on predictions with a planted gap and without one, the planted effect of ``cxr data synth``,
and the subgroups in ``cxr evaluate`` and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import cxr.subgroups as subgroups_module
from cxr.cli import app
from cxr.data.synthetic import (
    README_NAME,
    parse_planted_effect,
    render_image,
    sample_population,
    write_synthetic_dataset,
)
from cxr.errors import ConfigError, DataError
from cxr.labels import PATHOLOGIES
from cxr.run import RunFolder
from cxr.subgroups import build_groupings, holm_adjust, subgroup_analysis

LABELS = ["A", "B", "C", "D"]


def population(patients: int, rng: np.random.Generator) -> pd.DataFrame:
    """One row per image: patient, sex, age, view and NIH's 0-based follow-up number."""
    rows = []
    for patient in range(patients):
        sex = "F" if rng.random() < 0.45 else "M"
        age = int(rng.integers(5, 95))
        for follow_up in range(int(rng.integers(1, 8))):
            view = "AP" if rng.random() < 0.4 else "PA"
            rows.append(
                {"Patient ID": str(patient), "Patient Gender": sex, "age_years": float(age),
                 "View Position": view, "Follow-up #": follow_up}
            )  # fmt: skip
    return pd.DataFrame(rows)


def scores(frame: pd.DataFrame, truth: np.ndarray, rng, faint=None) -> np.ndarray:
    """Probabilities whose logit is 2 x label - 1 + noise; in the ``faint`` rows a finding
    lifts the logit by 0.5 only (a fainter finding: worse ranking, more misses)."""
    lift = np.full(len(frame), 2.0)
    if faint is not None:
        lift[faint] = 0.5
    logit = lift[:, None] * truth - 1.0 + rng.normal(0.0, 1.0, truth.shape)
    return 1.0 / (1.0 + np.exp(-logit))


def _groups(result: dict) -> dict[tuple[str, str], dict]:
    return {(g["key"], e["name"]): e for g in result["groupings"] for e in g["groups"]}


# ---------------------------------------------------------------------------- groupings


def test_bands_and_categories_follow_the_stated_edges():
    frame = pd.DataFrame(
        {
            "Patient ID": list("abcdefghij"),
            "Patient Gender": ["F", "M", "", "F", "M", "F", "M", "F", "M", None],
            "age_years": [0, 19.9, 20, 59.5, 60, 79.9, 80, 101, np.nan, 45],
            "View Position": ["pa", "AP", "PA", "AP", "", "PA", "AP", "PA", "AP", "PA"],
            "Follow-up #": [0, 1, 4, 5, 17, 0, 2, 3, 6, np.nan],
        }
    )
    found = {g.key: g for g in build_groupings(frame)}
    assert list(found) == ["sex", "age", "view", "follow_up"]

    def named(key):
        g = found[key]
        return [g.names[c] if c >= 0 else None for c in g.codes]

    assert named("sex") == ["F", "M", None, "F", "M", "F", "M", "F", "M", None]
    assert named("age") == ["0-19", "0-19", "20-39", "40-59", "60-79", "60-79", "80+", "80+",
                            None, "40-59"]  # fmt: skip
    assert named("view") == ["PA", "AP", "PA", "AP", None, "PA", "AP", "PA", "AP", "PA"]
    # Follow-up # is 0-based: 0 is the first image, 1-4 the 2nd to 5th, 5 on the 6th on.
    assert named("follow_up") == ["first image", "2-5", "2-5", "6+", "6+", "first image", "2-5",
                                  "2-5", "6+", None]  # fmt: skip


def test_a_named_column_is_a_grouping_and_a_missing_or_wide_one_is_refused():
    frame = pd.DataFrame({"Patient ID": ["1", "2", "3"], "site": ["x", "y", "x"]})
    (site,) = build_groupings(frame, ["site"])
    assert site.names == ("x", "y") and site.codes.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="'scanner' is not in the split table"):
        build_groupings(frame, ["scanner"])
    wide = pd.DataFrame({"Patient ID": [str(i) for i in range(30)], "id": range(30)})
    with pytest.raises(DataError, match="30 distinct values"):
        build_groupings(wide, ["id"])


def test_holm_adjustment_equals_the_hand_computed_one():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> 0.06.
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])


# ---------------------------------------------------------------------------- numbers


def test_subgroup_numbers_equal_scikit_learn_and_counts_on_the_subgroup_rows():
    rng = np.random.default_rng(1)
    frame = population(300, rng)
    truth = (rng.random((len(frame), 4)) < [0.3, 0.2, 0.1, 0.02]).astype(float)
    truth[rng.random(truth.shape) < 0.1] = np.nan  # unknown labels count for nothing
    prob = scores(frame, np.nan_to_num(truth), rng)
    thresholds = [0.5, 0.4, 0.6, 0.5]
    result = subgroup_analysis(frame, truth, prob, thresholds, LABELS, resamples=200)
    sex = frame["Patient Gender"].to_numpy()
    checked = 0
    for (key, name), entry in _groups(result).items():
        if key != "sex":
            continue
        rows = sex == name
        rest = ~rows
        assert entry["images"] == rows.sum()
        assert entry["patients"] == frame.loc[rows, "Patient ID"].nunique()
        classes = []
        for c, label in enumerate(LABELS):
            numbers = entry["per_class"][label]
            known = rows & ~np.isnan(truth[:, c])
            t, p = truth[known, c], prob[known, c]
            positives, negatives = int((t == 1).sum()), int((t == 0).sum())
            assert (numbers["positives"], numbers["negatives"]) == (positives, negatives)
            if positives >= 10 and negatives >= 10:
                assert numbers["auroc"] == pytest.approx(roc_auc_score(t, p), abs=1e-12)
                low, high = numbers["auroc_ci"]
                assert low <= numbers["auroc"] <= high
                checked += 1
                rest_t = truth[rest & ~np.isnan(truth[:, c]), c]
                if (rest_t == 1).sum() >= 10 and (rest_t == 0).sum() >= 10:
                    classes.append(label)
            else:
                assert numbers["auroc"] is None and numbers["auroc_ci"] == [None, None]
            call = p >= thresholds[c]
            expected_sens = (call & (t == 1)).sum() / positives if positives >= 10 else None
            expected_fpr = (call & (t == 0)).sum() / negatives if negatives >= 10 else None
            assert numbers["sensitivity"] == pytest.approx(expected_sens)
            assert numbers["fpr"] == pytest.approx(expected_fpr)
        assert entry["auroc_mean_classes"] == classes
        expected_mean = np.mean([entry["per_class"][n]["auroc"] for n in classes])
        assert entry["auroc_mean"] == pytest.approx(expected_mean)
    assert checked >= 5
    # Class D (2 % prevalence) has too few positives in either sex.
    assert all(_groups(result)[("sex", s)]["per_class"]["D"]["auroc"] is None for s in "FM")
    json.dumps(result)


def test_underdiagnosis_rate_is_the_hand_counted_share(monkeypatch):
    monkeypatch.setattr(subgroups_module, "MIN_WITH_FINDING", 1)
    nan = np.nan
    labels = ["A", "B", "No Finding"]
    truth = np.array(
        [
            [1, 0, 0],  # finding, A and B called negative (the No Finding call does not count)
            [1, nan, 0],  # finding, A called positive: caught
            [0, 0, 1],  # no finding: not counted
            [nan, 1, 0],  # finding, both called negative: missed
            [nan, nan, nan],  # nothing known: not counted
            [0, 1, 0],  # finding, the wrong class called positive: not "no finding"
        ]
    )
    prob = np.array(
        [[0.2, 0.1, 0.9], [0.7, 0.1, 0.1], [0.1, 0.1, 0.9], [0.3, 0.4, 0.2], [0.1, 0.1, 0.1],
         [0.8, 0.1, 0.1]]
    )  # fmt: skip
    frame = pd.DataFrame({"Patient ID": list("abcdef"), "Patient Gender": ["F"] * 6})
    result = subgroup_analysis(frame, truth, prob, [0.5] * 3, labels, resamples=50)
    assert result["finding_labels"] == ["A", "B"]
    under = _groups(result)[("sex", "F")]["underdiagnosis"]
    assert (under["called_no_finding"], under["with_finding"]) == (2, 4)
    assert under["rate"] == pytest.approx(2 / 4)


# ---------------------------------------------------------------------------- gap test


@pytest.mark.slow
def test_a_planted_gap_is_flagged_for_its_subgroups_and_only_them():
    rng = np.random.default_rng(7)
    frame = population(700, rng)
    faint = ((frame["Patient Gender"] == "F") & frame["age_years"].between(60, 79)).to_numpy()
    truth = (rng.random((len(frame), 4)) < 0.25).astype(float)
    result = subgroup_analysis(frame, truth, scores(frame, truth, rng, faint), [0.5] * 4, LABELS)
    flags = result["flags"]
    weaker = {(f["grouping"], f["group"]) for f in flags if f["metric"] == "auroc_mean"
              and f["difference"] < 0}  # fmt: skip
    missed_more = {(f["grouping"], f["group"]) for f in flags if f["metric"] == "underdiagnosis"
                   and f["difference"] > 0}  # fmt: skip
    assert weaker == {("sex", "F"), ("age", "60-79")}
    assert missed_more == {("sex", "F"), ("age", "60-79")}
    assert not {f["grouping"] for f in flags} & {"view", "follow_up"}
    groups = _groups(result)
    assert groups[("age", "60-79")]["vs_rest"]["auroc_mean"]["difference"] < -0.1
    # sex (1) + age (5) + view (1) + follow-up (3) subgroups, two metrics each.
    assert result["test"]["comparisons"] == 2 * (1 + 5 + 1 + 3)
    assert result["test"]["adjustment"] == "holm"


@pytest.mark.slow
def test_without_a_planted_gap_nothing_is_flagged_over_several_seeds():
    comparisons = 0
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        frame = population(300, rng)
        truth = (rng.random((len(frame), 4)) < 0.25).astype(float)
        result = subgroup_analysis(frame, truth, scores(frame, truth, rng), [0.5] * 4, LABELS)
        assert result["flags"] == [], (seed, result["flags"])
        comparisons += result["test"]["comparisons"]
    # The tests were made, not skipped as "too few" (of 16 per seed, a small age band may
    # lack MIN_TEST_POSITIVES positives of a class now and then).
    assert comparisons >= 6 * 15


# ---------------------------------------------------------------------------- synthetic data


def test_a_fainter_finding_changes_the_image_about_half_as_much():
    ratios = []
    for index in range(len(PATHOLOGIES)):
        flags = [0] * len(PATHOLOGIES)
        plain, _ = render_image(flags, np.random.default_rng([5, index]), 96)
        flags[index] = 1
        full, boxes = render_image(flags, np.random.default_rng([5, index]), 96)
        half, half_boxes = render_image(flags, np.random.default_rng([5, index]), 96, 0.5)
        assert half_boxes == boxes
        change = np.abs(full.astype(float) - plain).sum()
        ratios.append(np.abs(half.astype(float) - plain).sum() / change)
    assert all(0.35 <= r <= 0.65 for r in ratios), ratios


def test_a_planted_effect_redraws_only_its_subgroups_findings(tmp_path: Path):
    effect = parse_planted_effect("sex=F,age=40-79,contrast=0.3")
    plain = write_synthetic_dataset(tmp_path / "plain", patients=30, image_size=48, seed=2)
    write_synthetic_dataset(tmp_path / "faint", patients=30, image_size=48, seed=2,
                            plant_effect=effect)  # fmt: skip
    table = sample_population(30, 2, 48)
    assert (tmp_path / "faint/Data_Entry_2017.csv").read_bytes() == (
        tmp_path / "plain/Data_Entry_2017.csv"
    ).read_bytes()
    chosen = (table["Patient Gender"] == "F") & table["Patient Age"].between(40, 79)
    findings = table[list(PATHOLOGIES)].sum(axis=1) > 0
    changed = [
        (tmp_path / "faint/images" / n).read_bytes() != (tmp_path / "plain/images" / n).read_bytes()
        for n in table["Image Index"]
    ]
    assert changed == (chosen & findings).tolist()
    assert 0 < sum(changed) < plain.images
    readme = (tmp_path / "faint" / README_NAME).read_text()
    expected = (
        "PLANTED SUBGROUP EFFECT: findings drawn at 0.3 x their contrast for sex F, age 40-79: "
        f"{int(chosen.sum())} images, {int((chosen & findings).sum())} of them with findings"
    )
    assert expected in readme


@pytest.mark.parametrize(
    "text", ["sex=X,contrast=0.5", "age=60,contrast=0.5", "contrast=0.5", "sex=F,contrast=1",
             "sex=F", "sex=F,contrast=0.5,colour=red", "age=70-60,contrast=0.2"]
)  # fmt: skip
def test_a_planted_effect_that_is_not_clear_is_refused(text):
    with pytest.raises(ConfigError, match="planted effect"):
        parse_planted_effect(text)


def test_cli_synth_plants_an_effect_and_refuses_a_bad_one(tmp_path: Path):
    runner = CliRunner()
    out = tmp_path / "data"
    args = ["data", "synth", "--out", str(out), "--patients", "6", "--image-size", "32"]
    result = runner.invoke(app, [*args, "--plant-effect", "sex=M,age=80+,contrast=0"])
    assert result.exit_code == 0, result.output
    assert "planted subgroup effect: findings drawn at 0 x their contrast for sex M, age 80+" in (
        result.output
    )
    assert "--plant-effect 'sex=M,age=80+,contrast=0'" in (out / README_NAME).read_text()
    result = runner.invoke(app, [*args, "--plant-effect", "sex=M;contrast=0.5"])
    assert result.exit_code != 0 and "not understood" in result.output
    result = runner.invoke(
        app, [*args, "--layout", "chexpert", "--plant-effect", "sex=M,contrast=0"]
    )
    assert result.exit_code != 0 and "NIH's layout only" in result.output


# ---------------------------------------------------------------------------- evaluate, report


def _copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for name in ("config.json", "run.json", "log.csv", "model.json", "model.safetensors"):
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "split", target / "split")
    return target


@pytest.mark.slow
def test_cli_evaluate_prints_subgroups_and_refuses_an_unknown_column(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    runner = CliRunner()
    bad = runner.invoke(app, ["evaluate", str(run), "--device", "cpu", "--subgroup", "scanner"])
    assert bad.exit_code != 0 and "'scanner' is not in the split table" in bad.output
    assert not RunFolder(run).predictions("test").exists()  # refused before inference
    good = runner.invoke(
        app,
        ["evaluate", str(run), "--device", "cpu", "--workers", "0", "--subgroup", "Patient Age"],
    )
    assert good.exit_code == 0, good.output
    assert "test by subgroup" in good.output and "subgroup gaps flagged: 0 of" in good.output
    stored = json.loads((run / "metrics.json").read_text())["test"]["subgroups"]
    frame = RunFolder(run).read_split("test")
    keys = [g["key"] for g in stored["groupings"]]
    assert keys == ["sex", "age", "view", "follow_up", "Patient Age"]
    sex = next(g for g in stored["groupings"] if g["key"] == "sex")
    counts = frame["Patient Gender"].value_counts().to_dict()
    assert {e["name"]: e["images"] for e in sex["groups"]} == counts
    plain = runner.invoke(app, ["evaluate", str(run), "--device", "cpu", "--no-subgroups"])
    assert plain.exit_code == 0 and "by subgroup" not in plain.output
    assert "subgroups" not in json.loads((run / "metrics.json").read_text())["test"]


@pytest.mark.slow
def test_report_has_a_subgroup_section_even_for_predictions_without_one(trained_run, tmp_path):
    from cxr.report import build_report
    from cxr.workflows.evaluate import evaluate_run

    run = _copy_run(trained_run, tmp_path / "run")
    evaluate_run(run, "test", device="cpu", subgroups=None)  # computed by the report instead
    result = build_report(run, "test", gallery=0, resamples=200, device="cpu")
    page = result["html"].read_text()
    stored = result["report"]["subgroups"]
    assert '<section id="subgroups">' in page and "What these numbers mean" in page
    assert (run / "figures" / "subgroups.png").is_file()
    assert 'alt="mean AUROC and underdiagnosis rate per subgroup with intervals"' in page
    assert stored["bootstrap"]["resamples"] == 200
    frame = RunFolder(run).read_split("test")
    views = next(g for g in stored["groupings"] if g["key"] == "view")
    for entry in views["groups"]:
        images = int((frame["View Position"] == entry["name"]).sum())
        patients = frame.loc[frame["View Position"] == entry["name"], "Patient ID"].nunique()
        assert entry["images"] == images
        assert f"<td>{entry['name']}</td><td>{images:,}</td><td>{patients:,}</td>" in page
    assert f"{stored['test']['comparisons']} comparisons" in page
