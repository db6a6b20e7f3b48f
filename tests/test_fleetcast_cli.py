"""The fleetcast command dispatcher."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetcast", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("image", "send", "receive", "keygen"):
        assert command in out.stdout


def test_unknown_command_is_one_clear_error() -> None:
    out = run("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr
