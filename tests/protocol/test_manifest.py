"""The manifest format (docs/FORMAT.md): canonical bytes, digest, validation."""

from __future__ import annotations

import hashlib
import json

import pytest

from protocol.manifest import BlockKind, Manifest, ManifestError, Partition


def make_manifest() -> Manifest:
    m = Manifest.empty(image_size=5 * (1 << 20) + 123, block_size=1 << 20)
    m.set_data(0, hashlib.sha256(b"a").digest(), 1000)
    m.set_kind(1, BlockKind.ZERO)
    m.set_kind(2, BlockKind.ZERO)
    m.set_data(3, hashlib.sha256(b"b").digest(), 1 << 20)  # stored raw
    m.set_kind(4, BlockKind.UNUSED)
    m.set_data(5, hashlib.sha256(b"c").digest(), 123)  # short last block, raw
    m.created = "2026-11-26T00:00:00Z"
    m.partition_table = "gpt"
    m.partitions = [Partition(number=1, start=1 << 20, size=4 << 20, fs="ext4", label="root")]
    return m


def test_round_trip_is_byte_identical_and_digest_stable() -> None:
    m = make_manifest()
    data = m.to_bytes()
    again = Manifest.from_bytes(data)
    assert again.to_bytes() == data
    assert again.digest() == hashlib.sha256(data).digest() == m.digest()


def test_block_geometry_and_kinds() -> None:
    m = make_manifest()
    assert m.block_count == 6
    assert m.block_length(5) == 123
    assert [b.kind for b in m] == [
        BlockKind.DATA,
        BlockKind.ZERO,
        BlockKind.ZERO,
        BlockKind.DATA,
        BlockKind.UNUSED,
        BlockKind.DATA,
    ]
    assert not m.block(0).is_raw
    assert m.block(3).is_raw and m.block(5).is_raw
    assert m.stored_bytes == 1000 + (1 << 20) + 123


def test_runs_of_zero_and_unused_are_compact() -> None:
    blocks = json.loads(make_manifest().to_bytes())["blocks"]
    assert ["zero", 2] in blocks and ["unused", 1] in blocks
    assert len(blocks) == 5


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o.update(format="other"), "not a fleetcast image manifest"),
        (lambda o: o.update(version=99), "version 99 is not supported"),
        (lambda o: o.update(block_size=1000), "block size"),
        (lambda o: o["blocks"].pop(), "covers 5 blocks"),
        (lambda o: o["blocks"].append(["zero", 1]), "overruns"),
        (lambda o: o["blocks"].__setitem__(0, ["zz", 5]), "64 hex"),
        (lambda o: o["blocks"].__setitem__(0, ["00" * 32, 0]), "stored size"),
        (lambda o: o.update(image_size=-1), "non-negative"),
    ],
)
def test_invalid_manifests_are_refused_with_a_reason(mutate, message) -> None:  # type: ignore[no-untyped-def]
    obj = json.loads(make_manifest().to_bytes())
    mutate(obj)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_bytes(json.dumps(obj).encode())


@pytest.mark.parametrize("data", [b"", b"\xff\xfe", b"[]", b"null", b'{"format": 1}'])
def test_garbage_is_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(data)
