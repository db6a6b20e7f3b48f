"""The web dashboard: server-rendered pages under /ui (Jinja2), static files, cookie log-in.

``install(app)`` adds the pages, the static files and the two error answers pages need: a
missing log-in goes to the log-in page, a refused action shows what went wrong as a page.
Pages call the same services as the API (server/services); docs/DASHBOARD.md describes them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from server.api.deps import WEB_PREFIX, WEB_STATIC, LoginRequired
from server.services.errors import ServiceError
from server.web import auth, captures, inventory, schedules, sessions
from server.web.common import TEMPLATES, WEB_ROOT

Handler = Callable[[Request, Exception], Awaitable[Response]]


def install(app: FastAPI, api_errors: Handler) -> None:
    """Add the dashboard to ``app``; ``api_errors`` keeps answering ServiceError outside /ui."""
    for module in (auth, sessions, inventory, schedules, captures):
        app.include_router(module.router)
    app.mount(WEB_STATIC, StaticFiles(directory=WEB_ROOT / "static"), name="web-static")
    app.add_exception_handler(LoginRequired, _login_required)

    async def service_error(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith(WEB_PREFIX + "/") and request.url.path != WEB_PREFIX:
            return await api_errors(request, exc)
        assert isinstance(exc, ServiceError)
        return TEMPLATES.TemplateResponse(
            request,
            "error.html",
            {"status": exc.status, "message": str(exc), "user": None, "prefix": WEB_PREFIX},
            status_code=exc.status,
        )

    app.add_exception_handler(ServiceError, service_error)


async def _login_required(request: Request, _exc: Exception) -> Response:
    target = request.url.path if request.method == "GET" else WEB_PREFIX
    return RedirectResponse(f"{WEB_PREFIX}/login?next={target}", status_code=303)
