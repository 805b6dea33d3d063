"""The compact subgroup table that ``cxr evaluate`` prints (rich only: no heavy imports)."""

from __future__ import annotations

from rich.table import Table

from cxr.cli.common import number, shown


def _interval(pair, percent: bool = False) -> str:
    low, high = pair
    if low is None:
        return ""
    return f" ({100 * low:.1f}-{100 * high:.1f})" if percent else f" ({low:.2f}-{high:.2f})"


def _gap(test: dict | None, percent: bool = False) -> str:
    if not test:
        return ""
    difference = test["difference"] * (100 if percent else 1)
    text = f"{difference:+.1f} pp" if percent else f"{difference:+.3f}"
    return f"[bold red]{text} FLAG[/]" if test["flagged"] else text


def subgroup_table(subgroups: dict, title: str) -> Table:
    """Per subgroup: images, mean AUROC and interval, underdiagnosis and interval, gaps to
    the rest of its grouping (FLAG where the adjusted test flags them)."""
    table = Table(
        "subgroup", "images", "mean AUROC (95% CI)", "vs rest", "underdiagnosis (95% CI)",
        "vs rest", title=title,
    )  # fmt: skip
    for grouping in subgroups["groupings"]:
        table.add_section()
        for group in grouping["groups"]:
            under = group["underdiagnosis"]
            rate = under["rate"]
            table.add_row(
                shown(f"{grouping['key']} {group['name']}"),
                f"{group['images']:,}",
                number(group["auroc_mean"], missing="too few") + _interval(group["auroc_mean_ci"]),
                _gap(group["vs_rest"].get("auroc_mean")),
                ("too few" if rate is None else f"{100 * rate:.1f}%")
                + _interval(under["ci"], percent=True),
                _gap(group["vs_rest"].get("underdiagnosis"), percent=True),
            )
    return table


def flags_line(subgroups: dict) -> str:
    """How many gaps were flagged, out of how many comparisons, by which rule."""
    test = subgroups["test"]
    flags = subgroups["flags"]
    rules = subgroups["rules"]
    return (
        f"subgroup gaps flagged: {len(flags)} of {test['comparisons']} comparisons (each subgroup "
        f"vs the rest of its grouping, patient-bootstrap Wald test, Holm-adjusted p < "
        f"{test['alpha']:g}); 'too few': under {rules['min_positives']} positives or "
        f"{rules['min_negatives']} negatives for a class, under {rules['min_with_finding']} "
        "images with a finding for underdiagnosis; blank 'vs rest': not tested (mean AUROCs "
        f"need {rules.get('min_test_positives', 0)} positives and negatives per class on each "
        "side)"
    )
