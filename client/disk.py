"""The receiver's target: a file or a block device that ends byte-identical to the image.

``Target.open(path, image_size)`` refuses, before anything is written, a target that is
mounted (or holds a mounted partition, is swap, is held by device-mapper/md, or backs a loop
device), is read-only, or is smaller than the image; the error says what to do. It then
writes data blocks with large ``pwrite`` calls, turns ZERO blocks into zeros (a punched hole
in a file, ``BLKZEROOUT`` on a device, plain writes where neither works) unless the caller
knows the target is blank, and ``sync()``s before the caller reports success. A failing
disk (ENOSPC, EIO, ...) raises DiskError with the offset and the reason.

Blocking calls: run them off the event loop (client/pipeline.py does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

# <linux/fs.h>
BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
BLKRRPART = 0x125F
# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 4 << 20
_ZEROS = bytes(_ZERO_CHUNK)


class TargetError(Exception):
    """The target was refused before anything was written; the message says why."""


class DiskError(Exception):
    """Writing or syncing the target failed (ENOSPC, EIO, ...); ``errno`` is kept."""

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno = err


@dataclass
class TargetStats:
    """What a Target did, for the receiver's summary line."""

    bytes_written: int = 0
    bytes_zeroed: int = 0  #: zero ranges made zero (holes, BLKZEROOUT or writes)
    zero_method: str = ""  #: "punch-hole", "blkzeroout", "write" or "" (nothing zeroed)


