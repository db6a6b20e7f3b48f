"""The content-addressed image store (docs/FORMAT.md §5).

Layout under the store's root (``Settings().image_root``)::

    blocks/ab/ab12...ef   one payload per unique block, named by the raw content's SHA-256
    manifests/NAME.json   canonical manifest bytes; "/" in a name is stored as "%2F"
    tmp/                  temp files "<pid>-<random>.tmp" and capture markers "<pid>-<random>.run"
    readers/NAME.lock     per-image flock: readers (send, export) share it, delete takes it alone
    readers/NAME@<pid>-<random>.holder   who holds a reader lease (text), for delete's message
    pins/KEY.pin          blocks an open network capture uploaded or was told are present
                          (one hex digest a line): gc and delete keep them until unpinned
    lock                  flock: writers (capture/import) share it, delete/gc take it alone

Every file is written to ``tmp/``, fsynced and renamed into place, and a manifest is added
last, only after every block it names is durable; so a killed capture leaves at most
unreferenced blocks and temp files, never an image that lists. Those leftovers belong to
a dead process (by the pid in their name) and the next writer or ``gc`` removes them.

``read_block`` is a plain open/read: the sender calls it on its event loop thread. A
reader that must not lose the image half way (``fleetcast send``, export) holds
``store.reading(name)``: delete then refuses, naming the holder.

A network capture (server/services/capture.py) has no manifest until its last call, so its
blocks would look unreferenced to ``gc``. Each such capture holds a *pin*: every block it
uploads or is told the store has is appended to ``pins/KEY.pin`` (fsynced, under the shared
lock, before the block is written), and ``gc``/``delete_image`` count pinned blocks as
referenced. ``unpin(KEY)`` releases them when the capture ends; a pin outlives a crash of
the server, so an interrupted capture resumes with its blocks intact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from urllib.parse import quote, unquote

from protocol.manifest import BlockKind, Manifest, ManifestError

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 128
_NAME_RE = re.compile(r"[A-Za-z0-9._/-]+")
_PIN_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
#: How long a writer waits for a running delete/gc to finish before giving up.
LOCK_WAIT_SECONDS = 60.0


class StoreError(Exception):
    """Something the user asked of the store cannot be done; the message says why."""


class ImageNotFound(StoreError, LookupError):
    """No image of that name."""


class ImageExists(StoreError):
    """An image of that name is already in the store."""


class InvalidImageName(StoreError, ValueError):
    """The name breaks the naming rules."""


class StoreBusy(StoreError):
    """Another process holds the store's lock."""


class ImageInUse(StoreBusy):
    """A reader (a running send or export) holds the image: it cannot be deleted now."""


@dataclass(frozen=True)
class ImageInfo:
    name: str
    manifest: Manifest
    digest: bytes  #: SHA-256 of the canonical manifest bytes


