"""The dashboard's part of issue 9: the delta option on the new-session form, each machine's
phase and what it was spared in the grid's data, and the session's totals."""

from __future__ import annotations

import re

from apitest import *  # noqa: F403
from apitest import Api
from catchuptest import MIB, captured, machines, session, set_row
from test_web import UI, _login

from server.models import utcnow


def test_the_new_session_form_sets_the_delta_option(api: Api) -> None:
    captured(api)
    (mid,) = machines(api, 1)
    csrf = _login(api)
    form = api.client.get(f"{UI}/sessions-new").text
    assert re.search(r'<select name="delta">', form) and 'value="never"' in form
    base = {"csrf": csrf, "image": "golden", "machine_ids": str(mid), "start": "manual"}
    bad = api.client.post(f"{UI}/sessions-new", data={**base, "delta": "sometimes"})
    assert bad.status_code == 400 and "choose auto, always or never" in bad.text
    ok = api.client.post(f"{UI}/sessions-new", data={**base, "delta": "never"})
    assert ok.status_code == 200, ok.text  # followed the redirect to the session's page
    sessions = api.get("/api/sessions").json()
    assert [s["delta"] for s in sessions] == ["never"]


def test_state_json_carries_phase_spared_and_catch_up_per_machine_and_in_total(api: Api) -> None:
    captured(api)
    held, catching, plain = machines(api, 3)
    sid = session(api, "golden", [held, catching, plain])
    total = 2 * MIB  # two data blocks
    set_row(api, sid, held, state="receiving", phase="multicast", held_bytes=total * 95 // 100,
            held_blocks=1, bytes_total=total, started_at=utcnow())  # fmt: skip
    set_row(api, sid, catching, state="succeeded", phase="verifying", via="catchup",
            catchup_bytes=12345, bytes_total=total)  # fmt: skip
    csrf = _login(api)
    assert csrf
    state = api.client.get(f"{UI}/sessions/{sid}/state.json").json()
    rows = {r[0]: dict(zip(state["columns"], r, strict=True)) for r in state["machines"]}
    assert (rows[held]["phase"], rows[held]["held"]) == ("multicast", total * 95 // 100)
    assert (rows[catching]["via"], rows[catching]["catchup"]) == ("catchup", 12345)
    assert rows[plain]["held"] == 0 and rows[plain]["phase"] == ""
    assert state["spared"]["held_bytes"] == total * 95 // 100
    assert state["spared"]["by_catchup"] == 1 and state["spared"]["catchup_bytes"] == 12345
    page = api.client.get(f"{UI}/sessions/{sid}").text
    assert "1 by catch-up" in page and "spared 1.9 MiB (32%)" in page  # of 3 machines' 6 MiB
    assert "<option>catchup</option>" in page and ">Spared</th>" in page
    assert "· delta auto ·" in page
