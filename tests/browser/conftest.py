"""Real headless Chromium (Debian's `/usr/bin/chromium`) driven by Playwright's async API,
against the real API served by uvicorn on a loopback port.

A test that uses the `chromium` fixture must be marked `@pytest.mark.browser` (as service
fixtures need their markers, see tests/conftest.py). A missing Chromium or Playwright
fails the test with the reason; nothing skips.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controlplane.access.permissions import STAFF_PERMISSIONS
from controlplane.app import create_app
from controlplane.service import ApiService
from yakpanel.services import Stack

from ..integration.controlplane.conftest import STAFF_EMAIL, STAFF_PASSWORD, Api, add_staff

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BROWSER_FIXTURES = {"chromium": "browser"}


def pytest_runtest_setup(item: pytest.Item) -> None:
    fixtures = getattr(item, "fixturenames", ())
    for fixture, marker in BROWSER_FIXTURES.items():
        if fixture in fixtures and item.get_closest_marker(marker) is None:
            pytest.fail(
                f"{item.nodeid} drives the real Chromium (fixture {fixture}) "
                f"but is not marked @pytest.mark.{marker}",
                pytrace=False,
            )


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium (`make system-deps`)",
            pytrace=False,
        )
    try:
        from playwright.async_api import async_playwright
    except ImportError as exc:
        pytest.fail(f"playwright is not installed ({exc}): `pip install -e '.[dev]'`")
    async with async_playwright() as playwright:
        try:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
        except Exception as exc:
            pytest.fail(f"Chromium did not start: {exc}", pytrace=False)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def api(stack: Stack) -> AsyncIterator[Api]:
    add_staff(stack.postgres_dsn, STAFF_EMAIL, STAFF_PASSWORD, sorted(STAFF_PERMISSIONS))
    service = ApiService(create_app(stack), "127.0.0.1", 0)
    await service.start()
    handle = Api(service.url, stack)
    try:
        yield handle
    finally:
        for c in handle.clients:
            await c.aclose()
        await service.stop()
