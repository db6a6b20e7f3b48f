"""The receiver's progress bar and summary line."""

from __future__ import annotations

import io

from client.progress import ProgressBar
from client.receive import Outcome, summary_line


def test_the_bar_shows_percent_and_size_and_ends_its_line() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.start(8 << 20)
    bar.update(8 << 20)
    bar.close()
    text = out.getvalue()
    assert text.startswith("\r[") and "100.0%" in text and "8.0/8.0 MiB" in text
    assert text.endswith("\n")


def test_the_bar_is_rate_limited() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.start(100 << 20)
    for i in range(1000):
        bar.update(i)
    assert out.getvalue().count("\r") <= 2


def test_the_summary_names_outcome_reason_and_drops() -> None:
    outcome = Outcome(
        result="evicted",
        reason="cannot-keep-up",
        stats={
            "verified_bytes": 3 << 20,
            "peak_rss_mib": 40.0,
            "socket": {"datagrams_in": 1000},
            "session": {"dropped": {"bad_tag": 7, "replayed": 2, "not_joined": 40}},
        },
    )
    line = summary_line("/dev/sda", outcome, 2.0)
    assert line.startswith("fleetcast receive: EVICTED (cannot-keep-up): /dev/sda, 3.0 MiB")
    assert "9 rejected (forged, damaged, replayed), 40 ignored" in line
    assert '"bad_tag":7' in line
