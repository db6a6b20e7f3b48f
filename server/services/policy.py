"""When a session's transfer starts: pure evaluation of its start policy (no I/O, no clock).

A running session's sender is open from the moment the session runs: agents fetch their
assignment and join the multicast session, and the sender waits. The start policy decides
when the transfer begins. Its conditions combine; the first one met wins (as in Ghost and
WDS):

- **now**: the operator said so (``POST /api/sessions/{id}/start`` on a waiting session);
- **joined**: ``min_receivers`` machines joined (default: every target);
- **at**: the wall-clock time ``at`` has come;
- **quiet**: ``quiet_period`` seconds passed since the last join (restarts at every join);
- **max wait**: ``max_wait`` seconds after the sender opened, the transfer starts with those
  present if at least ``minimum`` joined; otherwise the session ends ``not-started``.

"at", "quiet" and "now" need at least ``minimum`` machines present too (a transfer to nobody
is no transfer). A maintenance window end (``not_after``) that comes before the transfer
started ends the session ``not-started`` as well.

All times are seconds since the epoch (UTC), passed in by the caller (``now``).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.models import StartPolicy


@dataclass(frozen=True)
class Waiting:
    """The transfer does not start yet; look again at ``until`` at the latest (None: only
    when something changes, such as a join)."""

    until: float | None


@dataclass(frozen=True)
class StartNow:
    """The transfer starts now, with ``joined`` machines; ``reason`` names the condition."""

    joined: int
    reason: str


@dataclass(frozen=True)
class NotStarted:
    """The session ends without a transfer; ``reason`` says why and what to do."""

    reason: str


Decision = Waiting | StartNow | NotStarted


@dataclass(frozen=True)
class WaitState:
    """What the server knows of a waiting session at ``now``."""

    opened_at: float  #: when the sender opened (the session began running)
    targets: int  #: target machines of the session
    joined: int  #: machines that joined the multicast session so far
    last_join_at: float | None = None  #: when the newest of them joined
    forced: bool = False  #: the operator asked to start now


def evaluate(policy: StartPolicy, w: WaitState, now: float) -> Decision:
    """The decision for ``w`` at ``now`` (see the module docstring for the rules)."""
    minimum = max(1, policy.minimum)
    deadline = policy.not_after.timestamp() if policy.not_after is not None else None
    if deadline is not None and now >= deadline:
        return NotStarted(
            f"the maintenance window ended before the transfer started ({w.joined} of "
            f"{w.targets} machines had joined); nothing was written"
        )
    enough = w.joined >= minimum
    wanted = min(policy.min_receivers or w.targets, w.targets)
    if w.forced and enough:
        return StartNow(w.joined, "started by the operator")
    if w.joined >= max(1, wanted):
        return StartNow(w.joined, f"{w.joined} of {w.targets} machines joined")
    at = policy.at.timestamp() if policy.at is not None else None
    if policy.at is not None and now >= policy.at.timestamp() and enough:
        return StartNow(w.joined, f"the start time {policy.at.isoformat()} came")
    quiet_end = None
    if policy.quiet_period is not None and w.last_join_at is not None:
        quiet_end = w.last_join_at + policy.quiet_period
        if now >= quiet_end and enough:
            return StartNow(
                w.joined, f"no machine joined for {policy.quiet_period:g} s after the last one"
            )
    wait_end = w.opened_at + policy.max_wait
    if now >= wait_end:
        if enough:
            return StartNow(w.joined, f"the maximum wait of {policy.max_wait:g} s passed")
        return NotStarted(
            f"only {w.joined} of {w.targets} machines joined within the maximum wait of "
            f"{policy.max_wait:g} s ({minimum} needed); check that the machines booted into "
            "the client, then re-run the session"
        )
    times = [t for t in (deadline, at, quiet_end, wait_end) if t is not None and t > now]
    return Waiting(min(times) if times else None)
