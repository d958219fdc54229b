"""Headless Chromium for the page tests: Debian's /usr/bin/chromium (never a browser download) driven by
Playwright. Test modules import the fixtures: `from browser import browser, page  # noqa: F401`.

Screenshots go to `$GLMTUNE_TEST_ARTIFACTS` (CI uploads that folder) or the test's tmp_path."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("GLMTUNE_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this closed network
# refuses; --no-sandbox because CI and this machine run tests as root.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def artifacts_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where this test's screenshots go: $GLMTUNE_TEST_ARTIFACTS/<test name>, else tmp_path."""
    root = os.environ.get("GLMTUNE_TEST_ARTIFACTS")
    if not root:
        return tmp_path
    return Path(root) / re.sub(r"[^\w.-]+", "_", request.node.name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per test module; skips when Chromium or Playwright is missing.

    Module scope, not session: each importing module gets its own copy of this fixture, and a second Playwright
    must not start while another one's event loop still runs (Playwright refuses that)."""
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (install it: scripts/get_chromium.sh, or set GLMTUNE_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need the playwright package")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class PageShots:
    """A fresh browser page plus `shot(name)`, which saves a full-page screenshot as a test artifact."""

    def __init__(self, page: Any, folder: Path) -> None:
        self.page, self.folder = page, folder
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)

    def shot(self, name: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PageShots]:
    """A page in a fresh browser context (no shared storage between tests); a screenshot is kept on failure."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    context.set_default_timeout(30_000)
    shots = PageShots(context.new_page(), artifacts_dir(request, tmp_path))
    failed_before = request.session.testsfailed
    try:
        yield shots
    finally:
        # The call phase's report is logged before teardown: a higher count means this test just failed.
        if request.session.testsfailed > failed_before:
            shots.shot("failure")
        context.close()
