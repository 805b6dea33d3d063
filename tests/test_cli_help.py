"""`cxr --help` lists the commands in the order a user meets them (issue 25)."""

import re

import typer
from typer.testing import CliRunner

from cxr.cli import app

# The order of the issue: data -> train -> evaluate -> report -> explain -> predict/export ->
# serve/dicom -> results, with the demo first as "Get started".
PANELS = [
    ("Get started", ["demo"]),
    ("Data", ["data"]),
    ("Train", ["train", "model"]),
    ("Evaluate", ["evaluate", "calibrate", "thresholds", "ood"]),
    ("Report", ["report", "card"]),
    ("Explain", ["explain", "localize"]),
    ("Predict and export", ["predict", "export"]),
    ("Serve", ["serve", "dicom"]),
    ("Results", ["results"]),
]


def _help_text() -> str:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_help_lists_panels_and_commands_in_the_users_order():
    text = _help_text()
    panel_at = [text.index(f"─ {title} ─") for title, _ in PANELS]
    assert panel_at == sorted(panel_at), "panels out of order"
    listed = re.findall(r"^│ ([a-z][a-z-]*) {2,}", text, flags=re.MULTILINE)
    assert listed == [name for _, names in PANELS for name in names]


def test_every_command_is_in_a_panel():
    """A new command must be placed: none falls into the default "Commands" panel."""
    group = typer.main.get_command(app)
    assert sorted(group.commands) == sorted(name for _, names in PANELS for name in names)
    text = _help_text()
    assert "─ Commands ─" not in text
