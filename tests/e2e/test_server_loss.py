"""The loss a receiver measures reaches the server: SessionMachine.loss of an agent behind a
2 % random drop rule (nftables in its namespace) is near 0.02; a clean one's is near 0."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fleethelp import BuiltImage, file_sha256
from serverlab import ServerLab

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_the_loss_behind_a_2_percent_drop_rule_is_recorded_near_2_percent(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    lossy, clean = sl.lab.receivers
    sl.lab.set_loss(lossy, 2)
    # The server sends with UDP GSO: over veth a 64 KiB batch stays one packet up to the
    # receiver's socket, and the drop rule would drop ~40 datagrams at a time (measured: 3
    # drops of ~43 KB). One segment per packet on the sender's port, as on a real NIC.
    subprocess.run(
        ["ip", "-n", sl.lab.sender.netns, "link", "set", "dev", "lab0", "gso_max_segs", "1"],
        check=True,
        timeout=10,
    )
    targets = {n.address: tmp_path / f"{n.name}.img" for n in (lossy, clean)}
    agents = [sl.agent(n, targets[n.address]) for n in (lossy, clean)]
    machines = sl.wait_for_machines(2)
    by_address = {m["address"]: m["id"] for m in machines}
    r = api.post(
        "/api/sessions",
        json={
            "image": small_image.name,
            "machine_ids": list(by_address.values()),
            "start_policy": {"max_wait": 60},
            # ~3 MiB stored at 10 Mbit/s: a few seconds, many STATUS and progress reports
            "rate_bps": 10_000_000,
        },
    )
    assert r.status_code == 201, r.text
    sid = r.json()["id"]

    def ended() -> dict[str, Any] | None:
        d: dict[str, Any] = api.get(f"/api/sessions/{sid}").json()
        return d if d["state"] not in ("pending", "running") else None

    detail = sl.wait_for("the session to end", ended, 120)
    for node, proc in zip((lossy, clean), agents, strict=True):
        assert sl.lab.wait(proc, 30) == 0, sl.log(node.name)
    assert detail["state"] == "succeeded", detail
    loss = {m["machine_id"]: m["loss"] for m in detail["machines"]}
    # ~3,500 datagrams at 2 %: 0.0205 measured (71 drops counted by nftables)
    assert 0.01 < loss[by_address[lossy.address]] < 0.05, loss
    assert loss[by_address[clean.address]] < 0.005, loss
    assert re.search(r"counter packets [1-9]", sl.lab.nft_counters(lossy))
    for target in targets.values():
        assert file_sha256(target) == small_image.sha256
