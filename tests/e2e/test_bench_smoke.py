"""The benchmark harness (bench/compare.py) runs every peer end to end and reads its outcome.

One tiny scenario, one repetition per tool: this proves the harness starts each tool in a
lab, knows when each receiver is done, hashes the targets, tells whether the sender's exit
status was true, and reports bytes on the wire and CPU. It asserts no timing: speed targets
live in bench/ as ratios (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fleethelp import MIB

from bench import compare, report
from bench.lab import lab_namespaces, lab_unavailable_reason
from bench.peers import PreparedImage, all_tools
from bench.scenarios import Scenario

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(scope="module")
def tiny_image(tmp_path_factory: pytest.TempPathFactory) -> PreparedImage:
    reason = lab_unavailable_reason()
    if reason:
        pytest.skip(reason)
    missing = [b for t in all_tools() for b in t.missing()]
    if missing:
        pytest.skip(f"peers not installed ({missing}): run scripts/setup")
    return compare.prepare_image("realistic", 24 * MIB, tmp_path_factory.mktemp("img"), 1)


def test_the_prepared_image_is_the_exported_capture(tiny_image: PreparedImage) -> None:
    assert tiny_image.size == 24 * MIB
    assert compare.file_sha256(tiny_image.raw) == tiny_image.sha256
    # half-full ext4: fewer data bytes than the disk, compressed smaller still
    assert 0 < tiny_image.stored_bytes < tiny_image.data_bytes < tiny_image.size
    assert 0 < tiny_image.zstd_bytes < tiny_image.size


def test_every_tool_delivers_a_verified_copy_and_is_measured(
    tiny_image: PreparedImage, tmp_path: Path
) -> None:
    scenario = Scenario("realistic", 2)
    runs = []
    for tool in all_tools():
        rec = compare.run_one(tool, scenario, tiny_image, tmp_path, timeout=60)
        runs.append(rec)
        who = f"{tool.name}: {rec}"
        assert [r["verified"] for r in rec["receivers"]] == [True, True], who
        assert rec["all_expected_verified"] and rec["wall_s"] is not None, who
        assert rec["sender_truthful"] in (True, None), who  # None: HTTP has no verdict
        assert rec["wire_bytes"] >= 0.5 * tool.payload_once(tiny_image), who
        assert all(r["cpu_s"] is not None and r["peak_rss_kib"] > 0 for r in rec["receivers"]), who
        assert rec["sender"]["cpu_s"] is not None, who
    fleet = runs[-1]
    assert fleet["tool"] == "fleetcast" and fleet["sender"]["exit"] == 0
    assert fleet["tool_reports"]["nak_datagrams"] >= 0
    text = report.table(runs)
    for tool in all_tools():
        assert f"| {scenario.name} | {tool.name} | 1/1 |" in text
    assert not list(tmp_path.iterdir())  # every run's scratch removed
    assert not [ns for ns in lab_namespaces() if ns.split("-")[1] == str(_pid())]


def test_a_target_that_differs_from_the_image_is_not_verified(
    tiny_image: PreparedImage, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.img"
    shutil.copyfile(tiny_image.raw, bad)
    with open(bad, "r+b") as f:
        f.seek(tiny_image.size // 2)
        f.write(b"\xff")
    assert compare._hash_or_none(bad) != tiny_image.sha256
    assert compare._hash_or_none(tmp_path / "missing.img") is None


def _pid() -> int:
    import os

    return os.getpid()
