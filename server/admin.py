"""``fleetcast server`` (uvicorn) and ``fleetcast admin create-user|token|migrate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from sqlmodel import Session as DbSession

from server.config import Settings
from server.models import User


def server_main(argv: Sequence[str]) -> int:
    """Serve the API until interrupted; returns an exit status."""
    p = argparse.ArgumentParser(
        prog="fleetcast server",
        description="Run the fleetcast control plane (API at /api, docs at /docs). "
        "Configured by FLEETCAST_* environment variables; see docs/SERVER.md.",
    )
    p.add_argument("--host", help="address to listen on (default $FLEETCAST_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default $FLEETCAST_PORT or 8080)")
    p.add_argument(
        "--uds",
        metavar="PATH",
        help="also listen on this Unix socket (mode 0600): local administration that works "
        "whatever network namespace the TCP listener is in",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    try:
        args = p.parse_args(list(argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    settings = _settings()
    if settings is None:
        return 2
    import uvicorn

    from server.main import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_graceful_shutdown=20,
        timeout_keep_alive=30,  # clients (dashboards, bench) reuse connections
    )
    try:
        sockets = _listen(args.host or settings.host, args.port or settings.port, args.uds)
    except OSError as exc:
        print(f"fleetcast server: cannot listen: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_server(config, app.state).serve(sockets=sockets))
    finally:
        for sock in sockets:
            sock.close()
        if args.uds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(args.uds)
    return 0


def _server(config: Any, state: Any) -> Any:
    """A uvicorn Server that, when stopping, first answers the agents' waiting assignment
    requests (long polls of up to 25 s), which it would otherwise wait for before the app's
    lifespan ends (up to timeout_graceful_shutdown)."""
    import uvicorn

    from server.services.assignwait import close_waits

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            close_waits(state)
            await super().shutdown(sockets)

    return Server(config)


def _listen(host: str, port: int, uds: str | None) -> list[socket.socket]:
    """The TCP listener, and the Unix socket listener when ``uds`` is given."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, port))
    tcp.listen(2048)
    out = [tcp]
    if uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uds)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            unix.bind(uds)
        finally:
            os.umask(old)
        unix.listen(128)
        out.append(unix)
    return out


def admin_main(argv: Sequence[str]) -> int:
    """``create-user NAME``, ``token NAME``, ``migrate``; returns an exit status."""
    p = argparse.ArgumentParser(prog="fleetcast admin", description="Administer the server.")
    sub = p.add_subparsers(dest="cmd", required=True)
    cu = sub.add_parser(
        "create-user",
        help="add an admin user (password from a prompt or $FLEETCAST_ADMIN_PASSWORD)",
    )
    cu.add_argument("username")
    tk = sub.add_parser("token", help="print a new API token for a user")
    tk.add_argument("username")
    tk.add_argument("--name", default="cli", help="a label for the token")
    sub.add_parser("migrate", help="bring the database schema up to date")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    settings = _settings()
    if settings is None:
        return 2
    from server.db import db_session, make_engine, migrate
    from server.services import users
    from server.services.errors import ServiceError

    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        if args.cmd == "migrate":
            print(f"database schema is up to date ({engine.url.render_as_string()})")
            return 0
        with db_session(engine) as db:
            if args.cmd == "create-user":
                password = os.environ.get("FLEETCAST_ADMIN_PASSWORD") or _ask_password()
                users.create_user(db, args.username, password)
                print(f"created user {args.username}", file=sys.stderr)
            else:
                user = _user(db, args.username)
                print(users.create_admin_token(db, user, args.name))
        return 0
    except ServiceError as exc:
        print(f"fleetcast admin: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def _user(db: DbSession, username: str) -> User:
    from sqlmodel import select

    from server.services.errors import NotFound

    user = db.exec(select(User).where(User.username == username)).first()
    if user is None:
        raise NotFound(f"no user named {username!r}: create it with 'fleetcast admin create-user'")
    return user


def _ask_password() -> str:
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        from server.services.errors import Invalid

        raise Invalid("the passwords differ")
    return first


def _settings() -> Settings | None:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as exc:
        print(f"fleetcast: bad FLEETCAST_* setting: {exc}", file=sys.stderr)
        return None
