"""A simulated multicast network for the pure protocol core: fake clock, seeded links.

One SenderSession, many ReceiverSessions. Each link drops, duplicates, delays (reorders)
and corrupts datagrams by its own seeded rule. ``SimReceiver`` plays the receiver shell:
it decodes each BlockReceived payload with the real codec, checks the manifest hash,
"writes" it, and calls block_verified / block_failed; on AllBlocksVerified it calls
blocks_durable after a simulated fsync.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol.codec import BlockError, decode_block, encode_block
from protocol.config import EngineConfig
from protocol.events import (
    AllBlocksVerified,
    BlockReceived,
    Completed,
    Evicted,
    ManifestReceived,
    SessionAborted,
)
from protocol.manifest import BlockKind, Manifest
from protocol.receiver import ReceiverSession
from protocol.sender import SenderSession
from protocol.wire import Transmit

KEY = bytes(range(32))
SENDER_ADDR = ("10.0.0.1", 9000)
SESSION_ID = 0x5EED


@dataclass
class Link:
    """What happens to each datagram on one direction of one path."""

    drop: float = 0.0
    #: chance that a whole Transmit (a GSO train) is lost at once, as the lab's nftables
    #: rule drops a GSO skb before it is cut into datagrams
    train_drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0  #: chance of an extra delay of up to 5 ms
    corrupt: float = 0.0
    delay: float = 0.0002
    capacity_bps: float | None = None  #: a bottleneck: datagrams queue, then drop
    buffer_bytes: int = 256 << 10  #: queue (switch port / socket buffer) of the bottleneck


@dataclass
class Image:
    """A small image: manifest bytes, stored payloads and raw content per data block."""

    manifest: Manifest
    manifest_bytes: bytes
    stored: dict[int, bytes]
    raw: dict[int, bytes]

    @property
    def stored_bytes(self) -> int:
        return sum(len(v) for v in self.stored.values())


def make_sender(image: Image, config: EngineConfig, **kw: Any) -> SenderSession:
    """A sender of ``image`` at time 0 (seeded rng 1), outside a SimNet: for tests that
    hand datagrams between sessions themselves. ``kw`` goes to SenderSession."""
    kw.setdefault("rng", random.Random(1))
    return SenderSession(
        session_id=SESSION_ID,
        key=KEY,
        manifest_bytes=image.manifest_bytes,
        read_block=image.stored.__getitem__,
        config=config,
        now=0.0,
        **kw,
    )


def make_image(
    rng: random.Random, blocks: int = 6, block_size: int = 64 << 10, last_short: bool = True
) -> Image:
    """Data blocks (compressible and random), a zero block and an unused one."""
    size = blocks * block_size - (block_size // 3 if last_short else 0)
    m = Manifest.empty(size, block_size)
    stored: dict[int, bytes] = {}
    raw: dict[int, bytes] = {}
    words = [rng.randbytes(rng.randint(2, 9)) for _ in range(64)]
    for i in range(blocks):
        length = m.block_length(i)
        kind = i % 6
        if kind == 3 and i != blocks - 1:
            m.set_kind(i, BlockKind.ZERO)
            continue
        if kind == 4 and i != blocks - 1:
            m.set_kind(i, BlockKind.UNUSED)
            continue
        if kind == 5:
            content = rng.randbytes(length)  # incompressible: stored raw
        else:
            parts: list[bytes] = []
            total = 0
            while total < length:
                w = rng.choice(words)
                parts.append(w)
                total += len(w)
            content = b"".join(parts)[:length]
        digest, payload = encode_block(content, level=1)
        m.set_data(i, digest, len(payload))
        stored[i] = payload
        raw[i] = content
    m.created = "2026-01-01T00:00:00Z"
    return Image(m, m.to_bytes(), stored, raw)


@dataclass
class SimReceiver:
    """A ReceiverSession plus the shell's duties and a dict as the disk."""

    name: str
    addr: tuple[str, int]
    session: ReceiverSession
    verify_delay: float = 0.0
    fsync_delay: float = 0.001
    corrupt_blocks: set[int] = field(default_factory=set)  #: fail these once
    dead_at: float | None = None
    disk: dict[int, bytes] = field(default_factory=dict)
    manifest: Manifest | None = None
    events: list[Any] = field(default_factory=list)
    verify_busy_until: float = 0.0
    finished_at: float | None = None  #: when Completed / Evicted / SessionAborted came

    @property
    def alive(self) -> bool:
        return self.dead_at is None


