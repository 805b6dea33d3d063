"""What every command shares: the typer app, consoles, error handling, progress bars."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape

from cxr.errors import CxrError, LeakageError

app = typer.Typer(
    help="Chest X-ray diagnosis on NIH ChestX-ray14: data, training, evaluation, explanation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="NIH tables: statistics, patient-level splits, synthetic data.")
app.add_typer(data_app, name="data")

# soft_wrap: messages hold paths, which must stay whole (copyable) at any terminal width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def friendly_errors(func: Callable) -> Callable:
    """Turn the library's typed errors into one readable line and an exit status."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        # Messages are escaped (a CSV header like 'OriginalImagePixelSpacing[x,y]' or a label
        # '[bold]' is text, not rich markup) and never wrapped (paths stay whole).
        except LeakageError as exc:
            err_console.print(
                f"[bold red]leakage:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(3) from None
        except CxrError as exc:
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def progress_bar():
    """A rich progress bar; each task carries a free-text ``status`` (loss, images/s)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
    )
