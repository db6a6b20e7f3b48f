"""A schedule fires in a namespace lab: the server wakes the machines (magic packets caught by
a listener in the lab, checked byte for byte), the agents join, the deployment runs.

Four machines are targets; three have agents, the fourth never boots: it is woken like the
others, marked ``no-show`` when the quiet period starts the transfer, and the session goes on
with the three present (``partial``: 3 of 4).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fleethelp import BuiltImage, file_sha256
from serverlab import ServerLab

from bench.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]
AGENTS = 3
WOL_PORT = 40009
REPEATS = 3
SLEEPER = "52:54:00:5e:e9:01"  # the machine that never boots
LISTENER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", int(sys.argv[1])))
s.settimeout(1.0)
end = time.monotonic() + float(sys.argv[3])
with open(sys.argv[2], "w") as out:
    print("ready", file=out, flush=True)
    while time.monotonic() < end:
        try:
            data = s.recv(2048)
        except TimeoutError:
            continue
        print(data.hex(), file=out, flush=True)
"""


@dataclass
class ScheduleLab(ServerLab):
    """The server lab with a fast scheduler and a short Wake-on-LAN repeat interval."""

    @property
    def env(self) -> dict[str, str]:
        return {
            **super().env,
            "FLEETCAST_SCHEDULER_TICK": "0.25",
            "FLEETCAST_WOL_REPEATS": str(REPEATS),
            "FLEETCAST_WOL_INTERVAL": "0.1",
        }


@pytest.fixture
def lab(
    make_lab: Callable[..., Lab], small_image: BuiltImage, tmp_path: Path
) -> Iterator[ScheduleLab]:
    sl = ScheduleLab(make_lab(AGENTS), small_image.data_dir, tmp_path)
    try:
        yield sl
    finally:
        sl.close()


def magic(mac: str) -> bytes:
    return bytes([0xFF] * 6) + bytes(int(x, 16) for x in mac.split(":")) * 16


def test_a_schedule_wakes_the_lab_and_deploys_to_those_that_join(
    lab: ScheduleLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    api = lab.start()
    listen_node = lab.lab.receivers[0]
    caught = tmp_path / "magic.txt"
    listener = lab.lab.popen(
        listen_node, [sys.executable, "-c", LISTENER, str(WOL_PORT), str(caught), "60"]
    )
    lab.procs["listener"] = listener
    targets = [tmp_path / f"disk-{n.name}.img" for n in lab.lab.receivers]
    agents = [lab.agent(n, t) for n, t in zip(lab.lab.receivers, targets, strict=True)]
    machines = lab.wait_for("3 agents to enroll", lambda: _machines(api, AGENTS), 60)
    group = api.post("/api/groups", json={"name": "lab-b"}).json()
    sleeper = api.post("/api/machines", json={"mac": SLEEPER, "group_id": group["id"]}).json()
    ids = [m["id"] for m in machines] + [sleeper["id"]]
    assert api.put(f"/api/groups/{group['id']}/machines", json={"machine_ids": ids}).is_success
    broadcast = lab.lab.sender.address.rsplit(".", 1)[0] + ".255"
    r = api.put(
        f"/api/groups/{group['id']}/wake", json={"wol_broadcast": broadcast, "wol_port": WOL_PORT}
    )
    assert r.status_code == 200, r.text
    assert lab.wait_for("the listener", lambda: caught.exists() and caught.read_text(), 10)

    due = (datetime.now(UTC) + timedelta(seconds=6)).replace(microsecond=0)
    r = api.post(
        "/api/schedules",
        json={
            "name": "lab-b tonight",
            "image": small_image.name,
            "group_id": group["id"],
            "kind": "once",
            "once_at": due.replace(tzinfo=None).isoformat(),
            "timezone": "UTC",
            "wake_lead": 3,
            "start_policy": {"quiet_period": 2, "max_wait": 60},
        },
    )
    assert r.status_code == 201, r.text
    schedule = r.json()
    assert schedule["next_run_at"].startswith(due.replace(tzinfo=None).isoformat())

    def run() -> dict[str, Any] | None:
        runs: list[dict[str, Any]] = api.get(f"/api/schedules/{schedule['id']}/runs").json()
        return runs[0] if runs and runs[0]["session_state"] not in ("pending", "running") else None

    done = lab.wait_for("the scheduled session to end", run, 90)
    assert done["state"] == "started" and done["woken"] == 4, done
    detail = api.get(f"/api/sessions/{done['session_id']}").json()
    assert detail["state"] == "partial", detail
    assert detail["reason"] == "3 of 4 machines succeeded"
    states = {m["machine_id"]: (m["state"], m["reason"]) for m in detail["machines"]}
    assert states[sleeper["id"]] == ("no-show", "did not join before the transfer started")
    assert all(states[m["id"]][0] == "succeeded" for m in machines), states
    assert datetime.fromisoformat(detail["started_at"]).replace(tzinfo=UTC) >= due
    for node, proc in zip(lab.lab.receivers, agents, strict=True):
        assert lab.lab.wait(proc, 30) == 0, lab.log(node.name)
    for target in targets:
        assert file_sha256(target) == small_image.sha256

    lab.lab.kill(listener)
    packets = [bytes.fromhex(ln) for ln in caught.read_text().split()[1:]]
    macs = [m["mac"] for m in machines] + [SLEEPER]
    assert sorted(packets) == sorted(magic(m) for m in macs for _ in range(REPEATS))

    events = api.get("/api/events", params={"session_id": done["session_id"]}).json()
    kinds = [e["kind"] for e in events]
    assert "schedule.woken" in kinds and "session.transfer-started" in kinds
    started = next(e for e in events if e["kind"] == "session.transfer-started")
    assert "after the last one" in started["message"]


def _machines(api: Any, n: int) -> list[dict[str, Any]] | None:
    machines: list[dict[str, Any]] = api.get("/api/machines").json()
    return machines if len(machines) == n else None
