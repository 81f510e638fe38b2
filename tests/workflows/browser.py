"""Headless Chromium for UI tests: the rendered DOM of a page (to assert texts) and screenshots.

Debian's ``chromium`` (installed by ``.ci/run``), run as root: hence ``--no-sandbox``. Every call gets a
fresh profile, so no visit depends on an earlier one (the MLflow UI remembers dismissed dialogs).
``--virtual-time-budget`` lets the single-page app fetch and render before the DOM is dumped; the
page's own requests still go over the network to the server under test.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
)


def chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))), None)


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True)  # its helpers share our group id
        try:
            out, err = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # helpers (GPU, network, zygote) left behind
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(process.args, process.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def dump_dom(url: str, budget_ms: int = 15_000, timeout_s: float = 120) -> str:
    """The page's DOM after ``budget_ms`` of virtual time (scripts run, fetches answered)."""
    done = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout_s)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"chromium --dump-dom {url} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def text_showing(url: str, *expected: str, tries: int = 3, budget_ms: int = 15_000) -> str:
    """The page's visible text once it shows every one of ``expected``: a single-page app renders in
    stages (a tab's charts after its run's data), and a loaded machine renders slower than a virtual-time
    budget assumes. Up to ``tries`` dumps, each with twice the budget of the one before; the last text is
    returned either way (the caller asserts on it)."""
    for attempt in range(tries):
        text = visible_text(dump_dom(url, budget_ms=budget_ms * 2**attempt))
        if all(item in text for item in expected):
            break
    return text


def visible_text(dom: str) -> str:
    """The DOM's text, without scripts, styles and tags, whitespace collapsed."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", text)).split())


def screenshot(url: str, path: Path, size: tuple[int, int] = (1440, 900), budget_ms: int = 15_000,
               timeout_s: float = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _run([f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}",
                 f"--screenshot={path}", url], timeout_s)
    if done.returncode != 0 or not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium --screenshot {url} failed ({done.returncode}): {done.stderr[-2000:]}")
    return path
