"""The sender's pacer and rate controller (docs/PROTOCOL.md §5)."""

from __future__ import annotations

import bisect

from protocol.config import EngineConfig

#: Debt below one byte counts as none, so float rounding cannot stall the pacer at its timer.
_EPSILON = -1.0


class Pacer:
    """A token bucket in UDP payload bytes, with an optional AIMD-style rate controller.

    ``rate_bps`` is None when the session is unpaced (no cap and no auto mode).
    """

    def __init__(self, config: EngineConfig, now: float) -> None:
        self._config = config
        cap = config.rate_bps
        if config.auto_rate:
            ceiling = cap if cap is not None else config.max_rate_bps
            self.ceiling: int | None = ceiling
            self.rate_bps: int | None = min(config.initial_rate_bps, ceiling)
        else:
            self.ceiling = cap
            self.rate_bps = cap
        self._tokens = self._depth()
        self._stamp = now
        self._decrease_holdoff = now
        self._last_adjust = now
        self._slow_start = True
        #: the rate of the last loss cut: what the path is known to take (TCP's ssthresh).
        #: Below it growth is multiplicative even after the first loss cut.
        self._known_good: int | None = None
        self.decreases = 0
        self.increases = 0

    @property
    def paced(self) -> bool:
        return self.rate_bps is not None

    def _refill(self, now: float) -> None:
        if self.rate_bps is None:
            return
        dt = now - self._stamp
        if dt > 0:
            self._tokens = min(self._depth(), self._tokens + dt * self.rate_bps / 8.0)
            self._stamp = now

    def _depth(self) -> float:
        cfg = self._config
        if self.rate_bps is None:
            return 0.0
        by_time = self.rate_bps / 8.0 * cfg.burst_time
        return float(max(cfg.payload_size, min(cfg.burst_bytes, by_time)))

    def ready(self, now: float) -> bool:
        """True when a Transmit may go at ``now`` (the bucket is not in debt)."""
        if self.rate_bps is None:
            return True
        self._refill(now)
        return self._tokens > _EPSILON

    def consume(self, nbytes: int) -> None:
        """Charge a Transmit of ``nbytes`` UDP payload bytes (may go into debt)."""
        if self.rate_bps is not None:
            self._tokens -= nbytes

    def ready_at(self, now: float) -> float:
        """When the bucket will be out of debt."""
        if self.rate_bps is None:
            return now
        self._refill(now)
        if self._tokens > _EPSILON:
            return now
        return now + (-self._tokens * 8.0) / self.rate_bps

    def adjust(self, now: float, reports: list[tuple[float, int, float]], group: int = 0) -> None:
        """Auto mode: react to the freshest receiver reports: (loss fraction, received
        bit/s, reading lag in seconds) of some of the ``group`` receivers still receiving
        (0: as many as reports). The quantile is taken over the group, the receivers with
        no fresh report counting as news of no loss and no lag: the first report, from one
        receiver behind a slow port, is not the group's rate.

        Like TCP: grow multiplicatively (``rate_increase`` per ``rate_interval``) until the
        first loss above the threshold, then additively (a tenth of that); on loss, cut to
        a little below the rate the receivers actually received at. Like LEDBAT: stop
        growing while receivers read more than ``max_lag`` behind; beyond twice, cut to a
        little below the rate they read at (a CPU limit: growth stays multiplicative).
        """
        cfg = self._config
        if not cfg.auto_rate or self.rate_bps is None or not reports:
            return
        assert self.ceiling is not None
        if group > len(reports):
            reports = [*reports, *[(0.0, 0, 0.0)] * (group - len(reports))]
        q = int(cfg.rate_quantile * (len(reports) - 1))
        loss, received, _ = sorted(reports)[q]
        _, read_bps, lag = sorted(reports, key=lambda r: r[2])[q]
        elapsed = min(1.0, max(0.0, now - self._last_adjust)) / cfg.rate_interval
        self._last_adjust = now
        if loss > cfg.loss_threshold:
            if now >= self._decrease_holdoff:
                # What got through is what the path takes: go a little below it at once
                # rather than halving for many rounds, in one step however far below ours
                # (a 100 Mbit port behind a 10 Gbit rate), and no further (a deeper cut
                # only idles the port it measured). A mild loss cuts by twice itself at
                # most: then the receiver may have got all we sent, and what it got says
                # nothing of the path (we sent little: a group just shrank to it). Without
                # a measured rate, by rate_decrease (or the loss), and at most 90%.
                if received:
                    rate = self.rate_bps
                    cut = min(rate * (1.0 - loss), max(received * 0.9, rate * (1.0 - 2 * loss)))
                else:
                    cut = max(
                        self.rate_bps * min(cfg.rate_decrease, 1.0 - loss), self.rate_bps * 0.1
                    )
                self._set_rate(now, int(cut))
                self.decreases += 1
                self._slow_start = False
                self._known_good = self.rate_bps
                # Let reports made at the new rate arrive before cutting again.
                self._decrease_holdoff = now + 2 * cfg.status_interval
            return
        if lag > cfg.max_lag:
            if lag > 2 * cfg.max_lag and now >= self._decrease_holdoff:
                # It reads slower than we send: what it read is what it can take. Go a
                # little below that at once, so its backlog drains, not 15% per round.
                cut = self.rate_bps * 0.85
                if read_bps:
                    cut = min(cut, max(read_bps * 0.9, self.rate_bps * 0.1))
                self._set_rate(now, int(cut))
                self.decreases += 1
                # Not the network's limit but their CPU's, which varies with what else
                # runs: keep growing multiplicatively once they caught up (their socket
                # buffers absorb the overshoot), so no receiver idles on a low rate.
                self._decrease_holdoff = now + 2 * cfg.status_interval
            return
        good = self._known_good
        if self._slow_start or (good is not None and self.rate_bps < good):
            # Back to what the path took at once (after a lag cut: a receiver's CPU was
            # busy for a moment, not its port), not +2.5% per step from a tenth of it.
            grown = self.rate_bps * (1.0 + cfg.rate_increase) ** elapsed
            if not self._slow_start and good is not None:
                grown = min(grown, good)
        else:
            grown = self.rate_bps * (1.0 + cfg.rate_increase / 10 * elapsed)
        self._set_rate(now, min(self.ceiling, max(int(grown), self.rate_bps + 100_000)))
        self.increases += 1

    def set_rate(self, now: float, rate: int) -> None:
        """Pace at ``rate`` from ``now`` on (at least ``min_rate_bps``)."""
        self._set_rate(now, rate)

    def _set_rate(self, now: float, rate: int) -> None:
        self._refill(now)
        self.rate_bps = max(self._config.min_rate_bps, rate)


class SendLog:
    """When our datagrams left, to tell how late a receiver reads (§5).

    Sequence numbers here never wrap (``total``); wire seqs are their low 32 bits.
    """

    __slots__ = ("_log", "total")

    def __init__(self) -> None:
        self.total = 0  #: datagrams numbered so far
        self._log: list[tuple[int, float]] = []  #: (last seq of a Transmit, when it left)

    def numbered(self, n: int) -> None:
        self.total += n

    def sent(self, now: float) -> None:
        """The Transmit whose last datagram was numbered last left at ``now``."""
        self._log.append((self.total - 1, now))
        if len(self._log) > 8192:
            del self._log[:4096]

    def lag(self, seen: int, seq: int, now: float) -> float:
        """How long the first Transmit after ``seen`` (a receiver's highest wire seq read)
        has been waiting for it; ``seq`` is our next wire seq. 0 when it read everything."""
        seen_total = self.total - ((seq - seen) & 0xFFFFFFFF)
        i = bisect.bisect_right(self._log, (seen_total, float("inf")))
        return max(0.0, now - self._log[i][1]) if i < len(self._log) else 0.0
