"""Delta re-imaging, resume and the disk scan, measured (issue 9; docs/TRANSFER.md).

Run as root::

    .venv/bin/python -m bench.delta lab --size 1G --receivers 4   # full vs delta vs udpcast
    .venv/bin/python -m bench.delta scan --size 3G                # scan vs sha256sum vs dd
    .venv/bin/python -m bench.delta journal --size 1G             # journal vs re-hash

``lab``: in the namespace lab (bench/lab.py, bench/compare.run_one, the realistic disk of
bench/disks.py), N receivers get the golden image (1) by a full fleetcast deployment onto
blank targets, (2) by a delta deployment onto targets that hold the golden image with
``--change`` of its data blocks altered (each receiver hashes its disk, joins with what it
holds, receives the rest; its clock starts when the receivers start, so the hashing counts),
(3) by udpcast raw and (4) udpcast with zstd, both onto blank targets. Every target must
end byte-identical to the golden image. The page cache is dropped before each run.

``scan``: client.delta.scan_disk over a file (and a loop device on it) of random data,
against ``sha256sum`` and ``dd bs=8M`` of the same file, page cache dropped before each.

``journal``: what a resume costs either way: (a) a progress journal on the target, which
must make each block durable before recording it (fdatasync the target, append, fdatasync
the journal, every ``--every`` blocks), paid by every deployment; (b) re-hashing the
half-written target against the manifest when a receiver restarts, paid only on resume.

Results: bench/results/delta.json and delta.md (``--tag`` renames them).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import compare, scenarios
from bench.disks import parse_size
from bench.lab import require_lab_support
from bench.peers import ROOT, Fleetcast, Launched, PreparedImage, RunContext, Udpcast, _popen
from client.delta import scan_disk
from client.disk import Target
from protocol.manifest import BlockKind, Manifest

RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20


def drop_caches() -> None:
    """Write back and drop the page cache, so reads come from the disk."""
    os.sync()
    with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


# -- lab: full vs delta vs udpcast -------------------------------------------------------------


@dataclass
class FleetcastDelta(Fleetcast):
    """fleetcast onto targets holding the image with some blocks changed, ``--delta always``."""

    base: Path = Path()  #: what every target holds before the run
    manifest_file: Path = Path()
    #: keep the targets in the page cache: the scan reads at memory speed (a fast-disk proxy)
    warm: bool = False

    def __post_init__(self) -> None:
        self.name = "fleetcast-delta"

    def launch(self, ctx: RunContext) -> Launched:
        """Fill the targets, drop the cache, then start receivers and sender together: the
        clock runs from the receivers' start, so their hashing is counted."""
        for t in ctx.targets:
            subprocess.run(["cp", "--sparse=always", str(self.base), str(t)], check=True)
        if self.warm:
            os.sync()  # written back, still cached: the scan's reads come from memory
        else:
            drop_caches()
        t0 = ctx.t0 = time.monotonic()
        receivers = [self.start_receiver(ctx, i, n) for i, n in enumerate(ctx.lab.receivers)]
        return Launched(self.start_sender(ctx), receivers, t0)

    def start_receiver(self, ctx: RunContext, i: int, node: Any) -> Any:
        argv = self._argv(ctx, "receive", "--target", str(ctx.targets[i]))
        argv += ["--stats-json", str(self._stats(ctx, i)), "--timeout", str(int(ctx.timeout))]
        argv += ["--delta", "always", "--manifest", str(self.manifest_file)]
        return _popen(ctx, node, node.name, argv, self._env(ctx))

    def reports(self, ctx: RunContext) -> dict[str, Any]:
        out = super().reports(ctx)
        per = out.get("receiver_stats", [])
        keys = ("held_blocks", "held_bytes", "scan_seconds", "scan_mb_s", "verified_blocks")
        out["delta"] = [{k: s.get(k) for k in keys} for s in per]
        out["blocks_received"] = [s.get("session", {}).get("blocks_received") for s in per]
        return out


def changed_copy(image: PreparedImage, out: Path, share: float, seed: int = 9) -> list[int]:
    """``image.raw`` with ``share`` of its DATA blocks altered (4 KiB of each); the indices."""
    shutil.copyfile(image.raw, out)
    m = Manifest.from_bytes(
        (image.data_dir / "images" / "manifests" / f"{image.name}.json").read_bytes()
    )
    data = [i for i in range(m.block_count) if m.kinds[i] == BlockKind.DATA]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(data, max(1, round(share * len(data)))))
    with open(out, "r+b") as f:
        for i in chosen:
            f.seek(i * m.block_size + rng.randrange(0, m.block_length(i) - 4096 + 1, 4096))
            f.write(rng.randbytes(4096))
    return chosen


