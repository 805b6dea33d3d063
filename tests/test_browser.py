"""The page at ``/`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

uvicorn serves the app on a free loopback port in a thread of this process; the browser
uploads a real NIH PNG and must show 14 bars (positive calls marked) and, after a click on a
pathology, its Grad-CAM overlay.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from conftest import CHROMIUM, CHROMIUM_ARGS, FIXED_CALL_THRESHOLDS
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import expect, sync_playwright

from cxr.labels import PATHOLOGIES
from cxr.serve.app import create_app

pytestmark = pytest.mark.slow  # a real Chromium

THRESHOLDS = FIXED_CALL_THRESHOLDS  # the first 7 pathologies positive, the last 7 negative
NIH_PNG = "00001369_000.png"  # an RGBA NIH image with a Cardiomegaly box


KEY = "browser-test-key-0123456789"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from cxr.model.bundle import BundleMeta, save_bundle
    from cxr.model.network import build_model

    torch.manual_seed(0)
    bundle = tmp_path_factory.mktemp("bundle") / "model"
    meta = BundleMeta(
        image_size=64, normalization="imagenet", thresholds=THRESHOLDS, threshold_rule="youden"
    )
    save_bundle(bundle, build_model(), meta)
    return bundle


@pytest.fixture(scope="module")
def server_url(bundle):
    yield from serving(create_app(bundle, backend="torch", device="cpu"))


@pytest.fixture(scope="module")
def keyed_server_url(bundle):
    yield from serving(create_app(bundle, backend="torch", device="cpu", api_key=KEY))


def serving(app):
    """Serve ``app`` on a free loopback port in a thread; yield its URL, then stop it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


def test_page_shows_bars_and_overlay(server_url, sample_images: Path):
    use_page(server_url, sample_images)


def test_with_an_api_key_the_page_works_once_the_browser_has_it(
    keyed_server_url, sample_images: Path
):
    # The browser's login dialog, answered: user name anything, password the key.
    use_page(keyed_server_url, sample_images, {"username": "me", "password": KEY})
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # Without the key, the challenge: headless Chromium cannot show the login dialog
            # and gives up on the page.
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                page.goto(keyed_server_url)
            response = page.request.get(keyed_server_url)
            assert response.status == 401
            assert response.headers["www-authenticate"].startswith("Basic")
        finally:
            browser.close()


def test_the_page_shows_an_error_s_problem_detail(server_url, tmp_path):
    """An error is an RFC 9457 problem: the page shows its status and detail."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not an X-ray\n")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server_url)
            page.set_input_files("#file", str(notes))
            expect(page.locator("#error")).to_have_text(
                "Error 415: notes.txt: not a PNG, JPEG or DICOM image"
            )
            expect(page.locator("#bars .bar-row")).to_have_count(0)
        finally:
            browser.close()


def use_page(url: str, sample_images: Path, credentials: dict | None = None) -> None:
    """Upload an NIH PNG through the page; check its bars and a Grad-CAM overlay."""
    assert Path(CHROMIUM).is_file() or shutil.which("chromium"), (
        "Debian's chromium is needed: apt-get install chromium"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(http_credentials=credentials).new_page()
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            expect(page).to_have_title("cxr: chest X-ray findings")

            page.set_input_files("#file", str(sample_images / NIH_PNG))
            rows = page.locator("#bars .bar-row")
            expect(rows).to_have_count(len(PATHOLOGIES))
            expect(page.locator("#bars .bar-row.positive")).to_have_count(7)
            for index, name in enumerate(PATHOLOGIES):
                row = rows.nth(index)
                expect(row).to_have_attribute("data-label", name)
                width = row.locator(".fill").evaluate("e => e.getBoundingClientRect().width")
                assert width > 0  # a visible bar (an untrained model gives p near 0.5)
            expect(rows.nth(1).locator(".call")).to_have_text("positive")
            expect(rows.nth(13).locator(".call")).to_have_text("negative")
            expect(page.locator("#status")).to_contain_text(f"{NIH_PNG} (1024x1024)")

            rows.nth(1).click()  # Cardiomegaly
            overlay = page.locator("#overlay")
            expect(overlay).to_be_visible()
            expect(overlay).to_have_attribute("data-label", "Cardiomegaly")
            page.wait_for_function(
                "() => { const i = document.getElementById('overlay');"
                " return i.complete && i.naturalWidth > 64; }"
            )
            expect(page.locator("#error")).to_have_text("")
            assert errors == []
        finally:
            browser.close()


def test_a_synthetic_model_says_so_and_flags_a_real_x_ray(trained_run, sample_images: Path):
    """The demo's situation: a model trained on synthetic images, a real NIH X-ray dropped on
    its page. The heading says SYNTHETIC, the X-ray is flagged, the model card is there."""
    url = next(serving_gen := serving(create_app(trained_run, backend="torch", device="cpu")))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(url)
                expect(page.locator("#synthetic")).to_be_visible()
                expect(page.locator("#trained-on")).to_contain_text("trained on SYNTHETIC")
                expect(page.locator("#trained-on")).not_to_contain_text("NIH")
                page.locator("#about summary").click()
                expect(page.locator("#about")).to_contain_text("Known limitations")
                page.set_input_files("#file", str(sample_images / NIH_PNG))
                expect(page.locator("#bars .bar-row")).to_have_count(len(PATHOLOGIES))
                expect(page.locator("#status")).to_contain_text("trained on SYNTHETIC data")
                expect(page.locator("#ood")).to_be_visible()
                expect(page.locator("#ood")).to_contain_text("unlike the images")
            finally:
                browser.close()
    finally:
        next(serving_gen, None)
