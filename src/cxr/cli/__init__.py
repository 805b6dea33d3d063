"""The ``cxr`` command. Thin: it parses options, calls library code and renders results.

Each area's commands live in their own module and register on the shared typer app.
"""

from cxr.cli import data, dicom, explain, model, report, serve, train  # noqa: F401  (registers)
from cxr.cli.common import app

__all__ = ["app"]
