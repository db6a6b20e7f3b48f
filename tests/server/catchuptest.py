"""Helpers for the catch-up and delta tests (issue 9): a real image in the store, a running
session of it without a sender (the control plane alone), and direct looks at its rows."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from apitest import Api
from sqlmodel import select

from server.db import db_session
from server.images.capture import CaptureOptions, capture_image
from server.images.store import ImageStore
from server.models import Session, SessionMachine
from server.services import sessions as session_svc

MIB = 1 << 20


def disk_bytes(seed: int = 1) -> bytes:
    """Three 1 MiB blocks: random (stored raw), zeros (a ZERO block), text (compressed)."""
    rnd = __import__("random").Random(seed)
    text = (f"fleetcast {seed} " * (MIB // 8)).encode()[:MIB]
    return rnd.randbytes(MIB) + bytes(MIB) + text


def captured(api: Api, name: str = "golden", data: bytes | None = None, family: str = "") -> int:
    """Capture ``data`` (default disk_bytes()) as image ``name`` and register it; its id."""
    store = ImageStore(api.settings.image_root)
    src = api.settings.data_dir.parent / f"{name.replace('/', '_')}.img"
    src.write_bytes(disk_bytes() if data is None else data)
    opts = CaptureOptions(level=1, used_only=False, progress=False)
    capture_image(store, name, src, opts)
    os.unlink(src)
    body = {"name": name, "mode": "existing", "family": family}
    r = api.post("/api/images", json=body)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def machines(api: Api, n: int, prefix: str = "52:54:00:9c:00") -> list[int]:
    """``n`` new machines; their ids."""
    out = []
    for i in range(n):
        r = api.post("/api/machines", json={"mac": f"{prefix}:{i:02x}"})
        assert r.status_code == 201, r.text
        out.append(int(r.json()["id"]))
    return out


def session(api: Api, image: str, mids: list[int], *, running: bool = True, **extra: Any) -> int:
    """A session of ``image`` to ``mids`` (start manual), marked running unless told not."""
    body = {"image": image, "machine_ids": mids, "start_policy": {"start": "manual"}, **extra}
    r = api.post("/api/sessions", json=body)
    assert r.status_code == 201, r.text
    sid = int(r.json()["id"])
    if running:
        with db(api) as d:
            s = d.get(Session, sid)
            assert s is not None
            session_svc.mark_running(d, None, s, "test")
    return sid


@contextmanager
def db(api: Api) -> Iterator[Any]:
    """A database session of the app under test (committed at the end)."""
    with db_session(api.client.app.state.engine) as d:  # type: ignore[attr-defined]
        yield d


def set_row(api: Api, sid: int, mid: int, **fields: Any) -> None:
    """Set fields of the machine's row in the session directly."""
    with db(api) as d:
        row = d.exec(
            select(SessionMachine).where(
                SessionMachine.session_id == sid, SessionMachine.machine_id == mid
            )
        ).one()
        for k, v in fields.items():
            setattr(row, k, v)
        d.add(row)


def set_session(api: Api, sid: int, **fields: Any) -> None:
    with db(api) as d:
        s = d.get(Session, sid)
        assert s is not None
        for k, v in fields.items():
            setattr(s, k, v)
        d.add(s)


def row_of(api: Api, sid: int, mid: int) -> dict[str, Any]:
    """The machine's row as the session detail API shows it."""
    detail = api.get(f"/api/sessions/{sid}").json()
    return next(m for m in detail["machines"] if m["machine_id"] == mid)


def enroll(api: Api, mid: int) -> dict[str, str]:
    """Enroll an agent as machine ``mid`` (by its MAC); its auth header."""
    mac = api.get(f"/api/machines/{mid}").json()["mac"]
    return api.enroll(mac)
