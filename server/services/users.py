"""Admin users, their API tokens, and resolving a bearer token to who is calling."""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session as DbSession
from sqlmodel import select

from server.models import ApiToken, Machine, User, utcnow
from server.security import (
    ADMIN_PREFIX,
    MIN_PASSWORD,
    hash_password,
    new_token,
    token_hash,
    verify_password,
)
from server.services.errors import Conflict, Invalid, Unauthorized


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: an admin user or a machine's agent."""

    kind: str  #: "admin" or "machine"
    user_id: int | None = None
    username: str = ""
    machine_id: int | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"user:{self.username}" if self.kind == "admin" else f"machine:{self.machine_id}"


def create_user(db: DbSession, username: str, password: str) -> User:
    """A new admin; raises Conflict if the name is taken, Invalid for a short password."""
    username = username.strip()
    if not username or len(username) > 64:
        raise Invalid("the user name must be 1-64 characters")
    if len(password) < MIN_PASSWORD:
        raise Invalid(f"the password must be at least {MIN_PASSWORD} characters")
    if db.exec(select(User).where(User.username == username)).first() is not None:
        raise Conflict(f"a user named {username!r} exists already")
    user = User(username=username, password_hash=hash_password(password))
    db.add(user)
    db.flush()
    return user


def authenticate(db: DbSession, username: str, password: str) -> User:
    """The active user with this name and password; raises Unauthorized otherwise."""
    user = db.exec(select(User).where(User.username == username)).first()
    if user is None or not user.is_active or not verify_password(user.password_hash, password):
        raise Unauthorized("wrong user name or password")
    return user


def create_admin_token(db: DbSession, user: User, name: str = "") -> str:
    """A new API token for ``user``; only the returned text can ever show it again."""
    token, digest = new_token(ADMIN_PREFIX)
    db.add(ApiToken(token_hash=digest, kind="admin", name=name, user_id=user.id))
    db.flush()
    return token


def resolve_token(db: DbSession, token: str) -> Principal:
    """Who holds ``token``; raises Unauthorized for an unknown or revoked token."""
    row = db.exec(select(ApiToken).where(ApiToken.token_hash == token_hash(token))).first()
    if row is None or row.revoked:
        raise Unauthorized("unknown or revoked token: log in again or ask for a new token")
    if row.kind == "admin":
        user = db.get(User, row.user_id)
        if user is None or not user.is_active:
            raise Unauthorized("this token's user is disabled or deleted")
        return Principal("admin", user_id=user.id, username=user.username)
    machine = db.get(Machine, row.machine_id)
    if machine is None:
        raise Unauthorized("this credential's machine was deleted: enroll again")
    return Principal("machine", machine_id=machine.id)


def touch_token(db: DbSession, token: str) -> None:
    """Remember when a token was last used (best effort)."""
    row = db.exec(select(ApiToken).where(ApiToken.token_hash == token_hash(token))).first()
    if row is not None:
        row.last_used_at = utcnow()
        db.add(row)
