"""Fixtures of the browser tests: one coordinator subprocess and one headless Chromium per module.

``coordinator`` (module)
    A :class:`tests.browser.fleet.Coordinator`: `testfleet serve` with role tokens on its own data
    directory; tests may restart it.
``fleet`` (module)
    A :class:`tests.browser.fleet.Fleet` on that coordinator: plays CI, workers and slaves.
``browser`` (module)
    Debian's Chromium driven by playwright's sync API.
``page`` (function)
    A fresh page that records console errors and uncaught exceptions; the test fails if any were
    recorded, except those matching a pattern the test put in ``allowed_errors``.
``open_page`` (function)
    ``open_page("#/tasksets/3")`` loads the dashboard with the viewer token and that route.
``artifacts``
    ``test-artifacts/`` at the top of the repository, for screenshots.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.fleet import VIEWER_TOKEN, Coordinator, Fleet

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-sandbox",
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    base = tmp_path_factory.mktemp("dashboard")
    server = Coordinator(base / "data", base / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet(coordinator: Coordinator) -> Iterator[Fleet]:
    client = Fleet(coordinator.url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def allowed_errors() -> list[str]:
    return []


@pytest.fixture
def page(browser: Any, allowed_errors: list[str]) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light")
    page = context.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    try:
        yield page
        unexpected = [e for e in errors if not any(re.search(pattern, e) for pattern in allowed_errors)]
        assert not unexpected, f"the page logged errors: {unexpected}"
    finally:
        context.close()


@pytest.fixture
def open_page(page: Any, coordinator: Coordinator) -> Callable[[str], Any]:
    def open_(route: str, *, token: str | None = VIEWER_TOKEN) -> Any:
        query = f"?token={token}" if token else ""
        page.goto(f"{coordinator.url}/{query}{route}")
        return page

    return open_


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path
