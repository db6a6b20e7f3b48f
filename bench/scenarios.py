"""The benchmark's scenario matrix (issue 8): what each run's lab looks like.

A scenario fixes the image (realistic or random), the number of receivers, the random loss at
every receiver, and at most one fault on receiver r0: killed half-way, behind a 100 Mbit
bridge port, or writing to a throttled disk. ``python -m bench.compare --list`` prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FAULTS = ("kill", "slowport", "slowdisk")


@dataclass(frozen=True)
class Scenario:
    """One lab setup; its ``name`` is what ``--scenario`` matches."""

    image: str  #: "realistic" or "random"
    receivers: int
    loss: int = 0  #: percent of UDP datagrams dropped at random in every receiver namespace
    fault: str | None = None  #: None or one of FAULTS, applied to receiver r0

    @property
    def name(self) -> str:
        """E.g. ``realistic-n4-loss2`` or ``realistic-n4-kill``."""
        parts = [self.image, f"n{self.receivers}"]
        if self.loss:
            parts.append(f"loss{self.loss}")
        if self.fault:
            parts.append(self.fault)
        return "-".join(parts)

    @property
    def baseline(self) -> Scenario:
        """The same lab without loss or fault: what ratios of this one are taken against."""
        return Scenario(self.image, self.receivers)

    def describe(self) -> str:
        """One line for tables."""
        text = f"{self.image} image, N={self.receivers}"
        if self.loss:
            text += f", {self.loss}% loss at every receiver"
        text += {
            None: "",
            "kill": ", r0 killed half-way",
            "slowport": ", r0 behind a 100 Mbit/s port",
            "slowdisk": ", r0 writes to a throttled disk",
        }[self.fault]
        return text


def full_matrix() -> list[Scenario]:
    """Every scenario issue 8 asks for. Each lossy or faulted one comes right after the
    lossless one it is compared with: the lab drifts within minutes (the same lossless N=8
    run took 2.42-2.51 s at one time and 2.60-2.76 s an hour later), and with every peer
    between them the two came ~6 minutes apart."""
    out: list[Scenario] = []
    for n in (1, 4, 8):
        out += [Scenario("realistic", n), Scenario("realistic", n, loss=2)]
        if n == 4:
            out += [Scenario("realistic", 4, fault=f) for f in FAULTS]
    out += [Scenario("random", n) for n in (1, 4, 8)]
    return out


def quick_matrix() -> list[Scenario]:
    """``--quick``: N=1 and 4, lossless, both images."""
    return [Scenario(img, n) for img in ("realistic", "random") for n in (1, 4)]


#: ``--targets``: each scenario issue 8 sets a target on, with only the tools that target
#: compares (None: every tool). Lossless realistic runs are against every peer; the random
#: image against raw udpcast; loss and faults against fleetcast's own lossless time.
TARGET_TOOLS: dict[str, tuple[str, ...] | None] = {  # each right after its baseline
    "realistic-n1": None,
    "realistic-n1-loss2": ("fleetcast",),
    "realistic-n4": None,
    "realistic-n4-loss2": ("fleetcast",),
    "realistic-n4-kill": ("fleetcast",),
    "realistic-n4-slowport": ("fleetcast",),
    "realistic-n8": None,
    "realistic-n8-loss2": ("fleetcast",),
    "random-n4": ("udpcast", "fleetcast"),
}


def target_matrix() -> list[Scenario]:
    """``--targets``: the scenarios of TARGET_TOOLS, in that order."""
    return [parse(name) for name in TARGET_TOOLS]


def select(scenarios: Sequence[Scenario], patterns: Sequence[str] | None) -> list[Scenario]:
    """Scenarios named exactly, else containing, any of ``patterns`` (all when None or empty).

    A pattern that is a full scenario name not in the matrix (e.g. ``realistic-n2-loss5``)
    is parsed and added, so any lab can be run by name. Raises ValueError for a name that
    matches nothing and does not parse.
    """
    if not patterns:
        return list(scenarios)
    chosen: list[Scenario] = []
    for pat in patterns:
        hits = [s for s in scenarios if s.name == pat] or [s for s in scenarios if pat in s.name]
        if not hits:
            hits = [parse(pat)]
        chosen += [s for s in hits if s not in chosen]
    return chosen


def parse(name: str) -> Scenario:
    """``realistic-n4-loss2-kill`` -> Scenario; ValueError with the grammar when it fails."""
    parts = name.split("-")
    try:
        image, count, *rest = parts
        if image not in ("realistic", "random") or not count.startswith("n"):
            raise ValueError
        loss, fault = 0, None
        for p in rest:
            if p.startswith("loss"):
                loss = int(p[4:])
            elif p in FAULTS:
                fault = p
            else:
                raise ValueError
        return Scenario(image, int(count[1:]), loss, fault)
    except ValueError:
        raise ValueError(
            f"scenario {name!r} matches nothing: use a part of a listed name, or "
            f"IMAGE-nN[-lossP][-{'|'.join(FAULTS)}] with IMAGE realistic or random"
        ) from None
