"""The start policy: which condition starts a transfer, and when (an injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from server.models import StartPolicy
from server.services.policy import NotStarted, StartNow, Waiting, WaitState, evaluate

T0 = datetime(2026, 11, 29, 2, 0, tzinfo=UTC).timestamp()


def state(joined: int = 0, last: float | None = None, targets: int = 10, forced: bool = False):
    return WaitState(T0, targets, joined, last, forced)


def test_every_target_joined_starts_at_once_by_default() -> None:
    d = evaluate(StartPolicy(), state(joined=10, last=T0 + 3), T0 + 3)
    assert d == StartNow(10, "10 of 10 machines joined")


def test_n_joined_starts_when_n_machines_are_present() -> None:
    p = StartPolicy(min_receivers=4)
    assert isinstance(evaluate(p, state(joined=3, last=T0 + 1), T0 + 2), Waiting)
    assert evaluate(p, state(joined=4, last=T0 + 2), T0 + 2) == StartNow(
        4, "4 of 10 machines joined"
    )


def test_n_larger_than_the_targets_means_every_target() -> None:
    assert isinstance(evaluate(StartPolicy(min_receivers=50), state(joined=10), T0), StartNow)


def test_waiting_says_when_to_look_again() -> None:
    p = StartPolicy(max_wait=600, quiet_period=60)
    assert evaluate(p, state(joined=2, last=T0 + 100), T0 + 120) == Waiting(T0 + 160)
    assert evaluate(StartPolicy(max_wait=600), state(), T0) == Waiting(T0 + 600)


def test_at_a_time_starts_with_those_present() -> None:
    at = datetime(2026, 11, 29, 2, 15, tzinfo=UTC)
    p = StartPolicy(at=at, max_wait=3600)
    assert evaluate(p, state(joined=3, last=T0), T0 + 899) == Waiting(at.timestamp())
    d = evaluate(p, state(joined=3, last=T0), T0 + 900)
    assert isinstance(d, StartNow) and d.joined == 3 and "start time" in d.reason


def test_at_a_time_with_nobody_present_waits_for_the_first_machine() -> None:
    at = datetime(2026, 11, 29, 2, 15, tzinfo=UTC)
    p = StartPolicy(at=at, max_wait=3600)
    assert evaluate(p, state(joined=0), T0 + 1000) == Waiting(T0 + 3600)
    assert isinstance(evaluate(p, state(joined=1, last=T0 + 1001), T0 + 1001), StartNow)


def test_a_naive_time_is_utc() -> None:
    assert StartPolicy(at=datetime(2026, 1, 1, 2, 0)).at == datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def test_quiet_period_restarts_at_every_join() -> None:
    p = StartPolicy(quiet_period=60, max_wait=3600)
    assert evaluate(p, state(joined=1, last=T0 + 10), T0 + 69) == Waiting(T0 + 70)
    # another machine joined at +50: the quiet period runs from there
    assert evaluate(p, state(joined=2, last=T0 + 50), T0 + 70) == Waiting(T0 + 110)
    d = evaluate(p, state(joined=2, last=T0 + 50), T0 + 110)
    assert isinstance(d, StartNow) and "60 s after the last" in d.reason


def test_quiet_period_does_not_run_before_the_first_join() -> None:
    p = StartPolicy(quiet_period=5, max_wait=100)
    assert evaluate(p, state(joined=0), T0 + 50) == Waiting(T0 + 100)


def test_max_wait_starts_with_those_present_when_the_minimum_joined() -> None:
    p = StartPolicy(max_wait=300, minimum=3)
    d = evaluate(p, state(joined=3, last=T0 + 5), T0 + 300)
    assert d == StartNow(3, "the maximum wait of 300 s passed")


def test_max_wait_ends_not_started_below_the_minimum_and_says_why() -> None:
    d = evaluate(StartPolicy(max_wait=300, minimum=3), state(joined=2, last=T0), T0 + 300)
    assert isinstance(d, NotStarted)
    assert "only 2 of 10 machines joined" in d.reason and "3 needed" in d.reason


def test_nobody_within_max_wait_is_not_started() -> None:
    assert isinstance(evaluate(StartPolicy(max_wait=0), state(), T0), NotStarted)


def test_the_minimum_holds_back_at_quiet_and_the_operator() -> None:
    at = datetime(2026, 11, 29, 2, 1, tzinfo=UTC)
    p = StartPolicy(minimum=5, at=at, quiet_period=10, max_wait=3600)
    w = state(joined=4, last=T0, forced=True)
    assert isinstance(evaluate(p, w, T0 + 100), Waiting)
    assert isinstance(evaluate(p, state(joined=5, last=T0), T0 + 100), StartNow)


def test_the_operator_starts_now_with_those_present() -> None:
    d = evaluate(StartPolicy(max_wait=3600), state(joined=2, last=T0, forced=True), T0 + 1)
    assert d == StartNow(2, "started by the operator")


def test_the_operator_cannot_start_a_transfer_to_nobody() -> None:
    assert isinstance(evaluate(StartPolicy(), state(forced=True), T0 + 1), Waiting)


def test_window_end_before_the_start_ends_not_started() -> None:
    end = datetime(2026, 11, 29, 5, 0, tzinfo=UTC)
    p = StartPolicy(not_after=end, max_wait=86_400, min_receivers=20)
    assert evaluate(p, state(joined=3, last=T0), end.timestamp() - 1) == Waiting(end.timestamp())
    d = evaluate(p, state(joined=3, last=T0), end.timestamp())
    assert isinstance(d, NotStarted) and "maintenance window ended" in d.reason


def test_window_end_wins_over_every_start_condition() -> None:
    end = datetime(2026, 11, 29, 2, 0, tzinfo=UTC)
    p = StartPolicy(not_after=end)
    assert isinstance(evaluate(p, state(joined=10, forced=True), end.timestamp()), NotStarted)


# Every combination: the earliest condition met wins. Columns: the policy's conditions, the
# machines' joins (times after T0), and which condition must start the transfer when.
COMBOS = [
    # (min_receivers, at, quiet, max_wait, joins, expected reason fragment, start time)
    (3, 100, None, 600, [1, 2, 3], "3 of 10", 3),
    (3, 100, None, 600, [1, 2], "start time", 100),
    (None, 100, 20, 600, [1, 2], "after the last", 22),
    (None, 10, 20, 600, [1, 2], "start time", 10),
    (5, None, 20, 600, [1, 2, 3, 4, 5], "5 of 10", 5),
    (5, None, 20, 600, [1, 30, 60], "after the last", 80),
    (None, None, None, 60, [1], "maximum wait", 60),
    (None, None, 100, 60, [1, 30], "maximum wait", 60),
    (None, 1000, 100, 60, [], "only 0 of 10", 60),
]


@pytest.mark.parametrize(("n", "at", "quiet", "max_wait", "joins", "why", "start"), COMBOS)
def test_first_condition_met_wins(
    n: int | None,
    at: float | None,
    quiet: float | None,
    max_wait: float,
    joins: list[float],
    why: str,
    start: float,
) -> None:
    p = StartPolicy(
        min_receivers=n,
        at=datetime.fromtimestamp(T0 + at, UTC) if at is not None else None,
        quiet_period=quiet,
        max_wait=max_wait,
    )
    decided_at, decision = _run(p, joins)
    assert decided_at == pytest.approx(T0 + start)
    assert why in getattr(decision, "reason", "")


def _run(p: StartPolicy, joins: list[float]) -> tuple[float, StartNow | NotStarted]:
    """Step a clock through the joins and the policy's own wake-up times."""
    now = T0
    for _ in range(100):
        done = [t for t in joins if T0 + t <= now]
        w = state(joined=len(done), last=T0 + done[-1] if done else None)
        d = evaluate(p, w, now)
        if not isinstance(d, Waiting):
            return now, d
        later = [T0 + t for t in joins if T0 + t > now]
        candidates = [t for t in (d.until, *later) if t is not None]
        assert candidates, "the policy would wait forever"
        now = min(candidates)
    raise AssertionError("no decision in 100 steps")
