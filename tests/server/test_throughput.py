"""A session's throughput history: rates from the sender's byte counter, bounded by pairwise
downsampling, and recorded by the runner's once-a-second watch."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from apitest import *  # noqa: F403
from apitest import seed_running_session

from server.config import Settings
from server.db import db_session, make_engine, migrate
from server.events import EventBus
from server.images.store import ImageStore
from server.metrics import Metrics
from server.services import runner as runner_mod
from server.services import sessions as svc
from server.services.runner import SessionManager
from server.services.throughput import ThroughputHistory, median_mbytes

T0 = 1_800_000_000.0


def _feed(h: ThroughputHistory, seconds: int, mb_per_s: float = 10.0) -> None:
    """One sample a second for ``seconds`` seconds of a sender at ``mb_per_s``."""
    for i in range(seconds + 1):
        h.record(T0 + i, int(i * mb_per_s * 1e6), mb_per_s / 2)


def test_rates_come_from_the_byte_counter_and_the_first_sample_only_starts_the_clock() -> None:
    h = ThroughputHistory()
    assert h.record(T0, 5_000_000, 3.0) == (0.0, 3.0)
    assert len(h) == 0
    assert h.record(T0 + 2, 25_000_000, 4.0) == (10.0, 4.0)
    assert h.to_json() == {"start": T0, "step": 1.0, "points": [[2.0, 10.0, 4.0]]}


def test_a_counter_that_goes_backwards_is_not_a_negative_rate() -> None:
    h = ThroughputHistory()
    h.record(T0, 9_000_000, 0.0)
    sender, _ = h.record(T0 + 1, 1_000_000, 0.0)
    assert sender == 0.0


def test_the_history_never_exceeds_its_bound_and_halves_its_resolution_when_full() -> None:
    h = ThroughputHistory(max_points=600)
    _feed(h, 600)
    assert len(h) == 600 and h.step == 1.0
    _feed_more = [h.record(T0 + 600 + i, int((600 + i) * 10e6), 5.0) for i in range(1, 3000)]
    assert len(_feed_more) == 2999
    doc = h.to_json()
    assert len(doc["points"]) <= 600
    assert doc["step"] == 8.0  # 3599 s of samples: 1 s -> 2 -> 4 -> 8 s buckets
    times = [p[0] for p in doc["points"]]
    assert times == sorted(times) and times[0] == 0.0 and times[-1] >= 3599 - 8
    assert all(t % 8 == 0 for t in times)
    # a steady sender stays steady through the merges (weighted means, not sums)
    assert {p[1] for p in doc["points"]} == {10.0} and {p[2] for p in doc["points"]} == {5.0}


def test_merging_weights_each_bucket_by_its_samples() -> None:
    h = ThroughputHistory(max_points=2)
    h.record(T0, 0, 0.0)
    h.record(T0 + 1, 0, 0.0)  # bucket 1: 0 MB/s
    h.record(T0 + 2, 30_000_000, 9.0)  # bucket 2: 30 MB/s
    h.record(T0 + 2.5, 30_000_000, 3.0)  # bucket 2 again: 0 MB/s -> mean 15, median 6
    assert h.to_json()["points"] == [[1.0, 0.0, 0.0], [2.0, 15.0, 6.0]]
    h.record(T0 + 3, 60_000_000, 6.0)  # a third bucket: halve to 2 s buckets 0 and 1
    doc = h.to_json()
    assert doc["step"] == 2.0
    # bucket 0 = {1 s: one sample of 0}; bucket 1 = {2 s: 30, 0; 3 s: 60} -> mean 30
    assert doc["points"] == [[0.0, 0.0, 0.0], [2.0, 30.0, 6.0]]


def test_a_bad_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_points >= 2"):
        ThroughputHistory(max_points=1)


def test_the_median_machine_rate_skips_machines_without_one() -> None:
    assert median_mbytes([80e6, None, 0, 160e6, 240e6]) == 20.0
    assert median_mbytes([]) == 0.0


@pytest.mark.asyncio
async def test_the_runner_records_the_history_and_keeps_it_in_the_session_stats(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(settings.db_url)
    migrate(engine)
    with db_session(engine) as db:
        sid = seed_running_session(db, settings, mac_prefix="52:54:00:00:02")
        for row, rate in zip(svc.session_machines(db, sid), (80e6, 160e6, 0.0), strict=True):
            row.state, row.rate_bps = "receiving", rate
            db.add(row)
    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    sub = bus.subscribe()
    manager = SessionManager(
        engine, ImageStore(settings.image_root), settings, bus, Metrics(engine)
    )
    now = [T0]
    manager.clock = lambda: now[0]
    engine_stats: dict[str, Any] = {"bytes_sent": 0}
    runner: Any = SimpleNamespace(session=SimpleNamespace(stats=engine_stats))
    monkeypatch.setattr(runner_mod, "STATS_INTERVAL", 0.01)
    monkeypatch.setattr(manager, "_count", lambda _runner: None)
    watch = asyncio.create_task(manager._watch(sid, runner))
    try:
        for _ in range(500):
            if len(manager.histories.get(sid, ())) >= 3:
                break
            await asyncio.sleep(0.01)
            now[0] += 1.0
            engine_stats["bytes_sent"] = int((now[0] - T0) * 40e6)
    finally:
        watch.cancel()
    live = manager.history(sid)
    assert live is not None and len(live["points"]) >= 3
    assert all(p[2] == 15.0 for p in live["points"])  # median of 10 and 20 MB/s (0: no rate)
    events = []
    while not sub.queue.empty():
        events.append(sub.queue.get_nowait())
    stats = [e for e in events if e["kind"] == "session.stats"]
    assert stats and stats[-1]["median_mbps"] == 15.0 and "t" in stats[-1]
    with db_session(engine) as db:
        manager._finalize(db, sid, None, "the test ended it")
    assert manager.history(sid) is None
    with db_session(engine) as db:
        kept = svc.get_session(db, sid).stats["throughput"]
    assert kept == live and kept["start"] >= T0
