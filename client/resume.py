"""The agent's deployment with delta, resume and catch-up (issue 9, docs/TRANSFER.md).

``deploy(agent, job, ...)`` is what ``Agent.run_once`` runs for an assigned session:

1. with the assignment's ``delta`` (the server sets it for a re-image of the same image
   family and for a machine resuming its session), hash the target against the assigned
   manifest first (phase "hashing"): the blocks that verify are declared held in the JOIN
   and never sent;
2. mode "multicast": receive the rest (client.receive.Receiver);
3. if the sender evicts this machine (too slow), or mode is "catchup" (the transfer is over,
   or it arrived late): hash again, then fetch what is still missing over HTTP
   (client/catchup.py, phase "catchup") and report ``via: "catchup"``.

Every block counted done was verified: by hash on the disk, by the multicast pipeline, or
by catch-up's decode_block. Progress and the result carry ``phase``, ``held_blocks`` and
``held_bytes`` (contract9.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from client.agent import Agent, AgentError, ProgressReporter
from client.catchup import BlockFetcher, CatchupError, catch_up
from client.delta import DiskHolding, ScanError, scan_disk
from client.disk import DiskError, Target, TargetError
from client.receive import ABORTED, EVICTED, FAILED, OK, REFUSED, Outcome, Receiver
from protocol.manifest import BlockKind, Manifest, ManifestError

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The server answered a progress report with ``cancel``."""


async def deploy(
    agent: Agent, job: dict[str, Any], manifest_bytes: bytes, iface: str, reporter: ProgressReporter
) -> tuple[Outcome, Receiver | None]:
    """Run one assigned session to an outcome (see the module docstring)."""
    session_id = int(job["session_id"])
    agent.phase_fields = {}
    try:
        manifest: Manifest | None = Manifest.from_bytes(manifest_bytes)
    except ManifestError as exc:
        if job.get("delta") or job.get("mode") == "catchup":
            return Outcome(FAILED, f"the assigned manifest is not usable: {exc}"), None
        manifest = None  # plain multicast needs none (it comes with the session)
    holding: DiskHolding | None = None
    receiver: Receiver | None = None
    if job.get("delta") and manifest is not None:
        holding, failed = await _hash(agent, session_id, manifest, None)
        if failed is not None:
            return failed, None
    spared = _held(holding)  # what the disk held before anything was transferred
    if str(job.get("mode") or "multicast") != "catchup":
        receiver = Receiver(
            key=bytes.fromhex(str(job["key"])),
            group=str(job["group"]),
            port=int(job["port"]),
            iface=iface,
            target=agent.options.target,
            progress=reporter,
            holding=holding,
        )
        agent.phase_fields = {"phase": "multicast", **spared}
        outcome = await agent._receive(session_id, receiver, reporter)
        outcome.stats.update({"via": "multicast", **spared})
        if outcome.result != EVICTED or manifest is None:
            return outcome, receiver
        log.warning("session %d: evicted (%s); finishing by catch-up", session_id, outcome.reason)
        holding, failed = await _hash(agent, session_id, manifest, spared)  # + what it wrote
        if failed is not None:
            return failed, receiver
    assert manifest is not None
    outcome = await asyncio.to_thread(_catch_up, agent, session_id, manifest, holding, spared)
    return outcome, receiver


def _held(holding: DiskHolding | None) -> dict[str, int]:
    if holding is None:
        return {"held_blocks": 0, "held_bytes": 0}
    return {"held_blocks": holding.data_blocks, "held_bytes": holding.data_bytes}


async def _hash(
    agent: Agent, session_id: int, manifest: Manifest, spared: dict[str, int] | None
) -> tuple[DiskHolding | None, Outcome | None]:
    """Scan the target (phase "hashing"); (holding, None), or (None, a failed outcome).

    Progress reports say ``spared`` as held, or what this scan found when None.
    """
    total = manifest.image_size - manifest.count(BlockKind.UNUSED) * manifest.block_size
    post = _Poster(agent, session_id, "hashing", total)
    post.held = {} if spared is None else spared
    scanned = [0]  # the scan's threads note progress here; never wait on HTTP themselves
    scan = asyncio.get_running_loop().create_task(
        asyncio.to_thread(
            scan_disk, agent.options.target, manifest, progress=lambda n: scanned.__setitem__(0, n)
        )
    )
    while not scan.done():
        await asyncio.wait({scan}, timeout=max(agent.progress_interval, 0.2))
        if not scan.done() and not post.cancelled:
            await asyncio.to_thread(post.scanned, scanned[0])
    try:
        holding = scan.result()
    except ScanError as exc:
        return None, Outcome(FAILED, str(exc), manifest, {"via": "multicast"})
    log.info(
        "session %d: the target holds %d data blocks (%.1f MiB) and %d zero blocks; "
        "hashed at %.0f MB/s",
        session_id,
        holding.data_blocks,
        holding.data_bytes / (1 << 20),
        holding.zero_blocks,
        holding.summary()["scan_mb_s"],
    )
    post.held = _held(holding) if spared is None else spared
    try:
        await asyncio.to_thread(post.send, holding.scanned_bytes, 0, True)
    except Cancelled as exc:
        post.cancelled = str(exc)
    if post.cancelled:
        return None, Outcome(ABORTED, post.cancelled, manifest, {"via": "multicast"})
    return holding, None


