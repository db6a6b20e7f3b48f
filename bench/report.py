"""Medians, ratios, the Markdown table and the PNG charts of a bench.compare result set."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from protocol.config import EngineConfig
from protocol.wire import DATA_HEADER, TAG_SIZE

MIB = 1 << 20
GIB = 1 << 30
Run = dict[str, Any]

#: the slow-port scenario's shaping toward r0 (bench/compare.py: ``tbf rate 100mbit``)
SLOW_PORT_BPS = 100_000_000
#: what a port carries per DATA datagram besides the object bytes: Ethernet 14 + IPv4 20 +
#: UDP 8 + fleetcast's DATA header, and its tag when the default sender tags data (tbf counts
#: frames without preamble and FCS)
PORT_OVERHEAD = 42 + DATA_HEADER.size + (TAG_SIZE if EngineConfig().tag_data else 0)

#: issue 8's targets: (scenario, peer, bound on fleetcast's wall / peer's wall)
TIME_TARGETS = [
    ("realistic-n1", "udpcast+zstd", 0.3),
    ("realistic-n4", "udpcast+zstd", 0.4),
    ("realistic-n8", "udpcast+zstd", 0.55),
    ("realistic-n1", "http", 0.6),
]


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None; None when there are none."""
    vs = [v for v in values if v is not None]
    return statistics.median(vs) if vs else None


