"""Partition tables (GPT, MBR with logical partitions) and filesystem signatures.

Pure byte parsing: the caller passes a ``read_at(offset, length) -> bytes`` function and
the disk size, and gets back what the disk holds. Nothing here opens a file. Anything
malformed is treated as "no table" (the caller then captures every block, which is
always safe), never trusted: every count and offset is bounded by the disk size.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass

ReadAt = Callable[[int, int], bytes]

#: Bytes from a partition's start that detect_filesystem needs (btrfs's superblock is at 64 KiB).
FS_PROBE_BYTES = 0x10000 + 4096
MAX_GPT_ENTRIES_BYTES = 1 << 20
MAX_LOGICAL_PARTITIONS = 128
_EXTENDED_TYPES = {0x05, 0x0F, 0x85}

# GPT header after the 8-byte signature (UEFI 2.x §5.3.2): revision, header size, header CRC32,
# reserved, current LBA, backup LBA, first usable, last usable, disk GUID, entries LBA,
# entry count, entry size, entries CRC32.
_GPT_HEADER = struct.Struct("<8sIIII QQQQ 16s QIII")
# GPT entry: type GUID, unique GUID, first LBA, last LBA (inclusive), attributes, name.
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
# MBR entry: status, CHS first, type, CHS last, first LBA, sector count.
_MBR_ENTRY = struct.Struct("<B3sB3sII")


@dataclass(frozen=True)
class PartitionEntry:
    """One partition as the table describes it; offsets in bytes from the disk start."""

    number: int
    start: int
    size: int
    type: str  #: GPT type GUID (upper case) or MBR type byte as "0x83"
    name: str = ""  #: GPT partition name


@dataclass(frozen=True)
class PartitionTable:
    kind: str  #: "gpt", "mbr" or "none"
    partitions: tuple[PartitionEntry, ...]


@dataclass(frozen=True)
class FsInfo:
    """What a filesystem's superblock says about itself."""

    fs: str  #: ext2, ext3, ext4, ntfs, vfat, exfat, xfs, btrfs, swap, or "" if unknown
    label: str = ""
    uuid: str = ""
    used_bytes: int | None = None  #: in-use bytes when the superblock records them


def parse_partition_table(read_at: ReadAt, disk_size: int) -> PartitionTable:
    """Read the disk's partition table: GPT (512- or 4096-byte sectors), else MBR, else none.

    A disk whose first sector is itself a filesystem (a "superfloppy" FAT or NTFS volume)
    has no table.
    """
    for sector in (512, 4096):
        gpt = _parse_gpt(read_at, disk_size, sector)
        if gpt is not None:
            return gpt
    head = read_at(0, FS_PROBE_BYTES)
    if detect_filesystem(head).fs:
        return PartitionTable("none", ())
    mbr = _parse_mbr(read_at, disk_size, head[:512])
    return mbr if mbr is not None else PartitionTable("none", ())


def _parse_gpt(read_at: ReadAt, disk_size: int, sector: int) -> PartitionTable | None:
    raw = read_at(sector, 512)
    if len(raw) < 92 or raw[:8] != b"EFI PART":
        return None
    fields = _GPT_HEADER.unpack_from(raw)
    hsize, hcrc = fields[2], fields[3]
    entries_lba, count, esize, ecrc = fields[10], fields[11], fields[12], fields[13]
    if not 92 <= hsize <= 512:
        return None
    header = bytearray(raw[:hsize])
    header[16:20] = b"\0\0\0\0"
    if zlib.crc32(header) != hcrc or esize < _GPT_ENTRY.size or esize % 8:
        return None
    total = count * esize
    if total > MAX_GPT_ENTRIES_BYTES or entries_lba * sector + total > disk_size:
        return None
    table = read_at(entries_lba * sector, total)
    if len(table) != total or zlib.crc32(table) != ecrc:
        return None
    parts = []
    for i in range(count):
        tguid, _, first, last, _, name = _GPT_ENTRY.unpack_from(table, i * esize)
        if tguid == bytes(16) or last < first:
            continue
        start, size = first * sector, (last - first + 1) * sector
        if start + size > disk_size:
            continue
        label = name.decode("utf-16-le", "replace").split("\0", 1)[0]
        ptype = str(uuid.UUID(bytes_le=tguid)).upper()
        parts.append(PartitionEntry(i + 1, start, size, ptype, label))
    return PartitionTable("gpt", tuple(parts))


