"""Passwords (argon2id through argon2-cffi) and bearer tokens (random, stored as SHA-256)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()
#: Token prefixes say what a leaked token is: an admin's API token or a machine credential.
ADMIN_PREFIX = "fca_"
MACHINE_PREFIX = "fcm_"
MIN_PASSWORD = 8


def hash_password(password: str) -> str:
    """An argon2id hash of ``password`` (salted, parameters embedded)."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when ``password`` matches ``password_hash``; never raises on a bad hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def new_token(prefix: str) -> tuple[str, str]:
    """A new random bearer token and the hash the database keeps of it."""
    token = prefix + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    """SHA-256 (hex) of a token: tokens are 256-bit random, so no slow hash is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (the enrollment token)."""
    return hmac.compare_digest(a.encode(), b.encode())
