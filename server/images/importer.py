"""Import qcow2, VMDK, VHD(X), VDI or raw disk images, streamed (docs/FORMAT.md §9).

A raw file is captured directly. Any other format is opened read-only by
``qemu-storage-daemon`` and exported over FUSE as a raw view onto an empty file in the
store's ``tmp/`` (the file reads as the guest disk, holes included); the ordinary capture
reads that view, so the used-block analysis (partclone on a read-only loop device of the
view) and the bounded-memory pipeline are the same as for a raw file, and nothing as large
as the image is ever written. The daemon runs in its own session (Ctrl-C reaches us, not
it), dies with the thread that started it (``PR_SET_PDEATHSIG``) and is always stopped by
its PID; the view file is unmounted and removed afterwards.

Without FUSE (no ``/dev/fuse``, or qemu-storage-daemon not installed) the image is
converted by ``qemu-img convert`` into a sparse raw temp file in ``tmp/`` first (needs free
space for the image's data), with a one-line notice.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from server.images.capture import CaptureError, CaptureOptions, CaptureResult, capture_image
from server.images.source import foreign_format
from server.images.store import ImageExists, ImageStore, check_name

log = logging.getLogger(__name__)
Warn = Callable[[str], None]

INFO_TIMEOUT = 60.0
CONVERT_TIMEOUT = 6 * 3600.0
#: How long qemu-storage-daemon may take to open the image and mount its raw view.
EXPORT_WAIT = 30.0
#: How long it may take to unmount and exit once asked to stop.
STOP_WAIT = 10.0
DAEMON = "qemu-storage-daemon"
_PR_SET_PDEATHSIG = 1


def image_format(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` as a dict; raises CaptureError if it is not an image."""
    if shutil.which("qemu-img") is None:
        raise CaptureError("qemu-img is not installed (Debian package qemu-utils)")
    if not path.exists():
        raise CaptureError(f"{path}: no such file")
    proc = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)],
        capture_output=True,
        text=True,
        timeout=INFO_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise CaptureError(
            f"{path}: not a disk image qemu-img can read{': ' + lines[-1] if lines else ''}"
        )
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def detect_format(path: Path) -> str:
    """The qemu block driver for ``path`` ("raw", "qcow2", "vpc", ...); CaptureError if none."""
    fmt = str(image_format(path).get("format", "?"))
    header = foreign_format(path) if fmt == "raw" else ""
    if header == "vhd":
        return "vpc"  # qemu-img probes a fixed-size VHD as raw; its footer says otherwise
    if header:
        raise CaptureError(
            f"{path}: not a disk image qemu-img can read: it has a {header} "
            "header but does not open as one (damaged or truncated?)"
        )
    return fmt


def import_image(
    store: ImageStore,
    name: str,
    path: Path,
    options: CaptureOptions | None = None,
    warn: Warn | None = None,
) -> CaptureResult:
    """Import the disk image file ``path`` as image ``name``; raises a StoreError subclass."""
    opts = options or CaptureOptions()
    say = warn or log.warning
    check_name(name)
    if store.exists(name):
        raise ImageExists(f"an image named {name!r} already exists; pick another name")
    fmt = detect_format(path)
    opts.source_info = {
        "path": str(path),
        "kind": f"{fmt} file",
        "format": fmt,
        "file_size": path.stat().st_size,
    }
    opts.label = opts.label or path.name
    if fmt == "raw":
        return capture_image(store, name, path, opts, warn=say)
    missing = fuse_unavailable()
    if missing:
        say(
            f"{missing}: converting {path.name} through a temporary raw file in "
            f"{store.tmp_dir} instead (needs free space for the image's data)"
        )
        return _import_via_temp_file(store, name, path, fmt, opts, say)
    with raw_view(path, fmt, store.tmp_dir) as view:
        return capture_image(store, name, view, opts, warn=say)


def fuse_unavailable() -> str:
    """Why a streamed import cannot run here, or "" if it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse (FUSE unavailable)"
    if shutil.which(DAEMON) is None:
        return f"{DAEMON} is not installed (Debian package qemu-system-common)"
    return ""


def _daemon_args(path: Path, fmt: str, view: Path) -> list[str]:
    blockdev = {
        "driver": fmt,
        "node-name": "img",
        "read-only": True,
        "file": {"driver": "file", "filename": str(path.resolve()), "read-only": True},
    }
    export = {
        "type": "fuse",
        "id": "view",
        "node-name": "img",
        "mountpoint": str(view),
        "writable": False,
    }
    return [DAEMON, "--blockdev", json.dumps(blockdev), "--export", json.dumps(export)]


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the thread that started us dies (even by kill -9)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@contextlib.contextmanager
def raw_view(path: Path, fmt: str, where: Path) -> Iterator[Path]:
    """A read-only file under ``where`` that reads as the raw disk inside ``path``.

    Raises CaptureError if qemu-storage-daemon cannot open the image or mount the view in
    EXPORT_WAIT seconds. The daemon is stopped and the view removed on every exit.
    """
    where.mkdir(parents=True, exist_ok=True)
    view = where / f"{os.getpid()}-{secrets.token_hex(8)}.view"
    view.touch(exist_ok=False)
    proc: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(
                _daemon_args(path, fmt, view),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            _wait_for_export(proc, view, path, errors)
            yield view
        finally:
            if proc is not None:
                _stop(proc)
            _release(view)


def _is_mounted(view: Path) -> bool:
    try:
        return os.stat(view).st_dev != os.stat(view.parent).st_dev
    except FileNotFoundError:
        return False
    except OSError:
        return True  # a dead FUSE mount fails stat with ENOTCONN


def _last_line(errors: IO[bytes]) -> str:
    errors.seek(0)
    lines = errors.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


def _wait_for_export(
    proc: subprocess.Popen[bytes], view: Path, path: Path, errors: IO[bytes]
) -> None:
    deadline = time.monotonic() + EXPORT_WAIT
    while not _is_mounted(view):
        if proc.poll() is not None:
            why = _last_line(errors) or f"exit status {proc.returncode}"
            raise CaptureError(f"{DAEMON} could not open {path}: {why}")
        if time.monotonic() > deadline:
            raise CaptureError(
                f"{DAEMON} did not export {path} within {EXPORT_WAIT:.0f} s; "
                "is the machine overloaded? try again"
            )
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the daemon by its PID: SIGTERM (it unmounts cleanly), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_WAIT)


def _release(view: Path) -> None:
    """Unmount the view if a dead daemon left it mounted, then remove the file."""
    if _is_mounted(view):
        subprocess.run(["umount", "-l", str(view)], capture_output=True, timeout=STOP_WAIT)
    try:
        view.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the import view %s: %s (unmount it by hand)", view, exc)


def _import_via_temp_file(
    store: ImageStore, name: str, path: Path, fmt: str, opts: CaptureOptions, warn: Warn
) -> CaptureResult:
    """The fallback: ``qemu-img convert`` to a sparse raw temp file, then capture it."""
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = store.tmp_dir / f"{os.getpid()}-import-{secrets.token_hex(6)}.tmp"
    try:
        proc = subprocess.run(
            ["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(tmp)],
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            msg = lines[-1] if lines else f"exit status {proc.returncode}"
            if "No space left" in msg:
                raise CaptureError(
                    f"disk full while converting {path} into {store.tmp_dir}: "
                    "free some space and import again"
                )
            raise CaptureError(f"qemu-img could not convert {path}: {msg}")
        return capture_image(store, name, tmp, opts, warn=warn)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
