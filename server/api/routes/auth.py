"""Log in with a user name and password to get an API token; who am I."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import ERRORS, AdminDep, DbDep
from server.models import LoginRequest, TokenPublic, User, UserPublic
from server.services import users
from server.services.audit import record
from server.services.errors import NotFound

router = APIRouter(prefix="/api/auth", tags=["auth"], responses=ERRORS)


@router.post("/login", response_model=TokenPublic)
def login(body: LoginRequest, db: DbDep) -> TokenPublic:
    """A new API token for the user (send it as ``Authorization: Bearer TOKEN``)."""
    user = users.authenticate(db, body.username, body.password)
    token = users.create_admin_token(db, user, body.token_name)
    record(db, None, "user.login", actor=f"user:{user.username}", message="logged in")
    return TokenPublic(token=token, kind="admin", name=body.token_name)


@router.get("/me", response_model=UserPublic)
def me(who: AdminDep, db: DbDep) -> User:
    """The user the token belongs to."""
    user = db.get(User, who.user_id)
    if user is None:
        raise NotFound("the token's user is gone")
    return user
