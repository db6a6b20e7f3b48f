"""``fleetcast capture start|list``: capture sessions from the server's shell (issue 10).

Works on the server's database directly (like ``fleetcast admin``), so it needs the same
FLEETCAST_* settings as the server. A capture session needs no sender: the running server
hands it to the machine's agent as soon as the session is in the database.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from sqlmodel import Session as DbSession
from sqlmodel import col, or_, select

from server.config import Settings
from server.models import Machine, normalize_mac


def capture_main(argv: Sequence[str]) -> int:
    """Run ``fleetcast capture ...``; returns an exit status."""
    p = argparse.ArgumentParser(
        prog="fleetcast capture",
        description="Capture a machine's disk over the network as a new image (the machine "
        "network-boots into the client, which uploads only blocks the store lacks).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start a capture session of one machine")
    st.add_argument("--machine", required=True, help="the machine: its id, name or MAC")
    st.add_argument("--image", required=True, help="the new image's name, e.g. win11/ref")
    st.add_argument("--disk", help="which disk to read (auto, sda, model:TEXT, ...)")
    st.add_argument("--after", choices=["reboot", "poweroff", "none"], help="then do this")
    st.add_argument("--level", type=int, help="zstd level 1..19 the client compresses with")
    ls = sub.add_parser("list", help="list captures, newest first, with what each uploaded")
    ls.add_argument("--machine", help="only this machine's (id, name or MAC)")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    from pydantic import ValidationError

    from server.admin import _settings
    from server.db import db_session, make_engine, migrate
    from server.services.errors import ServiceError

    settings = _settings()
    if settings is None:
        return 2
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        with db_session(engine) as db:
            if args.cmd == "start":
                _start(db, settings, args)
            else:
                _list(db, args.machine)
        return 0
    except (ServiceError, ValidationError) as exc:
        print(f"fleetcast capture: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()


def find_machine(db: DbSession, text: str) -> Machine:
    """The machine whose id, name or MAC is ``text``; NotFound/Invalid saying so."""
    from server.services.errors import Invalid, NotFound

    conds = [Machine.name == text]
    if text.isdigit():
        conds.append(Machine.id == int(text))
    with contextlib.suppress(ValueError):
        conds.append(Machine.mac == normalize_mac(text))
    found = list(db.exec(select(Machine).where(or_(*conds)).order_by(col(Machine.id))))
    if not found:
        raise NotFound(f"no machine with id, name or MAC {text!r} (see the dashboard's list)")
    if len(found) > 1:
        raise Invalid(f"{len(found)} machines match {text!r}: give its id or MAC")
    return found[0]


def _start(db: DbSession, settings: Settings, args: argparse.Namespace) -> None:
    from server.images.store import ImageStore
    from server.models_capture import CaptureCreate
    from server.services import capture, sessions

    machine = find_machine(db, args.machine)
    req = CaptureCreate(
        machine_id=machine.id or 0,
        target_image=args.image,
        disk_rule=args.disk,
        after=args.after,
        level=args.level,
    )
    store = ImageStore(settings.image_root)
    capture.release_ended_pins(db, store)
    s = capture.create_capture(db, None, settings, store, req, "cli")
    sessions.mark_running(db, None, s, "cli")
    print(
        f"capture session {s.id}: machine {machine.name or machine.mac} -> image {args.image}; "
        "network-boot the machine (or wake it) and it uploads its disk"
    )


def _list(db: DbSession, machine: str | None) -> None:
    from server.services.capture import list_captures

    mid = find_machine(db, machine).id if machine else None
    print(f"{'session':>7}  {'state':<10} {'image':<40} {'uploaded':>12} {'reused':>12}")
    for c in list_captures(db, machine_id=mid):
        up = f"{c.uploaded_blocks}/{c.uploaded_bytes >> 20}M"
        reused = f"{c.reused_blocks}/{c.reused_bytes >> 20}M"
        print(
            f"{c.session_id:>7}  {c.session_state:<10} {c.target_image:<40} {up:>12} {reused:>12}"
        )
