"""Per-datagram cost of the pure protocol core (sender and receiver), in µs.

    .venv/bin/python bench/engine_micro.py [--blocks 48] [--payload-size 1472]

No sockets: the sender's Transmits are cut into datagrams and fed straight to one joined
receiver. The sender figure covers scheduling, fragment packing and HMAC tags; the
receiver figure covers tag check, header checks and reassembly (block decode and disk
writes are the shell's and are not included). Context: plain sendto() in Python manages
~110 k datagrams/s here (~9 µs each) and 1 GbE carries ~81 k datagrams/s of 1500 bytes
(12.3 µs each): the core must stay well below that.
"""

from __future__ import annotations

import argparse
import random
import time

from protocol import events as ev
from protocol import wire
from protocol.config import EngineConfig
from protocol.manifest import Manifest
from protocol.receiver import ReceiverSession
from protocol.sender import SenderSession

KEY = bytes(32)
SENDER = ("10.0.0.1", 9000)
RECEIVER = ("10.0.0.2", 9000)


def _setup(blocks: int, payload_size: int, tag_data: bool) -> tuple[SenderSession, ReceiverSession]:
    rng = random.Random(1)
    block_size = 1 << 20
    m = Manifest.empty(blocks * block_size, block_size)
    stored = {}
    for i in range(blocks):
        # ~4.9x compression is typical of a real disk at zstd-1 (LAB-NOTES): ~210 KiB stored.
        payload = rng.randbytes(block_size // 5)
        m.set_data(i, bytes(32), len(payload))
        stored[i] = payload
    config = EngineConfig(
        payload_size=payload_size, auto_rate=False, rate_bps=None, tag_data=tag_data
    )
    sender = SenderSession(
        session_id=1,
        key=KEY,
        manifest_bytes=m.to_bytes(),
        read_block=stored.__getitem__,
        config=config,
        now=0.0,
        rng=random.Random(2),
    )
    receiver = ReceiverSession(key=KEY, config=config, now=0.0, rng=random.Random(3))
    now = 0.0
    for _ in range(200):  # handshake and manifest, until the receiver is ready for data
        now += 0.001
        for t in sender.datagrams_to_send(now):
            for d in _split(t.data, t.segment_size):
                receiver.receive_datagram(d, SENDER, now)
        for t in receiver.datagrams_to_send(now):
            sender.receive_datagram(t.data, RECEIVER, now)
        sender.handle_timer(now)
        receiver.handle_timer(now)
        if receiver.manifest is not None:
            break
    assert receiver.manifest is not None, "handshake did not complete"
    return sender, receiver


def _split(data: bytes, seg: int) -> list[bytes]:
    return [data[i : i + seg] for i in range(0, len(data), seg)]


def run(blocks: int, payload_size: int, tag_data: bool = False) -> dict[str, float]:
    sender, receiver = _setup(blocks, payload_size, tag_data)
    full = (payload_size, payload_size - wire.TAG_SIZE)  # tagged, untagged DATA (§6.1)
    now = 1.0
    t0 = time.perf_counter()
    transmits = []
    while True:
        batch = sender.datagrams_to_send(now)
        data = [t for t in batch if t.segment_size in full or t.count == 1]
        transmits.extend(data)
        if sender.get_timer() != now and not batch:
            break
        if len(transmits) > 0 and not batch:
            break
    t_send = time.perf_counter() - t0
    datagrams = [d for t in transmits for d in _split(t.data, t.segment_size)]
    t0 = time.perf_counter()
    for d in datagrams:
        receiver.receive_datagram(d, SENDER, now)
    t_recv = time.perf_counter() - t0
    done = 0
    while (e := receiver.next_event()) is not None:
        if isinstance(e, ev.BlockReceived):
            receiver.block_verified(e.index, now)
            done += 1
    assert done == blocks, f"receiver completed {done} of {blocks} blocks"
    n = len(datagrams)
    msg = bytes(payload_size - 16)
    t0 = time.perf_counter()
    for _ in range(20000):
        wire.tag(KEY, msg)  # as the engine tags: a copy of a keyed OpenSSL HMAC
    t_mac = (time.perf_counter() - t0) / 20000
    return {
        "datagrams": n,
        "sender_us": t_send / n * 1e6,
        "receiver_us": t_recv / n * 1e6,
        "hmac_us": t_mac * 1e6,
        "transmits": len(transmits),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, default=48)
    p.add_argument("--payload-size", type=int, default=1472)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print(f"{'':32}{'µs/datagram':>12}{'datagrams/s':>14}{'of 1 GbE budget':>17}")
    for tag_data, label in ((False, "blocks untagged"), (True, "--tag-data")):
        # interleaved repeats, best of each: the machine's noise hits both alike
        results = [run(args.blocks, args.payload_size, tag_data) for _ in range(args.repeat)]
        best = {k: min(r[k] for r in results) for k in results[0]}
        n = int(best["datagrams"])
        print(f"{label}: {n} datagrams in {int(best['transmits'])} GSO Transmits")
        for name, key in (("  sender core", "sender_us"), ("  receiver core", "receiver_us")):
            us = best[key]
            print(f"{name:32}{us:12.2f}{1e6 / us:14,.0f}{us / 12.3:17.0%}")
    us = best["hmac_us"]
    print(f"{'(one HMAC tag)':32}{us:12.2f}{1e6 / us:14,.0f}{us / 12.3:17.0%}")


if __name__ == "__main__":
    main()
