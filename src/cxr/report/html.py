"""The report page: ``report.html`` rendered by the Jinja2 template ``templates/report.html.j2``.

All markup and CSS live in the template (the CSS in ``templates/report.css``); this module only
sets up the environment and the filters that format numbers and embed figures.

Every ``{{ }}`` output is escaped with :func:`html.escape` (``&#x27;`` and ``&quot;``), not
MarkupSafe's ``&#39;`` and ``&#34;``, so that escaped text is exactly what the f-string version
of the page wrote; what is already safe (a macro's markup, a figure's base64) passes unchanged.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from cxr.labels import PATHOLOGIES
from cxr.report.numbers import REPORT_KEY, fmt

TEMPLATE = "report.html.j2"


def escape(value: Any) -> Markup:
    """The environment's ``finalize``: ``html.escape(str(value), quote=True)`` unless safe."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def pct(value) -> str:
    """A fraction as a percentage with one decimal: ``0.123`` gives ``12.3 %``."""
    return "n/a" if value is None else f"{100 * value:.1f} %"


def ci(interval) -> str:
    """A ``[low, high]`` interval as ``low – high``; empty when it is undefined."""
    low, high = interval
    return "" if low is None else f"{low:.3f} – {high:.3f}"


def thousands(value) -> str:
    """A count with thousands separators: ``12,345``."""
    return f"{value:,}"


def to_json(value, indent: int | None = None) -> str:
    """``json.dumps`` as the page shows it (not Jinja's HTML-safe ``tojson``)."""
    return json.dumps(value, indent=indent)


def data_uri(png: bytes) -> Markup:
    """A PNG as a ``data:`` URI; base64 needs no escaping."""
    return Markup("data:image/png;base64," + base64.b64encode(png).decode("ascii"))


ENVIRONMENT = Environment(
    loader=PackageLoader("cxr.report", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    finalize=escape,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
ENVIRONMENT.filters.update(
    fmt=fmt, pct=pct, ci=ci, thousands=thousands, json=to_json, data_uri=data_uri
)
ENVIRONMENT.globals.update(report_key=REPORT_KEY)


def render_html(report: dict, figures: dict[str, bytes]) -> str:
    """The page, from the report dict as stored in ``metrics.json`` and the figures' bytes."""
    template = ENVIRONMENT.get_template(TEMPLATE)
    return template.render(
        report=report,
        figures=figures,
        run_name=Path(report["run"]).name,
        # Reports written before labels travelled with the run are NIH's 14.
        pathologies=report.get("labels") or list(PATHOLOGIES),
    )
