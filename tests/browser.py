"""Open a page in a real headless Chromium (the OS package, driven through Playwright's
CDP client) and say what happened: console errors, every request, the plots drawn."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

_BINARIES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """The browser, or a skip; a failure where CI says a browser must be there."""
    for name in _BINARIES:
        found = shutil.which(name)
        if found:
            return found
    message = "no Chromium here: `apt-get install chromium` (.ci/run installs it)"
    if os.environ.get("TUNECV_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class PageVisit:
    errors: list[str]  # console errors and uncaught exceptions
    requests: list[str]  # every URL the page asked for, the page itself first
    plots: dict[str, int]  # plot element id -> number of traces drawn in it
    statuses: list[str]  # the trial table's rows' status, top to bottom
    sorted_statuses: list[str]  # the same after a click on the macro-F1 header (ascending)
    sorted_f1: list[str]
    text: str  # the page's visible text


def visit(page_file: Path, screenshot: Path) -> PageVisit:
    """Load ``page_file`` from disk, wait for every plot, take a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            requests: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.resolve().as_uri())
            page.wait_for_function("document.body.dataset.plotted !== undefined || "
                                   "document.getElementById('status').textContent !== ''", timeout=60_000)
            plots = page.evaluate("Object.fromEntries([...document.querySelectorAll('.plot')].map("
                                  "d => [d.id, (d.data || []).length]))")
            statuses = page.evaluate("[...document.querySelectorAll('#trials tbody tr')].map(r => r.className)")
            col = page.evaluate("[...document.querySelectorAll('#trials th')].findIndex(th => th.textContent === 'macro_f1')")
            page.click(f"#trials th[data-col='{col}']")
            sorted_rows = page.evaluate("[...document.querySelectorAll('#trials tbody tr')].map("
                                        f"r => [r.className, r.children[{col}].textContent])")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return PageVisit(errors, requests, plots, statuses, [s for s, _ in sorted_rows], [f for _, f in sorted_rows], text)
