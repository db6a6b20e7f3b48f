"""A text value the database cannot store (PostgreSQL refuses NUL characters) is a client
error that says so, never a 500, and nothing is written — on every backend."""

from __future__ import annotations

from apitest import *  # noqa: F403
from apitest import Api


def test_a_nul_in_a_text_value_is_refused_without_a_server_error(api: Api) -> None:
    before = api.get("/api/sessions").json()
    r = api.post("/api/sessions", json={"image": "win\x0011", "machine_ids": [1]})
    assert r.status_code in (400, 404), r.text  # 404 where the backend can look it up
    if str(api.settings.database_url).startswith("postgresql"):
        assert r.status_code == 400
        assert "cannot store" in r.json()["detail"] and "NUL" in r.json()["detail"]
    assert api.get("/api/sessions").json() == before
    assert api.get("/healthz").status_code == 200  # the app (and its DB pool) still serves
