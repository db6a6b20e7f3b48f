"""The delta scan: which blocks a target already holds, proven by their content."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from client.delta import DiskHolding, ScanError, receive_holding, scan_disk
from protocol.codec import encode_block
from protocol.manifest import BlockKind, Manifest

BS = 64 << 10
N = 40


def _image(rng: random.Random) -> tuple[Manifest, bytes]:
    """An image of N blocks plus a short tail: data, a few zero and unused blocks."""
    raw = bytearray()
    size = N * BS + 1000
    m = Manifest.empty(size, BS)
    for i in range(m.block_count):
        length = m.block_length(i)
        if i % 10 == 3:
            m.set_kind(i, BlockKind.ZERO)
            raw += bytes(length)
        elif i % 10 == 7:
            m.set_kind(i, BlockKind.UNUSED)
            raw += bytes(length)
        else:
            block = rng.randbytes(length)
            digest, payload = encode_block(block, 1)
            m.set_data(i, digest, len(payload))
            raw += block
    return m, bytes(raw)


@pytest.fixture
def image() -> tuple[Manifest, bytes]:
    return _image(random.Random(1))


def test_a_disk_holding_the_image_holds_every_data_and_zero_block(
    tmp_path: Path, image: tuple[Manifest, bytes]
) -> None:
    m, raw = image
    disk = tmp_path / "disk"
    disk.write_bytes(raw)
    h = scan_disk(disk, m, threads=3, chunk_bytes=3 * BS)
    assert h.data_blocks == m.count(BlockKind.DATA)
    assert h.data_bytes == m.data_bytes()
    assert h.zero_blocks == m.count(BlockKind.ZERO)
    assert h.missing_data() == []
    assert h.have_data() == [i for i in range(m.block_count) if m.kinds[i] == BlockKind.DATA]
    unused = [i for i in range(m.block_count) if m.kinds[i] == BlockKind.UNUSED]
    assert all(h.held[i] == 0 for i in unused)  # never read, never counted
    assert h.scanned_bytes == m.image_size - len(unused) * BS


def test_changed_blocks_are_missing_and_only_they(
    tmp_path: Path, image: tuple[Manifest, bytes]
) -> None:
    m, raw = image
    disk = bytearray(raw)
    changed = {0, 5, 12, 40}  # 40 is the short last block
    for i in changed:
        disk[i * BS + 17] ^= 0xFF  # one flipped byte is enough
    disk[3 * BS + 100] = 1  # a ZERO block that is not zero on the disk
    path = tmp_path / "disk"
    path.write_bytes(disk)
    h = scan_disk(path, m, threads=2)
    assert set(h.missing_data()) == changed
    assert h.held[3] == 0 and h.held[23] == 1
    assert h.zero_blocks == m.count(BlockKind.ZERO) - 1


def test_any_thread_count_and_chunk_size_finds_the_same(
    tmp_path: Path, image: tuple[Manifest, bytes]
) -> None:
    m, raw = image
    disk = bytearray(raw)
    for i in range(0, N, 4):
        disk[i * BS] ^= 1
    path = tmp_path / "disk"
    path.write_bytes(disk)
    results = {
        bytes(scan_disk(path, m, threads=t, chunk_bytes=c).held)
        for t, c in [(1, BS), (2, 5 * BS), (4, 64 * BS), (7, 2 * BS)]
    }
    assert len(results) == 1


def test_a_missing_target_holds_nothing(tmp_path: Path, image: tuple[Manifest, bytes]) -> None:
    m, _ = image
    h = scan_disk(tmp_path / "absent", m)
    assert h.have_data() == [] and h.zero_blocks == 0 and h.scanned_bytes == 0


def test_a_short_target_holds_only_what_it_has(
    tmp_path: Path, image: tuple[Manifest, bytes]
) -> None:
    m, raw = image
    path = tmp_path / "disk"
    path.write_bytes(raw[: 10 * BS + 5])  # block 10 is cut short
    h = scan_disk(path, m)
    assert h.have_data() == [i for i in range(10) if m.kinds[i] == BlockKind.DATA]


def test_held_zero_blocks_are_not_zeroed_again(
    tmp_path: Path, image: tuple[Manifest, bytes]
) -> None:
    m, raw = image
    disk = bytearray(raw)
    disk[13 * BS] = 9  # ZERO block 13 holds garbage: it must still be zeroed
    path = tmp_path / "disk"
    path.write_bytes(disk)
    h = scan_disk(path, m)
    w = h.writing_manifest()
    zero_left = [i for i in range(w.block_count) if w.kinds[i] == BlockKind.ZERO]
    assert zero_left == [13]
    assert m.kinds[3] == BlockKind.ZERO  # the real manifest is untouched
    assert w.digests is m.digests and w.digest() != m.digest()


def test_progress_is_reported_while_scanning(
    tmp_path: Path, image: tuple[Manifest, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.delta as delta

    monkeypatch.setattr(delta, "PROGRESS_STEP", 4 * BS)
    m, raw = image
    path = tmp_path / "disk"
    path.write_bytes(raw)
    seen: list[int] = []
    scan_disk(path, m, threads=1, chunk_bytes=BS, progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] <= m.image_size


def test_an_unreadable_target_is_a_clear_error(
    tmp_path: Path, image: tuple[Manifest, bytes]
) -> None:
    m, _ = image
    with pytest.raises(ScanError, match="reading target"):
        scan_disk(tmp_path, m)  # a directory opens, but cannot be read


def test_nothing_is_a_blank_holding(image: tuple[Manifest, bytes]) -> None:
    m, _ = image
    h = DiskHolding.nothing(m)
    assert h.missing_data() == [i for i in range(m.block_count) if m.kinds[i] == BlockKind.DATA]
    assert h.summary()["held_blocks"] == 0


# -- fleetcast receive --delta MODE --manifest FILE ---------------------------------------


def test_receive_delta_modes(tmp_path: Path, image: tuple[Manifest, bytes]) -> None:
    m, raw = image
    mfile = tmp_path / "image.json"
    mfile.write_bytes(m.to_bytes())
    disk, blank = tmp_path / "disk", tmp_path / "blank"
    disk.write_bytes(raw)
    blank.touch()
    lines: list[str] = []
    assert receive_holding(str(disk), str(mfile), "never") is None
    assert receive_holding(str(disk), None, "auto") is None  # no manifest: a full receive
    assert receive_holding(str(blank), str(mfile), "auto") is None  # nothing there to spare
    held = receive_holding(str(disk), str(mfile), "auto", say=lines.append)
    assert held is not None and held.missing_data() == []
    assert lines and f"holds {held.data_blocks} of {held.data_blocks} data blocks" in lines[0]
    forced = receive_holding(str(blank), str(mfile), "always")
    assert forced is not None and forced.data_blocks == 0


def test_receive_delta_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match="--delta always needs the image's manifest"):
        receive_holding(str(tmp_path / "disk"), None, "always")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ScanError, match="is not a fleetcast manifest"):
        receive_holding(str(tmp_path / "disk"), str(bad), "always")
    with pytest.raises(ScanError, match="cannot read manifest file"):
        receive_holding(str(tmp_path / "disk"), str(tmp_path / "absent.json"), "always")


def test_a_holding_refuses_another_images_manifest(image: tuple[Manifest, bytes]) -> None:
    m, _ = image
    h = DiskHolding.nothing(m)
    assert h.mismatch(m.to_bytes()) == ""
    other = Manifest.from_bytes(m.to_bytes())
    other.created = "another day"
    assert "not the one the target was checked against" in h.mismatch(other.to_bytes())