class SimNet:
    """Drive one sender and many receivers over simulated links until all are finished."""

    def __init__(
        self,
        seed: int,
        image: Image,
        config: EngineConfig | None = None,
        *,
        min_receivers: int = 1,
        max_wait: float | None = None,
        down: Link | None = None,
        up: Link | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.image = image
        self.config = config or EngineConfig(auto_rate=False, rate_bps=200_000_000)
        self.now = 0.0
        self.down = down or Link()
        self.up = up or Link()
        self.links_down: dict[str, Link] = {}
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._tie = 0
        self.sender = SenderSession(
            session_id=SESSION_ID,
            key=KEY,
            manifest_bytes=image.manifest_bytes,
            read_block=self._read_block,
            config=self.config,
            now=0.0,
            rng=random.Random(seed + 1),
            min_receivers=min_receivers,
            max_wait=max_wait,
        )
        self.sender_events: list[Any] = []
        self.receivers: dict[str, SimReceiver] = {}  # those that have started
        self._all: dict[str, SimReceiver] = {}
        self.reads = 0
        self.sent_to_group = 0
        self._queue_free: dict[str, float] = {}
        self.queue_drops = 0

    # -- setup --------------------------------------------------------------------------

    def _read_block(self, index: int) -> bytes:
        self.reads += 1
        return self.image.stored[index]

    def add_receiver(
        self, name: str, at: float = 0.0, link: Link | None = None, **kw: Any
    ) -> SimReceiver:
        addr = (f"10.0.1.{len(self.receivers) + 1}", 9000)
        cfg = kw.pop("config", self.config)
        session = ReceiverSession(
            key=kw.pop("key", KEY), config=cfg, now=at, rng=random.Random(self.rng.random())
        )
        r = SimReceiver(name, addr, session, **kw)
        self._all[name] = r
        if link is not None:
            self.links_down[name] = link
        if at <= self.now:
            self.receivers[name] = r
        else:
            self.at(at, lambda: self.receivers.__setitem__(name, r))
        return r

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._tie += 1
        heapq.heappush(self._heap, (t, self._tie, fn))

    def kill(self, name: str, t: float) -> None:
        def die() -> None:
            self._all[name].dead_at = t

        self.at(t, die)

    # -- network --------------------------------------------------------------------------

    def _deliver(
        self, link: Link, data: bytes, fn: Callable[[bytes], None], queue: str = ""
    ) -> None:
        rng = self.rng
        if rng.random() < link.drop:
            return
        queued = 0.0
        if link.capacity_bps is not None:
            free = max(self.now, self._queue_free.get(queue, 0.0))
            if (free - self.now) * link.capacity_bps / 8 > link.buffer_bytes:
                self.queue_drops += 1
                return
            free += len(data) * 8 / link.capacity_bps
            self._queue_free[queue] = free
            queued = free - self.now
        copies = 2 if rng.random() < link.dup else 1
        for _ in range(copies):
            d = data
            if link.corrupt and rng.random() < link.corrupt:
                b = bytearray(d)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                d = bytes(b)
            delay = link.delay + queued
            if link.reorder and rng.random() < link.reorder:
                delay += rng.uniform(0, 0.005)
            self.at(self.now + delay, lambda d=d: fn(d))  # type: ignore[misc]

    def _from_sender(self, t: Transmit) -> None:
        datagrams = [t.data[i : i + t.segment_size] for i in range(0, len(t.data), t.segment_size)]
        self.sent_to_group += len(datagrams)
        targets = list(self.receivers.values())
        if t.addr is not None:
            targets = [r for r in targets if r.addr == t.addr]
        for r in targets:
            if not r.alive:
                continue
            link = self.links_down.get(r.name, self.down)
            if link.train_drop and self.rng.random() < link.train_drop:
                continue
            if link.capacity_bps is not None or len(datagrams) == 1:
                for d in datagrams:
                    self._deliver(link, d, lambda d, r=r: self._to_receiver(r, d), r.name)  # type: ignore[misc]
                continue
            self._deliver_batch(r, link, datagrams)

    def _deliver_batch(self, r: SimReceiver, link: Link, datagrams: list[bytes]) -> None:
        """A GSO burst: one event for what survives in order; reordered ones on their own."""
        rng = self.rng
        batch: list[bytes] = []
        for d in datagrams:
            if rng.random() < link.drop:
                continue
            if link.corrupt and rng.random() < link.corrupt:
                b = bytearray(d)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                d = bytes(b)
            if link.reorder and rng.random() < link.reorder:
                self.at(
                    self.now + link.delay + rng.uniform(0, 0.005),
                    lambda d=d: self._to_receiver(r, d),
                )  # type: ignore[misc]
                continue
            batch.append(d)
            if link.dup and rng.random() < link.dup:
                batch.append(d)

        def arrive() -> None:
            for d in batch:
                self._to_receiver(r, d)

        if batch:
            self.at(self.now + link.delay, arrive)

    def _to_receiver(self, r: SimReceiver, data: bytes) -> None:
        if r.alive:
            r.session.receive_datagram(data, SENDER_ADDR, self.now)

    def _to_sender(self, r: SimReceiver, data: bytes) -> None:
        self.sender.receive_datagram(data, r.addr, self.now)

    # -- the shell's duties ---------------------------------------------------------------

    def _drain_receiver(self, r: SimReceiver) -> None:
        s = r.session
        while (ev := s.next_event()) is not None:
            r.events.append(ev)
            if isinstance(ev, Completed | Evicted | SessionAborted) and r.finished_at is None:
                r.finished_at = self.now
            if isinstance(ev, ManifestReceived):
                r.manifest = ev.manifest
            elif isinstance(ev, BlockReceived):
                start = max(self.now, r.verify_busy_until)
                r.verify_busy_until = start + r.verify_delay
                self.at(r.verify_busy_until, lambda r=r, ev=ev: self._verify(r, ev))  # type: ignore[misc]
            elif isinstance(ev, AllBlocksVerified):
                self.at(self.now + r.fsync_delay, lambda r=r: self._durable(r))  # type: ignore[misc]

    def _verify(self, r: SimReceiver, ev: BlockReceived) -> None:
        if not r.alive:
            return
        assert r.manifest is not None
        entry = r.manifest.block(ev.index)
        payload = ev.payload
        if ev.index in r.corrupt_blocks:
            r.corrupt_blocks.discard(ev.index)
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        try:
            raw = decode_block(payload, entry.length, entry.digest)
        except BlockError as exc:
            r.session.block_failed(ev.index, self.now, str(exc))
            return
        r.disk[ev.index] = raw
        r.session.block_verified(ev.index, self.now)

    def _durable(self, r: SimReceiver) -> None:
        if r.alive:
            r.session.blocks_durable(self.now)

    # -- running ----------------------------------------------------------------------------

    def _flush(self) -> None:
        for t in self.sender.datagrams_to_send(self.now):
            self._from_sender(t)
        while (ev := self.sender.next_event()) is not None:
            self.sender_events.append(ev)
        for r in list(self.receivers.values()):
            if not r.alive:
                continue
            self._drain_receiver(r)
            for t in r.session.datagrams_to_send(self.now):
                assert t.addr == SENDER_ADDR
                self._deliver(self.up, t.data, lambda d, r=r: self._to_sender(r, d))  # type: ignore[misc]
            self._drain_receiver(r)

    def _timers(self) -> list[tuple[float, Any]]:
        out: list[tuple[float, Any]] = []
        t = self.sender.get_timer()
        if t is not None:
            out.append((t, self.sender))
        for r in self.receivers.values():
            if r.alive:
                t = r.session.get_timer()
                if t is not None:
                    out.append((t, r.session))
        return out

    def run(self, limit: float = 60.0, max_steps: int = 2_000_000) -> None:
        """Run until the sender and every live receiver are finished, or ``limit``."""
        for _ in range(max_steps):
            if self.sender.finished and all(
                r.session.finished for r in self.receivers.values() if r.alive
            ):
                self._flush()
                return
            timers = self._timers()
            t_timer = min((t for t, _ in timers), default=None)
            t_event = self._heap[0][0] if self._heap else None
            candidates = [t for t in (t_timer, t_event) if t is not None]
            if not candidates:
                return
            self.now = max(self.now, min(candidates))
            if self.now > limit:
                return
            while self._heap and self._heap[0][0] <= self.now:
                _, _, fn = heapq.heappop(self._heap)
                fn()
            for t, who in timers:
                if t <= self.now:
                    who.handle_timer(self.now)
            self._flush()
        raise AssertionError("simulation did not settle within max_steps")

    # -- checks ------------------------------------------------------------------------

    def check_disk(self, r: SimReceiver) -> None:
        """Every data block on ``r``'s disk is the image's content."""
        assert set(r.disk) == set(self.image.raw), (
            f"{r.name}: blocks {set(self.image.raw) - set(r.disk)} missing"
        )
        for i, raw in self.image.raw.items():
            assert r.disk[i] == raw, f"{r.name}: block {i} differs"

    def outcome(self, r: SimReceiver) -> str:
        for ev in r.events:
            if isinstance(ev, Completed):
                return "completed"
            if isinstance(ev, Evicted):
                return f"evicted: {ev.reason}"
            if isinstance(ev, SessionAborted):
                return f"aborted: {ev.reason}"
        if r.session.outcome == "failed":
            return f"failed: {r.session.fail_reason}"
        return "unfinished"
