"""Option types that several commands share, defined once so that their names, defaults'
meaning and help stay the same everywhere."""

from __future__ import annotations

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
