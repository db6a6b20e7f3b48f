"""Playwright driving Debian's chromium (never ``playwright install``), optionally inside a
lab namespace so the browser reaches the server at its lab address."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fleethelp import ROOT

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "docs" / "screenshots"


def browser_unavailable_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing (scripts/setup installs Debian's chromium)"
    return None


@contextmanager
def browser_page(work: Path, netns: str | None = None) -> Iterator[Any]:
    """A fresh chromium profile in ``work`` and one page; inside ``netns`` when given."""
    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    exe = CHROMIUM
    if netns is not None:  # the browser talks to Playwright over pipes: a namespace is fine
        exe = str(work / "chromium-in-netns")
        ip = shutil.which("ip") or "/usr/sbin/ip"
        Path(exe).write_text(f'#!/bin/sh\nexec {ip} netns exec {netns} {CHROMIUM} "$@"\n')
        os.chmod(exe, 0o755)
    profile = work / "chromium-profile"
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(profile),
            executable_path=exe,
            args=ARGS,
            headless=True,
            viewport={"width": 1180, "height": 720},
            timeout=60_000,
        )
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            ctx.close()


def screenshot(page: Any, name: str, work: Path) -> Path:
    """Save the visible part of ``page`` as NAME.png: in docs/screenshots when
    FLEETCAST_SCREENSHOTS=1 (to refresh the committed ones), else in ``work``."""
    folder = SCREENSHOTS if os.environ.get("FLEETCAST_SCREENSHOTS") == "1" else work
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    try:  # a 64-colour palette keeps the committed PNGs at a few tens of KiB
        from PIL import Image
    except ImportError:
        return path
    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=64)
    small.save(path, optimize=True)
    return path