@dataclass(frozen=True)
class SweepResult:
    blocks_removed: int
    bytes_removed: int
    temp_files_removed: int


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid image name, else raise InvalidImageName.

    Letters, digits, ``._-`` and ``/`` (for ``<machine>/<date>``), at most 128 characters,
    no leading or trailing ``/``, no empty, ``.`` or ``..`` path segment.
    """
    problem = ""
    if not name:
        problem = "it is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    elif not _NAME_RE.fullmatch(name):
        problem = "only letters, digits, '.', '_', '-' and '/' are allowed"
    elif any(seg in ("", ".", "..") for seg in name.split("/")):
        problem = "it has an empty, '.' or '..' path segment or a leading/trailing '/'"
    if problem:
        raise InvalidImageName(f"invalid image name {name!r}: {problem}")
    return name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ImageStore:
    """Images (manifests) and their deduplicated blocks under one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blocks_dir = self.root / "blocks"
        self.manifests_dir = self.root / "manifests"
        self.tmp_dir = self.root / "tmp"
        self.readers_dir = self.root / "readers"
        self.pins_dir = self.root / "pins"
        self._dirty_dirs: set[Path] = set()
        self._dirty_lock = threading.Lock()

    # -- reading (no lock: files only ever appear complete) ---------------------------

    def manifest_path(self, name: str) -> Path:
        return self.manifests_dir / (quote(check_name(name), safe="") + ".json")

    def block_path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.blocks_dir / h[:2] / h

    def read_block(self, digest: bytes) -> bytes:
        """The stored payload of a block (zstd frame, or raw iff its length is the block's)."""
        with open(self.block_path(digest), "rb") as f:
            return f.read()

    def has_block(self, digest: bytes) -> bool:
        return self.block_path(digest).exists()

    def stored_size(self, digest: bytes) -> int | None:
        """The payload size of a stored block, or None if the store does not have it."""
        try:
            return self.block_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.manifest_path(name).exists()

    def load_manifest(self, name: str) -> tuple[bytes, Manifest]:
        """Canonical manifest bytes and the parsed manifest; raises ImageNotFound."""
        path = self.manifest_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(
                f"no image named {name!r} in {self.root} (see 'fleetcast image list')"
            ) from None
        try:
            return data, Manifest.from_bytes(data)
        except ManifestError as exc:
            raise StoreError(f"manifest of image {name!r} ({path}) is damaged: {exc}") from exc

    def image_names(self) -> list[str]:
        if not self.manifests_dir.is_dir():
            return []
        names = [unquote(p.name[:-5]) for p in self.manifests_dir.glob("*.json")]
        return sorted(names)

    def list_images(self) -> list[ImageInfo]:
        """Every image in the store, by name; a damaged manifest is logged and left out."""
        out = []
        for name in self.image_names():
            try:
                data, manifest = self.load_manifest(name)
            except StoreError as exc:
                log.warning("%s", exc)
                continue
            # The file holds canonical bytes (add_image writes to_bytes()), so this is digest().
            out.append(ImageInfo(name, manifest, hashlib.sha256(data).digest()))
        return out

    # -- writing blocks ---------------------------------------------------------------

    def _tmp_name(self, suffix: str) -> Path:
        return self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}{suffix}"

    def put_block(self, digest: bytes, payload: bytes) -> bool:
        """Store a payload under its digest unless already there; True if newly written.

        Safe to call from several threads. The block is durable once the directories are
        synced (``add_image`` does that before writing a manifest).
        """
        path = self.block_path(digest)
        if path.exists():
            return False
        tmp = self._tmp_name(".tmp")
        if not self.tmp_dir.is_dir():
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with self._dirty_lock:
            self._dirty_dirs.add(path.parent)
        return True

    def _sync_dirty_dirs(self) -> None:
        with self._dirty_lock:
            dirs, self._dirty_dirs = self._dirty_dirs, set()
        for d in sorted(dirs):
            _fsync_dir(d)
        if dirs:
            _fsync_dir(self.blocks_dir)

    # -- images -----------------------------------------------------------------------

    def add_image(self, name: str, manifest: Manifest) -> bytes:
        """Add ``manifest`` as image ``name`` once all its blocks are durable; return its digest.

        Raises ImageExists if the name is taken (the check and the link are one atomic step)
        and StoreError if a data block is missing or has the wrong size.
        """
        check_name(name)
        for i in range(manifest.block_count):
            if manifest.kinds[i] != BlockKind.DATA:
                continue
            try:
                size = self.block_path(manifest.digest_of(i)).stat().st_size
            except FileNotFoundError:
                raise StoreError(f"image {name!r}: block {i} is not in the store") from None
            if size != manifest.stored_sizes[i]:
                raise StoreError(
                    f"image {name!r}: stored block {i} has {size} bytes, "
                    f"manifest says {manifest.stored_sizes[i]}"
                )
        self._sync_dirty_dirs()
        data = manifest.to_bytes()
        self.manifests_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_name(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.manifest_path(name))  # fails if the name exists
            except FileExistsError:
                raise ImageExists(f"an image named {name!r} already exists") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _fsync_dir(self.manifests_dir)
        return manifest.digest()

    def delete_image(self, name: str) -> SweepResult:
        """Remove image ``name`` and every block no other image references.

        Raises ImageNotFound, ImageInUse while a reader holds ``reading(name)``, StoreBusy
        while a capture runs.
        """
        path = self.manifest_path(name)
        with self._exclusive():
            if not path.exists():
                raise ImageNotFound(f"no image named {name!r} in {self.root}")
            with self._no_readers(name):
                referenced = self._referenced(exclude=name)  # fails before deleting anything
                path.unlink()
                _fsync_dir(self.manifests_dir)
                return self._sweep(referenced)

    def gc(self) -> SweepResult:
        """Remove blocks no image references, dead temp files and dead readers' leases.

        A block of an image being read is referenced by its manifest, which ``delete``
        keeps while the lease is held, so gc never takes a block from under a reader.
        """
        with self._exclusive():
            self._remove_dead_holders()
            return self._sweep(self._referenced())

    # -- reader leases ----------------------------------------------------------------

    def _reader_lock_path(self, name: str) -> Path:
        return self.readers_dir / (quote(check_name(name), safe="") + ".lock")

    @contextlib.contextmanager
    def reading(self, name: str, holder: str = "") -> Iterator[None]:
        """Hold a reader lease on image ``name``: ``delete_image`` refuses until it ends.

        ``holder`` says who reads (e.g. "fleetcast send"), for delete's message. Waits at
        most LOCK_WAIT_SECONDS for a delete in progress; raises ImageNotFound if the image
        is gone (then or after that delete), StoreBusy if the wait runs out. Leases of a
        process that died are released by the kernel (flock) and their files swept by gc.
        """
        lock_path = self._reader_lock_path(name)
        self.readers_dir.mkdir(parents=True, exist_ok=True)
        note = self.readers_dir / f"{lock_path.stem}@{os.getpid()}-{secrets.token_hex(6)}.holder"
        note.write_text(f"pid {os.getpid()} ({holder or 'a reader'})")
        fd = -1
        try:
            fd = self._lock_shared_current(lock_path)
            if not self.exists(name):
                raise ImageNotFound(f"no image named {name!r} in {self.root}")
            yield
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                note.unlink()

    def _lock_shared_current(self, lock_path: Path) -> int:
        """A shared flock on ``lock_path`` as it is now (delete replaces the file)."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                        return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreBusy(
                        f"image lease {lock_path} is held by a delete that did not finish; "
                        "try again"
                    ) from None
                time.sleep(0.1)
            os.close(fd)

    def readers(self, name: str) -> list[str]:
        """Who holds a reader lease on ``name`` ("pid 123 (fleetcast send)"), live ones."""
        prefix = self._reader_lock_path(name).stem + "@"
        found = []
        if self.readers_dir.is_dir():
            for f in sorted(self.readers_dir.glob(glob_escape(prefix) + "*.holder")):
                pid = f.name[len(prefix) :].split("-", 1)[0]
                if pid.isdigit() and _pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        found.append(f.read_text().strip())
        return found

    @contextlib.contextmanager
    def _no_readers(self, name: str) -> Iterator[None]:
        """Exclude readers of ``name`` for the block; ImageInUse naming them if any."""
        lock_path = self._reader_lock_path(name)
        self.readers_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                who = ", ".join(self.readers(name)) or "another process"
                raise ImageInUse(
                    f"image {name!r} is being read by {who}: "
                    "delete it when that has finished (or stop it)"
                ) from None
            yield
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()  # waiting readers see the new inode and find no image
        finally:
            os.close(fd)

    def _remove_dead_holders(self) -> None:
        if not self.readers_dir.is_dir():
            return
        for f in self.readers_dir.glob("*.holder"):
            pid = f.name.rsplit("@", 1)[-1].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    def discard_blocks(self, digests: set[bytes]) -> bool:
        """Remove these blocks if no image references them and the store is not in use.

        Used to roll back a failed capture. Returns False (leaving them for ``gc``) if
        another process is using the store.
        """
        if not digests:
            return True
        try:
            with self._exclusive():
                referenced = self._referenced()
                for d in digests - referenced:
                    with contextlib.suppress(FileNotFoundError):
                        self.block_path(d).unlink()
                return True
        except (StoreBusy, StoreError):
            return False

    def _referenced(self, exclude: str | None = None) -> set[bytes]:
        """Digests of every block some image uses; StoreError if a manifest is damaged
        (sweeping then could delete the blocks of an image that is only unreadable)."""
        refs: set[bytes] = set()
        for name in self.image_names():
            if name == exclude:
                continue
            try:
                _, m = self.load_manifest(name)
            except StoreError as exc:
                raise StoreError(
                    f"{exc}; no block is removed until that manifest is repaired or deleted"
                ) from None
            refs |= m.unique_digests()
        return refs | self.pinned()

    def _sweep(self, refs: set[bytes]) -> SweepResult:
        """Remove blocks not in ``refs``; the caller holds the exclusive lock."""
        referenced = {d.hex() for d in refs}
        blocks = nbytes = temps = 0
        if self.blocks_dir.is_dir():
            for shard in self.blocks_dir.iterdir():
                for f in shard.iterdir():
                    if f.name not in referenced:
                        nbytes += f.stat().st_size
                        f.unlink()
                        blocks += 1
        if self.tmp_dir.is_dir():
            temps = self._remove_dead_temps()[0]
        return SweepResult(blocks, nbytes, temps)

    # -- pins: blocks of captures that have no manifest yet ------------------------------

    def _pin_path(self, key: str) -> Path:
        if not _PIN_RE.fullmatch(key):
            raise StoreError(f"invalid pin name {key!r}: 1-100 letters, digits, '.', '_', '-'")
        return self.pins_dir / f"{key}.pin"

    def _append_pins(self, key: str, digests: list[bytes]) -> None:
        """Append ``digests`` to pin ``key`` durably (the caller holds the shared lock)."""
        if not digests:
            return
        self.pins_dir.mkdir(parents=True, exist_ok=True)
        path = self._pin_path(key)
        created = not path.exists()
        with open(path, "a", encoding="ascii") as f:
            f.write("".join(d.hex() + "\n" for d in digests))
            f.flush()
            os.fsync(f.fileno())
        if created:
            _fsync_dir(self.pins_dir)

    def put_pinned_block(self, key: str, digest: bytes, payload: bytes) -> bool:
        """``put_block`` for a capture without a manifest yet: the block is pinned under
        ``key`` first, so no gc removes it until ``unpin(key)``. True if newly written.

        Raises StoreBusy if a delete or gc holds the store longer than LOCK_WAIT_SECONDS.
        """
        with self._shared():
            self._append_pins(key, [digest])
            return self.put_block(digest, payload)

    def pin_present(self, key: str, digests: list[bytes]) -> dict[bytes, int]:
        """The stored size of each of ``digests`` the store has; those are pinned under
        ``key`` (so they are still there when the capture's manifest comes)."""
        self._pin_path(key)  # a bad key fails before anything is read
        with self._shared():
            present: dict[bytes, int] = {}
            for d in digests:
                size = self.stored_size(d)
                if size is not None:
                    present[d] = size
            self._append_pins(key, list(present))
            return present

    def unpin(self, key: str) -> bool:
        """Release pin ``key`` (its blocks are gc's again unless an image uses them);
        False if there was none."""
        try:
            self._pin_path(key).unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(self.pins_dir)
        return True

    def pins(self) -> list[str]:
        """The keys of the pins held now."""
        if not self.pins_dir.is_dir():
            return []
        return sorted(p.name[:-4] for p in self.pins_dir.glob("*.pin"))

    def pinned(self, key: str | None = None) -> set[bytes]:
        """Digests held by pin ``key`` (default: by every pin). A torn last line (a crash
        while appending) is ignored: its block was not written yet."""
        paths = [self._pin_path(key)] if key else [self.pins_dir / f"{k}.pin" for k in self.pins()]
        out: set[bytes] = set()
        for path in paths:
            try:
                text = path.read_text(encoding="ascii", errors="replace")
            except FileNotFoundError:
                continue
            for line in text.split("\n"):
                if len(line) == 64:
                    with contextlib.suppress(ValueError):
                        out.add(bytes.fromhex(line))
        return out

    # -- locking ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _shared(self) -> Iterator[None]:
        """The writers' shared lock, waiting at most LOCK_WAIT_SECONDS for a delete/gc."""
        fd = self._open_lock()
        try:
            self._wait_shared(fd)
            yield
        finally:
            os.close(fd)

    def _wait_shared(self, fd: int) -> None:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"the image store {self.root} is locked by a delete "
                        "or gc that did not finish; try again"
                    ) from None
                time.sleep(0.1)

    def _open_lock(self) -> int:
        for d in (self.root, self.blocks_dir, self.manifests_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        return os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = self._open_lock()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(
                    f"the image store {self.root} is in use by a running capture or import; "
                    "try again when it has finished"
                ) from None
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the store open for adding blocks and images (shared with other writers).

        First removes what dead writers left behind: temp files always, and their orphan
        blocks when no other process is using the store.
        """
        fd = self._open_lock()
        marker = self._tmp_name(".run")
        try:
            self._cleanup_dead(fd)
            self._wait_shared(fd)
            marker.touch()
            yield
        finally:
            with contextlib.suppress(OSError):
                marker.unlink()
            os.close(fd)

    def _cleanup_dead(self, fd: int) -> None:
        """Remove temp files of dead processes; sweep orphans if a dead writer left a marker."""
        if not self._remove_dead_temps()[1]:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (self.tmp_dir / f"{_DEAD_PID}-orphans.run").touch()  # leave the hint for later
            return
        try:
            result = self._sweep_orphans()
            log.info("removed %d orphan blocks left by an interrupted capture", result)
        except StoreError as exc:
            log.warning("orphan blocks left for later: %s", exc)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _remove_dead_temps(self) -> tuple[int, bool]:
        """Remove temp files of dead processes (an import's temp file lives unlocked).

        Returns how many, and whether one was a dead writer's marker (orphans may exist).
        """
        removed, dead_marker = 0, False
        for f in self.tmp_dir.iterdir():
            pid = f.name.split("-", 1)[0]
            if pid.isdigit() and (pid == str(_DEAD_PID) or not _pid_alive(int(pid))):
                dead_marker |= f.name.endswith(".run")
                try:
                    f.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:  # e.g. EBUSY: an import's FUSE view still mounted
                    log.warning("cannot remove %s: %s; unmount it ('umount -l')", f, exc)
        return removed, dead_marker

    def _sweep_orphans(self) -> int:
        """Sweep blocks only (other temp files may belong to live writers that hold no lock)."""
        referenced = {d.hex() for d in self._referenced()}
        removed = 0
        for shard in self.blocks_dir.iterdir():
            for f in shard.iterdir():
                if f.name not in referenced:
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
                    removed += 1
        return removed


#: A pid that is never alive, for markers that outlive the process that noticed them.
_DEAD_PID = 0


def is_disk_full(exc: BaseException) -> bool:
    """True for the OSError of a full disk or an exceeded quota."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
