"""MkDocs hook: the command-line reference, generated from the Typer app at build time.

``docs/reference/cli.md`` holds a ``<!-- cli-reference -->`` marker; this hook puts there
every command of ``cxr`` (``cxr.cli.click_command``), group by group and subcommand by
subcommand, with its usage, arguments and options, written by Typer's own Markdown writer
(the one behind ``typer ... utils docs``). The commands come under the panels and in the
order of ``cxr --help``, so the page cannot drift from the code.
"""

from __future__ import annotations

import typer
from typer.cli import get_docs_for_click

MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    """The Markdown of every command: one section per ``cxr --help`` panel."""
    from cxr.cli import click_command

    root = click_command
    ctx = typer.Context(root, info_name="cxr")
    parts = [
        "## `cxr`",
        "",
        f"{root.help}",
        "",
        "```console",
        f"$ cxr {' '.join(root.collect_usage_pieces(ctx))}",
        "```",
        "",
        "**Options**:",
        "",
    ]
    for param in root.get_params(ctx):
        record = param.get_help_record(ctx)
        if record:
            parts.append(f"* `{record[0]}`: {record[1]}")
    parts.append("")
    panel = None
    for name in root.list_commands(ctx):
        command = root.get_command(ctx, name)
        if command.hidden:
            continue
        title = getattr(command, "rich_help_panel", None) or "Commands"
        if title != panel:
            panel = title
            parts += [f"## {title}", ""]
        sub_ctx = typer.Context(command, info_name=name, parent=ctx)
        parts.append(get_docs_for_click(obj=command, ctx=sub_ctx, indent=2, call_prefix="cxr"))
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
