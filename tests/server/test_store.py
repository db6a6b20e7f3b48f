"""The content-addressed store (docs/FORMAT.md §5): names, blocks, images, delete, gc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.codec import encode_block
from protocol.manifest import BlockKind, Manifest
from server.images.store import (
    ImageExists,
    ImageNotFound,
    ImageStore,
    InvalidImageName,
    StoreBusy,
    StoreError,
    check_name,
)

MIB = 1 << 20


def block(seed: int, n: int = MIB) -> bytes:
    line = f"block {seed} of a test image\n".encode()
    return (line * (n // len(line) + 1))[:n]


def add(store: ImageStore, name: str, seeds: list[int | None]) -> Manifest:
    """Store an image whose blocks are block(seed) or zero (None), through the public API."""
    m = Manifest.empty(len(seeds) * MIB, MIB)
    with store.writing():
        for i, seed in enumerate(seeds):
            if seed is None:
                m.set_kind(i, BlockKind.ZERO)
                continue
            digest, payload = encode_block(block(seed))
            store.put_block(digest, payload)
            m.set_data(i, digest, len(payload))
        m.created = "2026-11-26T00:00:00Z"
        store.add_image(name, m)
    return m


def block_files(store: ImageStore) -> set[str]:
    return {p.name for p in store.blocks_dir.glob("*/*")}


@pytest.mark.parametrize("name", ["win11", "lab-a/2026-11-26", "a.b_c-d", "x" * 128])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "/abs", "a/", "a//b", "..", "a/../b", "./a", "sp ace", "é", "a;b", "x" * 129]
)
def test_invalid_names_are_refused_with_the_reason(name: str) -> None:
    with pytest.raises(InvalidImageName, match="invalid image name"):
        check_name(name)


def test_image_round_trip_and_listing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    assert store.list_images() == []
    m = add(store, "lab/one", [1, None, 2])
    data, loaded = store.load_manifest("lab/one")
    assert data == m.to_bytes() and loaded.to_bytes() == data
    [info] = store.list_images()
    assert (info.name, info.digest) == ("lab/one", m.digest())
    assert store.read_block(m.digest_of(0)) == encode_block(block(1))[1]
    assert store.manifest_path("lab/one").name == "lab%2Fone.json"


def test_identical_blocks_are_stored_once_across_images(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "a", [1, 1, 2])
    add(store, "b", [2, 3, None])
    assert len(block_files(store)) == 3


def test_name_taken_is_refused_and_the_first_image_is_kept(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    first = add(store, "img", [1])
    with pytest.raises(ImageExists):
        add(store, "img", [2])
    assert store.load_manifest("img")[1].digest() == first.digest()


def test_an_image_whose_blocks_are_missing_is_never_added(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    m = Manifest.empty(MIB, MIB)
    digest, payload = encode_block(block(9))
    m.set_data(0, digest, len(payload))
    with pytest.raises(StoreError, match="not in the store"):
        store.add_image("ghost", m)
    store.put_block(digest, payload[:-1])  # wrong size on disk
    with pytest.raises(StoreError, match="bytes"):
        store.add_image("ghost", m)
    assert store.list_images() == []


def test_delete_frees_only_blocks_no_other_image_uses(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    a = add(store, "a", [1, 2])
    b = add(store, "b", [2, 3])
    result = store.delete_image("a")
    assert result.blocks_removed == 1
    assert block_files(store) == {d.hex() for d in b.unique_digests()}
    assert not store.has_block(a.digest_of(0))
    with pytest.raises(ImageNotFound):
        store.load_manifest("a")
    with pytest.raises(ImageNotFound):
        store.delete_image("a")


def test_gc_removes_unreferenced_blocks_and_dead_temp_files(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "a", [1])
    digest, payload = encode_block(block(7))
    store.put_block(digest, payload)  # an orphan: no manifest names it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (store.tmp_dir / f"{dead}-abc.tmp").write_bytes(b"half a block")
    (store.tmp_dir / f"{os.getpid()}-mine.tmp").write_bytes(b"a live writer's file")
    r = store.gc()
    assert (r.blocks_removed, r.temp_files_removed) == (1, 1)
    assert (store.tmp_dir / f"{os.getpid()}-mine.tmp").exists()
    assert len(block_files(store)) == 1


def test_delete_and_gc_refuse_while_a_writer_holds_the_store(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "a", [1])
    with store.writing(), pytest.raises(StoreBusy, match="in use"):
        ImageStore(tmp_path).delete_image("a")
    assert store.exists("a")


def test_a_damaged_manifest_is_left_out_of_the_listing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "good", [1])
    add(store, "bad", [2])
    store.manifest_path("bad").write_bytes(b'{"format": "something else"}')
    assert [i.name for i in store.list_images()] == ["good"]
    with pytest.raises(StoreError, match="damaged"):
        store.load_manifest("bad")


def test_next_writer_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "kept", [1])
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from server.images.store import ImageStore\n"
        "from protocol.codec import encode_block\n"
        "s = ImageStore(Path(sys.argv[1]))\n"
        "with s.writing():\n"
        "    s.put_block(*encode_block(b'orphan' * 100000))\n"
        "    (s.tmp_dir / f'{os.getpid()}-x.tmp').write_bytes(b'partial')\n"
        "    os._exit(9)\n"  # dies holding the store, like kill -9
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path.cwd())
    assert proc.returncode == 9
    assert len(block_files(store)) == 2 and any(store.tmp_dir.iterdir())
    with store.writing():
        pass
    assert len(block_files(store)) == 1
    assert [p.name for p in store.tmp_dir.iterdir()] == []


def test_a_damaged_manifest_stops_sweeping_so_its_blocks_survive(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "ok", [1])
    broken = add(store, "broken", [2])
    add(store, "gone", [3])
    store.manifest_path("broken").write_bytes(b"not json")
    with pytest.raises(StoreError, match="repaired or deleted"):
        store.gc()
    with pytest.raises(StoreError, match="repaired or deleted"):
        store.delete_image("gone")
    assert store.exists("gone")  # nothing was deleted
    assert store.has_block(broken.digest_of(0))
