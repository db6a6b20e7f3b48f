"""Capture, export and verify of whole disks, and the ``fleetcast image`` command's errors."""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import pytest

if str(Path(__file__).resolve().parents[2]) not in sys.path:  # bench/ is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.disks import make_random_disk, make_realistic_disk
from protocol.manifest import BlockKind
from server.cli import image_main
from server.images.capture import CaptureError, CaptureOptions, capture_image
from server.images.export import ExportError, export_image, verify_image
from server.images.progress import Progress
from server.images.source import rw_mounts
from server.images.store import ImageExists, ImageStore

MIB = 1 << 20
ALL = CaptureOptions(used_only=False)
needs_disk_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkfs.ext4", "debugfs", "sfdisk")),
    reason="needs e2fsprogs and fdisk (scripts/setup installs them)",
)


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "data" / "images")


def sparse_disk(path: Path, size: int, chunks: dict[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)
    return path


def text(n: int, tag: str = "x") -> bytes:
    line = f"{tag}: some compressible text of a golden image\n".encode()
    return (line * (n // len(line) + 1))[:n]


@pytest.mark.tools
@needs_disk_tools
def test_full_capture_exports_byte_identical_and_verifies(
    store: ImageStore, tmp_path: Path
) -> None:
    src = tmp_path / "disk.img"
    make_realistic_disk(src, 24 * MIB, seed=3)
    r = capture_image(store, "golden", src, ALL)
    m = r.manifest
    assert m.partition_table == "gpt"
    [p] = m.partitions
    assert (p.number, p.start, p.fs, p.label, p.used_map) == (
        1,
        MIB,
        "ext4",
        "fleetcast-root",
        "all",
    )
    assert m.count(BlockKind.UNUSED) == 0 and m.count(BlockKind.DATA) > 0
    assert m.stored_bytes < m.data_bytes()  # zstd shrank real files
    out = tmp_path / "out.img"
    export_image(store, "golden", out)
    assert out.read_bytes() == src.read_bytes()
    assert verify_image(store, "golden").ok


def test_random_blocks_are_stored_raw_and_zero_blocks_not_at_all(
    store: ImageStore, tmp_path: Path
) -> None:
    src = tmp_path / "rand.img"
    make_random_disk(src, 3 * MIB, seed=1)
    with open(src, "r+b") as f:
        f.truncate(5 * MIB + 4096)  # two zero blocks, then a short zero last block
    m = capture_image(store, "rand", src, ALL).manifest
    assert [b.kind for b in m] == [BlockKind.DATA] * 3 + [BlockKind.ZERO] * 3
    assert all(m.block(i).is_raw for i in range(3))
    assert m.block(5).length == 4096
    out = tmp_path / "out.img"
    export_image(store, "rand", out)
    assert out.read_bytes() == src.read_bytes()


def test_partly_zero_and_short_last_blocks_round_trip(store: ImageStore, tmp_path: Path) -> None:
    src = sparse_disk(tmp_path / "s.img", 3 * MIB + 512, {100: text(5000), 3 * MIB: b"end" * 170})
    m = capture_image(
        store, "s", src, CaptureOptions(used_only=False, block_size=256 << 10)
    ).manifest
    assert m.block_count == 13
    assert m.kinds[0] == BlockKind.DATA and m.kinds[1] == BlockKind.ZERO
    assert m.kinds[12] == BlockKind.DATA and m.block_length(12) == 512
    out = tmp_path / "o.img"
    export_image(store, "s", out)
    assert out.read_bytes() == src.read_bytes()


def test_second_capture_of_the_same_disk_stores_nothing_new(
    store: ImageStore, tmp_path: Path
) -> None:
    src = sparse_disk(tmp_path / "d.img", 4 * MIB, {0: text(MIB, "a"), 2 * MIB: text(MIB, "b")})
    first = capture_image(store, "one", src, ALL)
    second = capture_image(store, "two", src, ALL)
    assert first.new_blocks == 2 and second.new_blocks == 0
    assert first.manifest.image_sha256 == second.manifest.image_sha256
    assert first.digest != second.digest or first.manifest.created == second.manifest.created


def test_export_refuses_to_overwrite_unless_asked(store: ImageStore, tmp_path: Path) -> None:
    src = sparse_disk(tmp_path / "d.img", MIB, {0: text(4096)})
    capture_image(store, "d", src, ALL)
    target = tmp_path / "t.img"
    target.write_bytes(b"precious" * 1000)
    with pytest.raises(ExportError, match="--overwrite"):
        export_image(store, "d", target)
    assert target.read_bytes() == b"precious" * 1000
    export_image(store, "d", target, overwrite=True)
    assert target.read_bytes() == src.read_bytes()


def test_verify_names_the_image_block_and_offset_of_a_flipped_byte(
    store: ImageStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src = sparse_disk(tmp_path / "d.img", 4 * MIB, {0: text(MIB, "a"), 2 * MIB: text(MIB, "b")})
    m = capture_image(store, "lab/img", src, ALL).manifest
    victim = store.block_path(m.digest_of(2))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x04
    victim.write_bytes(bytes(data))
    report = verify_image(store, "lab/img")
    assert not report.ok
    assert [(p.index, p.offset) for p in report.problems] == [(2, 2 * MIB)]
    monkeypatch.setenv("FLEETCAST_DATA", str(store.root.parent))
    assert image_main(["verify", "lab/img"]) == 1
    err = capsys.readouterr().err
    assert "image lab/img: block 2 (offset 2097152)" in err and "DAMAGED" in err
    with pytest.raises(ExportError, match="block 2"):
        export_image(store, "lab/img", tmp_path / "x.img")


def test_name_taken_fails_before_reading_the_source(store: ImageStore, tmp_path: Path) -> None:
    src = sparse_disk(tmp_path / "d.img", MIB, {0: b"x"})
    capture_image(store, "d", src, ALL)
    with pytest.raises(ImageExists):
        capture_image(store, "d", tmp_path / "missing.img", ALL)


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("hello\n"), "not a raw disk image"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"QFI\xfb" + bytes(1020)), "qcow2 image"),
        (lambda p: p.mkdir(), "not a disk image"),
    ],
)
def test_bad_sources_give_one_clear_line_and_leave_the_store_alone(
    make: object,
    expect: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("FLEETCAST_DATA", str(tmp_path / "data"))
    good = sparse_disk(tmp_path / "good.img", MIB, {0: b"hello"})
    assert image_main(["capture", str(good), "--name", "good"]) == 0
    before = sorted(str(p) for p in (tmp_path / "data").rglob("*") if "tmp" not in p.parts)
    capsys.readouterr()
    bad = tmp_path / "bad.img"
    make(bad)  # type: ignore[operator]
    assert image_main(["capture", str(bad), "--name", "other"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fleetcast image: ") and expect in err
    after = sorted(str(p) for p in (tmp_path / "data").rglob("*") if "tmp" not in p.parts)
    assert after == before


def test_cli_round_trip_list_info_export_delete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETCAST_DATA", str(tmp_path / "data"))
    src = sparse_disk(tmp_path / "d.img", 2 * MIB, {0: text(MIB)})
    assert image_main(["capture", str(src), "--name", "pc1/2026-11-26", "--level", "5"]) == 0
    assert image_main(["capture", str(src), "--name", "pc1/2026-11-26"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert image_main(["list"]) == 0
    assert "pc1/2026-11-26" in capsys.readouterr().out
    assert image_main(["info", "pc1/2026-11-26"]) == 0
    out = capsys.readouterr().out
    assert "data 1" in out and "zero 1" in out and "level 5" in out
    assert image_main(["export", "pc1/2026-11-26", str(tmp_path / "o.img")]) == 0
    assert (tmp_path / "o.img").read_bytes() == src.read_bytes()
    assert image_main(["delete", "pc1/2026-11-26"]) == 0
    assert image_main(["info", "pc1/2026-11-26"]) == 1
    assert image_main(["capture", str(src), "--name", "../x"]) == 1
    assert image_main(["capture", str(src), "--name", "x", "--level", "40"]) == 1
    assert not list((tmp_path / "data" / "images" / "blocks").glob("*/*"))


def test_level_out_of_range_is_refused(store: ImageStore, tmp_path: Path) -> None:
    src = sparse_disk(tmp_path / "d.img", MIB, {0: b"x"})
    with pytest.raises(CaptureError, match="level"):
        capture_image(store, "d", src, CaptureOptions(level=0))


def test_progress_line_shows_percent_rate_and_eta() -> None:
    stream = io.StringIO()
    bar = Progress("capture d.img", 100 * MIB, stream=stream, enabled=True, interval=0)
    bar.update(50 * MIB)
    bar.finish()
    out = stream.getvalue()
    assert "50.0%" in out and "MB/s" in out and "ETA" in out and out.endswith("\n")
    quiet = io.StringIO()
    Progress("x", 10, stream=quiet).update(5)  # StringIO is not a terminal
    assert quiet.getvalue() == ""


def test_rw_mounts_finds_the_disk_and_its_partitions() -> None:
    mountinfo = (
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "23 1 8:2 / /boot ro,relatime shared:2 - vfat /dev/sda2 ro\n"
        "24 1 8:17 / /data rw,relatime shared:3 - xfs /dev/sdb1 rw\n"
    )
    assert rw_mounts({(8, 0), (8, 1), (8, 2)}, mountinfo) == ["/"]
    assert rw_mounts({(8, 0), (8, 2)}, mountinfo) == []
    assert rw_mounts({(8, 16), (8, 17)}, mountinfo) == ["/data"]


def test_capture_reads_holes_without_storing_them(store: ImageStore, tmp_path: Path) -> None:
    size = 256 * MIB
    src = sparse_disk(tmp_path / "big.img", size, {128 * MIB: text(MIB)})
    r = capture_image(store, "big", src, ALL)
    assert r.manifest.count(BlockKind.DATA) == 1
    assert r.manifest.count(BlockKind.ZERO) == 255
    assert os.path.getsize(src) == size


@pytest.mark.tools
@needs_disk_tools
def test_without_a_used_map_every_block_is_kept_with_one_warning(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.images.capture as capture_module
    from server.images.usedmap import UsedMapUnavailable

    def no_loop(*args: object) -> None:
        raise UsedMapUnavailable("cannot attach a loop device (needs root): denied")

    monkeypatch.setattr(capture_module, "partition_device", no_loop)
    src = tmp_path / "disk.img"
    make_realistic_disk(src, 16 * MIB, seed=1)
    warnings: list[str] = []
    m = capture_image(store, "d", src, CaptureOptions(), warn=warnings.append).manifest
    assert warnings == [
        "partition 1 (ext4): keeping every block: cannot attach a loop device (needs root): denied"
    ]
    assert m.partitions[0].used_map == "all" and m.count(BlockKind.UNUSED) == 0
    out = tmp_path / "out.img"
    export_image(store, "d", out)
    assert out.read_bytes() == src.read_bytes()


def test_missing_block_file_is_reported_and_gc_keeps_referenced_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FLEETCAST_DATA", str(tmp_path / "data"))
    src = sparse_disk(tmp_path / "d.img", 3 * MIB, {0: text(MIB, "a"), 2 * MIB: text(MIB, "b")})
    assert image_main(["capture", str(src), "--name", "img"]) == 0
    assert image_main(["info", "img", "--json"]) == 0
    info = capsys.readouterr().out
    assert '"image_size": 3145728' in info and '"blocks"' not in info
    assert image_main(["gc"]) == 0
    assert "removed 0 unreferenced blocks" in capsys.readouterr().out
    store = ImageStore(tmp_path / "data" / "images")
    _, m = store.load_manifest("img")
    store.block_path(m.digest_of(2)).unlink()
    assert image_main(["verify", "img"]) == 1
    err = capsys.readouterr().err
    assert "block 2 (offset 2097152)" in err and "missing" in err


def test_a_failed_export_leaves_no_half_written_new_file(store: ImageStore, tmp_path: Path) -> None:
    src = sparse_disk(tmp_path / "d.img", 2 * MIB, {0: text(MIB, "a"), MIB: text(MIB, "b")})
    m = capture_image(store, "d", src, ALL).manifest
    store.block_path(m.digest_of(1)).write_bytes(b"rotten")
    out = tmp_path / "new.img"
    with pytest.raises(ExportError, match="block 1"):
        export_image(store, "d", out)
    assert not out.exists()
