"""The page at ``/``: ``static/index.html`` rendered once with what the model is (its heading
names the training data; "About this model" shows the model card). Jinja2 escapes every
value, so a card's text can never become markup or script on the page."""

from __future__ import annotations

from importlib import resources
from typing import Any

from jinja2 import Environment

from cxr.model.bundle import BundleMeta

_ENVIRONMENT = Environment(autoescape=True, keep_trailing_newline=True)


def render_page(meta: BundleMeta, about: dict[str, Any]) -> str:
    text = resources.files("cxr.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return _ENVIRONMENT.from_string(text).render(
        about=about, card=meta.card, labels=list(meta.labels)
    )
