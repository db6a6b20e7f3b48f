"""The dashboard in a real browser (Playwright + Debian's chromium) against a real server
deploying to 4 real agents in a private namespace lab: log in, see a validation error, create
a session, watch every machine reach 100% in the live grid, cancel another session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from browser import browser_page, screenshot
from fleethelp import BuiltImage, file_sha256
from serverlab import ServerLab

pytestmark = [pytest.mark.netns, pytest.mark.slow]
AGENTS = 4


def _log_in(page: Any, url: str) -> None:
    page.goto(f"{url}/ui")
    assert page.url.startswith(f"{url}/ui/login"), page.url
    page.fill("input[name=username]", "admin")
    page.fill("input[name=password]", "wrong-password")
    page.click("button[type=submit]")
    assert "wrong user name or password" in page.inner_text("p.error")
    page.fill("input[name=password]", "lab-password-1")
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/ui")
    assert page.inner_text("h1") == "Overview"


def test_log_in_create_watch_every_machine_reach_100_percent_and_cancel_another(
    server_lab: ServerLab, small_image: BuiltImage, tmp_path: Path
) -> None:
    sl = server_lab
    api = sl.start()
    targets = [tmp_path / f"disk-{n.name}.img" for n in sl.lab.receivers]
    agents = [sl.agent(n, t) for n, t in zip(sl.lab.receivers, targets, strict=True)]
    sl.wait_for("4 agents to enroll", lambda: len(api.get("/api/machines").json()) == AGENTS, 60)
    ids = ", ".join(str(m["id"]) for m in api.get("/api/machines").json())

    with browser_page(tmp_path, sl.lab.sender.netns) as page:
        page.on("dialog", lambda d: d.accept())
        _log_in(page, sl.url)

        page.click("text=New session")
        page.fill("input[name=machine_ids]", ids)
        page.fill("input[name=rate_mbytes]", "0")
        page.click("main button[type=submit]")
        assert page.inner_text("#err-image") == "choose an image"
        assert "between 0.001 and 12500 MB/s" in page.inner_text("#err-rate_mbytes")
        screenshot(page, "new-session-validation", tmp_path)

        page.select_option("select[name=image]", small_image.name)
        page.fill("input[name=rate_mbytes]", "0.5")  # slow enough to watch it live
        page.fill("input[name=max_wait]", "60")
        page.click("main button[type=submit]")
        page.wait_for_url(f"{sl.url}/ui/sessions/*")
        sid = int(page.url.rsplit("/", 1)[1])
        page.wait_for_function(
            "() => window.fleetcastGrid && window.fleetcastGrid.rows.size === 4", timeout=30_000
        )
        page.wait_for_function(  # live: rows move while the transfer runs
            """() => [...document.querySelectorAll('#rows tr')].some(tr =>
                        tr.cells[1].textContent === 'receiving' &&
                        parseFloat(tr.cells[2].textContent) > 20)""",
            timeout=60_000,
        )
        page.wait_for_function("() => window.fleetcastGrid.chart.length >= 3", timeout=30_000)
        screenshot(page, "session-live", tmp_path)
        # Every row of the live grid reads succeeded and 100.0 (no reload: events + state.json).
        page.wait_for_function(
            """() => [...document.querySelectorAll('#rows tr')].length === 4 &&
                     [...document.querySelectorAll('#rows tr')].every(tr =>
                        tr.cells[1].textContent === 'succeeded' &&
                        tr.cells[2].textContent === '100.0')""",
            timeout=120_000,
        )
        page.wait_for_function(
            "() => document.getElementById('session-state')?.textContent === 'succeeded'",
            timeout=60_000,
        )
        assert page.inner_text("#t-slowest") == "100.0%"
        assert page.is_hidden("form[action$='/cancel']")
        screenshot(page, "session-succeeded", tmp_path)
        # Opened after the end, the page draws the whole session from the kept history.
        page.reload()
        page.wait_for_function(
            """() => window.fleetcastGrid.chart.length >= 3 &&
                     document.getElementById('line-sender').getAttribute('points') !== ''""",
            timeout=10_000,
        )
        assert max(page.evaluate("window.fleetcastGrid.chart.map(p => p.sender)")) > 0
        for node, proc in zip(sl.lab.receivers, agents, strict=True):
            assert sl.lab.wait(proc, 30) == 0, sl.log(node.name)
        assert api.get(f"/api/sessions/{sid}").json()["state"] == "succeeded"
        for target in targets:
            assert file_sha256(target) == small_image.sha256

        # Another session, started by hand: cancel it from its page.
        page.click("text=New session")
        page.select_option("select[name=image]", small_image.name)
        page.fill("input[name=machine_ids]", ids)
        page.check("input[name=start][value=manual]")
        page.click("main button[type=submit]")
        page.wait_for_url(f"{sl.url}/ui/sessions/*")
        other = int(page.url.rsplit("/", 1)[1])
        assert other != sid and page.inner_text("#session-state") == "pending"
        page.click("form[action$='/cancel'] button")
        # the POST redirects back to the page: while it loads there is no #session-state yet
        page.wait_for_function(
            "() => document.getElementById('session-state')?.textContent === 'cancelled'"
        )
        assert api.get(f"/api/sessions/{other}").json()["state"] == "cancelled"

        page.click("text=Overview")
        assert f"#{sid}" in page.inner_text("main") and "cancelled" in page.inner_text("main")
        screenshot(page, "overview", tmp_path)
        page.click("text=Images")
        assert small_image.name in page.inner_text("table")
        screenshot(page, "images", tmp_path)
        page.click("text=Machines")
        assert page.inner_text("table").count("succeeded") == AGENTS
        screenshot(page, "machines", tmp_path)
        page.click("nav >> text=Schedules")
        page.fill("main input[name=name]", "nightly")
        page.select_option("main select[name=image]", small_image.name)
        page.fill("main input[name=machine_ids]", ids)
        page.check("main input[name=weekdays][value='6']")
        page.fill("main input[name=time]", "2:00")
        page.fill("main input[name=timezone]", "Europe/Berlin")
        page.click("main button[type=submit]")
        assert "must be a time HH:MM" in page.inner_text("#err-time")
        page.fill("main input[name=time]", "02:00")
        page.fill("main input[name=window_end]", "06:00")
        page.fill("main input[name=wake_lead_min]", "5")
        page.click("main button[type=submit]")
        page.wait_for_url(f"{sl.url}/ui/schedules/*")
        assert len(page.query_selector_all("main ul li")) == 5
        screenshot(page, "schedule", tmp_path)
        page.click("text=Log out")
        page.wait_for_url(f"{sl.url}/ui/login*")
