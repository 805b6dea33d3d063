"""What every command shares: the typer app, consoles, error handling, progress bars and
the per-class AUROC table."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from cxr.errors import CxrError, LeakageError
from cxr.safety import masked
from cxr.utils import printable_text

# `cxr --help` lists the commands in the order a user meets them, each under its panel.
GET_STARTED = "Get started"
DATA = "Data"
TRAIN = "Train"
EVALUATE = "Evaluate"
REPORT = "Report"
EXPLAIN = "Explain"
PREDICT = "Predict and export"
SERVE = "Serve"
RESULTS = "Results"
COMMAND_ORDER = (
    "demo",
    "data",
    "train",
    "model",
    "evaluate",
    "calibrate",
    "thresholds",
    "ood",
    "report",
    "card",
    "explain",
    "localize",
    "predict",
    "export",
    "serve",
    "dicom",
    "results",
)


class _OrderedGroup(TyperGroup):
    """Holds its commands in :data:`COMMAND_ORDER` (any other after them, as registered), so
    that ``cxr --help`` and the generated CLI reference list them in that order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        ordered = sorted(self.commands, key=lambda name: rank.get(name, len(rank)))
        self.commands = {name: self.commands[name] for name in ordered}


app = typer.Typer(
    cls=_OrderedGroup,
    help="Chest X-ray diagnosis on NIH ChestX-ray14: data, training, evaluation, explanation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="NIH tables: statistics, patient-level splits, synthetic data.")
app.add_typer(data_app, name="data", rich_help_panel=DATA)

# soft_wrap: messages hold paths, which must stay whole (copyable) at any terminal width.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def printable(text: object) -> str:
    """``text`` safe to print: control characters (C0, DEL, C1) as ``repr``-style escapes
    (``\\x1b``, ``\\n``), bytes that are not UTF-8 as ``\\xNN`` (as in the files ``cxr predict``
    writes); other Unicode is kept (:func:`cxr.utils.printable_text`).

    Every file name and every library message the CLI prints goes through here, and through
    :func:`rich.markup.escape` when printed as markup (:func:`shown`).
    """
    return printable_text(text)


def shown(value: object) -> str:
    """A file name or message inside rich markup: :func:`printable`, passwords masked
    (:func:`cxr.safety.masked`), then markup-escaped."""
    return escape(masked(printable(value)))


def friendly_errors(func: Callable) -> Callable:
    """Turn the library's typed errors into one readable line and an exit status."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        # Messages are escaped (a CSV header like 'OriginalImagePixelSpacing[x,y]' or a label
        # '[bold]' is text, not rich markup), control characters in a file name are shown as
        # '\x1b' instead of reaching the terminal, and lines are never wrapped (paths stay
        # whole).
        except LeakageError as exc:
            err_console.print(
                f"[bold red]leakage:[/] {shown(exc)}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(3) from None
        except CxrError as exc:
            err_console.print(f"[bold red]error:[/] {shown(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # a file the command could not read or write
            where = f"{exc.filename}: " if exc.filename else ""
            reason = exc.strerror or exc.__class__.__name__
            err_console.print(
                f"[bold red]error:[/] {shown(where)}{shown(reason)}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {shown(message)}", highlight=False, soft_wrap=True)


def progress_bar() -> Progress:
    """A rich progress bar; each task carries a free-text ``status`` (loss, images/s)."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=err_console,
    )


@dataclass
class ProgressTask:
    """One task of a progress bar, with the callbacks library functions take."""

    progress: Progress
    task: TaskID

    def advance(self, count: int) -> None:
        """For ``on_batch``-style callbacks: ``count`` more items done."""
        self.progress.advance(self.task, count)

    def update(self, done: int, total: int | None) -> None:
        """For ``progress(done, total)``-style callbacks."""
        self.progress.update(self.task, completed=done, total=total)

    def describe(self, text: str) -> None:
        """For ``on_stage`` callbacks: the task's description becomes ``text``."""
        self.progress.update(self.task, description=text)

    @property
    def console(self) -> Console:
        return self.progress.console


@contextmanager
def progress_task(
    description: str, total: int | None = None, status: str = ""
) -> Iterator[ProgressTask]:
    """A progress bar with one task, for the length of a ``with`` block."""
    with progress_bar() as progress:
        yield ProgressTask(progress, progress.add_task(description, total=total, status=status))


def number(value: float | None, digits: int = 3, missing: str = "-") -> str:
    return missing if value is None else f"{value:.{digits}f}"


def auroc_table(result: dict, title: str, labels: Sequence[str]) -> Table:
    """Per class: AUROC, positives, threshold, sensitivity and specificity; then the mean."""
    table = Table("pathology", "AUROC", "positives", "threshold", "sens.", "spec.", title=title)
    for name in labels:
        entry = result["per_class"][name]
        table.add_row(
            name,
            number(entry["auroc"], missing="undefined"),
            f"{entry['positives']:,}",
            f"{entry['threshold']:.3f}",
            number(entry["sensitivity"], 2),
            number(entry["specificity"], 2),
        )
    table.add_section()
    table.add_row("mean", number(result["auroc_mean"], missing="undefined"), "", "", "", "")
    return table
