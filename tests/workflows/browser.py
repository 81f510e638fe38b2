"""A real browser for UI tests: Playwright driving Debian's ``chromium`` (installed by ``.ci/run``).

The MLflow UI is a single-page app that renders in stages (a run's page, then its tabs' charts, which are
drawn only once their data came and they scrolled into view) and refreshes itself while a page is open.
Playwright waits, in real time, until the page shows what a test looks for; Chromium's own ``--dump-dom``
with ``--virtual-time-budget`` (what this module used before) dumps at a point it cannot choose, and on
the system-metrics tab it caught the charts' titles in only about one dump in four.

Playwright's own browser downloads are not used (``playwright install`` reaches a CDN this project cannot):
it launches the system's Chromium by path, headless, with ``--no-sandbox`` (CI runs as root). Every visit
gets a fresh browser context, so no visit depends on an earlier one (the MLflow UI remembers dismissed
dialogs in the browser's storage).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

VIEWPORT = {"width": 1440, "height": 2400}  # tall: the run page's charts render only once in view


def chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


@contextmanager
def launched() -> Iterator[Browser]:
    """The system's Chromium, headless, for the duration of the block."""
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=binary, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def visit(browser: Browser, url: str) -> Iterator[Page]:
    """``url`` open in a fresh context (no cookies, no storage from an earlier visit)."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(url, wait_until="load")
        yield page
    finally:
        context.close()


def wait_for_texts(page: Page, expected: tuple[str, ...], timeout_s: float) -> str:
    """The page's visible text once it shows every one of ``expected``, or after ``timeout_s`` as it is
    then (the caller asserts on it, so a failure shows what the page did show)."""
    if expected:
        try:
            page.wait_for_function("texts => texts.every(text => document.body.innerText.includes(text))",
                                   arg=list(expected), timeout=timeout_s * 1000, polling=250)
        except PlaywrightTimeout:
            pass
    return " ".join(page.inner_text("body").split())


def text_showing(browser: Browser, url: str, *expected: str, timeout_s: float = 60,
                 screenshot: Path | None = None) -> str:
    """The visible text, whitespace collapsed, of ``url`` once it shows every one of ``expected``; with
    ``screenshot``, a PNG of the page is saved there at that moment too."""
    with visit(browser, url) as page:
        text = wait_for_texts(page, expected, timeout_s)
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        return text