def run_lab(a: argparse.Namespace) -> dict[str, Any]:
    require_lab_support()
    counts = [int(n) for n in str(a.receivers).split(",")]
    out: dict[str, Any] = {
        "receivers": counts,
        "size": a.size,
        "change": a.change,
        "warm": a.warm,
        "runs": [],
    }
    with _workdir(a.keep) as work:
        image = compare.cached_image("realistic", a.size, work, 1)
        base = work / "changed.img"
        changed = changed_copy(image, base, a.change)
        out["changed_blocks"] = len(changed)
        out["image"] = {k: str(v) for k, v in vars(image).items()}
        mfile = image.data_dir / "images" / "manifests" / f"{image.name}.json"
        tools = [
            Fleetcast(),
            FleetcastDelta(base=base, manifest_file=mfile, warm=a.warm),
            Udpcast(),
            Udpcast(zstd=True),
        ]
        scratch = work / "runs"
        scratch.mkdir(exist_ok=True)
        for rep in range(a.reps):
            for sc in (scenarios.Scenario("realistic", n) for n in counts):
                for tool in tools:
                    drop_caches()
                    rec = compare.run_one(tool, sc, image, scratch, a.timeout)
                    rec["rep"] = rep
                    rec.get("tool_reports", {}).pop("receiver_stats", None)
                    out["runs"].append(rec)
                    _say(
                        f"{sc.name} {tool.name} rep {rep}: {rec['wall_s']} s, {rec['wire_bytes']} B"
                    )
    return out


# -- scan: disk speed ------------------------------------------------------------------------


def run_scan(a: argparse.Namespace) -> dict[str, Any]:
    with _workdir(a.keep) as work:
        path = work / "scan.img"
        subprocess.run(
            ["dd", "if=/dev/urandom", f"of={path}", "bs=8M", f"count={a.size // (8 * MIB)}"],
            check=True,
            capture_output=True,
        )
        size = path.stat().st_size
        m = _manifest_of(path, size)
        out: dict[str, Any] = {"size": size, "file": {}, "loop": {}}
        out["file"] = _scan_all(path, m, size)
        dev = subprocess.run(
            ["losetup", "-f", "--show", "-r", str(path)], capture_output=True, text=True
        ).stdout.strip()
        if dev:
            try:
                out["loop"] = _scan_all(Path(dev), m, size)
            finally:
                subprocess.run(["losetup", "-d", dev], check=False)
        return out


def _manifest_of(path: Path, size: int) -> Manifest:
    """A manifest whose every block is DATA with the file's real digest (half changed)."""
    m = Manifest.empty(size)
    with open(path, "rb") as f:
        for i in range(m.block_count):
            raw = f.read(m.block_size)
            m.set_data(i, bytes(32) if i % 2 else _sha(raw), len(raw))  # odd: "changed"
    return m


