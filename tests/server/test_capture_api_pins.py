"""Store pins (server/images/store.py): the blocks of a network capture that has no manifest
yet survive gc and delete until the capture releases its pin, across a server crash too."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.codec import encode_block
from protocol.manifest import BlockKind, Manifest
from server.images.store import ImageStore, StoreError

BLOCK = 64 << 10


def _block(seed: int) -> tuple[bytes, bytes]:
    return encode_block(bytes([seed]) * 100 + bytes(range(256)) * 40, 1)


def _image(store: ImageStore, name: str, *blocks: tuple[bytes, bytes]) -> None:
    m = Manifest.empty(BLOCK * max(1, len(blocks)), BLOCK)
    for i, (digest, payload) in enumerate(blocks):
        store.put_block(digest, payload)
        m.set_data(i, digest, len(payload))
    if not blocks:
        m.set_kind(0, BlockKind.ZERO)
    store.add_image(name, m)


def test_a_pinned_block_survives_gc_until_it_is_unpinned(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    d, payload = _block(1)
    assert store.put_pinned_block("capture-1", d, payload) is True
    assert store.put_pinned_block("capture-1", d, payload) is False
    assert store.gc().blocks_removed == 0 and store.has_block(d)
    assert store.pins() == ["capture-1"] and store.pinned("capture-1") == {d}
    assert store.unpin("capture-1") is True and store.unpin("capture-1") is False
    assert store.gc().blocks_removed == 1 and not store.has_block(d)


def test_pin_present_pins_and_sizes_only_the_blocks_the_store_has(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    (d1, p1), (d2, _) = _block(1), _block(2)
    store.put_block(d1, p1)  # an orphan: gc would take it
    assert store.pin_present("capture-2", [d1, d2]) == {d1: len(p1)}
    assert store.pinned() == {d1}
    assert store.gc().blocks_removed == 0 and store.has_block(d1)


def test_deleting_the_last_image_using_a_block_keeps_it_for_a_capture(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    (d1, p1), (d2, p2) = _block(1), _block(2)
    _image(store, "old", (d1, p1), (d2, p2))
    store.pin_present("capture-3", [d1])  # an open capture was told the store has it
    result = store.delete_image("old")
    assert result.blocks_removed == 1
    assert store.has_block(d1) and not store.has_block(d2)


def test_pins_outlive_the_process_and_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    d, payload = _block(1)
    store.put_pinned_block("capture-4", d, payload)
    with open(store.pins_dir / "capture-4.pin", "a") as f:
        f.write("abcdef")  # a crash while appending the next digest
    again = ImageStore(tmp_path)  # a new server process
    assert again.pinned() == {d}
    assert again.gc().blocks_removed == 0 and again.has_block(d)


def test_a_pin_name_must_be_plain(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(StoreError, match="invalid pin name"):
        store.pin_present("../x", [])