def _parse_mbr(read_at: ReadAt, disk_size: int, sector0: bytes) -> PartitionTable | None:
    if len(sector0) < 512 or sector0[510:512] != b"\x55\xaa":
        return None
    entries = [_MBR_ENTRY.unpack_from(sector0, 446 + 16 * i) for i in range(4)]
    if any(e[0] not in (0, 0x80) for e in entries):
        return None  # not a partition table (a boot sector of something else)
    parts: list[PartitionEntry] = []
    for i, (_, _, ptype, _, first, count) in enumerate(entries):
        if ptype == 0 or count == 0:
            continue
        if ptype == 0xEE:
            return None  # protective MBR of a GPT disk whose GPT did not parse
        if (first + count) * 512 > disk_size:
            continue
        if ptype in _EXTENDED_TYPES:
            parts += _parse_logical(read_at, disk_size, first)
        else:
            parts.append(PartitionEntry(i + 1, first * 512, count * 512, f"0x{ptype:02x}"))
    return PartitionTable("mbr", tuple(sorted(parts, key=lambda p: p.number)))


def _parse_logical(read_at: ReadAt, disk_size: int, ext_start: int) -> list[PartitionEntry]:
    """Follow the chain of extended boot records; logical partitions are numbered from 5."""
    parts: list[PartitionEntry] = []
    ebr_lba, seen = ext_start, set()
    while len(parts) < MAX_LOGICAL_PARTITIONS and ebr_lba not in seen:
        seen.add(ebr_lba)
        if (ebr_lba + 1) * 512 > disk_size:
            break
        ebr = read_at(ebr_lba * 512, 512)
        if len(ebr) < 512 or ebr[510:512] != b"\x55\xaa":
            break
        _, _, ptype, _, first, count = _MBR_ENTRY.unpack_from(ebr, 446)
        start = (ebr_lba + first) * 512
        if ptype and count and start + count * 512 <= disk_size:
            parts.append(PartitionEntry(5 + len(parts), start, count * 512, f"0x{ptype:02x}"))
        _, _, ntype, _, nfirst, _ = _MBR_ENTRY.unpack_from(ebr, 462)
        if ntype not in _EXTENDED_TYPES or nfirst == 0:
            break
        ebr_lba = ext_start + nfirst
    return parts


def detect_filesystem(head: bytes) -> FsInfo:
    """Recognise a filesystem from the first FS_PROBE_BYTES of its partition."""
    for probe in (_ext, _xfs, _btrfs, _ntfs, _exfat, _fat, _swap):
        info = probe(head)
        if info is not None:
            return info
    return FsInfo("")


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def _ext(h: bytes) -> FsInfo | None:
    sb = h[1024:2048]
    if len(sb) < 1024 or sb[56:58] != b"\x53\xef":
        return None
    compat, incompat = struct.unpack_from("<II", sb, 92)
    fs = "ext4" if incompat & 0x2C0 else "ext3" if compat & 0x4 else "ext2"
    block_size = 1024 << struct.unpack_from("<I", sb, 24)[0]
    count, _, free = struct.unpack_from("<III", sb, 4)
    if incompat & 0x80:  # 64bit: high halves of the counts
        count |= struct.unpack_from("<I", sb, 0x150)[0] << 32
        free |= struct.unpack_from("<I", sb, 0x158)[0] << 32
    used = (count - free) * block_size if count >= free and block_size <= 65536 else None
    return FsInfo(fs, _text(sb[120:136]), str(uuid.UUID(bytes=sb[104:120])), used)


def _xfs(h: bytes) -> FsInfo | None:
    if h[:4] != b"XFSB":
        return None
    return FsInfo("xfs", _text(h[108:120]), str(uuid.UUID(bytes=h[32:48])))


def _btrfs(h: bytes) -> FsInfo | None:
    sb = h[0x10000 : 0x10000 + 4096]
    if sb[0x40:0x48] != b"_BHRfS_M":
        return None
    used = struct.unpack_from("<Q", sb, 0x78)[0]
    return FsInfo("btrfs", _text(sb[0x12B:0x22B]), str(uuid.UUID(bytes=sb[0x20:0x30])), used)


def _ntfs(h: bytes) -> FsInfo | None:
    if h[3:11] != b"NTFS    ":
        return None
    return FsInfo("ntfs", "", h[0x48:0x50][::-1].hex().upper())


def _exfat(h: bytes) -> FsInfo | None:
    if h[3:11] != b"EXFAT   ":
        return None
    serial = h[0x64:0x68][::-1].hex().upper()
    return FsInfo("exfat", "", f"{serial[:4]}-{serial[4:]}")


def _fat(h: bytes) -> FsInfo | None:
    if len(h) < 512 or h[510:512] != b"\x55\xaa":
        return None
    if h[82:87] == b"FAT32":
        serial, label = h[67:71], h[71:82]
    elif h[54:57] == b"FAT":
        serial, label = h[39:43], h[43:54]
    else:
        return None
    s = serial[::-1].hex().upper()
    name = _text(label)
    return FsInfo("vfat", "" if name == "NO NAME" else name, f"{s[:4]}-{s[4:]}")


def _swap(h: bytes) -> FsInfo | None:
    if h[4086:4096] not in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return None
    return FsInfo("swap", _text(h[1052:1068]), str(uuid.UUID(bytes=h[1036:1052])))
