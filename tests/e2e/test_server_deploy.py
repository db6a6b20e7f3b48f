"""The server deploys an image to 4 agents (the real client, writing to files) in a lab.

Through the API only: agents enroll, a session is created for them, the server's sender
multicasts, agents report progress and results; every machine ends ``succeeded``, the audit
log tells the story, and every target file is byte-identical to the image.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fleethelp import BuiltImage, file_sha256
from serverlab import ServerLab

pytestmark = [pytest.mark.netns, pytest.mark.slow]
AGENTS = 4


class LiveEvents:
    """Reads the server's SSE stream in a thread until an event of kind ``until``."""

    def __init__(self, sl: ServerLab, until: str) -> None:
        assert sl.api is not None
        self.kinds: list[str] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(sl, until), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the event stream did not open"

    def _read(self, sl: ServerLab, until: str) -> None:
        assert sl.api is not None
        with sl.api.stream("GET", "/api/events/stream", timeout=60) as r:
            self.ready.set()
            for line in r.iter_lines():
                if line.startswith("event: "):
                    self.kinds.append(line.removeprefix("event: "))
                    if self.kinds[-1] == until:
                        return


def test_a_session_created_through_the_api_deploys_to_four_agents(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    targets = [tmp_path / f"disk-{n.name}.img" for n in sl.lab.receivers]
    agents = [sl.agent(n, t) for n, t in zip(sl.lab.receivers, targets, strict=True)]
    machines = sl.wait_for_machines(AGENTS)
    assert {m["address"] for m in machines} == {n.address for n in sl.lab.receivers}
    assert all(m["inventory"]["nics"] for m in machines)

    live = LiveEvents(sl, until="session.succeeded")
    r = api.post(
        "/api/sessions",
        json={
            "image": small_image.name,
            "machine_ids": [m["id"] for m in machines],
            "start_policy": {"max_wait": 60},
        },
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert r.json()["state"] == "running"

    def ended() -> dict[str, Any] | None:
        d: dict[str, Any] = api.get(f"/api/sessions/{sid}").json()
        return d if d["state"] not in ("pending", "running") else None

    detail = sl.wait_for("the session to end", ended, 120)
    for node, proc in zip(sl.lab.receivers, agents, strict=True):
        assert sl.lab.wait(proc, 30) == 0, sl.log(node.name)
    assert detail["state"] == "succeeded", detail
    data_bytes = small_image.manifest.data_bytes()
    for m in detail["machines"]:
        assert m["state"] == "succeeded", m
        assert m["bytes_done"] == data_bytes and m["reason"] == ""
        assert m["started_at"] and m["ended_at"]
    for target in targets:
        assert file_sha256(target) == small_image.sha256

    events = api.get("/api/events", params={"session_id": sid, "limit": 1000}).json()[::-1]
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["session.created", "session.running"]
    assert kinds[-1] == "session.succeeded"
    for m in machines:
        mine = [e["kind"] for e in events if e["machine_id"] == m["id"]]
        assert mine == ["machine.assigned", "machine.receiving", "machine.succeeded"], mine
        assert [e["actor"] for e in events if e["machine_id"] == m["id"]] == [
            f"machine:{m['id']}"
        ] * 3
    after = {m["id"]: m for m in sl.machines()}
    assert all(
        m["last_outcome"] == "succeeded" and m["last_image_id"] == detail["image_id"]
        for m in after.values()
    )
    live.thread.join(30)
    assert live.kinds[-1] == "session.succeeded", live.kinds
    assert {"session.running", "machine.receiving", "machine.progress", "machine.succeeded"} <= set(
        live.kinds
    )
    metrics = api.get("/metrics").text
    assert 'fleetcast_sessions{state="succeeded"} 1.0' in metrics
    sent = [ln for ln in metrics.splitlines() if ln.startswith("fleetcast_sent_bytes_total")]
    assert sent and float(sent[0].split()[1]) >= small_image.manifest.stored_bytes


def _start_slow_session(sl: ServerLab, image: BuiltImage, machines: list[dict[str, Any]]) -> int:
    """A session throttled to 2 Mbit/s, so it is still running when the test acts."""
    assert sl.api is not None
    r = sl.api.post(
        "/api/sessions",
        json={
            "image": image.name,
            "machine_ids": [m["id"] for m in machines],
            "start_policy": {"max_wait": 60},
            "rate_bps": 2_000_000,
        },
    )
    assert r.status_code == 201, r.text
    sid: int = r.json()["id"]

    def receiving() -> bool:
        d = sl.api.get(f"/api/sessions/{sid}").json() if sl.api else {}
        return all(m["state"] == "receiving" and m["bytes_done"] > 0 for m in d["machines"])

    sl.wait_for("every machine to be receiving", receiving, 60)
    return sid


def test_cancel_stops_the_sender_and_the_agents(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    agents = [sl.agent(n, tmp_path / f"{n.name}.img") for n in sl.lab.receivers[:2]]
    machines = sl.wait_for_machines(2)
    sid = _start_slow_session(sl, small_image, machines)
    r = api.post(f"/api/sessions/{sid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    for node, proc in zip(sl.lab.receivers[:2], agents, strict=True):
        assert sl.lab.wait(proc, 30) == 1, sl.log(node.name)  # told, stopped, reported
        assert "aborted" in sl.log(node.name)
    d = api.get(f"/api/sessions/{sid}").json()
    assert d["state"] == "cancelled" and d["reason"] == "cancelled by user:admin"
    assert {m["state"] for m in d["machines"]} == {"cancelled"}
    sl.wait_for(
        "the sender's counters to be saved",
        lambda: api.get(f"/api/sessions/{sid}").json()["stats"].get("outcome") == "aborted",
        20,
    )
    assert 'fleetcast_sessions{state="running"} 0.0' in api.get("/metrics").text


def test_after_kill_9_the_session_ends_failed_and_a_rerun_completes(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    targets = [tmp_path / f"{n.name}.img" for n in sl.lab.receivers[:2]]
    for node, target in zip(sl.lab.receivers[:2], targets, strict=True):
        sl.agent(node, target, "--loop")
    machines = sl.wait_for_machines(2)
    sid = _start_slow_session(sl, small_image, machines)
    sl.lab.kill(sl.procs["server"])  # SIGKILL: no shutdown code runs
    api = sl.start()
    d = api.get(f"/api/sessions/{sid}").json()
    assert d["state"] == "failed" and "server stopped while this session was running" in d["reason"]
    assert {m["state"] for m in d["machines"]} == {"failed"}
    r = api.post(f"/api/sessions/{sid}/rerun")
    assert r.status_code == 201, r.text
    rerun = r.json()["id"]

    def ended() -> dict[str, Any] | None:
        d: dict[str, Any] = api.get(f"/api/sessions/{rerun}").json()
        return d if d["state"] not in ("pending", "running") else None

    done = sl.wait_for("the re-run to end", ended, 120)
    assert done["state"] == "succeeded", done
    for target in targets:
        assert file_sha256(target) == small_image.sha256


def test_two_sessions_run_at_once_without_cross_talk(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    targets = {n.address: tmp_path / f"{n.name}.img" for n in sl.lab.receivers}
    agents = [sl.agent(n, targets[n.address]) for n in sl.lab.receivers]
    machines = sl.wait_for_machines(AGENTS)
    halves = [machines[:2], machines[2:]]
    sids = []
    for half in halves:
        r = api.post(
            "/api/sessions",
            json={
                "image": small_image.name,
                "machine_ids": [m["id"] for m in half],
                "start_policy": {"max_wait": 60},
            },
        )
        assert r.status_code == 201, r.text
        sids.append(r.json()["id"])
    a, b = (api.get(f"/api/sessions/{sid}").json() for sid in sids)
    assert (a["mcast_group"], a["mcast_port"]) != (b["mcast_group"], b["mcast_port"])

    def both_ended() -> list[dict[str, Any]] | None:
        ds = [api.get(f"/api/sessions/{sid}").json() for sid in sids]
        return ds if all(d["state"] not in ("pending", "running") for d in ds) else None

    for d, half in zip(sl.wait_for("both sessions to end", both_ended, 120), halves, strict=True):
        assert d["state"] == "succeeded", d
        assert {m["machine_id"] for m in d["machines"]} == {m["id"] for m in half}
    for node, proc in zip(sl.lab.receivers, agents, strict=True):
        assert sl.lab.wait(proc, 30) == 0, sl.log(node.name)
    for target in targets.values():
        assert file_sha256(target) == small_image.sha256
