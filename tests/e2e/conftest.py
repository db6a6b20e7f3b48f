"""End-to-end fixtures: a private namespace lab (bench/lab.py), torn down whatever happens."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not an installed package; tests may import it
    sys.path.insert(0, str(ROOT))

from bench.lab import Lab, lab_unavailable_reason  # noqa: E402

_reason: list[str | None] = []


def _unavailable() -> str | None:
    if not _reason:
        _reason.append(lab_unavailable_reason())
    return _reason[0]


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """``make_lab(receivers, sender_rate=None)`` -> a started Lab, closed after the test."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    labs: list[Lab] = []

    def factory(receivers: int = 1, *, sender_rate: str | None = None) -> Lab:
        built = Lab(receivers, sender_rate=sender_rate)
        labs.append(built)
        built.start()
        return built

    try:
        yield factory
    finally:
        for built in labs:
            built.close()
