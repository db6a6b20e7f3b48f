"""The block codec (docs/FORMAT.md §3): payloads round-trip, and any bad payload is refused."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
import zstandard

from protocol.codec import (
    BlockError,
    block_digest,
    decode_block,
    decode_block_into,
    encode_block,
    is_zero,
)

MIB = 1 << 20


def text_block(n: int = MIB) -> bytes:
    line = b"fleetcast golden image block, compressible text line 0123456789\n"
    return (line * (n // len(line) + 1))[:n]


def test_compressible_block_is_stored_as_a_smaller_zstd_frame() -> None:
    raw = text_block()
    digest, payload = encode_block(raw)
    assert digest == hashlib.sha256(raw).digest()
    assert len(payload) < len(raw)
    assert zstandard.frame_content_size(payload) == len(raw)
    assert decode_block(payload, len(raw), digest) == raw


def test_incompressible_block_is_stored_raw_by_the_length_rule() -> None:
    raw = os.urandom(MIB)
    digest, payload = encode_block(raw)
    assert payload == raw
    assert decode_block(payload, len(raw), digest) == raw


def test_short_last_block_round_trips() -> None:
    raw = text_block(12345)
    digest, payload = encode_block(raw, level=1)
    assert decode_block(payload, 12345, digest) == raw


def test_flipped_byte_in_a_frame_is_a_block_error() -> None:
    raw = text_block()
    digest, payload = encode_block(raw)
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(BlockError):
        decode_block(bytes(bad), len(raw), digest)


def test_flipped_byte_in_a_raw_payload_is_a_hash_mismatch() -> None:
    raw = os.urandom(4096 * 16)
    digest, payload = encode_block(raw)
    bad = bytearray(payload)
    bad[100] ^= 0x80
    with pytest.raises(BlockError, match="hash mismatch"):
        decode_block(bytes(bad), len(raw), digest)


def test_wrong_digest_is_refused() -> None:
    raw = text_block()
    _, payload = encode_block(raw)
    with pytest.raises(BlockError, match="hash mismatch"):
        decode_block(payload, len(raw), block_digest(b"other"))


def test_frame_declaring_a_huge_size_is_refused_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 * MIB))
    with pytest.raises(BlockError, match="declares"):
        decode_block(bomb, MIB, block_digest(bytes(MIB)))


def test_frame_without_content_size_is_refused() -> None:
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    raw = text_block()
    frame = cctx.compress(raw)
    with pytest.raises(BlockError):
        decode_block(frame, len(raw), block_digest(raw))


def test_garbage_and_oversized_payloads_are_refused() -> None:
    with pytest.raises(BlockError, match="not a zstd frame"):
        decode_block(b"not zstd at all", MIB, block_digest(b"x"))
    with pytest.raises(BlockError, match="longer"):
        decode_block(bytes(MIB + 1), MIB, block_digest(b"x"))
    with pytest.raises(BlockError):
        decode_block(b"", MIB, block_digest(b"x"))


def test_bad_level_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="level"):
        encode_block(b"abc", level=0)


def test_is_zero() -> None:
    assert is_zero(bytes(MIB))
    assert not is_zero(bytes(MIB - 1) + b"\x01")
    assert is_zero(memoryview(bytearray(4096)))


def test_codec_is_safe_to_use_from_many_threads() -> None:
    blocks = [text_block(MIB - i * 4096) for i in range(8)]
    errors: list[BaseException] = []

    def work(raw: bytes) -> None:
        try:
            for _ in range(5):
                digest, payload = encode_block(raw)
                assert decode_block(payload, len(raw), digest) == raw
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(b,)) for b in blocks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors


def test_decoding_into_a_reused_buffer_gives_each_block_exactly() -> None:
    out = bytearray(b"\xff" * MIB)  # dirty from an earlier block
    for raw in (text_block(), os.urandom(MIB), text_block(12345), os.urandom(777)):
        digest, payload = encode_block(raw, level=1)
        view = decode_block_into(payload, len(raw), digest, out)
        assert len(view) == len(raw) and view == raw


def test_decoding_into_refuses_what_decode_block_refuses() -> None:
    raw = text_block()
    digest, payload = encode_block(raw)
    out = bytearray(MIB)
    bad = bytearray(payload)
    bad[len(bad) // 2] ^= 0x01
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 * MIB))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    cases = [
        (bytes(bad), len(raw), digest, None),
        (bomb, MIB, block_digest(bytes(MIB)), "declares"),
        (no_size, len(raw), digest, None),
        (b"not zstd at all", MIB, digest, "not a zstd frame"),
        (bytes(MIB + 1), MIB, digest, "longer"),
        (payload, len(raw), block_digest(b"other"), "hash mismatch"),
        (payload, 2 * MIB, digest, "buffer"),
    ]
    for data, length, want, match in cases:
        with pytest.raises(BlockError, match=match):
            decode_block_into(data, length, want, out)
