"""An agent killed mid-transfer is evicted by the engine, which the API shows with the
engine's reason while the session is still running (recorded as it happens, not at the end):
with catch-up on (the default, issue 9) as ``catchup`` — an evicted agent alive would now
fetch the rest over HTTP — and, as this one is dead, ``failed`` once it made no progress for
FLEETCAST_CATCHUP_TIMEOUT; the other machine completes and the session ends ``partial``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleethelp import BuiltImage, file_sha256
from serverlab import ServerLab

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_a_killed_agent_is_evicted_with_the_reason_before_the_session_ends(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    sl.settings["FLEETCAST_CATCHUP_TIMEOUT"] = "5"
    api = sl.start()
    victim, survivor = sl.lab.receivers
    targets = {n.address: tmp_path / f"{n.name}.img" for n in (victim, survivor)}
    procs = {n.address: sl.agent(n, targets[n.address]) for n in (victim, survivor)}
    machines = sl.wait_for_machines(2)
    ids = {m["address"]: m["id"] for m in machines}
    r = api.post(
        "/api/sessions",
        json={
            "image": small_image.name,
            "machine_ids": list(ids.values()),
            "start_policy": {"max_wait": 60},
            # ~3 MiB stored at 2 Mbit/s: over 10 s, longer than the engine's 5 s silence limit
            "rate_bps": 2_000_000,
        },
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def detail() -> dict[str, Any]:
        d: dict[str, Any] = api.get(f"/api/sessions/{sid}").json()
        return d

    def row(d: dict[str, Any], address: str) -> dict[str, Any]:
        return next(m for m in d["machines"] if m["machine_id"] == ids[address])

    sl.wait_for(
        "both machines to be receiving",
        lambda: all(
            m["state"] == "receiving" and m["bytes_done"] > 0 for m in detail()["machines"]
        ),
        60,
    )
    assert sl.lab.kill(procs[victim.address]) == -9  # SIGKILL: its agent never reports

    def evicted() -> dict[str, Any] | None:
        d = detail()
        return d if row(d, victim.address)["state"] == "catchup" else None

    seen = sl.wait_for("the killed machine to show its eviction", evicted, 30)
    assert seen["state"] == "running", seen  # recorded as it happened, not when settling
    assert row(seen, survivor.address)["state"] == "receiving"
    reason = row(seen, victim.address)["reason"]
    assert reason.startswith("silent: nothing heard for"), reason
    assert reason.endswith("evicted from the multicast transfer: catching up over HTTP")

    def ended() -> dict[str, Any] | None:
        d = detail()
        return d if d["state"] not in ("pending", "running") else None

    final = sl.wait_for("the session to end", ended, 120)
    assert sl.lab.wait(procs[survivor.address], 30) == 0, sl.log(survivor.name)
    assert final["state"] == "partial", final
    assert row(final, victim.address)["state"] == "failed"
    assert "catch-up made no progress for 5 s" in row(final, victim.address)["reason"]
    assert row(final, victim.address)["ended_at"]
    assert row(final, survivor.address)["state"] == "succeeded"
    assert file_sha256(targets[survivor.address]) == small_image.sha256
    events = api.get("/api/events", params={"session_id": sid, "limit": 1000}).json()[::-1]
    kinds = [(e["kind"], e["machine_id"], e["actor"]) for e in events]
    evict = kinds.index(("machine.catchup", ids[victim.address], "server"))
    assert evict < kinds.index(
        ("machine.succeeded", ids[survivor.address], f"machine:{ids[survivor.address]}")
    )
    assert [k for k, mid, _ in kinds if mid == ids[victim.address]].count("machine.catchup") == 1
