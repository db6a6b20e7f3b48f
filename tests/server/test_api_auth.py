"""Every route of the app needs an admin token or a machine credential, except the public ones;
every dashboard page (under /ui) needs the log-in cookie, except the log-in page itself.

The test walks ``app.routes`` itself, so a route added later without a guard fails here.
"""

from __future__ import annotations

import re
from typing import Any

from apitest import *  # noqa: F403
from apitest import Api
from fastapi.routing import APIRoute

from server.api.deps import (
    PUBLIC_ROUTES,
    WEB_COOKIE,
    WEB_PREFIX,
    WEB_PUBLIC_ROUTES,
    WEB_STATIC,
)

#: Agent routes accept only a machine credential.
AGENT_PREFIX = "/api/agent/"
#: Routes FastAPI adds for the documentation (public by design).
DOC_PATHS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _flatten(routes: list[Any]) -> list[Any]:
    """Every route, including those of included routers (the app has no extra prefixes)."""
    out: list[Any] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out += _flatten(list(inner.routes)) if inner is not None else [route]
    return out


def _routes(api: Api) -> list[tuple[str, str]]:
    out = []
    for route in _flatten(list(api.client.app.routes)):  # type: ignore[attr-defined]
        path = getattr(route, "path", "")
        if not isinstance(route, APIRoute):
            assert path in DOC_PATHS | {WEB_STATIC}, f"unexpected non-API route {path}"
            continue
        for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
            out.append((method, re.sub(r"\{[^}]+\}", "1", path)))
    return out


def _call(
    api: Api, method: str, path: str, headers: dict[str, str], cookie: str | None = None
) -> int:
    api.client.cookies.clear()
    if cookie is not None:
        api.client.cookies.set(WEB_COOKIE, cookie)
    try:
        r = api.client.request(method, path, headers=headers, json={}, follow_redirects=False)
    finally:
        api.client.cookies.clear()
    if r.status_code == 303:
        assert r.headers["location"].startswith(f"{WEB_PREFIX}/login"), (method, path)
    return r.status_code


def _is_page(path: str) -> bool:
    return path == WEB_PREFIX or path.startswith(WEB_PREFIX + "/")


def test_the_app_has_the_routes_this_test_expects(api: Api) -> None:
    routes = _routes(api)
    assert len(routes) >= 25
    assert ("POST", "/api/sessions") in routes and ("GET", "/metrics") in routes


def test_every_non_public_route_refuses_a_request_without_a_token(api: Api) -> None:
    for method, path in _routes(api):
        if (method, path) in PUBLIC_ROUTES or _is_page(path):
            continue
        assert _call(api, method, path, {}) == 401, f"{method} {path} answered without a token"
        bad = {"Authorization": "Bearer fca_not-a-real-token"}
        assert _call(api, method, path, bad) == 401, f"{method} {path} took a made-up token"


def test_admin_routes_refuse_machine_credentials_and_agent_routes_refuse_admin_tokens(
    api: Api,
) -> None:
    machine = api.enroll("52:54:00:99:00:01")
    for method, path in _routes(api):
        if (method, path) in PUBLIC_ROUTES or _is_page(path):
            continue
        if path.startswith(AGENT_PREFIX):
            code = _call(api, method, path, api.auth)
            assert code == 403, f"{method} {path} accepted an admin token ({code})"
        else:
            code = _call(api, method, path, machine)
            assert code == 403, f"{method} {path} accepted a machine credential ({code})"


def test_public_routes_are_exactly_the_documented_few(api: Api) -> None:
    assert {
        ("GET", "/healthz"),
        ("POST", "/api/auth/login"),
        ("POST", "/api/agent/register"),
    } == PUBLIC_ROUTES
    assert api.client.get("/healthz").status_code == 200
    no_token = api.client.post("/api/agent/register", json={"macs": ["52:54:00:99:00:02"]})
    assert no_token.status_code == 401


def test_api_routes_do_not_take_the_dashboard_cookie(api: Api) -> None:
    """The cookie is for pages only: an API call carrying just the cookie is a 401."""
    for method, path in _routes(api):
        if (method, path) in PUBLIC_ROUTES or _is_page(path):
            continue
        code = _call(api, method, path, {}, cookie=api.token)
        assert code == 401, f"{method} {path} took the dashboard cookie ({code})"


def test_every_dashboard_page_but_log_in_sends_a_stranger_to_the_log_in_page(api: Api) -> None:
    """No cookie, a made-up one, or only a bearer token: a 303 to /ui/login, never the page.
    A machine credential in the cookie is a 403."""
    machine = api.enroll("52:54:00:99:00:03")["Authorization"].removeprefix("Bearer ")
    pages = [(m, p) for m, p in _routes(api) if _is_page(p)]
    assert len(pages) >= 10 and ("GET", f"{WEB_PREFIX}/sessions/1") in pages
    for method, path in pages:
        if (method, path) in WEB_PUBLIC_ROUTES:
            continue
        assert _call(api, method, path, {}) == 303, f"{method} {path} answered a stranger"
        assert _call(api, method, path, {}, cookie="fca_made-up") == 303, (method, path)
        assert _call(api, method, path, api.auth) == 303, f"{method} {path} took a bearer token"
        assert _call(api, method, path, {}, cookie=machine) == 403, (method, path)


def test_the_public_dashboard_pages_are_only_log_in(api: Api) -> None:
    assert {("GET", f"{WEB_PREFIX}/login"), ("POST", f"{WEB_PREFIX}/login")} == WEB_PUBLIC_ROUTES
    assert api.client.get(f"{WEB_PREFIX}/login").status_code == 200
