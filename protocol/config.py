"""Tuning knobs of the multicast engine: one frozen dataclass (docs/PROTOCOL.md)."""

from __future__ import annotations

from dataclasses import dataclass

#: Every header byte the engine puts around a fragment: header 20 + data header 12 + tag 16.
FRAGMENT_OVERHEAD = 48
MIN_PAYLOAD_SIZE = 512
MAX_PAYLOAD_SIZE = 65507


class ConfigError(ValueError):
    """An EngineConfig field is out of range."""


@dataclass(frozen=True)
class EngineConfig:
    """Knobs shared by SenderSession and ReceiverSession. Times are in seconds."""

    payload_size: int = 1472
    """UDP payload bytes per datagram (1472 fits a 1500-byte MTU); larger for jumbo frames."""

    rate_bps: int | None = None
    """Hard cap on sent bits/s of UDP payload; None = no cap (PROTOCOL.md §5)."""

    auto_rate: bool = True
    """Find the rate the group can take from the receivers' loss reports (§5)."""

    initial_rate_bps: int = 1_000_000_000
    """Starting rate in auto mode (capped by rate_bps): a 1 GbE port's. A transfer of a few
    seconds cannot afford a slow ramp; a slower sender port blocks the socket instead of
    losing, and a slower path or receiver is found within one or two STATUS intervals (a
    loss or lag report cuts straight to the rate the receivers got through, §5)."""

    min_rate_bps: int = 1_000_000
    """Auto mode never goes below this."""

    max_rate_bps: int = 10_000_000_000
    """Auto mode never goes above this when rate_bps is None."""

    rate_interval: float = 0.1
    """How often auto mode adjusts the rate."""

    rate_increase: float = 0.25
    """Auto mode, until the first loss cut: fraction of the current rate added per
    rate_interval without loss or lag (a tenth of it after a loss cut; a lag cut keeps it)."""

    rate_decrease: float = 0.7
    """Auto mode: largest factor applied to the rate when loss exceeds loss_threshold and
    the receiver reported no received rate (a heavier loss L cuts it to (1 - L) of itself);
    with one, the rate goes to 90% of what it received."""

    loss_threshold: float = 0.05
    """Auto mode: loss fraction above which the rate is cut (random loss below is ignored)."""

    max_lag: float = 0.15
    """Auto mode: receivers reading further behind than this (seconds) stop the rate growing;
    twice this cuts it to a little below the rate they read at (their socket buffers are
    filling: their CPU, not the network, is the limit)."""

    rate_quantile: float = 0.75
    """Auto mode: use the loss of the receiver at this quantile, not the worst one."""

    burst_bytes: int = 256 * 1024
    """Token bucket depth of the pacer (bytes of UDP payload), at most."""

    burst_time: float = 0.005
    """Token bucket depth as time at the current rate (the smaller depth wins)."""

    gso_max_bytes: int = 65000
    """At most this many bytes in one Transmit (Linux UDP GSO limit is ~64 KiB)."""

    gso_max_segments: int = 64
    """At most this many datagrams in one Transmit."""

    max_transmits_per_call: int = 64
    """Unpaced mode: at most this many Transmits per datagrams_to_send call."""

    announce_interval: float = 0.5
    """ANNOUNCE period while transferring (§3.1)."""

    waiting_announce_interval: float = 0.1
    """ANNOUNCE period while waiting for receivers."""

    join_interval: float = 0.1
    """First JOIN retry interval; doubles up to control_retry_max."""

    join_timeout: float = 10.0
    """Give up on a session whose sender does not answer JOIN for this long."""

    control_retry: float = 0.03
    """First retry interval of DONE / LEAVE / EVICT; doubles up to control_retry_max."""

    control_retry_max: float = 1.0
    """Largest retry interval of any control message."""

    control_timeout: float = 10.0
    """Give up on an unacknowledged DONE / LEAVE / EVICT after this long."""

    listen_timeout: float | None = None
    """Receiver: give up when no session is found for this long; None = wait forever."""

    sender_timeout: float = 15.0
    """Receiver: the session is lost when nothing came from the sender for this long."""

    status_interval: float = 0.25
    """Receiver STATUS period (jittered ±25%)."""

    nak_delay: float = 0.01
    """Receiver: random wait 0..nak_delay before a first NAK, to aggregate."""

    nak_interval: float = 0.05
    """Receiver: least time between NAK bursts (jittered ±25%)."""

    nak_idle: float = 0.1
    """Receiver: a partial object with no fragment for this long is NAK-able."""

    nak_repeat: float = 0.15
    """Receiver: NAK the same object again only after this long without progress."""

    nak_min: float = 0.01
    """Receiver: the least NAK gap and repeat time once repairs are seen to come quickly:
    both follow the measured wait from a NAK to its first repair (§4.3), between nak_min
    and nak_interval / nak_repeat."""

    sweep_holdoff: float = 0.1
    """Sender: do not sweep the same object again within this long (§4.2)."""

    max_partial_objects: int = 256
    """Receiver: most objects held half-received at once (memory bound)."""

    max_partial_bytes: int = 48 << 20
    """Receiver: most bytes of reassembly buffers at once (memory bound)."""

    max_unverified_blocks: int = 64
    """Receiver: most blocks handed to the shell and not yet verified; beyond, drop."""

    max_unverified_bytes: int = 32 << 20
    """Receiver: most stored bytes handed to the shell and not yet verified; beyond, drop."""

    max_block_failures: int = 5
    """Receiver: fail when one block fails verification this many times (counting only
    copies made of tagged datagrams: an untagged copy that fails may be forged, §6.1)."""

    tag_data: bool = False
    """Sender: tag every DATA datagram, not only manifest chunks and the blocks a receiver
    asked to be authenticated (§6.1). Costs ~1.5 µs per datagram at both ends; buys that
    a forger on the LAN cannot make receivers fetch a block twice."""

    receiver_timeout: float = 5.0
    """Sender: evict a receiver silent for this long (§7)."""

    suspect_after: float = 1.0
    """Sender: send nothing that only receivers silent this long still need (§7)."""

    max_object_naks: int = 40
    """Sender: evict a receiver that NAKs one object more than this many times."""

    straggler_grace: float = 30.0
    """Sender: evict a receiver still incomplete this long after all others completed."""

    max_receivers: int = 1024
    """Sender: refuse JOINs beyond this many receivers."""

    linger: float = 1.0
    """Sender: after the end, keep answering DONE / LEAVE this long (§3.3)."""

    abort_repeats: int = 5
    """Sender: ABORT datagrams sent over the linger time by close()."""

    block_cache: int = 8
    """Sender: most recently read blocks kept for repairs."""

    max_manifest_bytes: int = 256 << 20
    """Receiver: refuse sessions announcing a larger manifest."""

    def __post_init__(self) -> None:
        if not MIN_PAYLOAD_SIZE <= self.payload_size <= MAX_PAYLOAD_SIZE:
            raise ConfigError(
                f"payload_size {self.payload_size} must be between {MIN_PAYLOAD_SIZE} and "
                f"{MAX_PAYLOAD_SIZE} (1472 for a 1500-byte MTU)"
            )
        if self.rate_bps is not None and self.rate_bps < 8 * 1024:
            raise ConfigError(f"rate_bps {self.rate_bps} is too small (at least 8192 bit/s)")
        if not 0.0 <= self.rate_quantile <= 1.0:
            raise ConfigError("rate_quantile must be between 0 and 1")
        if not 0.0 < self.rate_decrease < 1.0:
            raise ConfigError("rate_decrease must be between 0 and 1")
        if self.max_partial_objects < 2 or self.max_unverified_blocks < 1:
            raise ConfigError("max_partial_objects must be >= 2 and max_unverified_blocks >= 1")
        if self.gso_max_segments < 1 or self.gso_max_bytes < self.payload_size:
            raise ConfigError("gso_max_bytes must hold at least one datagram")

    @property
    def fragment_payload(self) -> int:
        """Object bytes carried per DATA datagram."""
        return self.payload_size - FRAGMENT_OVERHEAD

    @property
    def segments_per_transmit(self) -> int:
        """Most datagrams the sender packs into one GSO Transmit."""
        return max(1, min(self.gso_max_segments, self.gso_max_bytes // self.payload_size))
