"""Log in (an admin API token set as an HttpOnly, SameSite=Strict cookie) and log out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlmodel import select

from server.api.deps import WEB_COOKIE, WEB_PREFIX, DbDep, WebDep
from server.models import ApiToken
from server.security import token_hash
from server.services import users
from server.services.audit import record
from server.services.errors import Unauthorized
from server.web.common import Csrf, check_origin, check_post, page, see_other

router = APIRouter(prefix=WEB_PREFIX, include_in_schema=False)
#: How long the browser keeps the log-in cookie (the token itself lives until log-out).
COOKIE_MAX_AGE = 12 * 3600


def _safe_next(target: str) -> str:
    """Only a dashboard path may follow the log-in (no open redirect to another site)."""
    ok = target.startswith(WEB_PREFIX) and not target.startswith("//") and "\\" not in target
    return target if ok else WEB_PREFIX


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = WEB_PREFIX) -> HTMLResponse:
    return page(request, "login.html", None, next=_safe_next(next), error="", username="")


@router.post("/login", response_model=None)
def login(
    request: Request,
    db: DbDep,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2048)] = WEB_PREFIX,
) -> Response:
    """Check the password, make a token for this browser, set it as the cookie."""
    check_origin(request)
    try:
        user = users.authenticate(db, username.strip(), password)
    except Unauthorized as exc:
        return page(
            request,
            "login.html",
            None,
            401,
            next=_safe_next(next),
            error=str(exc),
            username=username,
        )
    token = users.create_admin_token(db, user, "dashboard")
    record(db, None, "user.login", actor=f"user:{user.username}", message="dashboard log-in")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        WEB_COOKIE,
        token,
        max_age=COOKIE_MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request, user: WebDep, db: DbDep, csrf: Csrf = "") -> RedirectResponse:
    """Revoke this browser's token and drop the cookie."""
    check_post(request, user, csrf)
    row = db.exec(select(ApiToken).where(ApiToken.token_hash == token_hash(user.token))).first()
    if row is not None:
        row.revoked = True
        db.add(row)
    record(db, None, "user.logout", actor=user.who.actor, message="dashboard log-out")
    response = see_other(f"{WEB_PREFIX}/login")
    response.delete_cookie(WEB_COOKIE, path="/")
    return response
