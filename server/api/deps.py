"""Shared dependencies: settings, database session, store, event bus, and who is calling.

Every route declares exactly one of ``AdminDep`` (an admin's API token), ``MachineDep`` (a
machine credential), ``WebDep`` (the dashboard's log-in cookie; pages under /ui) or nothing
(the explicitly public routes, listed in PUBLIC_ROUTES and WEB_PUBLIC_ROUTES and checked by
tests/server/test_api_auth.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Session as DbSession

from server.config import Settings
from server.db import db_session
from server.events import EventBus
from server.images.store import ImageStore
from server.metrics import Metrics
from server.models import MAX_ID
from server.services.errors import Forbidden, Unauthorized
from server.services.runner import SessionManager
from server.services.users import Principal, resolve_token

#: (method, path) of every route that needs no admin token or machine credential.
PUBLIC_ROUTES = {
    ("GET", "/healthz"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/agent/register"),  # its own credential: the enrollment token
}


class ErrorDetail(BaseModel):
    """Every error but a schema validation error (422): what went wrong and what to do."""

    detail: str


#: The error answers every route may give, for the OpenAPI schema.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail, "description": text}
    for code, text in (
        (400, "the request's values do not make sense"),
        (401, "no valid token"),
        (403, "the token may not do this"),
        (404, "no such thing"),
        (409, "clashes with the current state"),
    )
}

_bearer = HTTPBearer(auto_error=False, description="an admin API token or a machine credential")


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_db(request: Request) -> Iterator[DbSession]:
    with db_session(request.app.state.engine) as db:
        yield db


async def get_store(request: Request) -> ImageStore:
    store: ImageStore = request.app.state.store
    return store


async def get_bus(request: Request) -> EventBus:
    bus: EventBus = request.app.state.bus
    return bus


async def get_manager(request: Request) -> SessionManager:
    manager: SessionManager = request.app.state.manager
    return manager


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


# The getters above are async on purpose: a sync dependency costs a worker-thread hop.
SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": commit before the response is sent, so a client never acts on an
# answer (a new credential, a new session) that is not in the database yet.
DbDep = Annotated[DbSession, Depends(get_db, scope="function")]
StoreDep = Annotated[ImageStore, Depends(get_store)]
BusDep = Annotated[EventBus, Depends(get_bus)]
ManagerDep = Annotated[SessionManager, Depends(get_manager)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _principal(db: DbSession, creds: HTTPAuthorizationCredentials | None) -> Principal:
    if creds is None or not creds.credentials:
        raise Unauthorized("this route needs a bearer token (Authorization: Bearer TOKEN)")
    return resolve_token(db, creds.credentials)


def require_admin(db: DbDep, creds: BearerDep) -> Principal:
    """The admin calling; 401 without a valid token, 403 for a machine credential.

    Uses the request's own database session (one connection per request)."""
    who = _principal(db, creds)
    if who.kind != "admin":
        raise Forbidden("this route needs an admin's API token, not a machine credential")
    return who


def require_machine(db: DbDep, creds: BearerDep) -> Principal:
    """The machine calling; 401 without a valid credential, 403 for an admin token."""
    who = _principal(db, creds)
    if who.kind != "machine":
        raise Forbidden("this route is for agents: use the machine credential from register")
    return who


#: A path id, and an optional query id (1..2^31-1; larger ones get a 422, not a 500).
Id = Annotated[int, Path(ge=1, le=MAX_ID)]
OptId = Annotated[int | None, Query(ge=1, le=MAX_ID)]

AdminDep = Annotated[Principal, Depends(require_admin)]
MachineDep = Annotated[Principal, Depends(require_machine)]


# -- the web dashboard: an admin token in an HttpOnly cookie ---------------------------------

#: The dashboard's pages live under this prefix; its static files under WEB_STATIC.
WEB_PREFIX = "/ui"
WEB_STATIC = "/ui/static"
#: The cookie holding the admin API token made at log-in (HttpOnly, SameSite=Strict).
WEB_COOKIE = "fleetcast_session"
#: (method, path) of the dashboard's pages that need no log-in.
WEB_PUBLIC_ROUTES = {("GET", "/ui/login"), ("POST", "/ui/login")}


class LoginRequired(Exception):
    """A dashboard page was asked for without a valid log-in cookie (answered with a
    redirect to the log-in page; server/web.py)."""


@dataclass(frozen=True)
class WebUser:
    """The admin behind a dashboard request, and the cookie's token (its CSRF secret)."""

    who: Principal
    token: str

    @property
    def csrf(self) -> str:
        """The per-log-in token every dashboard form carries (derived from the cookie)."""
        return hashlib.sha256(b"fleetcast-csrf:" + self.token.encode()).hexdigest()[:32]


def require_web_admin(request: Request, db: DbDep) -> WebUser:
    """The admin logged in to the dashboard. Only the cookie counts (a bearer header does
    not: pages are for browsers); a missing, unknown or revoked cookie raises LoginRequired,
    a machine credential in it is 403."""
    token = request.cookies.get(WEB_COOKIE, "")
    if not token:
        raise LoginRequired()
    try:
        who = resolve_token(db, token)
    except Unauthorized:
        raise LoginRequired() from None
    if who.kind != "admin":
        raise Forbidden("the dashboard is for admins; log in with a user name and password")
    return WebUser(who, token)


WebDep = Annotated[WebUser, Depends(require_web_admin)]
