"""``fleetcast send``: arguments, rates, errors before sending, and the truth in its exit code."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from protocol.manifest import Manifest
from server.multicast.command import (
    EXIT_ERROR,
    EXIT_NONE,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    exit_code,
    parse_rate,
    send_main,
    summary_line,
)
from server.multicast.run import ReceiverRecord, SendReport


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("auto", None),
        ("900M", 900_000_000),
        ("1g", 10**9),
        ("250mbit", 250_000_000),
        ("1.5G", 1_500_000_000),
        ("64k", 64_000),
    ],
)
def test_rates_are_bits_per_second(text: str, bps: int | None) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "10 MB/s", "1k"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rate(text)


def _report(*states: str, outcome: str = "") -> SendReport:
    r = SendReport(image="img", manifest=Manifest.empty(1 << 20), outcome=outcome)
    for i, state in enumerate(states):
        r.receivers[i + 1] = ReceiverRecord(receiver_id=i + 1, state=state)
    return r


def test_exit_code_tells_the_truth() -> None:
    assert exit_code(_report("completed", "completed", outcome="completed")) == EXIT_OK
    assert exit_code(_report("completed", "evicted", outcome="partial")) == EXIT_PARTIAL
    assert exit_code(_report("completed", "failed", outcome="partial")) == EXIT_PARTIAL
    assert exit_code(_report("evicted", outcome="partial")) == EXIT_NONE
    assert exit_code(_report(outcome="no-receivers")) == EXIT_NONE
    assert exit_code(_report("completed", outcome="aborted")) == EXIT_ERROR
    assert exit_code(_report("completed", outcome="error")) == EXIT_ERROR


def test_summary_counts_every_ending() -> None:
    line = summary_line(_report("completed", "evicted", "failed", "left", outcome="partial"))
    assert "partial" in line and "4 receivers" in line
    assert "1 completed, 1 evicted, 1 failed, 1 left" in line


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert send_main(["img", "--group", "239.1.1.1"]) == EXIT_USAGE
    assert send_main(["--help"]) == EXIT_OK
    assert "exit status" in capsys.readouterr().out


def test_a_missing_image_or_key_fails_before_sending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k"
    key.write_text("ab" * 32)
    common = ["--group", "239.1.1.1", "--port", "5000", "--iface", "lo"]
    argv = ["nope", *common, "--key-file", str(key), "--data-dir", str(tmp_path)]
    assert send_main(argv) == EXIT_ERROR
    assert "no image named 'nope'" in capsys.readouterr().err
    argv = ["nope", *common, "--key-file", str(tmp_path / "missing")]
    assert send_main(argv) == EXIT_ERROR
    assert "cannot use key file" in capsys.readouterr().err


def test_a_payload_size_outside_the_limits_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["img", "--group", "239.1.1.1", "--port", "5000", "--iface", "lo", "--key-file", "k"]
    assert send_main([*argv, "--payload-size", "100"]) == EXIT_USAGE
    assert "--payload-size must be" in capsys.readouterr().err
