"""Prometheus metrics at /metrics: sessions by state, and the senders' wire counters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session as DbSession
from sqlmodel import select

from server.models import SESSION_STATES, Session

#: sender counter name -> (metric attribute, engine stats key)
_SENDER = {
    "bytes_sent": "bytes_sent",
    "datagrams_sent": "datagrams_sent",
    "retransmitted": "repair_datagrams",
    "naks": "naks",
    "evictions": "evictions",
}


class _SessionStates(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "fleetcast_sessions", "Deployment sessions by state", labels=["state"]
        )
        with DbSession(self.engine) as db:
            rows = dict(db.exec(select(Session.state, func.count()).group_by(Session.state)).all())
        for state in SESSION_STATES:
            g.add_metric([state], float(rows.get(state, 0)))
        yield g


class Metrics:
    """One registry per app (tests build many apps in one process)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SessionStates(engine))
        r = self.registry
        self.counters = {
            "bytes_sent": Counter("fleetcast_sent_bytes", "Bytes multicast by senders", registry=r),
            "datagrams_sent": Counter(
                "fleetcast_sent_datagrams", "Datagrams multicast by senders", registry=r
            ),
            "retransmitted": Counter(
                "fleetcast_retransmitted_datagrams", "Repair datagrams sent after NAKs", registry=r
            ),
            "naks": Counter("fleetcast_naks", "NAKs received from receivers", registry=r),
            "evictions": Counter("fleetcast_evictions", "Receivers evicted by senders", registry=r),
        }
        self.agent_reports = Counter(
            "fleetcast_agent_reports", "Agent progress and result reports", ["kind"], registry=r
        )
        self._last: dict[int, dict[str, int]] = {}

    def add_sender(self, key: int, stats: dict[str, Any]) -> None:
        """Fold one sender's cumulative counters in (only what grew since the last call)."""
        last = self._last.setdefault(key, {})
        for name, src in _SENDER.items():
            value = int(stats.get(src) or 0)
            delta = value - last.get(name, 0)
            if delta > 0:
                self.counters[name].inc(delta)
                last[name] = value

    def render(self) -> bytes:
        return generate_latest(self.registry)