def _sha(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def _scan_all(path: Path, m: Manifest, size: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for threads in (1, 2, 4):
        drop_caches()
        h = scan_disk(path, m, threads=threads)
        assert h.data_blocks == m.block_count // 2, "the scan must find every unchanged block"
        res[f"scan_t{threads}_mb_s"] = round(size / h.seconds / 1e6, 1)
    for name, argv in (
        ("sha256sum_mb_s", ["sha256sum", str(path)]),
        ("dd_mb_s", ["dd", f"if={path}", "of=/dev/null", "bs=8M"]),
    ):
        drop_caches()
        t = time.monotonic()
        subprocess.run(argv, check=True, capture_output=True)
        res[name] = round(size / (time.monotonic() - t) / 1e6, 1)
    _say(f"{path}: {res}")
    return res


# -- journal vs re-hash ----------------------------------------------------------------------


def run_journal(a: argparse.Namespace) -> dict[str, Any]:
    with _workdir(a.keep) as work:
        rng = random.Random(3)
        bs = MIB
        n = a.size // bs
        blocks = [rng.randbytes(bs) for _ in range(16)]  # 16 distinct blocks, reused
        m = Manifest.empty(n * bs)
        for i in range(n):
            m.set_data(i, _sha(blocks[i % 16]), bs)
        out: dict[str, Any] = {"size": n * bs, "every": a.every}
        for mode in ("plain", "journal"):
            target = work / f"{mode}.img"
            drop_caches()
            out[f"{mode}_s"] = round(_write(target, m, blocks, mode == "journal", a.every), 3)
        half = work / "plain.img"
        with open(half, "r+b") as f:
            f.truncate(n * bs // 2)  # a receiver that died half-way
            f.truncate(n * bs)
        drop_caches()
        h = scan_disk(half, m)
        out["rehash_half_s"] = round(h.seconds, 3)
        out["rehash_held_blocks"] = h.data_blocks
        out["journal_overhead_s"] = round(out["journal_s"] - out["plain_s"], 3)
        _say(str(out))
        return out


def _write(path: Path, m: Manifest, blocks: list[bytes], journal: bool, every: int) -> float:
    """Write every block like the receiver does; with ``journal``, make each batch durable
    and record it (the only safe order: data synced before the journal says so)."""
    target = Target.open(path, m.image_size)
    jfd = os.open(f"{path}.journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    started = time.monotonic()
    try:
        for i in range(m.block_count):
            target.write(i * m.block_size, blocks[i % 16])
            if journal and (i + 1) % every == 0:
                os.fdatasync(target.fd)
                os.write(jfd, f"{i + 1 - every} {i + 1}\n".encode())
                os.fdatasync(jfd)
        target.sync()
        return time.monotonic() - started
    finally:
        os.close(jfd)
        target.close()


# -- report ------------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# Delta re-imaging, resume, disk scan ({res.get('when', '')})", ""]
    lab = res.get("lab")
    if lab:
        lines += [
            f"Lab: N = {lab['receivers']}, realistic image of {lab['size'] >> 20} MiB, "
            f"{lab['changed_blocks']} data blocks changed ({lab['change']:.0%}) on the delta "
            "targets; sender port shaped to 1 Gbit/s; page cache dropped before each run"
            + (
                " but the delta targets' (kept cached: a fast-disk proxy)."
                if lab.get("warm")
                else "."
            ),
            "",
            "wall: from the sender's start (full, udpcast: receivers already waiting) or from",
            "the receivers' start (delta: their hashing counts); multicast: the sender's",
            "transfer start to the last DONE (fleetcast's own timeline).",
            "",
            "| scenario | tool | rep | wall s | x full | multicast s | wire MB | verified | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        full = {
            (r["scenario"], r["rep"]): r["wall_s"] for r in lab["runs"] if r["tool"] == "fleetcast"
        }
        for r in lab["runs"]:
            base = full.get((r["scenario"], r["rep"]))
            ratio = f"{r['wall_s'] / base:.3f}" if base and r["wall_s"] else "-"
            tl = r.get("tool_reports", {}).get("timeline") or {}
            mc = (
                tl["completed"] - tl["transfer"] if "completed" in tl and "transfer" in tl else None
            )
            lines.append(
                f"| {r['scenario']} | {r['tool']} | {r['rep']} | {r['wall_s']:.2f} | {ratio} | "
                f"{'-' if mc is None else f'{mc:.2f}'} | {r['wire_bytes'] / 1e6:.1f} | "
                f"{r['all_expected_verified']} | {r['load_1min']} |"
            )
        for r in lab["runs"]:
            if r["tool"] == "fleetcast-delta":
                rr = r["tool_reports"]
                lines += [
                    "",
                    f"{r['scenario']} delta rep {r['rep']}: timeline {rr.get('timeline')}; "
                    f"blocks received {rr.get('blocks_received')}; receivers {rr.get('delta')}",
                ]
        lines.append("")
    for key in ("scan", "journal"):
        if key in res:
            lines += [f"## {key}", "", "```", json.dumps(res[key], indent=1), "```", ""]
    return "\n".join(lines)


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="fcbench-delta-", dir="/var/tmp") as d:
        yield Path(d)


def _say(text: str) -> None:
    print(f"bench.delta: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.delta", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="+", choices=("lab", "scan", "journal"))
    p.add_argument("--size", type=parse_size, default=parse_size("1G"))
    p.add_argument("--receivers", default="4", help="receiver counts, e.g. 1,4")
    p.add_argument("--change", type=float, default=0.05, help="share of data blocks changed")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--every", type=int, default=8, help="journal: blocks per durable record")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument(
        "--warm", action="store_true", help="lab: delta targets stay cached (fast-disk proxy)"
    )
    p.add_argument("--keep", type=Path, help="work directory to keep (images are reused)")
    p.add_argument("--tag", default="delta")
    a = p.parse_args(argv)
    res: dict[str, Any] = {}
    path = RESULTS / f"{a.tag}.json"
    if path.exists():
        res.update(json.loads(path.read_text()))
    res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runners = {"lab": run_lab, "scan": run_scan, "journal": run_journal}
    for what in a.what:
        res[what] = runners[what](a)
    res["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    path.write_text(json.dumps(res, indent=1, default=str))
    (RESULTS / f"{a.tag}.md").write_text(markdown(res))
    _say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
