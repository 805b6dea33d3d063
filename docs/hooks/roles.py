"""MkDocs hook: Sphinx roles in docstrings (``:class:`Run```) shown as plain code.

cxr's docstrings name other objects with Sphinx roles; mkdocstrings renders the backticked
part as code and leaves the role's name in front of it. This drops the role (and, as Sphinx
does, shows only the last part of a ``~``-prefixed name).
"""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:attr|class|func|meth|mod|data|exc|obj|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"


def on_page_content(html, page, config, files):
    return ROLE.sub(_code, html)
