"""The documentation (issue 25): the README's promises, the site built with
``mkdocs build --strict``, its generated references checked against the code they come from,
and the site in the suite's real Chromium."""

from __future__ import annotations

import functools
import html
import http.server
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import typer

import cxr
from cxr.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def _first_fenced_block(text: str) -> str:
    return re.search(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M).group(1)


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 200


def test_readme_starts_with_the_commands_ci_runs():
    """The README's first block holds the demo's command and the test command of .ci/run
    (read from .ci/run itself), and the README names every system package .ci/run installs."""
    ci = CI.read_text()
    block = _first_fenced_block(README.read_text())
    assert 'pip install -e ".[all]" && cxr demo' in block
    tests = [line for line in ci.splitlines() if line.startswith("python -m pytest")]
    assert tests, "no pytest line in .ci/run"
    assert tests[-1] in block
    install = re.search(r'pip install -q -e "(\.\[dev\])"', ci).group(1)
    assert f'pip install -e "{install}"' in block
    packages = set()
    for line in ci.splitlines():
        if "apt-get install" in line:
            packages |= {word for word in shlex.split(line) if not word.startswith("-")}
    packages -= {"apt-get", "install", ">/dev/null"}
    assert packages >= {"chromium", "orthanc", "postgresql", "dcmtk", "dicom3tools"}
    readme = README.read_text()
    apt = [line for line in readme.splitlines() if "apt-get install" in line]
    assert apt and all(name in apt[0] for name in packages), (apt, packages)


def test_readme_links_resolve():
    """The README links into the repository (GitHub renders docs/*.md): each file exists."""
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert len(local) > 10
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == []
    picture = ROOT / "docs" / "assets" / "report.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture.stat().st_size < 300_000


def test_license_and_project_urls():
    import tomllib

    assert "MIT License" in (ROOT / "LICENSE").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert {"Homepage", "Documentation", "Repository", "Changelog", "Issues"} <= set(
        project["urls"]
    )
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    docs = project["optional-dependencies"]["docs"]
    assert any(name.startswith("mkdocs-material") for name in docs)
    assert any("docs" in extra for extra in project["optional-dependencies"]["dev"])


def test_every_doc_page_is_in_the_nav():
    """A page left out of the navigation is a page nobody finds."""
    import yaml

    config = yaml.safe_load(
        "\n".join(
            line
            for line in (ROOT / "mkdocs.yml").read_text().splitlines()
            if "!!python" not in line
        )
    )

    def pages(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            if isinstance(value, list):
                yield from pages(value)
            else:
                yield value

    in_nav = set(pages(config["nav"]))
    generated = {"reference/http-api.md"}
    on_disk = {
        str(path.relative_to(ROOT / "docs"))
        for path in (ROOT / "docs").rglob("*.md")
        if "hooks" not in path.parts
    }
    assert on_disk | generated == in_nav


# --- the built site ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` into a temporary folder, as .ci/run does."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))


def _commands(command, path=("cxr",)):
    """Every command path of the Typer app, walked through click's own groups."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


@pytest.mark.slow
def test_cli_reference_has_every_command_and_option(site):
    text = (site / "reference" / "cli" / "index.html").read_text()
    root = typer.main.get_command(app)
    paths = list(_commands(root))
    assert len(paths) > 20
    for path, command in paths:
        name = " ".join(path)
        assert f"<code>{name}</code>" in text, f"{name} is not in the CLI reference"
        for param in command.params:
            for option in param.opts if param.param_type_name == "option" else []:
                assert option in text, f"{name} {option} is not in the CLI reference"


@pytest.mark.slow
def test_api_reference_has_every_public_name(site):
    text = (site / "reference" / "python-api" / "index.html").read_text()
    for name in cxr.__all__:
        value = getattr(cxr, name)
        if name == "__version__":
            assert "cxr.__version__" in text
            continue
        anchor = value.__name__ if isinstance(value, type(cxr)) else (
            f"{value.__module__}.{value.__qualname__}"
        )  # fmt: skip
        assert f'id="{anchor}"' in text, f"cxr.{name} ({anchor}) is not in the API reference"
    assert not re.search(r":(class|func|meth|attr):<code>", text), "a Sphinx role left as text"


@pytest.mark.slow
def test_http_reference_has_every_route(site, untrained_bundle):
    from cxr.serve.app import create_app

    service = create_app(untrained_bundle, backend="torch", device="cpu")
    text = _text(site / "reference" / "http-api" / "index.html")
    routes = [r for r in service.routes if getattr(r, "include_in_schema", False)]
    assert routes
    for route in routes:
        for method in route.methods - {"HEAD"}:
            assert f"{method} {route.path}" in text, f"{method} {route.path}"
    assert (site / "reference" / "openapi.json").is_file()


@pytest.mark.slow
def test_benchmarks_page_is_benchmarks_readme(site):
    """benchmarks/README.md is included, not copied: each of its headings is on the page."""
    text = _text(site / "explanation" / "benchmarks" / "index.html")
    headings = re.findall(r"^#+ (.+)$", (ROOT / "benchmarks" / "README.md").read_text(), re.M)
    assert headings
    for heading in headings:
        assert heading.replace("`", "") in " ".join(text.split()), heading


@pytest.mark.slow
def test_site_fetches_nothing_from_elsewhere(site):
    """Offline: no script, style sheet or font from another host on any page."""
    pages = list(site.rglob("*.html"))
    assert len(pages) > 20
    remote = re.compile(r"""<(script|link)\b[^>]*\b(src|href)=["']?(https?:)?//""", re.I)
    for page in pages:
        found = remote.search(page.read_text())
        assert found is None, f"{page.relative_to(site)}: {found.group(0)}"
    for sheet in site.rglob("*.css"):
        assert "fonts.googleapis" not in sheet.read_text(errors="replace")


# --- the site in a real browser ----------------------------------------------------------


@pytest.fixture(scope="module")
def site_url(site):
    handler = functools.partial(
        type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}),
        directory=str(site),
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_site_renders_in_chromium(site_url):
    """The landing page, a tutorial and the CLI reference in Debian's Chromium: their headings
    render and no page logs a console error or throws. A missing Chromium fails the test."""
    from conftest import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).is_file(), "Debian's chromium is needed: apt-get install chromium"
    pages = {
        "": "cxr",
        "tutorials/demo/": "The demo, end to end",
        "reference/cli/": "Command line",
    }
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            failed: list[str] = []
            page.on("requestfailed", lambda request: failed.append(request.url))
            for path, heading in pages.items():
                page.goto(site_url + path)
                expect(page.locator("article h1").first).to_have_text(re.compile(heading))
            heading = page.get_by_role("heading", name=re.compile(r"^cxr data split"))
            expect(heading).to_be_visible()
            page.goto(site_url)
            expect(page.locator("article img").first).to_be_visible()
            width = page.locator("article img").first.evaluate("e => e.naturalWidth")
            assert width > 0, "the landing page's picture did not load"
        finally:
            browser.close()
    assert (errors, failed) == ([], [])
