"""Import of qcow2, VMDK, VHD and VHDX through qemu-img: the raw content survives exactly."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from server.images.capture import CaptureError, CaptureOptions
from server.images.export import export_image
from server.images.importer import import_image
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
