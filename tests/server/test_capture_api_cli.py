"""``fleetcast capture start|list``: a capture session from the server's shell, which the
running server hands to the machine's agent."""

from __future__ import annotations

import pytest
from apitest import *  # noqa: F403
from apitest import Api
from capturetest import enrolled

from fleetcast.cli import main


@pytest.fixture
def env(api: Api, monkeypatch: pytest.MonkeyPatch) -> Api:
    monkeypatch.setenv("FLEETCAST_DATA", str(api.settings.data_dir))
    monkeypatch.setenv("FLEETCAST_DATABASE_URL", api.settings.db_url)
    return api


def test_capture_start_makes_a_running_capture_session_the_agent_gets(
    env: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = enrolled(env, "52:54:00:c1:00:01", "ref-pc")
    argv = ["capture", "start", "--machine", "ref-pc", "--image", "win11/ref", "--level", "4"]
    assert main(argv) == 0
    assert "capture session" in capsys.readouterr().out
    job = agent.assignment()
    assert (job["kind"], job["image"], job["level"]) == ("capture", "win11/ref", 4)
    assert main(["capture", "list", "--machine", "52-54-00-C1-00-01"]) == 0
    out = capsys.readouterr().out
    assert "win11/ref" in out and "running" in out


def test_capture_start_says_what_is_wrong(env: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "start", "--machine", "nobody", "--image", "x"]) == 1
    assert "no machine with id, name or MAC 'nobody'" in capsys.readouterr().err
    enrolled(env, "52:54:00:c1:00:02", "pc2")
    assert main(["capture", "start", "--machine", "pc2", "--image", "bad name"]) == 1
    assert "invalid image name" in capsys.readouterr().err
    assert main(["capture", "start", "--machine", "pc2", "--image", "x", "--disk", "a b"]) == 1
    assert "disk_rule" in capsys.readouterr().err
    assert main(["capture"]) == 2
