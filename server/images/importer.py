"""Import qcow2, VMDK, VHD(X), VDI or raw disk images through ``qemu-img``.

qemu-img cannot write raw output to a pipe (it seeks and resizes its target), so a
non-raw image is converted into a sparse raw temp file inside the store's ``tmp/``
directory (only allocated data takes space; removed afterwards, or by the next store
operation if this process dies) and that file is captured with the full used-block
analysis. A raw file is captured directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.images.capture import CaptureError, CaptureOptions, CaptureResult, capture_image
from server.images.source import foreign_format
from server.images.store import ImageExists, ImageStore, check_name

INFO_TIMEOUT = 60.0
CONVERT_TIMEOUT = 6 * 3600.0


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


def import_image(
    store: ImageStore,
    name: str,
    path: Path,
    options: CaptureOptions | None = None,
    warn: Callable[[str], None] | None = None,
) -> CaptureResult:
    """Import the disk image file ``path`` as image ``name``; raises a StoreError subclass."""
    opts = options or CaptureOptions()
    check_name(name)
    if store.exists(name):
        raise ImageExists(f"an image named {name!r} already exists; pick another name")
    info = image_format(path)
    fmt = str(info.get("format", "?"))
    header = foreign_format(path) if fmt == "raw" else ""
    if header == "vhd":
        fmt = "vpc"  # qemu-img probes a fixed-size VHD as raw; its footer says otherwise
    elif header:
        raise CaptureError(
            f"{path}: not a disk image qemu-img can read: it has a {header} "
            "header but does not open as one (damaged or truncated?)"
        )
    opts.source_info = {
        "path": str(path),
        "kind": f"{fmt} file",
        "format": fmt,
        "file_size": path.stat().st_size,
    }
    kwargs = {} if warn is None else {"warn": warn}
    if fmt == "raw":
        return capture_image(store, name, path, opts, **kwargs)
    store.tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = store.tmp_dir / f"{os.getpid()}-import-{os.urandom(6).hex()}.tmp"
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
        return capture_image(store, name, tmp, opts, **kwargs)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
