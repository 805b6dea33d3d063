"""What the subgroup analysis costs at NIH scale, and what it finds in NIH's real demographics.

The table is NIH's official test split (25,596 images of 2,797 patients, from
``../shared/data/nih/metadata``) with its real sex, age, view and follow-up columns; the
predictions are made up (no model): logit = 2 x label - 1 + noise, and with ``--faint`` a
finding lifts the logit of the named subgroup's images by 0.5 only. Prints the time of
:func:`cxr.subgroups.subgroup_analysis` beside that of the report's whole-set bootstrap
(:func:`cxr.metrics.bootstrap_auroc`, same resamples), and the flags.

    python benchmarks/subgroups.py                      # no planted gap
    python benchmarks/subgroups.py --faint "F,60-79"    # female patients aged 60-79
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.data.layouts.nih import read_table
from cxr.labels import PATHOLOGIES
from cxr.metrics import bootstrap_auroc
from cxr.subgroups import subgroup_analysis

METADATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih" / "metadata"


def test_split() -> pd.DataFrame:
    table = read_table(METADATA / "Data_Entry_2017_v2020.csv.gz")  # validated, with age_years
    names = pd.read_csv(METADATA / "test_list.txt.gz", header=None)[0].str.strip()
    return table[table["Image Index"].isin(set(names))].reset_index(drop=True)


def made_up_scores(frame: pd.DataFrame, faint: str | None, seed: int):
    rng = np.random.default_rng(seed)
    truth = frame[list(PATHOLOGIES)].to_numpy(dtype=np.float64)
    lift = np.full(len(frame), 2.0)
    if faint:
        sex, band = faint.split(",")
        low, high = (int(x) for x in band.split("-"))
        chosen = (frame["Patient Gender"] == sex) & frame["age_years"].between(low, high)
        lift[chosen.to_numpy()] = 0.5
    logit = lift[:, None] * truth - 1.0 + rng.normal(0.0, 1.0, truth.shape)
    return truth, 1.0 / (1.0 + np.exp(-logit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faint", help="SEX,LOW-HIGH: the subgroup whose findings are fainter")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    frame = test_split()
    truth, prob = made_up_scores(frame, args.faint, args.seed)
    patients = frame["Patient ID"].astype(str).to_numpy()
    print(f"NIH test split: {len(frame):,} images of {len(set(patients)):,} patients")

    started = time.perf_counter()
    bootstrap_auroc(truth, prob, patients, resamples=args.resamples)
    whole = time.perf_counter() - started
    started = time.perf_counter()
    result = subgroup_analysis(
        frame, truth, prob, [0.5] * len(PATHOLOGIES), PATHOLOGIES, resamples=args.resamples
    )
    subgroups = time.perf_counter() - started
    groups = sum(len(g["groups"]) for g in result["groupings"])
    print(f"whole-set bootstrap ({args.resamples:,} resamples): {whole:.1f} s")
    print(
        f"subgroup analysis ({groups} subgroups, {result['test']['comparisons']} comparisons): "
        f"{subgroups:.1f} s = {subgroups / whole:.1f} x the whole-set bootstrap"
    )
    for grouping in result["groupings"]:
        for group in grouping["groups"]:
            mean, under = group["auroc_mean"], group["underdiagnosis"]["rate"]
            print(
                f"  {grouping['key']:>9} {group['name']:<12} {group['images']:>6,} images  "
                f"mean AUROC {'too few' if mean is None else f'{mean:.3f}'}  underdiagnosis "
                f"{'too few' if under is None else f'{100 * under:.1f}%'}"
            )
    print(f"flags ({len(result['flags'])}):")
    for flag in result["flags"]:
        print(
            f"  {flag['grouping']} {flag['group']}: {flag['metric']} {flag['difference']:+.3f} "
            f"(Holm-adjusted p {flag['p_adjusted']:.2g})"
        )


if __name__ == "__main__":
    main()
