"""NAK implosion: 64 receivers with independent 1% loss send few NAK datagrams (§4.3)."""

from __future__ import annotations

import random

import pytest
from simnet import Image, Link, SimNet

from protocol import events as ev
from protocol.codec import encode_block
from protocol.config import EngineConfig
from protocol.manifest import Manifest

MIB = 1 << 20
RECEIVERS = 64
#: NAK datagrams each receiver may send per 100 MiB on the wire at 1% loss. Without
#: aggregation one NAK per lost datagram would be ~740 per 100 MiB.
NAK_BOUND_PER_100MIB = 100


def _random_image(seed: int, blocks: int, block_size: int) -> Image:
    """Incompressible blocks: every byte goes on the wire, like a worst-case disk."""
    rng = random.Random(seed)
    m = Manifest.empty(blocks * block_size, block_size)
    stored: dict[int, bytes] = {}
    raw: dict[int, bytes] = {}
    for i in range(blocks):
        content = rng.randbytes(block_size)
        digest, payload = encode_block(content, level=1)
        m.set_data(i, digest, len(payload))
        stored[i], raw[i] = payload, content
    return Image(m, m.to_bytes(), stored, raw)


@pytest.mark.slow
def test_64_receivers_at_1_percent_loss_send_few_naks_and_all_finish() -> None:
    image = _random_image(64, blocks=16, block_size=256 << 10)
    config = EngineConfig(auto_rate=False, rate_bps=900_000_000)
    loss = Link(drop=0.01)
    net = SimNet(64, image, config, min_receivers=RECEIVERS, down=loss, up=loss)
    receivers = [net.add_receiver(f"r{i}") for i in range(RECEIVERS)]
    net.run(limit=120)
    for r in receivers:
        assert net.outcome(r) == "completed", (r.name, net.outcome(r))
        net.check_disk(r)
    wire_mib = image.stored_bytes / MIB
    naks = [r.session.stats.get("naks_sent", 0) for r in receivers]
    per_100mib = sum(naks) / RECEIVERS * 100 / wire_mib
    stats = net.sender.stats
    data = stats["data_datagrams"]
    repairs = stats.get("repair_datagrams", 0) + stats.get("resweep_datagrams", 0)
    print(
        f"\nNAK datagrams per receiver per 100 MiB: {per_100mib:.1f} "
        f"(max receiver {max(naks)}, image {wire_mib:.1f} MiB on the wire); "
        f"NAKs at the sender: {stats['naks_received']}; "
        f"repair overhead {repairs / data:.1%} of {data} data datagrams"
    )
    assert per_100mib <= NAK_BOUND_PER_100MIB
    # Each lost datagram is repaired by multicast once for everyone, not once per receiver:
    # 64 receivers x 1% loss would be 64% if repairs were per receiver.
    assert repairs / data < 0.64
    (end,) = [e for e in net.sender_events if isinstance(e, ev.SessionEnded)]
    assert end.outcome == "completed"
