"""Import of qcow2, VMDK, VHD and VHDX, streamed through a FUSE raw view: the raw content
survives exactly, no raw copy is written, and the used-block map is still taken."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.manifest import BlockKind
from server.images import importer
from server.images.capture import CaptureError, CaptureOptions
from server.images.export import export_image
from server.images.importer import fuse_unavailable, import_image
from server.images.store import ImageStore

MIB = 1 << 20
pytestmark = [
    pytest.mark.tools,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)"),
]


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(12 * MIB)
        for i in range(0, 12, 3):
            f.seek(i * MIB + 777)
            f.write(f"block {i} ".encode() * 20000)
    return path


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "raw"])
def test_import_round_trips_every_byte(fmt: str, raw: Path, tmp_path: Path) -> None:
    src = tmp_path / f"converted.{fmt}"
    opts = ["-o", "subformat=fixed,force_size=on"] if fmt == "vpc" else []
    subprocess.run(["qemu-img", "convert", "-O", fmt, *opts, str(raw), str(src)], check=True)
    store = ImageStore(tmp_path / "images")
    r = import_image(store, f"imported-{fmt}", src, CaptureOptions(used_only=False))
    assert r.manifest.source["format"] == fmt
    assert r.manifest.image_size == raw.stat().st_size
    out = tmp_path / "out.raw"
    export_image(store, f"imported-{fmt}", out)
    assert out.read_bytes() == raw.read_bytes()
    assert list(store.tmp_dir.iterdir()) == []  # the converted temp file is gone


def test_a_file_qemu_img_cannot_read_is_refused(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    with pytest.raises(CaptureError, match="no such file"):
        import_image(store, "x", tmp_path / "missing.qcow2")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(1020))  # a qcow2 magic with a broken header
    with pytest.raises(CaptureError, match=r"not a disk image|could not"):
        import_image(store, "x", bad)
    assert store.list_images() == []


needs_fuse = pytest.mark.skipif(
    os.geteuid() != 0 or fuse_unavailable() != "",
    reason="needs root, /dev/fuse and qemu-storage-daemon (qemu-system-common)",
)


def mounts_under(path: Path) -> list[str]:
    text = Path("/proc/self/mountinfo").read_text()
    return [line.split()[4] for line in text.splitlines() if str(path) in line.split()[4]]


def compressible(size: int) -> bytes:
    """Data zstd shrinks a lot, different in every block (so dedupe does not hide it)."""
    return b"".join(f"line {i:09d} of a text file\n".encode() for i in range(size // 32))


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@needs_fuse
def test_import_streams_without_a_raw_copy(
    small_tmpfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 48 MiB of data in a 64 MiB disk; the store sits on a 16 MiB tmpfs: a raw copy of the
    # data cannot fit there, the compressed blocks can.
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MIB)
        f.write(compressible(48 * MIB))
    src = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)], check=True)
    store = ImageStore(small_tmpfs / "images")
    r = import_image(store, "big", src, CaptureOptions(used_only=False))
    assert r.manifest.source["format"] == "qcow2"
    out = tmp_path / "out.raw"
    export_image(store, "big", out)
    assert out.read_bytes() == raw.read_bytes()
    assert list(store.tmp_dir.iterdir()) == [] and mounts_under(small_tmpfs / "images") == []
    # The same import through a temporary raw file (the no-FUSE fallback) runs out of space.
    monkeypatch.setattr(importer, "fuse_unavailable", lambda: "FUSE switched off by the test")
    notices: list[str] = []
    with pytest.raises(CaptureError, match="disk full"):
        import_image(store, "big2", src, CaptureOptions(used_only=False), warn=notices.append)
    assert len(notices) == 1 and "temporary raw file" in notices[0]
    assert store.image_names() == ["big"]


@needs_fuse
@pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "fsck.ext4", "partclone.extfs")),
    reason="needs e2fsprogs and partclone",
)
def test_streamed_import_keeps_the_used_block_map(tmp_path: Path) -> None:
    raw = tmp_path / "fs.raw"
    raw.write_bytes(random.Random(7).randbytes(32 * MIB))  # free space holds garbage
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(raw)], check=True)
    data = compressible(3 * MIB)
    (tmp_path / "f.txt").write_bytes(data)
    cmds = f"write {tmp_path / 'f.txt'} f.txt\n".encode()
    subprocess.run(["debugfs", "-w", "-f", "-", str(raw)], input=cmds, check=True,
                   capture_output=True)  # fmt: skip
    src = tmp_path / "fs.vmdk"
    subprocess.run(["qemu-img", "convert", "-O", "vmdk", str(raw), str(src)], check=True)
    store = ImageStore(tmp_path / "images")
    m = import_image(store, "fs", src).manifest
    assert [(p.fs, p.used_map) for p in m.partitions] == [("ext4", "partclone")]
    assert m.count(BlockKind.UNUSED) > 0 and m.stored_bytes < 8 * MIB  # garbage not kept
    target = tmp_path / "target.raw"
    target.write_bytes(random.Random(8).randbytes(32 * MIB))
    export_image(store, "fs", target, overwrite=True)
    subprocess.run(["fsck.ext4", "-fn", str(target)], check=True, capture_output=True)
    got = subprocess.run(["debugfs", "-R", "cat /f.txt", str(target)], check=True,
                         capture_output=True).stdout  # fmt: skip
    assert got == data


@needs_fuse
def test_interrupted_import_stops_the_daemon_and_removes_the_view(
    raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(src)], check=True)
    store = ImageStore(tmp_path / "images")
    seen: list[Path] = []

    def interrupted(_store: ImageStore, _name: str, view: Path, *a: object, **k: object) -> None:
        seen.append(view)
        assert view.read_bytes() == raw.read_bytes()  # the view is live while capturing
        raise KeyboardInterrupt

    monkeypatch.setattr(importer, "capture_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_image(store, "x", src)
    assert seen and not seen[0].exists()
    assert mounts_under(tmp_path) == [] and list(store.tmp_dir.iterdir()) == []