def group(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    """Runs by (scenario, tool), in the order they first appear."""
    out: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for r in runs:
        out[(r["scenario"], r["tool"])].append(r)
    return out


def port_time(r: Run) -> float:
    """Seconds a SLOW_PORT_BPS port takes for one copy of the image as fleetcast puts it on
    the wire: every stored byte of every data block (r0 starts with none) plus the headers
    of the datagrams one pass takes (the sender's count; else estimated from full ones)."""
    once = r["payload_once"]
    fragment = EngineConfig().fragment_payload
    datagrams = r["tool_reports"].get("data_datagrams") or -(-once // fragment)
    return (once + datagrams * PORT_OVERHEAD) * 8 / SLOW_PORT_BPS


def slow_ratio(r: Run) -> float | None:
    """The slow-port receiver's time, from the first data to its verified copy, ÷ port_time."""
    if r["faulted_s"] is None or r.get("first_data_s") is None:
        return None
    return float(r["faulted_s"] - r["first_data_s"]) / port_time(r)


def cpu_per_gib(r: Run) -> float | None:
    """The sender's CPU seconds per GiB its interface transmitted."""
    cpu, wire = r["sender"]["cpu_s"], r["wire_bytes"]
    return cpu / (wire / GIB) if cpu is not None and wire else None


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Medians over the repetitions of one scenario and tool."""

    def med(f: Callable[[Run], float | None]) -> float | None:
        return median(f(r) for r in runs)

    def recv(r: Run, key: str) -> list[Any]:
        return [x[key] for x in r["receivers"] if x[key] is not None and not x["faulted"]]

    wall = med(lambda r: r["wall_s"])
    return {
        "runs": len(runs),
        "ok": sum(r["all_expected_verified"] for r in runs),
        "truthful": [r["sender_truthful"] for r in runs],
        "stalled": sum(1 for r in runs if r.get("sender_stalled")),
        "wall": wall,
        "others": med(lambda r: r["others_s"]),
        "start": med(lambda r: r.get("first_data_s")),
        "faulted": med(lambda r: r["faulted_s"]),
        "mbps": runs[0]["image_bytes"] / wall / 1e6 if wall else None,
        "wire": med(lambda r: r["wire_bytes"]),
        "payload": runs[0]["payload_once"],
        "retrans": med(lambda r: r["tool_reports"].get("retransmitted_share")),
        "naks": med(lambda r: r["tool_reports"].get("nak_datagrams")),
        "sender_cpu": med(lambda r: r["sender"]["cpu_s"]),
        "cpu_per_gib": med(cpu_per_gib),
        "slow_ratio": med(slow_ratio) if runs[0]["scenario"].endswith("-slowport") else None,
        "sender_rss": med(lambda r: r["sender"]["peak_rss_kib"]),
        "recv_cpu": med(lambda r: median(recv(r, "cpu_s"))),
        "recv_rss": med(lambda r: max(recv(r, "peak_rss_kib"), default=None)),
        "load": med(lambda r: r["load_1min"]),
    }


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _truth(values: list[bool | None], stalled: int = 0) -> str:
    """``k/n`` runs whose sender's exit status was true; stalled senders gave none."""
    if stalled:
        told = [v for v in values if v is not None]
        return f"{sum(1 for v in told if v)}/{len(told)}, {stalled} stalled"
    if all(v is None for v in values):
        return "n/a"
    return f"{sum(1 for v in values if v)}/{len(values)}"


def table(runs: list[Run]) -> str:
    """The Markdown table: one row per scenario and tool, medians, fleetcast's ratio."""
    groups = group(runs)
    sums = {k: summarize(v) for k, v in groups.items()}
    head = [
        "scenario", "tool", "verified runs", "exit truthful", "wall s (median)", "first data s",
        "fleetcast ÷ this", "MB/s per receiver", "wire MiB", "wire ÷ payload", "retrans share",
        "NAKs", "sender CPU s", "sender CPU s/GiB", "receiver CPU s", "sender RSS MiB",
        "receiver RSS MiB", "load",
    ]  # fmt: skip
    rows = [head]
    for (sc, tool), s in sums.items():
        fc = sums.get((sc, "fleetcast"))
        ratio = fc["wall"] / s["wall"] if fc and fc["wall"] and s["wall"] else None
        extra = ""
        if s["faulted"] is not None or s["others"] != s["wall"]:
            extra = f" (others {_f(s['others'])}, r0 {_f(s['faulted'])})"
        rows.append([
            sc, tool, f"{s['ok']}/{s['runs']}", _truth(s["truthful"], s["stalled"]),
            _f(s["wall"]) + extra, _f(s["start"]),
            _f(ratio), _f(s["mbps"], "{:.0f}"), _f(s["wire"] and s["wire"] / MIB, "{:.0f}"),
            _f(s["wire"] and s["wire"] / max(1, s["payload"])), _f(s["retrans"], "{:.1%}"),
            _f(s["naks"], "{:.0f}"), _f(s["sender_cpu"]), _f(s["cpu_per_gib"], "{:.1f}"),
            _f(s["recv_cpu"]),
            _f(s["sender_rss"] and s["sender_rss"] / 1024, "{:.0f}"),
            _f(s["recv_rss"] and s["recv_rss"] / 1024, "{:.0f}"), _f(s["load"], "{:.1f}"),
        ])  # fmt: skip
    return _md(rows)


def targets(runs: list[Run]) -> str:
    """Issue 8's ratio targets that this result set can answer, met or not."""
    sums = {k: summarize(v) for k, v in group(runs).items()}
    rows = [["target", "measured", "met"]]

    def wall(sc: str, tool: str) -> float | None:
        s = sums.get((sc, tool))
        return s["wall"] if s else None

    for sc, peer, bound in TIME_TARGETS:
        fc, other = wall(sc, "fleetcast"), wall(sc, peer)
        if fc and other:
            r = fc / other
            rows.append(
                [f"{sc}: fleetcast ≤ {bound}x {peer}'s time", f"{r:.2f}x", _yes(r <= bound)]
            )
    fc, udp = wall("random-n4", "fleetcast"), wall("random-n4", "udpcast")
    if fc and udp:
        rows.append(["random-n4: fleetcast ≥ 1.2x udpcast's throughput", f"{udp / fc:.2f}x",
                     _yes(udp / fc >= 1.2)])  # fmt: skip
    for n in (1, 4, 8):
        lossy, clean = (
            wall(f"realistic-n{n}-loss2", "fleetcast"),
            wall(f"realistic-n{n}", "fleetcast"),
        )
        if lossy and clean:
            rows.append([f"n{n}, 2% loss: ≤ 1.05x own lossless time", f"{lossy / clean:.2f}x",
                         _yes(lossy / clean <= 1.05)])  # fmt: skip
    for fault in ("kill", "slowport"):
        s, clean = (
            sums.get((f"realistic-n4-{fault}", "fleetcast")),
            wall("realistic-n4", "fleetcast"),
        )
        if s and s["others"] and clean:
            r = s["others"] / clean
            rows.append([f"n4 {fault}: others ≤ 1.05x no-fault time", f"{r:.2f}x", _yes(r <= 1.05)])
    s = sums.get(("realistic-n4-slowport", "fleetcast"))
    if s and s["slow_ratio"]:
        r = s["slow_ratio"]
        rows.append(["n4 slowport: slow one ≤ 1.1x its port's time for its bytes", f"{r:.2f}x",
                     _yes(r <= 1.1)])  # fmt: skip
    rows += _cpu_rows(sums)
    for (sc, tool), s in sums.items():
        if tool == "fleetcast" and s["recv_rss"]:
            mib = s["recv_rss"] / 1024
            rows.append([f"{sc}: receiver RSS ≤ 100 MiB", f"{mib:.0f} MiB", _yes(mib <= 100)])
    return _md(rows) if len(rows) > 1 else "(no scenario here answers a target)\n"


def _cpu_rows(sums: dict[tuple[str, str], dict[str, Any]]) -> list[list[str]]:
    """Sender CPU s per GiB sent, fleetcast against fleetcast-base where both ran: falling?"""
    rows = []
    for (sc, tool), s in sums.items():
        base = sums.get((sc, "fleetcast-base"))
        if tool == "fleetcast" and base and s["cpu_per_gib"] and base["cpu_per_gib"]:
            now, before = s["cpu_per_gib"], base["cpu_per_gib"]
            rows.append([f"{sc}: sender CPU s per GiB sent falling (fleetcast vs base)",
                         f"{now:.1f} vs {before:.1f}", _yes(now < before)])  # fmt: skip
    return rows


#: fleetcast's phases (bench/peers.py Fleetcast._timeline): key, what ends there
PHASES = [
    ("run", "start-up (Python, imports, manifest)"),
    ("transfer", "joins + start rule"),
    ("last_data", "sending (ramp, steady, repairs)"),
    ("completed", "tail (last blocks verified, fsync, DONE)"),
    ("exit", "receiver exit"),
]


def budget(runs: list[Run]) -> str:
    """Where fleetcast's wall time goes, per scenario: median seconds spent in each phase."""
    rows = [["scenario", *(label for _, label in PHASES), "wall s"]]
    for (sc, tool), rs in group(runs).items():
        if tool != "fleetcast":
            continue
        spans: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            tl = dict(r["tool_reports"].get("timeline") or {})
            if not tl or r["wall_s"] is None:
                continue
            tl["exit"] = r["wall_s"]
            prev = 0.0
            for key, _ in PHASES:
                if key in tl:
                    spans[key].append(tl[key] - prev)
                    prev = tl[key]
        if spans:
            cells = [_f(median(spans.get(k, []))) for k, _ in PHASES]
            rows.append([sc, *cells, _f(median(r["wall_s"] for r in rs))])
    return _md(rows) if len(rows) > 1 else ""


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _md(rows: list[list[str]]) -> str:
    head = "| " + " | ".join(rows[0]) + " |\n|" + "|".join("---" for _ in rows[0]) + "|\n"
    return head + "".join("| " + " | ".join(r) + " |\n" for r in rows[1:])


def charts(runs: list[Run], out: Path, tag: str) -> list[Path]:
    """Bar charts of median wall time and of CPU per scenario and tool; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    sums = {k: summarize(v) for k, v in group(runs).items()}
    scen = list(dict.fromkeys(sc for sc, _ in sums))
    tools = list(dict.fromkeys(t for _, t in sums))
    made = []
    for key, label, fname in [
        ("wall", "seconds until every receiver holds a verified copy (median)", "wall"),
        ("sender_cpu", "sender CPU seconds (median)", "sender-cpu"),
        ("recv_cpu", "CPU seconds per receiver (median)", "receiver-cpu"),
    ]:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(scen)), 4))
        width = 0.8 / max(1, len(tools))
        for j, tool in enumerate(tools):
            ys = [(sums.get((sc, tool)) or {}).get(key) or 0 for sc in scen]
            xs = [i + j * width for i in range(len(scen))]
            ax.bar(xs, ys, width, label=tool)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(scen))], scen, rotation=20)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{tag}-{fname}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def write(meta: dict[str, Any], runs: list[Run], out: Path, tag: str) -> str:
    """Write ``out/TAG.md`` (and PNG charts); return the Markdown."""
    pngs = charts(runs, out, tag)
    text = (
        f"# bench.compare: {tag}\n\n`{meta['command']}` — {meta['date']}, commit "
        f"{meta.get('commit', '?')}, {meta['cpus']} CPUs, "
        f"Linux {meta['kernel']}, Python {meta['python']}, image {meta['size'] // MIB} MiB, "
        f"{meta['reps']} repetition(s), capture zstd level {meta['level']}; 1-min load at the "
        f"end {meta['load_end'][0]:.1f} (per run in the last column).\n\n"
        "## Targets (issue 8)\n\n" + targets(runs) + "\n## All runs (medians)\n\n" + table(runs)
    )
    spent = budget(runs)
    if spent:
        text += "\n## Where fleetcast's wall time goes (median s per phase)\n\n" + spent
    text += "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    (out / f"{tag}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report bench/results/TAG.json``: rewrite TAG.md and its charts."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULTS.json", file=sys.stderr)
        return 2
    path = Path(args[0])
    data = json.loads(path.read_text())
    for r in data["runs"]:
        if "sender_stalled" not in r:  # sets written before the harness recorded it
            stopped = r["tool"] != "http" and r["sender"]["exit"] in (-15, -9, None)
            r["sender_stalled"] = stopped
            if stopped:
                r["sender_truthful"] = None
    path.write_text(json.dumps(data, indent=1))
    print(write(data["meta"], data["runs"], path.parent, path.stem))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
