"""Strings from tables, file names, DICOM senders and command lines are hostile in every
format cxr writes. One home for making them inert where they land:

- CSV cells a spreadsheet would run as a formula (OWASP's CSV injection advice: a leading
  ``'``), reversibly, so that cxr reads its own tables back unchanged;
- Markdown and HTML text (the model card): escaped, table cells kept whole;
- text drawn in a figure: shortened, so that a 20,000-character value cannot make a
  figure 120,000 pixels wide;
- database URLs and other secrets in messages: the password masked.

Each is a few lines that no library does for all of these formats at once (pandas writes
formula cells as they are; markdown libraries render, they do not escape)."""

from __future__ import annotations

import csv
import html
import logging
import re
from typing import Any

# A spreadsheet treats a cell starting with one of these as a formula (or DDE command).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_QUOTE = "'"


def spreadsheet_cell(value: Any) -> Any:
    """``value`` with a ``'`` put before it when a spreadsheet would run it; non-text values
    (numbers, missing) unchanged. A text that already starts with ``'`` before such a
    character is quoted once more, so that :func:`restored_cell` gives back every text."""
    if not isinstance(value, str) or not value:
        return value
    if value[0] in FORMULA_START or (
        value[0] == _QUOTE and len(value) > 1 and value[1] in (*FORMULA_START, _QUOTE)
    ):
        return _QUOTE + value
    return value


def restored_cell(value: Any) -> Any:
    """The inverse of :func:`spreadsheet_cell`."""
    if (
        isinstance(value, str)
        and len(value) > 1
        and value[0] == _QUOTE
        and value[1] in (*FORMULA_START, _QUOTE)
    ):
        return value[1:]
    return value


def spreadsheet_safe(frame):
    """A copy of a pandas table whose text cells and column names are safe to open in a
    spreadsheet (numeric columns are left as numbers)."""
    safe = frame.copy()
    for column in safe.columns:
        if _is_text(safe[column]):
            safe[column] = safe[column].map(spreadsheet_cell)
    safe.columns = [spreadsheet_cell(str(c)) for c in safe.columns]
    return safe


def _is_text(column) -> bool:
    """A column that may hold text (object, or pandas' string dtypes)."""
    return column.dtype == object or str(column.dtype) in ("string", "str")


def csv_text(frame) -> str:
    """``frame`` as CSV text that a spreadsheet opens safely and that reads back whole: text
    cells through :func:`spreadsheet_safe`, and every cell quoted when a text holds a bare
    carriage return (pandas' writer quotes only delimiters, quotes and newlines, so a ``\r``
    would split the row for any reader)."""
    safe = spreadsheet_safe(frame)
    text_columns = [c for c in safe.columns if _is_text(safe[c])]
    has_cr = any(
        safe[c].map(lambda v: isinstance(v, str) and "\r" in v).any() for c in text_columns
    ) or any("\r" in str(c) for c in safe.columns)
    return safe.to_csv(index=False, quoting=csv.QUOTE_ALL if has_cr else csv.QUOTE_MINIMAL)


def restored_frame(frame):
    """A table written through :func:`spreadsheet_safe`, as it was before (in place)."""
    frame.columns = [restored_cell(c) for c in frame.columns]
    for column in frame.columns:
        if _is_text(frame[column]):
            frame[column] = frame[column].map(restored_cell)
    return frame


# Markdown's punctuation that can start emphasis, links, code, headings, lists, tables or
# raw HTML (CommonMark 2.4: any ASCII punctuation may be backslash-escaped).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>=])")


def markdown_text(value: Any) -> str:
    """``value`` as literal text in Markdown, on one line and inside a table cell: HTML
    escaped (``<script>`` shows as text), Markdown punctuation backslash-escaped (a ``|``
    cannot split a table row), line breaks as spaces."""
    text = " ".join(str(value).splitlines())
    text = html.escape(text, quote=True).replace("&#x27;", "'")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


FIGURE_TEXT_CHARS = 40


def figure_text(value: Any, limit: int = FIGURE_TEXT_CHARS) -> str:
    """``value`` shortened for a figure's labels and titles (an ellipsis marks the cut; the
    full value stays in the tables), on one line."""
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
_KEY_VALUE_PASSWORD = re.compile(r"(?i)\b(password|passwd|pwd)\s*=\s*('[^']*'|\"[^\"]*\"|\S+)")


def masked(text: Any) -> str:
    """``text`` with the passwords of any URLs in it (``scheme://user:PASSWORD@host``) and
    ``password=...`` pairs (libpq's connection strings, driver errors) replaced by ``***``."""
    shown = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))
    return _KEY_VALUE_PASSWORD.sub(lambda m: f"{m[1]}=***", shown)


class MaskSecrets(logging.Filter):
    """A logging filter (on a handler) that masks passwords in every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = masked(message)
        if shown != message:
            record.msg, record.args = shown, ()
        return True


def mask_secrets_in_logs(handler: logging.Handler | None = None) -> None:
    """Mask passwords on ``handler``, or on every handler of the root logger."""
    for each in [handler] if handler else logging.getLogger().handlers:
        if not any(isinstance(f, MaskSecrets) for f in each.filters):
            each.addFilter(MaskSecrets())