@dataclass
class Target:
    """An open, checked target. Create with ``Target.open``."""

    path: str
    fd: int
    is_device: bool
    image_size: int
    assume_blank: bool = False
    stats: TargetStats = field(default_factory=TargetStats)
    _punch_ok: bool = True
    _zeroout_ok: bool = True

    # -- opening ----------------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], image_size: int, *, assume_blank: bool = False
    ) -> Target:
        """Check and open ``path`` for an image of ``image_size`` bytes.

        A missing file is created; a file shorter than the image is grown (sparse).
        Raises TargetError, before writing anything, for a mounted, busy, read-only,
        too small or unsuitable target.
        """
        p = str(path)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return cls._create_file(p, image_size, assume_blank)
        except OSError as exc:
            raise TargetError(f"cannot use target {p}: {exc.strerror}") from None
        if stat.S_ISBLK(st.st_mode):
            return cls._open_device(p, st, image_size, assume_blank)
        if stat.S_ISREG(st.st_mode):
            return cls._open_file(p, st, image_size, assume_blank)
        raise TargetError(f"target {p} is neither a regular file nor a block device")

    @classmethod
    def _create_file(cls, p: str, image_size: int, assume_blank: bool) -> Target:
        parent = os.path.dirname(os.path.abspath(p))
        if not os.path.isdir(parent):
            raise TargetError(f"cannot create target {p}: directory {parent} does not exist")
        _refuse_readonly_fs(p, parent)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise TargetError(f"cannot create target {p}: {exc.strerror}") from None
        target = cls(p, fd, False, image_size, assume_blank=True)
        target._grow()
        return target

    @classmethod
    def _open_file(cls, p: str, st: os.stat_result, image_size: int, assume_blank: bool) -> Target:
        loop = _loop_backing(p, st)
        if loop:
            raise TargetError(
                f"target {p} backs loop device {loop}; detach it first (losetup -d {loop})"
            )
        _refuse_readonly_fs(p, p)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TargetError(f"target {p} is not writable: {exc.strerror}") from None
        target = cls(p, fd, False, image_size, assume_blank=assume_blank)
        target._grow()
        return target

    @classmethod
    def _open_device(
        cls, p: str, st: os.stat_result, image_size: int, assume_blank: bool
    ) -> Target:
        majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        busy = device_in_use(majmin)
        if busy:
            raise TargetError(f"target {p} is in use ({busy}); unmount or release it first")
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ro = struct.unpack("i", fcntl.ioctl(fd, BLKROGET, b"\0" * 4))[0]
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        finally:
            os.close(fd)
        if ro:
            raise TargetError(f"target {p} is a read-only device; make it writable first")
        if size < image_size:
            raise TargetError(
                f"target {p} holds {size} bytes but the image needs {image_size}; use a larger disk"
            )
        try:
            fd = os.open(p, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            why = "it is busy (mounted or held)" if exc.errno == errno.EBUSY else exc.strerror
            raise TargetError(f"cannot open target {p} for writing: {why}") from None
        return cls(p, fd, True, image_size, assume_blank=assume_blank)

    def _grow(self) -> None:
        size = os.fstat(self.fd).st_size
        if size < self.image_size:
            try:
                os.ftruncate(self.fd, self.image_size)
            except OSError as exc:
                os.close(self.fd)
                raise TargetError(
                    f"cannot grow target {self.path} to {self.image_size} bytes: {exc.strerror}"
                ) from None

    # -- writing ----------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` in as few ``pwrite`` calls as the kernel allows."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise self._failure("writing", offset + done, exc) from None
            if n == 0:
                raise DiskError(f"writing {self.path} at offset {offset + done} made no progress")
            done += n
        self.stats.bytes_written += done

    def zero(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros (nothing if assumed blank)."""
        if self.assume_blank or length <= 0:
            return
        if not self.is_device and self._punch_ok and self._punch(offset, length):
            self._zeroed(length, "punch-hole")
            return
        if self.is_device and self._zeroout_ok and self._blkzeroout(offset, length):
            self._zeroed(length, "blkzeroout")
            return
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.write(offset, memoryview(_ZEROS)[:n])
            self.stats.bytes_written -= n
            offset += n
        self._zeroed(length, "write")

    def sync(self) -> None:
        """fsync: everything written is on stable storage when this returns."""
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise self._failure("syncing", 0, exc) from None

    def reread_partitions(self) -> str:
        """Ask the kernel to re-read a device's partition table; "" or why it could not.

        Best effort after a successful write: the new partitions appear at once (for a
        check, or for the next boot step) instead of after a reboot. Files: nothing to do.
        """
        if not self.is_device:
            return ""
        try:
            fcntl.ioctl(self.fd, BLKRRPART)
        except OSError as exc:
            return f"the kernel did not re-read the partition table: {exc.strerror}"
        return ""

    def close(self) -> None:
        """Close the target (idempotent). Does not sync: call ``sync()`` first."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- internals --------------------------------------------------------------------

    def _zeroed(self, length: int, method: str) -> None:
        self.stats.bytes_zeroed += length
        self.stats.zero_method = self.stats.zero_method or method

    def _punch(self, offset: int, length: int) -> bool:
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        rc = _fallocate(self.fd, mode, offset, length)
        if rc == 0:
            return True
        if rc in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            self._punch_ok = False
            return False
        raise self._failure("punching a hole in", offset, OSError(rc, os.strerror(rc)))

    def _blkzeroout(self, offset: int, length: int) -> bool:
        if offset % 512 or length % 512:
            return False
        try:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                self._zeroout_ok = False
                return False
            raise self._failure("zeroing", offset, exc) from None
        return True

    def _failure(self, what: str, offset: int, exc: OSError) -> DiskError:
        hint = {
            errno.ENOSPC: "the filesystem holding the target is full; free space or use a disk",
            errno.EIO: "the disk reported an I/O error; check its health (dmesg, smartctl)",
            errno.EDQUOT: "a disk quota is exhausted",
        }.get(exc.errno or 0, "check the target disk")
        return DiskError(
            f"{what} {self.path} at offset {offset} failed: {exc.strerror} ({hint})", exc.errno
        )


# -- checks -----------------------------------------------------------------------------


def parse_mountinfo(text: str) -> dict[str, list[str]]:
    """``major:minor`` -> mount points, from /proc/self/mountinfo text."""
    mounts: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5:
            mounts.setdefault(fields[2], []).append(fields[4])
    return mounts


def device_in_use(majmin: str, *, sys_root: str = "/sys", proc_root: str = "/proc") -> str:
    """Why block device ``majmin`` (or one of its partitions) is in use, or "" if free."""
    try:
        mounts = parse_mountinfo(Path(proc_root, "self/mountinfo").read_text())
    except OSError:
        mounts = {}
    devdir = Path(sys_root, "dev/block", majmin)
    devices = [(majmin, devdir.resolve().name)]
    if devdir.is_dir():
        for child in sorted(devdir.resolve().iterdir()):
            if (child / "partition").exists() and (child / "dev").exists():
                devices.append(((child / "dev").read_text().strip(), child.name))
    swaps = _swap_names(proc_root)
    for dev, name in devices:
        if dev in mounts:
            return f"{name} is mounted on {', '.join(mounts[dev])}"
        if name in swaps:
            return f"{name} is active swap"
        holders = Path(sys_root, "dev/block", dev, "holders")
        if holders.is_dir() and any(holders.iterdir()):
            held = ", ".join(sorted(h.name for h in holders.iterdir()))
            return f"{name} is held by {held}"
    return ""


def _swap_names(proc_root: str) -> set[str]:
    try:
        lines = Path(proc_root, "swaps").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {os.path.basename(line.split()[0]) for line in lines if line.strip()}


def _loop_backing(p: str, st: os.stat_result) -> str:
    """The loop device backed by file ``p``, or ""."""
    real = os.path.realpath(p)
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            named = backing.read_text().strip()
        except OSError:
            continue
        named = named.removesuffix(" (deleted)")
        try:
            same = os.path.realpath(named) == real or (
                os.stat(named).st_ino == st.st_ino and (os.stat(named).st_dev == st.st_dev)
            )
        except OSError:
            same = False
        if same:
            return "/dev/" + backing.parent.parent.name
    return ""


def _refuse_readonly_fs(p: str, where: str) -> None:
    try:
        flags = os.statvfs(where).f_flag
    except OSError:
        return
    if flags & os.ST_RDONLY:
        raise TargetError(f"target {p} is on a read-only filesystem; choose a writable place")


_libc: ctypes.CDLL | None = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) via libc: 0 on success, else the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        _libc.fallocate64.restype = ctypes.c_int
    rc: int = _libc.fallocate64(fd, mode, offset, length)
    return 0 if rc == 0 else ctypes.get_errno()
