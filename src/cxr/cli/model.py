"""``cxr model import``: a torchxrayvision model, a CheXNet checkpoint or a plain state dict
as a cxr bundle, which every other command then takes like a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxr.cli.common import TRAIN, app, console, friendly_errors, shown
from cxr.errors import CxrError

model_app = typer.Typer(help="Bring your own model: import checkpoints as cxr bundles.")
app.add_typer(model_app, name="model", rich_help_panel=TRAIN)


@model_app.command("import")
@friendly_errors
def import_command(
    source: Annotated[
        str,
        typer.Argument(
            help="xrv:NAME (a torchxrayvision model from its cache, e.g. "
            "xrv:densenet121-res224-all), a CheXNet checkpoint (model.pth.tar) or a state dict."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The bundle folder to write.")],
    arch: Annotated[
        str | None, typer.Option(help="The architecture of a plain state dict (densenet121, ...).")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(help="A text file with one label per line, in the model's output order."),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow a checkpoint that needs full unpickling (it can run code: only for "
            "files from a source you trust).",
        ),
    ] = False,
    image_size: Annotated[int, typer.Option(help="Input size of a checkpoint (224).")] = 224,
    resize_to: Annotated[
        int | None,
        typer.Option(help="Shorter side before the centre crop (CheXNet's 256; default: size)."),
    ] = None,
    normalization: Annotated[
        str, typer.Option(help="A checkpoint's input scaling: imagenet, sample or xrv.")
    ] = "imagenet",
    xrv_cache: Annotated[
        Path | None,
        typer.Option(
            help="torchxrayvision's cache folder (default: ~/.torchxrayvision/models_data)."
        ),
    ] = None,
):
    """Write SOURCE as a cxr bundle: its weights, labels, preprocessing and thresholds."""
    from cxr.model.imports import XRV_PREFIX, import_checkpoint, import_xrv

    if source.startswith(XRV_PREFIX):
        imported = import_xrv(source[len(XRV_PREFIX) :], out, cache_dir=xrv_cache)
    else:
        names = None
        if labels is not None:
            try:
                names = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise CxrError(f"{labels}: cannot read labels ({exc.strerror or exc})") from None
        imported = import_checkpoint(
            source, out, arch=arch, labels=names, trust_pickle=trust_pickle,
            image_size=image_size, resize_to=resize_to, normalization=normalization,
        )  # fmt: skip
    meta = imported.meta
    console.print(
        f"wrote {shown(imported.bundle)}: {meta.architecture}, {len(meta.labels)} labels, "
        f"{meta.image_size} px, {meta.normalization} normalisation, {meta.channels} channel(s)"
    )
    if imported.note.get("dropped_outputs"):
        console.print(f"dropped unnamed outputs {imported.note['dropped_outputs']}")
    if imported.note.get("no_operating_point"):
        names = ", ".join(imported.note["no_operating_point"])
        console.print(f"no operating point for {shown(names)}: threshold 0.5")
