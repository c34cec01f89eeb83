"""Headless Chromium for the page tests (Debian's ``chromium`` package; ``make test`` installs it).

``Z3_CHROMIUM`` points elsewhere (or at nothing, to check the skip).
"""

from __future__ import annotations

import html
import os
import re
import subprocess
from pathlib import Path

CHROMIUM = Path(os.environ.get("Z3_CHROMIUM", "/usr/bin/chromium"))
SKIP_REASON = f"{CHROMIUM} is not installed (Debian package chromium; `make test` installs it)"

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with its own profile and home under ``tmp_path``."""
    env = {**os.environ, "HOME": str(tmp_path)}
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)


def dump_dom(page: Path, tmp_path: Path, *, budget_ms: int = 5000) -> str:
    """The page's DOM after its scripts ran (``--dump-dom``); asserts Chromium succeeded."""
    result = chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", page.as_uri()], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def body_attribute(dom: str, name: str) -> str | None:
    """The value of attribute ``name`` of the dumped DOM's ``<body>`` (unescaped), or None."""
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    match = re.search(rf'{name}="([^"]*)"', body.group(0))
    return html.unescape(match.group(1)) if match else None


def console_errors(stderr: str) -> list[str]:
    """Lines of Chromium's log (``--enable-logging=stderr --v=0``) that report a page error."""
    keys = ("CONSOLE", "Uncaught", "ERR_FILE_NOT_FOUND", "Failed to load resource")
    return [line for line in stderr.splitlines() if any(k in line for k in keys)]
