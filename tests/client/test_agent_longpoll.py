"""Agent.wait_assignment: long polls of up to 20 s, never past ``--wait``, and an old
server (which ignores ``wait`` and says ``retry_after`` 2) is still polled politely.

The server is a fake here and so is the clock: each request "takes" the time a server would
hold it, so the deadline arithmetic is checked exactly and the test takes no time.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import client.agent as agent_mod
from client.agent import HTTP_TIMEOUT, LONG_POLL, Agent, AgentError, AgentOptions

ASSIGNED = {"session_id": 7, "group": "239.1.0.8", "retry_after": 0.0}


class Clock:
    """Stands in for the ``time`` module inside client.agent."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


class FakeServer:
    """Answers assignment requests; ``honours_wait``: holds each as the long poll does."""

    def __init__(self, clock: Clock, *, honours_wait: bool, assign_at: float | None) -> None:
        self.clock, self.honours_wait, self.assign_at = clock, honours_wait, assign_at
        self.asked: list[tuple[float, float]] = []  #: (wait asked, HTTP timeout)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 0) -> Any:
        assert method == "GET" and urlsplit(path).path == "/api/agent/assignment"
        wait = float(parse_qs(urlsplit(path).query)["wait"][0])
        assert 0 <= wait <= 25 and timeout >= wait + 5, (wait, timeout)
        self.asked.append((wait, timeout))
        start = self.clock.now
        if self.assign_at is not None and start >= self.assign_at:
            return 200, ASSIGNED
        if not self.honours_wait:
            return 200, {"session_id": None, "retry_after": 2.0}
        if self.assign_at is not None and self.assign_at < start + wait:
            self.clock.now = self.assign_at  # woken by the new session
            return 200, ASSIGNED
        self.clock.now = start + wait
        return 200, {"session_id": None, "retry_after": 0.0}


def _agent(
    monkeypatch: pytest.MonkeyPatch, wait: float | None, *, poll: float = 0.5, **server: Any
) -> tuple[Agent, FakeServer, Clock]:
    clock = Clock()
    monkeypatch.setattr(agent_mod, "time", clock)
    options = AgentOptions(server="http://fleetcast", token="t", target="/dev/null")
    options.wait, options.poll = wait, poll
    agent = Agent(options)
    fake = FakeServer(clock, **server)
    agent.api = fake  # type: ignore[assignment]
    return agent, fake, clock


def test_a_long_polling_server_is_asked_again_at_once_until_the_session_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, fake, clock = _agent(monkeypatch, None, honours_wait=True, assign_at=1047.5)
    assert agent.wait_assignment() == ASSIGNED
    assert [w for w, _ in fake.asked] == [LONG_POLL, LONG_POLL, LONG_POLL]
    assert all(t == LONG_POLL + HTTP_TIMEOUT for _, t in fake.asked)
    assert clock.sleeps == [0.0, 0.0] and clock.now == 1047.5  # no pause, no delay


def test_the_last_long_poll_ends_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    agent, fake, clock = _agent(monkeypatch, 45.0, honours_wait=True, assign_at=None)
    with pytest.raises(AgentError, match="no session assigned within 45 s"):
        agent.wait_assignment()
    assert [w for w, _ in fake.asked] == [20.0, 20.0, 5.0]
    assert clock.now == 1045.0


def test_an_old_server_is_polled_every_retry_after_and_never_past_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, fake, clock = _agent(monkeypatch, 5.0, honours_wait=False, assign_at=None)
    with pytest.raises(AgentError):
        agent.wait_assignment()
    assert clock.sleeps == [2.0, 2.0, 1.0] and clock.now == 1005.0
    assert len(fake.asked) == 4  # at 0, 2, 4 and the deadline


def test_an_old_server_gets_at_least_poll_between_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    agent, _, clock = _agent(monkeypatch, None, poll=3.0, honours_wait=False, assign_at=1007.0)
    assert agent.wait_assignment() == ASSIGNED
    assert clock.sleeps == [3.0, 3.0, 3.0]


def test_an_empty_answer_that_did_not_wait_is_not_a_reason_to_spin() -> None:
    """retry_after 0 but answered at once (no long poll behind it): pause ``poll``."""
    empty = {"session_id": None, "retry_after": 0.0}
    assert agent_mod._poll_pause(empty, asked=20.0, took=0.01, poll=2.0) == 2.0
    assert agent_mod._poll_pause(empty, asked=20.0, took=20.0, poll=2.0) == 0.0
    assert agent_mod._poll_pause({"session_id": None}, asked=0.0, took=0.0, poll=2.0) == 2.0
    stopping = {"session_id": None, "retry_after": 2.0}  # a server that is stopping
    assert agent_mod._poll_pause(stopping, asked=20.0, took=3.0, poll=0.5) == 2.0
