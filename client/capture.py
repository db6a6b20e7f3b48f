"""Capture mode: read this machine's disk and upload it to the server as an image (issue 10).

The same walk as the server's own capture (imaging/walk.py: partition table, partclone
used-block maps, zero and hole detection), so the same disk gives the same manifest either
way. Three stages overlap, with memory bounded by ``slots`` (blocks in flight):

1. the caller's thread reads the disk block by block and hands each data block to a thread
   pool that hashes it (hashlib and zstd release the GIL), cutting them into batches;
2. one uploader thread owns the HTTP connection (client/upload.py): per batch it asks the
   server which digests it lacks (``have``), has the pool compress those (stored raw when
   zstd does not shrink them, as the store does) and ``PUT``s them one after another; the
   blocks the server has already cost nothing but their digest;
3. when all blocks are settled, the manifest is sent; the server checks every block is
   stored, adds the image and the session succeeds.

Resumable: a network drop is retried with growing pauses (bounded), after which ``have`` is
asked again for what is still to send; after a reboot the capture starts over and the
server's ``have`` already knows every block that arrived, so only the rest is uploaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.disk import device_in_use
from client.upload import CaptureApi, UploadError
from imaging.walk import BlockWalker, DiskFile, ShortRead, analyse, new_manifest
from protocol.codec import MAX_LEVEL, MIN_LEVEL, block_digest, compress_block
from protocol.manifest import DEFAULT_BLOCK_SIZE, Manifest, ManifestError

if TYPE_CHECKING:
    from client.agent import Agent

log = logging.getLogger(__name__)

#: Data blocks per ``have`` call (and per uploader step).
BATCH_BLOCKS = 32
#: ``have`` rounds per batch before a block the server keeps missing fails the capture.
MAX_ROUNDS = 5


class CaptureFailed(Exception):
    """The capture cannot go on; the message says what went wrong and what to do."""


class CaptureCancelled(CaptureFailed):
    """The server cancelled the capture session."""


@dataclass
class CaptureStats:
    """What one capture run did (the result's ``stats``)."""

    uploaded_blocks: int = 0  #: blocks this run sent (the server lacked them)
    uploaded_bytes: int = 0  #: their payload bytes on the wire
    reused_blocks: int = 0  #: data blocks of the image not sent (the server had them)
    read_bytes: int = 0  #: raw bytes read from the disk
    data_blocks: int = 0  #: data blocks of the image


@dataclass(frozen=True)
class CaptureJob:
    """A capture assignment: which session, the image name, block size and zstd level."""

    session_id: int
    image: str
    block_size: int = DEFAULT_BLOCK_SIZE
    level: int = 3

    @classmethod
    def from_assignment(cls, job: dict[str, Any]) -> CaptureJob:
        """From GET /api/agent/assignment's reply (kind "capture"); raises CaptureFailed."""
        try:
            made = cls(
                session_id=int(job["session_id"]),
                image=str(job.get("image") or ""),
                block_size=int(job.get("block_size") or DEFAULT_BLOCK_SIZE),
                level=int(job.get("level") or 3),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CaptureFailed(f"the capture assignment is malformed: {exc}") from None
        if not MIN_LEVEL <= made.level <= MAX_LEVEL:
            raise CaptureFailed(f"zstd level {made.level} is not {MIN_LEVEL}..{MAX_LEVEL}")
        return made


@contextlib.contextmanager
def open_disk(path: str | os.PathLike[str]) -> Iterator[DiskFile]:
    """Open ``path`` read-only for capture; raises CaptureFailed if it is unusable or in use."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CaptureFailed(f"cannot read the disk {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            busy = device_in_use(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
            if busy:
                raise CaptureFailed(f"the disk {p} is in use ({busy}): unmount it first")
            size, is_block = os.lseek(fd, 0, os.SEEK_END), True
        elif stat.S_ISREG(st.st_mode):
            size, is_block = st.st_size, False
        else:
            raise CaptureFailed(f"{p} is neither a block device nor a disk image file")
        if size == 0 or size % 512:
            raise CaptureFailed(f"{p} holds {size} bytes, not a whole number of sectors")
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield DiskFile(p, fd, size, is_block)
    finally:
        os.close(fd)


@dataclass
class _Batch:
    """Data blocks read and being hashed, handed to the uploader together."""

    blocks: list[tuple[int, bytearray, Future[bytes]]] = field(default_factory=list)


class Capturer:
    """One capture run of a disk into a capture session. ``run()`` once."""

    def __init__(
        self,
        api: CaptureApi,
        job: CaptureJob,
        disk: str | os.PathLike[str],
        *,
        threads: int = 0,
        batch_blocks: int = BATCH_BLOCKS,
        created: str = "",
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self.api, self.job, self.disk = api, job, disk
        self.threads = threads or max(os.cpu_count() or 2, 2)
        self.batch_blocks = max(batch_blocks, 1)
        self.created, self.warn = created, warn
        self.stats = CaptureStats()
        self.phase = "reading"  #: "reading" while the disk is read, then "uploading"
        self.total = 0  #: raw bytes the walk reads (known once the maps are taken)
        self._walker: BlockWalker | None = None
        self._data_seen = 0  # raw bytes of the data blocks read so far
        self._data_settled = 0  # ... of those the server has now
        self.manifest: Manifest | None = None
        self.cancelled = threading.Event()
        self.cancel_reason = ""
        self._known: dict[bytes, int] = {}  # digest -> stored size on the server
        self._slots = threading.BoundedSemaphore(2 * self.batch_blocks + self.threads)
        self._error: BaseException | None = None

    def cancel(self, reason: str = "the capture was cancelled") -> None:
        """Stop at the next block (from any thread)."""
        self.cancel_reason = reason
        self.cancelled.set()

    def run(self) -> tuple[Manifest, dict[str, Any]]:
        """Read, upload, send the manifest; (the manifest, the server's reply).

        Raises CaptureFailed (or CaptureCancelled), with the block and reason when the
        server refused one.
        """
        try:
            with open_disk(self.disk) as src:
                m = new_manifest(src, self.job.level, self.job.block_size, created=self.created)
                used = analyse(src, m, True, self.warn)
                walker = BlockWalker(src, m, used)
                self.total, self.manifest, self._walker = walker.to_read(), m, walker
                self._pipeline(walker)
                self.stats.read_bytes = walker.read_bytes
                m.image_sha256 = walker.image_sha256()
            reply = self.api.post_manifest(m.to_bytes())
        except ShortRead as exc:
            raise CaptureFailed(str(exc)) from None
        except (UploadError, ManifestError, OSError, ValueError) as exc:
            # ValueError: the server's 'have' gave a stored size the block cannot have
            raise CaptureFailed(str(exc)) from None
        finally:
            self.api.close()
        if str(reply.get("digest", "")) not in ("", m.digest().hex()):
            raise CaptureFailed("the server stored a manifest other than the one sent")
        return m, reply

    # -- the pipeline -----------------------------------------------------------------------

    def _pipeline(self, walker: BlockWalker) -> None:
        batches: queue.Queue[_Batch | None] = queue.Queue(maxsize=2)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="capture") as pool:
            uploader = threading.Thread(
                target=self._upload_all, args=(batches, pool), name="capture-upload", daemon=True
            )
            uploader.start()
            try:
                self._read_all(walker, batches, pool)
            finally:
                self.phase = "uploading"
                batches.put(None)
                uploader.join()
        if self._error is not None:
            raise self._error
        if self.cancelled.is_set():
            raise CaptureCancelled(self.cancel_reason)

    def _read_all(
        self, walker: BlockWalker, batches: queue.Queue[_Batch | None], pool: ThreadPoolExecutor
    ) -> None:
        batch = _Batch()
        for index, buf in walker:
            if self._error is not None or self.cancelled.is_set():
                return
            if buf is None:
                continue
            while not self._slots.acquire(timeout=0.5):
                if self._error is not None or self.cancelled.is_set():
                    return
            batch.blocks.append((index, buf, pool.submit(block_digest, buf)))
            self._data_seen += len(buf)
            if len(batch.blocks) >= self.batch_blocks:
                self._hand_over(batches, batch)
                batch = _Batch()
        self._hand_over(batches, batch)

    def _hand_over(self, batches: queue.Queue[_Batch | None], batch: _Batch) -> None:
        while self._error is None and not self.cancelled.is_set():
            with contextlib.suppress(queue.Full):
                batches.put(batch, timeout=0.5)
                return

    def _upload_all(self, batches: queue.Queue[_Batch | None], pool: ThreadPoolExecutor) -> None:
        """The uploader thread: settle each batch in order; keep the first error."""
        while True:
            batch = batches.get()
            if batch is None:
                return
            try:
                if self._error is None and not self.cancelled.is_set():
                    self._settle(batch, pool)
            except BaseException as exc:  # handed to the reading thread, raised there
                self._error = exc
            finally:
                for _ in batch.blocks:
                    self._slots.release()

    def _settle(self, batch: _Batch, pool: ThreadPoolExecutor) -> None:
        """Make sure the server has every block of ``batch``; record them in the manifest."""
        assert self.manifest is not None
        digests = [fut.result() for _, _, fut in batch.blocks]
        raw: dict[bytes, bytearray] = {}
        for (_, buf, _), d in zip(batch.blocks, digests, strict=True):
            if d not in self._known:
                raw.setdefault(d, buf)
        todo = list(raw)
        for _ in range(MAX_ROUNDS):
            if not todo:
                break
            retries = self.api.retries
            missing, present = self.api.have(todo)
            self._known.update((d, n) for d, n in present.items() if d in raw)
            missing = [d for d in missing if d in raw and d not in self._known]
            payloads = {d: pool.submit(compress_block, raw[d], self.job.level) for d in missing}
            for d in missing:
                if self.cancelled.is_set():
                    return
                payload = payloads[d].result()
                if self.api.put_block(d, payload, len(raw[d])):
                    self.stats.uploaded_blocks += 1
                    self.stats.uploaded_bytes += len(payload)
                    self._known[d] = len(payload)
                # else it was there already, maybe stored otherwise: 'have' says its size
                if self.api.retries != retries:
                    break  # the connection dropped: ask again what is still missing
            todo = [d for d in todo if d not in self._known]
        if todo:
            raise CaptureFailed(
                f"the server keeps answering that block {todo[0].hex()} is missing after "
                f"{MAX_ROUNDS} uploads of it: check the server's image store"
            )
        for (index, buf, _), d in zip(batch.blocks, digests, strict=True):
            self.manifest.set_data(index, d, self._known[d])
            self._data_settled += len(buf)
        self.stats.data_blocks += len(digests)
        self.stats.reused_blocks = self.stats.data_blocks - self.stats.uploaded_blocks

    @property
    def settled(self) -> int:
        """Raw bytes walked that are done: zero blocks, and data blocks the server has."""
        if self._walker is None:
            return 0
        self.stats.read_bytes = self._walker.read_bytes
        return self._walker.done_bytes - self._data_seen + self._data_settled

    def sample(self, started: float) -> dict[str, Any]:
        """One progress sample for POST /api/agent/progress (with the counters)."""
        elapsed = max(time.monotonic() - started, 1e-6)
        return {
            "bytes_done": self.settled,
            "bytes_total": self.total,
            "blocks_done": self.stats.data_blocks,
            "rate_bps": self.settled * 8 / elapsed,
            **{k: v for k, v in asdict(self.stats).items() if k != "data_blocks"},
        }


# -- the agent's capture assignment -----------------------------------------------------------


def run_capture(agent: Agent, job: dict[str, Any]) -> dict[str, Any]:
    """Run the capture ``job`` (an assignment of kind "capture") with ``agent``'s credential.

    Reads ``agent.options.target`` (or, when empty, the disk the session's ``disk_rule``
    names), reports progress every ``agent.progress_interval`` seconds, POSTs the result and
    returns the verdict (``state``, ``result``, ``reason``, ``after``, ``stats``) as
    Agent.run_once does.
    """
    assert agent.api is not None, "register() first"
    started = time.monotonic()
    capturer: Capturer | None = None
    digest, result, reason = "", "verified", ""
    try:
        cj = CaptureJob.from_assignment(job)
        disk = agent.options.target or _disk_by_rule(str(job.get("disk_rule") or "auto"))
        log.info("session %d: capturing %s as image %r", cj.session_id, disk, cj.image)
        api = CaptureApi(agent.options.server, agent.api.token, cj.session_id)
        capturer = Capturer(api, cj, disk)
        with _Reporter(agent, cj.session_id, capturer, started):
            manifest, _ = capturer.run()
        digest = manifest.digest().hex()
    except CaptureCancelled as exc:
        result, reason = "aborted", str(exc)
    except CaptureFailed as exc:
        result, reason = "failed", str(exc)
    stats = asdict(capturer.stats) if capturer is not None else {}
    secs = time.monotonic() - started
    log.info("session %d: capture %s in %.1f s %s %s", int(job["session_id"]), result, secs,
             reason, stats)  # fmt: skip
    body = {
        "session_id": int(job["session_id"]),
        "result": result,
        "reason": reason[:2048],
        "bytes_done": int(stats.get("read_bytes", 0)),
        "blocks_done": int(stats.get("data_blocks", 0)),
        "manifest_digest": digest,
        "stats": {**stats, "seconds": round(secs, 3)},
    }
    status, reply = agent.api.call("POST", "/api/agent/result", body)
    verdict = dict(reply) if isinstance(reply, dict) else {}
    if status != 200:
        verdict["state"] = f"not recorded: HTTP {status} {reply}"
    verdict.setdefault("state", "succeeded" if result == "verified" else result)
    verdict.update(result=result, reason=reason, stats=stats, kind="capture")
    verdict["after"] = str(job.get("after") or "")
    verdict["disk_rule"] = str(job.get("disk_rule") or "")
    return verdict


def _disk_by_rule(rule: str) -> str:
    from client.boot import BootError, list_disks, pick_disk

    try:
        return f"/dev/{pick_disk(rule, list_disks()).name}"
    except BootError as exc:
        raise CaptureFailed(str(exc)) from None


class _Reporter:
    """A thread posting the capture's progress every progress_interval; a reply ``cancel``
    cancels the capture."""

    def __init__(self, agent: Agent, session_id: int, capturer: Capturer, started: float) -> None:
        self.agent, self.session_id, self.capturer, self.started = (
            agent, session_id, capturer, started
        )  # fmt: skip
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="capture-progress", daemon=True)

    def __enter__(self) -> _Reporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        interval = max(self.agent.progress_interval, 0.2)
        while not self.stop.wait(interval):
            self.report()

    def report(self) -> None:
        c = self.capturer
        sample = c.sample(self.started)
        body = {"session_id": self.session_id, "phase": c.phase, "samples": [sample]}
        if c.total:
            log.info(
                "session %d: %s %5.1f%% (%s of %s MiB), %d blocks uploaded (%.1f MiB), %d reused",
                self.session_id, c.phase, 100 * sample["bytes_done"] / c.total,
                f"{sample['bytes_done'] / 2**20:,.0f}", f"{c.total / 2**20:,.0f}",
                c.stats.uploaded_blocks, c.stats.uploaded_bytes / 2**20, c.stats.reused_blocks,
            )  # fmt: skip
        assert self.agent.api is not None
        try:
            status, reply = self.agent.api.call("POST", "/api/agent/progress", body)
        except Exception as exc:  # progress is best effort; the result is what counts
            log.warning("session %d: progress not sent: %s", self.session_id, exc)
            return
        if status == 200 and isinstance(reply, dict) and reply.get("cancel"):
            reason = str(reply.get("reason") or "the server cancelled the capture")
            log.info("session %d: cancelled: %s", self.session_id, reason)
            c.cancel(reason)
