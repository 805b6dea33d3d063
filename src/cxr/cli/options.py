"""Option types that several commands share, defined once so that their names, defaults'
meaning and help stay the same everywhere."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer

DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
BatchSizeOption = Annotated[int, typer.Option(help="Images per forward pass.")]
WorkersOption = Annotated[int, typer.Option(help="DataLoader worker processes.")]
ShiftsOption = Annotated[
    int,
    typer.Option(
        help="Shift-and-stitch: sample the map every 32/N px instead of every 32 px "
        "(1, 2, 4 or 8; costs N*N backbone passes)."
    ),
]

LabelledDataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="An imported bundle (cxr model import): the labelled set (any layout) to use as "
        "its split; it must not share patients with the bundle's other split.",
    ),
]
LabelMapOption = Annotated[
    str | None,
    typer.Option(
        "--label-map",
        help="With --data: which model output(s) answer each data label, e.g. 'Pleural "
        "Effusion=Effusion;Lung Lesion=Mass|Nodule' (default: same names, then the "
        "NIH / CheXpert / MIMIC map).",
    ),
]
DropMissingOption = Annotated[
    bool, typer.Option("--drop-missing", help="Leave out listed images not on disk.")
]


def labelled_set(data, dataset, label_map: str | None, drop_missing: bool):
    """``--data`` and its options as a :class:`cxr.workflows.labelled.LabelledSet`, or
    ``None`` without ``--data``."""
    if data is None:
        return None
    from cxr.labels import parse_label_map
    from cxr.workflows.labelled import LabelledSet

    mapping = parse_label_map(label_map) if label_map else None
    return LabelledSet(data, dataset=dataset, label_map=mapping, drop_missing=drop_missing)


# ---------------------------------------------------------------------------------------------
# Which dataset a command reads: the same options on every command that takes a data folder


def _option(name: str, help: str):
    return Annotated[str | None, typer.Option(name, help=help, rich_help_panel="Dataset")]


def _layout_help() -> str:
    from cxr.data.layouts import get_layout, layout_names

    names = [f"{name} ({get_layout(name).title})" for name in layout_names()]
    return f"auto (tell from the files), {', '.join(names[:-1])} or {names[-1]}."


_DATASET_OPTIONS = {
    "layout": _option("--layout", _layout_help()),
    "image_col": _option("--image-col", "Generic table: the column naming each image file."),
    "patient_col": _option("--patient-col", "Generic table: the column with the patient id."),
    "labels": _option(
        "--labels",
        "Generic table: the label columns, A,B,C (default: every 1/0/-1/blank column).",
    ),
    "views": _option(
        "--views",
        "View positions to keep, e.g. PA,AP (default: the frontal views where the table "
        "says; 'all' keeps every view).",
    ),
    "image_root": _option(
        "--image-root", "Folder the table's image paths are relative to (default: its own)."
    ),
}


def dataset_options(command):
    """Give ``command`` the dataset options; it receives them as one ``dataset`` argument
    (a :class:`cxr.data.datasets.DatasetSpec`). One declaration for every command, so that
    the options read the same everywhere."""
    signature = inspect.signature(command, eval_str=True)
    kept = [p for p in signature.parameters.values() if p.name != "dataset"]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in _DATASET_OPTIONS.items()
    ]

    @functools.wraps(command)
    def with_dataset(*args, **kwargs):
        from cxr.data.datasets import DatasetSpec  # deferred: pandas is not needed for --help

        values = {name: kwargs.pop(name, None) for name in _DATASET_OPTIONS}
        values["layout"] = values["layout"] or "auto"
        kwargs["dataset"] = DatasetSpec(**values)
        if values["layout"] != "auto":
            from cxr.data.layouts import get_layout

            get_layout(values["layout"])  # an unknown name fails here, before any work
        return command(*args, **kwargs)

    with_dataset.__signature__ = signature.replace(parameters=[*kept, *added])
    with_dataset.__annotations__ = {
        **{p.name: p.annotation for p in kept},
        **_DATASET_OPTIONS,
    }
    return with_dataset
