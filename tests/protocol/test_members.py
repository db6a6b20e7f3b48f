"""The sender's replay window over a receiver's sequence numbers (PROTOCOL.md §6.2)."""

from __future__ import annotations

from protocol.members import REPLAY_WINDOW, ReplayWindow


def test_new_numbers_pass_once_and_repeats_fail() -> None:
    w = ReplayWindow(10)
    assert not w.accept(10)
    assert w.accept(12) and w.accept(11)
    assert not w.accept(11) and not w.accept(12)


def test_numbers_older_than_the_window_fail() -> None:
    w = ReplayWindow(0)
    assert w.accept(REPLAY_WINDOW + 5)
    assert not w.accept(4)
    assert w.accept(REPLAY_WINDOW + 1)


def test_a_huge_jump_is_cheap_and_remembered() -> None:
    w = ReplayWindow(1)
    assert w.accept(0xFFFFFFFF)
    assert not w.accept(0xFFFFFFFF) and not w.accept(1)
