"""The block codec shared by the store, the sender and the receiver (docs/FORMAT.md §3).

A data block's *payload* is what the store keeps and the wire carries: one zstd frame
(with its content size in the header), or the raw bytes themselves when zstd does not
shrink them. The rule is by length alone: a payload is raw iff its length equals the
block's raw length. ``decode_block`` checks everything a hostile or corrupted payload
could get wrong and never produces more than the block's raw length.

Compressors and decompressors are reused per thread (zstandard's contexts are not
thread-safe, and creating one per block costs more than decoding a small block).
zstandard releases the GIL while it works, and so does hashlib on large buffers, so
callers get real parallelism from threads.
"""

from __future__ import annotations

import hashlib
import threading

import zstandard

from protocol.manifest import HASH_SIZE, MAX_BLOCK_SIZE

DEFAULT_LEVEL = 3
MIN_LEVEL = 1
MAX_LEVEL = 19

_ZEROS = bytes(MAX_BLOCK_SIZE)  # compared against, never written
_local = threading.local()


class BlockError(ValueError):
    """A payload does not decode to the block it claims to be."""


def is_zero(raw: bytes | bytearray | memoryview) -> bool:
    """True when every byte of ``raw`` (at most MAX_BLOCK_SIZE) is zero."""
    n = len(raw)
    if n > len(_ZEROS):
        raise ValueError(f"block of {n} bytes is larger than {len(_ZEROS)}")
    return raw == memoryview(_ZEROS)[:n]


def block_digest(raw: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of a block's raw content."""
    return hashlib.sha256(raw).digest()


def encode_block(
    raw: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL
) -> tuple[bytes, bytes]:
    """Hash and compress one raw block.

    Returns ``(digest, payload)``: the SHA-256 of ``raw``, and a zstd frame of it, or
    ``bytes(raw)`` when the frame would not be smaller than ``raw`` (stored raw).
    """
    if not raw:
        raise ValueError("cannot encode an empty block")
    return hashlib.sha256(raw).digest(), compress_block(raw, level)


def compress_block(raw: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """The payload of one raw block: a zstd frame, or ``bytes(raw)`` if that is not smaller.

    For callers that already know the digest (and may find the block stored already).
    """
    frame = _compressor(level).compress(raw)
    if len(frame) < len(raw):
        return frame
    return bytes(raw)


def decode_block(
    payload: bytes | bytearray | memoryview, raw_length: int, expected_digest: bytes
) -> bytes:
    """Turn a payload back into the raw block and prove it is the right one.

    Raises BlockError when the payload is not a single zstd frame of exactly
    ``raw_length`` bytes (and not raw either), or its content's SHA-256 is not
    ``expected_digest``. Never allocates more than ``raw_length`` for the output.
    """
    if len(expected_digest) != HASH_SIZE:
        raise BlockError(f"expected digest of {HASH_SIZE} bytes, got {len(expected_digest)}")
    if raw_length <= 0:
        raise BlockError(f"bad raw length {raw_length}")
    n = len(payload)
    if n == raw_length:
        raw = bytes(payload)
    elif n > raw_length:
        raise BlockError(f"payload of {n} bytes is longer than the {raw_length}-byte block")
    else:
        raw = _decompress(payload, raw_length)
    if hashlib.sha256(raw).digest() != expected_digest:
        raise BlockError(
            f"content hash mismatch: got {hashlib.sha256(raw).hexdigest()[:16]}..., "
            f"expected {expected_digest.hex()[:16]}..."
        )
    return raw


def decode_block_into(
    payload: bytes | bytearray | memoryview,
    raw_length: int,
    expected_digest: bytes,
    out: bytearray,
) -> memoryview:
    """``decode_block``, decoding into ``out`` (at least ``raw_length`` bytes, reused by the
    caller from block to block) instead of a new buffer; returns the view of the raw block.

    A fresh megabyte per block costs the receiver a page fault per 4 KiB (its big buffers
    are mmapped, so freed blocks go back to the OS); a reused one is mapped and warm. Same
    checks, same BlockError as ``decode_block``. The view is valid until ``out`` is reused
    (a block stored raw is returned as a view of ``payload`` itself: no copy).
    """
    if len(expected_digest) != HASH_SIZE:
        raise BlockError(f"expected digest of {HASH_SIZE} bytes, got {len(expected_digest)}")
    if raw_length <= 0 or raw_length > len(out):
        raise BlockError(f"bad raw length {raw_length} (buffer of {len(out)})")
    view = memoryview(out)[:raw_length]
    n = len(payload)
    if n == raw_length:
        view = memoryview(payload)  # stored raw: check and write it where it is
    elif n > raw_length:
        raise BlockError(f"payload of {n} bytes is longer than the {raw_length}-byte block")
    else:
        _decompress_into(payload, view)
    digest = hashlib.sha256(view).digest()
    if digest != expected_digest:
        raise BlockError(
            f"content hash mismatch: got {digest.hex()[:16]}..., "
            f"expected {expected_digest.hex()[:16]}..."
        )
    return view


def _check_frame(payload: bytes | bytearray | memoryview, raw_length: int) -> None:
    """The payload is one zstd frame that declares exactly ``raw_length`` bytes."""
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise BlockError(f"payload is not a zstd frame: {exc}") from exc
    if declared != raw_length:
        raise BlockError(f"zstd frame declares {declared} bytes, block has {raw_length}")


def _decompress_into(payload: bytes | bytearray | memoryview, view: memoryview) -> None:
    raw_length = len(view)
    _check_frame(payload, raw_length)
    got = 0
    try:
        reader = _decompressor().stream_reader(payload)
        while got < raw_length:
            n = reader.readinto(view[got:])
            if not n:
                break
            got += n
        more = reader.readinto(bytearray(1)) if got == raw_length else 0
    except zstandard.ZstdError as exc:
        raise BlockError(f"zstd frame does not decompress: {exc}") from exc
    if got != raw_length or more:
        raise BlockError(f"zstd frame gave {got + more} bytes or more, block has {raw_length}")


def _decompress(payload: bytes | bytearray | memoryview, raw_length: int) -> bytes:
    _check_frame(payload, raw_length)
    try:
        raw = _decompressor().decompress(payload, max_output_size=raw_length)
    except zstandard.ZstdError as exc:
        raise BlockError(f"zstd frame does not decompress: {exc}") from exc
    if len(raw) != raw_length:
        raise BlockError(f"zstd frame gave {len(raw)} bytes, block has {raw_length}")
    return raw


def _compressor(level: int) -> zstandard.ZstdCompressor:
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level {level} must be between {MIN_LEVEL} and {MAX_LEVEL}")
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx
