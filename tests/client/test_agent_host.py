"""The agent's pieces that need no server: what it reports about the machine, its route."""

from __future__ import annotations

from pathlib import Path

from client.agent import ProgressReporter, inventory, local_macs, route_interface


def test_local_macs_skip_loopback_and_empty_addresses(tmp_path: Path) -> None:
    for name, mac in [
        ("lo", "00:00:00:00:00:00"),
        ("eth1", "52:54:00:AA:BB:02"),
        ("eth0", "52:54:00:aa:bb:01"),
        ("dummy", ""),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "address").write_text(mac + "\n")
    assert local_macs(tmp_path) == ["52:54:00:aa:bb:01", "52:54:00:aa:bb:02"]


def test_inventory_has_the_fields_the_server_shows() -> None:
    inv = inventory()
    assert set(inv) == {"disks", "cpu", "ram_bytes", "nics"}
    assert inv["cpu"]["cores"] >= 1 and inv["ram_bytes"] > 0
    assert all({"name", "size", "model", "serial"} <= set(d) for d in inv["disks"])


def test_the_route_to_a_loopback_server_is_lo() -> None:
    assert route_interface("http://127.0.0.1:8080") == "lo"


def test_a_progress_sample_is_what_the_server_accepts() -> None:
    rep = ProgressReporter()
    rep.start(1000)
    rep.update(250)
    s = rep.sample({"blocks_done": 1, "blocks_total": 4, "naks_sent": 3})
    assert (s["bytes_done"], s["bytes_total"], s["blocks_done"], s["naks"]) == (250, 1000, 1, 3)
    assert s["rate_bps"] > 0 and 0.0 <= s["loss"] <= 1.0


def test_a_progress_sample_carries_the_receivers_loss_since_it_joined() -> None:
    rep = ProgressReporter()
    rep.start(1000)
    s = rep.sample({"loss": 0.5, "loss_total": 0.02, "lost_datagrams": 2})
    assert s["loss"] == 0.02
    assert rep.sample({"loss": 0.03})["loss"] == 0.03  # an older receiver core: the last figure
    assert rep.sample({"loss_total": "n/a"})["loss"] == 0.0
