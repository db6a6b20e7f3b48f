"""Session keys as text: 32 random bytes written as 64 hex characters (docs/PROTOCOL.md)."""

from __future__ import annotations

KEY_SIZE = 32


class KeyFormatError(ValueError):
    """A key file's text is not a fleetcast session key."""


def format_key(key: bytes) -> str:
    """The key file text for ``key`` (64 hex characters and a newline)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"a session key is {KEY_SIZE} bytes, got {len(key)}")
    return key.hex() + "\n"


def parse_key(text: str) -> bytes:
    """The key in a key file's ``text``; raises KeyFormatError with a clear message."""
    body = text.strip()
    if len(body) != 2 * KEY_SIZE:
        raise KeyFormatError(
            f"a key file holds {2 * KEY_SIZE} hex characters, this one holds {len(body)}; "
            "make one with 'fleetcast keygen FILE'"
        )
    try:
        return bytes.fromhex(body)
    except ValueError:
        raise KeyFormatError("the key file holds characters that are not hex digits") from None