def _catch_up(
    agent: Agent,
    session_id: int,
    manifest: Manifest,
    holding: DiskHolding | None,
    spared: dict[str, int],
) -> Outcome:
    """Fetch every DATA block not held over HTTP; the outcome, reported ``via: catchup``.

    ``spared``: the held counters to report (what the disk had before any transfer).
    """
    assert agent.api is not None
    holding = holding or DiskHolding.nothing(manifest)
    data_blocks, data_bytes = manifest.count(BlockKind.DATA), manifest.data_bytes()
    post = _Poster(agent, session_id, "catchup", data_bytes)
    post.held = spared
    stats: dict[str, Any] = {**holding.summary(), "via": "catchup", **spared}
    try:
        target = Target.open(agent.options.target, manifest.image_size)
    except TargetError as exc:
        return Outcome(REFUSED, str(exc), manifest, stats)
    fetcher = BlockFetcher(agent.options.server, agent.api.token, session_id)

    def progress(blocks: int, raw: int) -> None:
        post.send(holding.data_bytes + raw, holding.data_blocks + blocks, False)

    try:
        post.send(holding.data_bytes, holding.data_blocks, True)
        done = catch_up(
            fetcher, manifest, target, holding.missing_data(), held=holding.held, progress=progress
        )
    except (CatchupError, DiskError) as exc:
        stats.update(fetcher.stats.as_dict())
        return Outcome(FAILED, f"catch-up failed: {exc}", manifest, stats)
    except Cancelled as exc:
        stats.update(fetcher.stats.as_dict())
        return Outcome(ABORTED, str(exc), manifest, stats)
    finally:
        fetcher.close()
        target.close()
    stats.update(done.as_dict())
    stats.update(verified_blocks=data_blocks, verified_bytes=data_bytes)
    log.info(
        "session %d: catch-up fetched %d blocks (%.1f MiB) in %.1f s",
        session_id,
        done.blocks,
        done.raw_bytes / (1 << 20),
        done.seconds,
    )
    return Outcome(OK, "", manifest, stats)


class _Poster:
    """Progress reports of one phase, at most every ``agent.progress_interval`` seconds."""

    def __init__(self, agent: Agent, session_id: int, phase: str, total: int) -> None:
        self.agent, self.session_id, self.phase, self.total = agent, session_id, phase, total
        self.held: dict[str, int] = {}
        self.cancelled = ""
        self._last = 0.0
        self._started = time.monotonic()

    def scanned(self, done: int) -> None:
        """While hashing: a cancel is noted, and acted on when the scan ends."""
        try:
            self.send(done, 0, False)
        except Cancelled as exc:
            self.cancelled = str(exc)

    def send(self, done: int, blocks: int, force: bool) -> None:
        """Post one sample; raises Cancelled when the server says to stop."""
        now = time.monotonic()
        if not force and now - self._last < self.agent.progress_interval:
            return
        self._last = now
        api = self.agent.api
        assert api is not None
        rate = done * 8 / max(now - self._started, 1e-6)
        body = {
            "session_id": self.session_id,
            "samples": [
                {
                    "bytes_done": min(done, self.total),
                    "bytes_total": self.total,
                    "blocks_done": blocks,
                    "rate_bps": rate,
                }
            ],
            "phase": self.phase,
            **self.held,
        }
        try:
            status, reply = api.call("POST", "/api/agent/progress", body)
        except AgentError as exc:  # progress is best effort; the result is what counts
            log.warning("session %d: progress not sent: %s", self.session_id, exc)
            return
        if status == 200 and isinstance(reply, dict) and reply.get("cancel"):
            raise Cancelled(str(reply.get("reason") or "the server cancelled the session"))
