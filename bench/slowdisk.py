"""A directory whose writes are throttled: a slow disk for the "slow writer" scenario.

Why FUSE: this machine mounts cgroup v2 without the io controller (blkio is on cgroup v1,
whose throttle only sees direct I/O and the writer's own fsync, never page-cache writeback),
so an ``io.max`` on a loop device would not slow a buffered writer down until its final
fsync. A FUSE file system without a writeback cache instead hands every ``write(2)`` to this
process before it returns, so a token bucket here really limits the writer's bandwidth, the
same way for every tool: a receiver can write no faster than ``rate`` bytes/s, and one that
buffers ahead stalls when its buffers fill, as on a slow disk. The files live in ``backing``
(tmpfs), so the bucket is the only limit.

``with SlowDisk(backing, size_hint, rate=50e6) as mnt:`` mounts it (a child process, stopped
by its PID after ``umount``); ``python -m bench.slowdisk BACKING MOUNT --rate 50M`` serves one
in the foreground. Needs root, /dev/fuse, libfuse2 and the ``fusepy`` package (the ``bench``
extra).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

DEFAULT_RATE = 50e6  #: bytes/s: a slow spinning disk or a USB stick


class TokenBucket:
    """Allows ``rate`` bytes/s with a burst of ``burst`` bytes; ``take`` sleeps as needed."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            self.tokens -= n
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def make_operations(backing: str, rate: float) -> Any:
    """A fusepy passthrough over ``backing`` whose write() is paced by a TokenBucket."""
    from fuse import FuseOSError, LoggingMixIn, Operations  # noqa: F401 (optional dependency)

    bucket = TokenBucket(rate, burst=min(rate / 10, 4 << 20))

    class Passthrough(Operations):  # type: ignore[misc]
        def _p(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            try:
                st = os.lstat(self._p(path))
            except OSError as exc:
                raise FuseOSError(exc.errno or errno.EIO) from None
            keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_atime", "st_mtime")
            return {k: getattr(st, k) for k in (*keys, "st_ctime", "st_blocks")}

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._p(path))]

        def statfs(self, path: str) -> dict[str, Any]:
            sv = os.statvfs(self._p(path))
            keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree")
            return {k: getattr(sv, k) for k in (*keys, "f_files", "f_frsize", "f_namemax")}

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            return os.open(self._p(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

        def open(self, path: str, flags: int) -> int:
            return os.open(self._p(path), flags & ~os.O_APPEND)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            bucket.take(len(data))
            return os.pwrite(fh, data, offset)

        def truncate(self, path: str, length: int, fh: int | None = None) -> None:
            os.truncate(self._p(path), length)

        def fsync(self, path: str, datasync: int, fh: int) -> None:
            os.fsync(fh)

        def flush(self, path: str, fh: int) -> None:
            return None

        def release(self, path: str, fh: int) -> None:
            os.close(fh)

        def unlink(self, path: str) -> None:
            os.unlink(self._p(path))

        def rename(self, old: str, new: str) -> None:
            os.rename(self._p(old), self._p(new))

        def mkdir(self, path: str, mode: int) -> None:
            os.mkdir(self._p(path), mode)

        def chmod(self, path: str, mode: int) -> None:
            os.chmod(self._p(path), mode)

        def chown(self, path: str, uid: int, gid: int) -> None:
            os.chown(self._p(path), uid, gid)

        def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
            os.utime(self._p(path), times)

    return Passthrough()


class SlowDisk:
    """Context manager: a throttled FUSE mount at ``root/mnt`` over ``root/backing``."""

    def __init__(self, root: Path, size_hint: int = 0, rate: float = DEFAULT_RATE) -> None:
        self.root = root
        self.rate = rate
        self.mount = root / "mnt"
        self.backing = root / "backing"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Path:
        self.mount.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "bench.slowdisk", str(self.backing), str(self.mount)]
        log = open(self.root / "slowdisk.log", "wb")
        with log:
            self.proc = subprocess.Popen(
                [*argv, "--rate", str(int(self.rate))],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(Path(__file__).resolve().parents[1]),
            )
        deadline = time.monotonic() + 10
        while not os.path.ismount(self.mount):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                text = (self.root / "slowdisk.log").read_text(errors="replace")
                raise RuntimeError(f"the throttled FUSE disk did not mount: {text.strip()}")
            time.sleep(0.05)
        return self.mount

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if os.path.ismount(self.mount):
            subprocess.run(["umount", "-l", str(self.mount)], capture_output=True, timeout=30)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, 9)
                self.proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    from fuse import FUSE

    from bench.disks import parse_size

    p = argparse.ArgumentParser(prog="python -m bench.slowdisk", description=__doc__.split("\n")[0])
    p.add_argument("backing")
    p.add_argument("mount")
    p.add_argument("--rate", default=str(int(DEFAULT_RATE)), help="bytes/s, e.g. 50M")
    a = p.parse_args(argv)
    rate = parse_size(a.rate) if not a.rate.isdigit() else int(a.rate)
    ops = make_operations(os.path.abspath(a.backing), float(rate))
    FUSE(ops, a.mount, foreground=True, nothreads=True, big_writes=True, max_write=1 << 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
