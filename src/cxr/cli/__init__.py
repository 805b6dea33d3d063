"""The ``cxr`` command. Thin: it parses options, calls library code and renders results.

Each area's commands live in their own module and register on the shared typer app.
``cxr.cli.click_command`` is the same app as a click command (built when first asked for):
the documentation's CLI reference is generated from it.
"""

from cxr.cli import data, dicom, explain, model, report, serve, train  # noqa: F401  (registers)
from cxr.cli.common import app

__all__ = ["app"]


def __getattr__(name: str):
    if name == "click_command":
        import typer

        return typer.main.get_command(app)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
