"""``fleetcast keygen`` and the receive command's argument handling."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client.cli import EXIT_USAGE, keygen_main, receive_main
from protocol.keys import parse_key


def test_keygen_writes_a_private_random_key(tmp_path: Path) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.key"
    assert keygen_main([str(a)]) == 0
    assert keygen_main([str(b)]) == 0
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    text = a.read_text()
    assert len(text.strip()) == 64
    assert parse_key(text) != parse_key(b.read_text())


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    key.write_text("precious")
    assert keygen_main([str(key)]) != 0
    assert key.read_text() == "precious"
    assert "already exists" in capsys.readouterr().err


def test_receive_without_required_options_is_a_usage_error() -> None:
    assert receive_main(["--target", "x"]) == EXIT_USAGE


def test_receive_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert receive_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "evicted" in out and "refused" in out
