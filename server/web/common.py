"""What every dashboard page shares: templates, formatting filters, form checks."""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

import web
from server.api.deps import WEB_PREFIX, WebUser
from server.services.errors import Forbidden

WEB_ROOT = Path(web.__file__).parent
TEMPLATES = Jinja2Templates(directory=str(WEB_ROOT / "templates"))


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_rate(bps: float | None) -> str:
    """Bits per second as MB/s (megabytes, what a disk-imaging admin compares)."""
    if not bps:
        return "-"
    return f"{bps / 8e6:.1f} MB/s"


def when(t: datetime | None) -> str:
    """A UTC time as 'YYYY-MM-DD HH:MM:SS' (the page says it is UTC)."""
    if t is None:
        return "-"
    if t.tzinfo is not None:
        t = t.astimezone(UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def inventory(inv: dict[str, Any]) -> str:
    """An agent's inventory in one line: CPU cores, RAM, disks, NICs."""
    parts: list[str] = []
    cpu = inv.get("cpu")
    if isinstance(cpu, dict) and cpu.get("cores"):
        parts.append(f"{cpu['cores']} cores")
    if isinstance(inv.get("ram_bytes"), int):
        parts.append(f"{human_bytes(inv['ram_bytes'])} RAM")
    for disk in inv.get("disks") or []:
        if isinstance(disk, dict):
            parts.append(f"{disk.get('name', '?')} {human_bytes(disk.get('size'))}")
    nics = inv.get("nics") or []
    if nics:
        parts.append(f"{len(nics)} NIC{'s' if len(nics) > 1 else ''}")
    return " · ".join(parts) or "-"


TEMPLATES.env.filters.update(bytes=human_bytes, rate=human_rate, when=when, inventory=inventory)


def page(
    request: Request, name: str, user: WebUser | None, status: int = 200, **ctx: Any
) -> HTMLResponse:
    """Render ``name`` with the logged-in user and the CSRF token every form needs."""
    ctx.update(user=user, csrf=user.csrf if user else "", prefix=WEB_PREFIX)
    return TEMPLATES.TemplateResponse(request, name, ctx, status_code=status)


def see_other(path: str) -> RedirectResponse:
    """The answer to a successful form POST: go to ``path`` (post/redirect/get)."""
    return RedirectResponse(path, status_code=303)


def check_origin(request: Request) -> None:
    """Refuse a POST a browser sent from another site (when the browser says so)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return
    host = request.headers.get("host", "")
    if origin.split("://", 1)[-1] != host:
        raise Forbidden(f"a form from {origin} may not post here; use the dashboard's own pages")


def check_post(request: Request, user: WebUser, csrf: str = "") -> None:
    """The Origin check and the per-log-in CSRF token (a form field or X-CSRF-Token)."""
    check_origin(request)
    sent = request.headers.get("x-csrf-token") or csrf
    if not hmac.compare_digest(sent.encode(), user.csrf.encode()):
        raise Forbidden("the form's security token is missing or stale: reload the page")


#: The CSRF token every dashboard form posts.
Csrf = Annotated[str, Form(max_length=64)]
