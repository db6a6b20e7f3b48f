"""The image manifest: what an image is, block by block (docs/FORMAT.md).

A manifest is canonical JSON (sorted keys, no spaces, ASCII). Its digest is the
SHA-256 of exactly those bytes; the multicast engine announces the digest so a
receiver can prove it got the right image. Blocks are held in compact arrays,
not one Python object per block, so a manifest for a large disk stays small.

Pure: no file, socket or clock access. Callers bring bytes and get bytes.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

FORMAT_NAME = "fleetcast-image"
FORMAT_VERSION = 1
HASH_NAME = "sha256"
HASH_SIZE = 32
DEFAULT_BLOCK_SIZE = 1 << 20
MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 16 << 20
#: A manifest larger than this is refused before parsing (hostile input).
MAX_MANIFEST_BYTES = 512 << 20


class ManifestError(ValueError):
    """The manifest bytes are not a valid fleetcast manifest."""


class BlockKind(IntEnum):
    """What a block is; see docs/FORMAT.md §2."""

    DATA = 0  #: stored (compressed or raw), sent, written
    ZERO = 1  #: all zeros: not stored, never sent; written as zeros
    UNUSED = 2  #: not allocated by its filesystem: not stored, not sent, not written


_KIND_NAMES = {BlockKind.ZERO: "zero", BlockKind.UNUSED: "unused"}
_KIND_BY_NAME = {v: k for k, v in _KIND_NAMES.items()}


@dataclass(frozen=True)
class BlockEntry:
    """One block as the manifest describes it."""

    index: int
    kind: BlockKind
    offset: int  #: byte offset in the raw image
    length: int  #: raw length (the last block may be short)
    digest: bytes = b""  #: SHA-256 of the raw content (data blocks only)
    stored_size: int = 0  #: bytes on the wire and in the store (data blocks only)

    @property
    def is_raw(self) -> bool:
        """True when the block is stored uncompressed (zstd did not shrink it)."""
        return self.kind is BlockKind.DATA and self.stored_size == self.length


@dataclass(frozen=True)
class Partition:
    """A partition (or the whole disk when there is no table) and its filesystem."""

    number: int
    start: int  #: byte offset in the image
    size: int  #: bytes
    type: str = ""  #: GPT type GUID or MBR type byte as text
    fs: str = ""  #: filesystem type found (ext4, ntfs, vfat, xfs, btrfs, swap, "" if unknown)
    label: str = ""
    uuid: str = ""
    used_map: str = "all"  #: how used blocks were found: "partclone", "all" (every block)
    used_bytes: int | None = None  #: bytes the filesystem reports in use, when known

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "start": self.start,
            "size": self.size,
            "type": self.type,
            "fs": self.fs,
            "label": self.label,
            "uuid": self.uuid,
            "used_map": self.used_map,
            "used_bytes": self.used_bytes,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Partition:
        try:
            return cls(
                number=_int(obj["number"]),
                start=_int(obj["start"]),
                size=_int(obj["size"]),
                type=str(obj.get("type", "")),
                fs=str(obj.get("fs", "")),
                label=str(obj.get("label", "")),
                uuid=str(obj.get("uuid", "")),
                used_map=str(obj.get("used_map", "all")),
                used_bytes=None if obj.get("used_bytes") is None else _int(obj["used_bytes"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"bad partition entry: {exc}") from exc


@dataclass
class Manifest:
    """An image: size, block size, block table, whole-image hash and metadata.

    The block table lives in three arrays indexed by block number: ``kinds``
    (one byte each), ``digests`` (32 bytes each, zeros for non-data blocks) and
    ``stored_sizes`` (0 for non-data blocks).
    """

    image_size: int
    block_size: int
    kinds: bytearray
    digests: bytearray
    stored_sizes: array[int]
    image_sha256: bytes  #: SHA-256 of the raw image with every unused block read as zeros
    created: str  #: ISO 8601 UTC
    source: dict[str, Any] = field(default_factory=dict)
    compression: dict[str, Any] = field(default_factory=lambda: {"algo": "zstd", "level": 3})
    partition_table: str = "none"  #: "gpt", "mbr" or "none"
    partitions: list[Partition] = field(default_factory=list)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def empty(cls, image_size: int, block_size: int = DEFAULT_BLOCK_SIZE) -> Manifest:
        """A manifest of the right shape with every block ``unused``; fill it in with set_*."""
        _check_geometry(image_size, block_size)
        n = block_count(image_size, block_size)
        return cls(
            image_size=image_size,
            block_size=block_size,
            kinds=bytearray([BlockKind.UNUSED]) * n,
            digests=bytearray(HASH_SIZE * n),
            stored_sizes=array("Q", bytes(8 * n)),
            image_sha256=bytes(HASH_SIZE),
            created="",
        )

    def set_data(self, index: int, digest: bytes, stored_size: int) -> None:
        """Mark block ``index`` as data with the raw content's SHA-256 and its stored size."""
        length = self.block_length(index)
        if len(digest) != HASH_SIZE:
            raise ValueError("digest must be 32 bytes")
        if not 0 < stored_size <= length:
            raise ValueError(f"stored size {stored_size} out of range for block of {length}")
        self.kinds[index] = BlockKind.DATA
        self.digests[index * HASH_SIZE : (index + 1) * HASH_SIZE] = digest
        self.stored_sizes[index] = stored_size

    def set_kind(self, index: int, kind: BlockKind) -> None:
        """Mark block ``index`` as zero or unused."""
        if kind is BlockKind.DATA:
            raise ValueError("use set_data for data blocks")
        self.block_length(index)
        self.kinds[index] = kind
        self.digests[index * HASH_SIZE : (index + 1) * HASH_SIZE] = bytes(HASH_SIZE)
        self.stored_sizes[index] = 0

    # -- queries ----------------------------------------------------------------------

    @property
    def block_count(self) -> int:
        return len(self.kinds)

    def block_length(self, index: int) -> int:
        """Raw length of block ``index`` (the last block may be short)."""
        if not 0 <= index < len(self.kinds):
            raise IndexError(f"block {index} out of range (0..{len(self.kinds) - 1})")
        start = index * self.block_size
        return min(self.block_size, self.image_size - start)

    def block(self, index: int) -> BlockEntry:
        kind = BlockKind(self.kinds[index])
        return BlockEntry(
            index=index,
            kind=kind,
            offset=index * self.block_size,
            length=self.block_length(index),
            digest=bytes(self.digests[index * HASH_SIZE : (index + 1) * HASH_SIZE])
            if kind is BlockKind.DATA
            else b"",
            stored_size=self.stored_sizes[index],
        )

    def digest_of(self, index: int) -> bytes:
        """The SHA-256 of data block ``index``'s raw content."""
        return bytes(self.digests[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def __iter__(self) -> Iterator[BlockEntry]:
        for i in range(len(self.kinds)):
            yield self.block(i)

    def count(self, kind: BlockKind) -> int:
        return self.kinds.count(kind)

    @property
    def stored_bytes(self) -> int:
        """Bytes the data blocks take in the store and on the wire (before dedupe)."""
        return sum(self.stored_sizes)

    def data_bytes(self) -> int:
        """Raw bytes covered by data blocks."""
        return sum(self.block_length(i) for i, k in enumerate(self.kinds) if k == BlockKind.DATA)

    def unique_digests(self) -> set[bytes]:
        return {self.digest_of(i) for i, k in enumerate(self.kinds) if k == BlockKind.DATA}

    # -- serialisation ----------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        blocks: list[Any] = []
        i, n = 0, len(self.kinds)
        while i < n:
            kind = self.kinds[i]
            if kind == BlockKind.DATA:
                blocks.append([self.digest_of(i).hex(), self.stored_sizes[i]])
                i += 1
                continue
            j = i
            while j < n and self.kinds[j] == kind:
                j += 1
            blocks.append([_KIND_NAMES[BlockKind(kind)], j - i])
            i = j
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "hash": HASH_NAME,
            "image_size": self.image_size,
            "block_size": self.block_size,
            "image_sha256": self.image_sha256.hex(),
            "created": self.created,
            "source": self.source,
            "compression": self.compression,
            "partition_table": self.partition_table,
            "partitions": [p.to_json() for p in self.partitions],
            "blocks": blocks,
        }

    def to_bytes(self) -> bytes:
        """The canonical encoding; ``digest()`` is the SHA-256 of these bytes."""
        return canonical_json(self.to_json())

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate canonical manifest bytes.

        Raises ManifestError for anything that is not a well-formed version-1 manifest.
        Non-canonical but valid JSON is accepted; re-encode with to_bytes() to digest it.
        """
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_BYTES}")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"manifest is not JSON: {exc}") from exc
        return cls.from_json(obj)

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict):
            raise ManifestError("manifest is not a JSON object")
        if obj.get("format") != FORMAT_NAME:
            raise ManifestError(f"not a fleetcast image manifest (format={obj.get('format')!r})")
        if obj.get("version") != FORMAT_VERSION:
            raise ManifestError(
                f"manifest version {obj.get('version')!r} is not supported (this build reads "
                f"version {FORMAT_VERSION})"
            )
        if obj.get("hash") != HASH_NAME:
            raise ManifestError(f"unsupported block hash {obj.get('hash')!r}")
        try:
            image_size = _int(obj["image_size"])
            block_size = _int(obj["block_size"])
            _check_geometry(image_size, block_size)
            m = cls.empty(image_size, block_size)
            m.image_sha256 = _hex32(obj["image_sha256"])
            m.created = str(obj.get("created", ""))
            source = obj.get("source", {})
            compression = obj.get("compression", {})
            if not isinstance(source, dict) or not isinstance(compression, dict):
                raise ManifestError("source and compression must be objects")
            m.source, m.compression = source, compression
            m.partition_table = str(obj.get("partition_table", "none"))
            parts = obj.get("partitions", [])
            if not isinstance(parts, list):
                raise ManifestError("partitions must be a list")
            m.partitions = [Partition.from_json(p) for p in parts]
            blocks = obj["blocks"]
            if not isinstance(blocks, list):
                raise ManifestError("blocks must be a list")
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ManifestError):
                raise
            raise ManifestError(f"bad manifest field: {exc}") from exc
        i = 0
        n = m.block_count
        for entry in blocks:
            if not isinstance(entry, list) or len(entry) != 2:
                raise ManifestError(f"bad block entry at block {i}: {entry!r:.80}")
            first, second = entry
            if first in _KIND_BY_NAME:
                count = _int(second)
                if count <= 0 or i + count > n:
                    raise ManifestError(f"block run at {i} of {count} overruns {n} blocks")
                m.kinds[i : i + count] = bytes([_KIND_BY_NAME[first]]) * count
                i += count
                continue
            if i >= n:
                raise ManifestError(f"more block entries than the {n} blocks of the image")
            digest = _hex32(first)
            stored = _int(second)
            try:
                m.set_data(i, digest, stored)
            except ValueError as exc:
                raise ManifestError(f"block {i}: {exc}") from exc
            i += 1
        if i != n:
            raise ManifestError(f"block table covers {i} blocks, image has {n}")
        return m


def block_count(image_size: int, block_size: int) -> int:
    """How many blocks an image of ``image_size`` bytes has."""
    return (image_size + block_size - 1) // block_size


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: one byte string per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _check_geometry(image_size: int, block_size: int) -> None:
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size % 4096:
        raise ManifestError(
            f"block size {block_size} must be a multiple of 4096 between "
            f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
        )
    if image_size <= 0:
        raise ManifestError(f"image size {image_size} must be positive")
    if block_count(image_size, block_size) > (1 << 31):
        raise ManifestError("image has too many blocks")


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ManifestError(f"expected a non-negative integer, got {v!r:.40}")
    return v


def _hex32(v: Any) -> bytes:
    if not isinstance(v, str) or len(v) != 64:
        raise ManifestError(f"expected 64 hex characters, got {v!r:.80}")
    try:
        return bytes.fromhex(v)
    except ValueError as exc:
        raise ManifestError(f"expected 64 hex characters, got {v!r:.80}") from exc
