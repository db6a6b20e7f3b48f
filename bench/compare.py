"""fleetcast against its peers, in one private lab, on the same images (issue 8).

Run as root::

    .venv/bin/python -m bench.compare --quick            # N=1,4, lossless, 1 repetition
    .venv/bin/python -m bench.compare --scenario realistic-n --reps 3
    .venv/bin/python -m bench.compare                    # the whole matrix, 3 repetitions

It builds a realistic disk (GPT + ext4 about half full, some files deleted) and a random
one, captures both into a scratch fleetcast store, exports each back to a raw file (the bytes
every receiver must end with, and every peer's input), then for every scenario, tool and
repetition builds a fresh namespace lab (bench/lab.py, sender egress shaped to 1 Gbit/s),
runs the tool, hashes every receiver's target and records times, bytes on the wire, CPU and
peak RSS. Results go to bench/results/ (JSON, Markdown, PNG); docs/BENCHMARKS.md explains.
Every wait is bounded, every process is stopped by its PID and every lab is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import profile, report, scenarios
from bench.disks import make_random_disk, make_realistic_disk, parse_size
from bench.lab import Lab, LabError, Node, require_lab_support
from bench.peers import (
    ROOT,
    Fleetcast,
    Launched,
    PreparedImage,
    RunContext,
    Tool,
    all_tools,
    tool_by_name,
)
from bench.slowdisk import SlowDisk
from server.images.store import ImageStore

MIB = 1 << 20
RESULTS = ROOT / "bench" / "results"


# -- images ----------------------------------------------------------------------------------


def prepare_image(kind: str, size: int, work: Path, level: int) -> PreparedImage:
    """Build the ``kind`` disk, capture it into the store under ``work``, export it back."""
    disk = work / f"{kind}.disk"
    if kind == "realistic":
        make_realistic_disk(disk, size, seed=0)
    else:
        make_random_disk(disk, size, seed=0)
    data = work / "store"
    env = {**os.environ, "FLEETCAST_DATA": str(data), "PYTHONPATH": str(ROOT)}
    fc = [sys.executable, "-m", "fleetcast", "image"]
    cap = [*fc, "capture", "--name", kind, "--level", str(level), str(disk)]
    subprocess.run(cap, env=env, check=True, capture_output=True, timeout=900)
    raw = work / "serve" / f"{kind}.img"
    raw.parent.mkdir(exist_ok=True)
    subprocess.run([*fc, "export", kind, str(raw)], env=env, check=True, timeout=900)
    disk.unlink()
    _, manifest = ImageStore(data / "images").load_manifest(kind)
    zst = subprocess.run(
        f"zstd -q -c -1 -T1 {raw} | wc -c", shell=True, check=True, capture_output=True, text=True
    )
    return PreparedImage(
        kind=kind,
        name=kind,
        data_dir=data,
        raw=raw,
        sha256=file_sha256(raw),
        size=raw.stat().st_size,
        data_bytes=manifest.data_bytes(),
        stored_bytes=manifest.stored_bytes,
        zstd_bytes=int(zst.stdout.strip()),
    )


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


# -- one run ---------------------------------------------------------------------------------


def tx_bytes(lab: Lab, node: Node) -> int:
    """Bytes sent so far by ``node``'s lab interface (its kernel counters)."""
    out = lab.run(node, ["ip", "-s", "-j", "link", "show", "dev", node.ifname]).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


class Poller:
    """Watches a run's processes: exit status, CPU and peak RSS (wait4), completion time."""

    def __init__(self, lab: Lab, launched: Launched) -> None:
        self.lab = lab
        self.t0 = launched.t0
        self.procs = {"sender": launched.sender} | {
            f"r{i}": p for i, p in enumerate(launched.receivers)
        }
        self.exit: dict[str, int | None] = {}
        self.usage: dict[str, tuple[float, int]] = {}  # name -> (CPU s, peak RSS KiB)
        self.at: dict[str, float] = {}  # name -> seconds after t0 when it exited/completed
        self.hwm: dict[str, int] = {}  # name -> peak RSS in KiB, sampled from /proc
        self.stopped: set[str] = set()  # processes the harness had to stop

    def sample(self) -> None:
        """Note each live process's peak RSS (VmHWM, its own and its children's).

        wait4's ru_maxrss cannot be used: a child forked from this (large) Python process
        carries the parent's resident pages into its maximum across exec.
        """
        for name, proc in self.procs.items():
            if name not in self.exit:
                self.hwm[name] = max(self.hwm.get(name, 0), _tree_hwm_kib(proc.pid))

    def poll(self, name: str) -> bool:
        """Reap ``name`` if it exited; True once it has."""
        if name in self.exit:
            return True
        try:
            code, ru = self.lab.wait_usage(self.procs[name], timeout=0)
        except subprocess.TimeoutExpired:
            return False
        self._record(name, code, ru)
        return True

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop ``name`` by its PID (SIGTERM, then SIGKILL) and keep its usage."""
        if self.poll(name):
            return
        self.stopped.add(name)
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            code, ru = self.lab.wait_usage(proc, timeout=5)
        except subprocess.TimeoutExpired:
            self.lab.kill(proc)
            self.exit[name] = None
            return
        self._record(name, code, ru, keep_at=True)

    def mark(self, name: str) -> None:
        """Note that ``name`` is done now (daemons that do not exit)."""
        self.at.setdefault(name, time.monotonic() - self.t0)

    def _record(self, name: str, code: int, ru: Any, keep_at: bool = False) -> None:
        self.exit[name] = code
        self.usage[name] = (ru.ru_utime + ru.ru_stime, self.hwm.get(name, 0))
        if not keep_at:
            self.at.setdefault(name, time.monotonic() - self.t0)


def _tree_hwm_kib(pid: int) -> int:
    """VmHWM of ``pid`` plus that of its direct children (a pipe's zstd), in KiB; 0 if gone."""
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0
    for p in [str(pid), *children]:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total


def run_one(
    tool: Tool,
    sc: scenarios.Scenario,
    image: PreparedImage,
    scratch: Path,
    timeout: float,
    keep: bool = False,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Run ``tool`` once in a fresh lab for scenario ``sc``; return the run's record.

    With ``profile_to`` (a path prefix) a fleetcast run's sender and receiver r0 are sampled
    by py-spy into ``PREFIX-sender.txt`` and ``PREFIX-r0.txt`` (collapsed stacks).
    """
    run_dir = Path(tempfile.mkdtemp(prefix=f"{tool.name}-{sc.name}-", dir=scratch))
    key = run_dir / "session.key"
    key.write_text(secrets.token_bytes(32).hex() + "\n")
    load = os.getloadavg()[0]
    with Lab(sc.receivers, sender_rate="1gbit") as lab, contextlib.ExitStack() as stack:
        targets = []
        for i in range(sc.receivers):
            tdir = run_dir / f"r{i}"
            if i == 0 and sc.fault == "slowdisk":
                tdir = stack.enter_context(SlowDisk(run_dir / "slowdisk", image.size))
            tdir.mkdir(exist_ok=True)
            targets.append(tdir / image.raw.name)
        for node in lab.receivers if sc.loss else []:
            lab.set_loss(node, sc.loss)
        if sc.fault == "slowport":
            lab.shape_port(lab.receivers[0], "100mbit")
        ctx = RunContext(
            lab=lab,
            scenario=sc,
            image=image,
            work=run_dir,
            targets=targets,
            port=20000 + secrets.randbelow(20000),
            group=_random_group(),
            key_file=key,
            timeout=timeout,
        )
        tx0 = tx_bytes(lab, lab.sender)
        launched = tool.launch(ctx)
        spies = []
        if profile_to is not None and tool.name == "fleetcast":
            for role, proc in (("sender", launched.sender), ("r0", launched.receivers[0])):
                spies.append(profile.start(proc.pid, Path(f"{profile_to}-{role}.txt")))
        poller = Poller(lab, launched)
        killed_at = _watch(tool, ctx, poller, timeout)
        wire = tx_bytes(lab, lab.sender) - tx0
        for name in list(poller.procs):
            poller.stop(name)
        for spy in spies:
            profile.stop(spy)
        record = _record(tool, ctx, poller, wire, killed_at, load)
    if keep:
        for t in ctx.targets:
            with contextlib.suppress(OSError):
                t.unlink()
        _say(f"kept {run_dir}")
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
    return record


def _random_group() -> str:
    r = secrets.randbelow
    return f"239.{r(256)}.{r(256)}.{r(250) + 1}"


def _watch(tool: Tool, ctx: RunContext, poller: Poller, timeout: float) -> float | None:
    """Poll until every receiver and the sender are done, or ``timeout``; kill r0 half-way."""
    n = ctx.scenario.receivers
    deadline = poller.t0 + timeout
    killed_at = None
    tick = 0
    while time.monotonic() < deadline:
        if tick % 10 == 0:
            poller.sample()
        tick += 1
        for i in range(n):
            name = f"r{i}"
            if (
                not poller.poll(name)
                and tool.receivers_are_daemons
                and tool.receiver_complete(ctx, i)
            ):
                poller.mark(name)
        if "first_data" not in poller.at and any(tool.progress(ctx, i) > 0 for i in range(n)):
            poller.at["first_data"] = time.monotonic() - poller.t0
        if ctx.scenario.fault == "kill" and killed_at is None and tool.progress(ctx, 0) >= 0.5:
            killed_at = time.monotonic() - poller.t0
            poller.stop("r0", signal.SIGKILL)
            # r0 is done (dead): without this the loop waited for it until --timeout, and
            # every kill run took that long (its figures were right, its duration not)
            poller.mark("r0")
        receivers_done = all(f"r{i}" in poller.at for i in range(n))
        if receivers_done and (tool.sender_is_server or poller.poll("sender")):
            break
        time.sleep(0.02)
    return killed_at


def _record(
    tool: Tool,
    ctx: RunContext,
    poller: Poller,
    wire: int,
    killed_at: float | None,
    load: float,
) -> dict[str, Any]:
    sc = ctx.scenario
    with ThreadPoolExecutor(2) as pool:
        hashes = list(pool.map(_hash_or_none, ctx.targets))
    receivers = []
    for i, digest in enumerate(hashes):
        name = f"r{i}"
        cpu, rss = poller.usage.get(name, (None, None))
        receivers.append(
            {
                "name": name,
                "exit": poller.exit.get(name),
                "at": poller.at.get(name),
                "verified": digest == ctx.image.sha256,
                "faulted": i == 0 and sc.fault is not None,
                "cpu_s": cpu,
                "peak_rss_kib": rss,
            }
        )
    cpu, rss = poller.usage.get("sender", (None, None))
    sender_exit = poller.exit.get("sender")
    all_verified = all(r["verified"] for r in receivers)
    expected = [r for r in receivers if not (sc.fault == "kill" and r["faulted"])]
    ok = all(r["verified"] for r in expected)
    # A sender the harness had to stop (still running at --timeout) gave no verdict.
    stalled = "sender" in poller.stopped and not tool.sender_is_server
    truthful = None if tool.sender_is_server or stalled else (sender_exit == 0) == all_verified
    return {
        "tool": tool.name,
        "scenario": sc.name,
        "image": ctx.image.kind,
        "receivers_n": sc.receivers,
        "load_1min": round(load, 2),
        "wall_s": _max_at(expected),
        "others_s": _max_at([r for r in expected if not r["faulted"]]),
        "faulted_s": receivers[0]["at"] if sc.fault and sc.fault != "kill" else None,
        "killed_at_s": killed_at,
        "first_data_s": poller.at.get("first_data"),
        "all_expected_verified": ok,
        "sender": {
            "exit": sender_exit,
            "at": poller.at.get("sender"),
            "cpu_s": cpu,
            "peak_rss_kib": rss,
        },
        "sender_truthful": truthful,
        "sender_stalled": stalled,
        "receivers": receivers,
        "wire_bytes": wire,
        "payload_once": tool.payload_once(ctx.image),
        "image_bytes": ctx.image.size,
        "tool_reports": tool.reports(ctx),
    }


def _max_at(rs: list[dict[str, Any]]) -> float | None:
    if not rs or any(r["at"] is None or not r["verified"] for r in rs):
        return None
    return float(max(r["at"] for r in rs))


def _hash_or_none(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=1,4, lossless, both images, 1 rep")
    p.add_argument(
        "--targets",
        action="store_true",
        help="every scenario issue 8 sets a target on, each with only the tools its target "
        "compares (bench/scenarios.py TARGET_TOOLS), 3 reps",
    )
    p.add_argument("--scenario", action="append", help="run scenarios whose name contains this")
    p.add_argument("--tools", help="comma-separated: udpcast,udpcast+zstd,uftp,http,fleetcast")
    p.add_argument("--reps", type=int, help="repetitions per scenario and tool (default 3)")
    p.add_argument("--size", type=parse_size, default=parse_size("512M"), help="image size")
    p.add_argument("--level", type=int, default=1, help="zstd level of the capture (default 1)")
    p.add_argument("--timeout", type=float, default=180, help="seconds one run may take")
    p.add_argument("--scratch", type=Path, default=Path("/dev/shm"), help="targets go here")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--tag", default="", help="name of this result set (default: quick/full)")
    p.add_argument(
        "--keep", help="keep each run's logs (not its targets) in --scratch", action="store_true"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the fleetcast sender and r0 of each run (results in --out)",
    )
    p.add_argument(
        "--fleetcast-arg",
        action="append",
        metavar="ARG",
        help="extra argument for 'fleetcast send' (repeat: --fleetcast-arg=--rate "
        "--fleetcast-arg=900M)",
    )
    p.add_argument(
        "--images",
        type=Path,
        help="keep the prepared images in this directory and reuse them on the next run "
        "with the same --size and --level (default: build them afresh in a temporary one)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also run fleetcast from the source tree DIR (e.g. a 'git worktree' of an older "
        "commit) as the tool fleetcast-base, interleaved with the others",
    )
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return p.parse_args(argv)


def choose_tools(spec: str | None) -> list[Tool]:
    """Tools named in ``spec`` (all when None); SystemExit naming an unknown one."""
    if not spec:
        return all_tools()
    known = tool_by_name()
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"bench.compare: unknown tool(s) {unknown}: choose from {list(known)}")
    return [t for name, t in known.items() if name in wanted]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.targets:
        base = scenarios.target_matrix()
    else:
        base = scenarios.quick_matrix() if a.quick else scenarios.full_matrix()
    try:
        chosen = scenarios.select(base, a.scenario)
    except ValueError as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    if a.list:
        print("\n".join(f"{s.name:28} {s.describe()}" for s in chosen))
        return 0
    reps = a.reps or (1 if a.quick else 3)
    tools = choose_tools(a.tools)
    if a.baseline is not None:
        tools.insert(len(tools) - 1 if tools and tools[-1].name == "fleetcast" else len(tools),
                     Fleetcast(root=a.baseline.resolve()))  # fmt: skip
    for t in tools:
        if isinstance(t, Fleetcast) and a.fleetcast_arg:
            t.sender_args = tuple(a.fleetcast_arg)
    try:
        require_lab_support()
    except LabError as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 1
    for t in tools:
        if t.missing():
            print(
                f"bench.compare: {t.name} needs {t.missing()}: run scripts/setup", file=sys.stderr
            )
            return 1
    tag = a.tag or ("quick" if a.quick else "targets" if a.targets else "full")
    if a.profile and not profile.available():
        print("bench.compare: --profile needs py-spy: pip install -e '.[bench]'", file=sys.stderr)
        return 1
    a.out.mkdir(parents=True, exist_ok=True)
    results = run_all(a, chosen, tools, reps, tag)
    meta = _meta(a, reps, tag)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{tag}.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    text = report.write(meta, results, a.out, tag)
    if a.profile:
        text += _profiles(a.out, tag)
    print(text)
    return 0


def run_all(
    a: argparse.Namespace,
    chosen: list[scenarios.Scenario],
    tools: list[Tool],
    reps: int,
    tag: str,
) -> list[dict[str, Any]]:
    """Prepare the images the scenarios need, then every repetition x scenario x tool.

    Repetitions are the outer loop: a set takes up to an hour, and the machine drifts over
    it (the lossless N=8 median moved 2.3 -> 2.6 s between sets of one morning). Taking
    every scenario's first repetition, then every one's second, lets that drift touch each
    scenario alike, so a ratio between scenarios (2% loss against lossless) compares runs
    minutes apart, not half an hour."""
    results: list[dict[str, Any]] = []
    with _image_dir(a.images) as img_dir:
        images: dict[str, PreparedImage] = {}
        for kind in sorted({s.image for s in chosen}):
            t = time.monotonic()
            images[kind] = cached_image(kind, a.size, img_dir, a.level)
            _say(f"image {kind}: {_describe(images[kind])} ({time.monotonic() - t:.0f} s)")
        with _scratch(a.scratch, a.keep) as scratch:
            for rep in range(reps):
                for sc in chosen:
                    for tool in tools:
                        if a.targets and not _wanted(tool.name, sc.name):
                            continue
                        spy = a.out / f"{tag}-profile-{sc.name}-rep{rep}" if a.profile else None
                        rec = run_one(
                            tool, sc, images[sc.image], Path(scratch), a.timeout, a.keep, spy
                        )
                        rec["rep"] = rep
                        results.append(rec)
                        _say(_line(rec))
    return results


@contextlib.contextmanager
def _image_dir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="fcbench-img-", dir="/var/tmp") as d:
        yield Path(d)


def cached_image(kind: str, size: int, parent: Path, level: int) -> PreparedImage:
    """``prepare_image`` in ``parent/KIND-SIZE-LEVEL``, reused when a previous run left it
    complete (its description file is written last, and the exported image still hashes
    the same is not re-checked: delete the directory to rebuild)."""
    work = parent / f"{kind}-{size}-{level}"
    desc = work / "prepared.json"
    if desc.exists():
        fields = json.loads(desc.read_text())
        for k in ("data_dir", "raw"):
            fields[k] = Path(fields[k])
        img = PreparedImage(**fields)
        if img.raw.exists():
            return img
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    img = prepare_image(kind, size, work, level)
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in vars(img).items()}
    desc.write_text(json.dumps(fields, indent=1))
    return img


def _wanted(tool: str, scenario: str) -> bool:
    """Does ``--targets`` run ``tool`` in ``scenario``? (fleetcast-base runs with fleetcast)"""
    names = scenarios.TARGET_TOOLS.get(scenario)
    return names is None or tool.removesuffix("-base") in names


def _profiles(out: Path, tag: str) -> str:
    """Summaries of every profile this set wrote, appended to TAG.md."""
    text = "\n## Where fleetcast's time goes (py-spy, all threads)\n"
    for path in sorted(out.glob(f"{tag}-profile-*.txt")):
        text += f"\n### {path.stem}\n\n" + profile.summarize(path)
    with open(out / f"{tag}.md", "a") as f:
        f.write(text)
    return text


@contextlib.contextmanager
def _scratch(parent: Path, keep: bool) -> Iterator[str]:
    if keep:
        yield tempfile.mkdtemp(prefix="fcbench-", dir=parent)
        return
    with tempfile.TemporaryDirectory(prefix="fcbench-", dir=parent) as d:
        yield d


def _describe(img: PreparedImage) -> str:
    return (
        f"{img.size / MIB:.0f} MiB, {img.data_bytes / MIB:.0f} MiB data, "
        f"{img.stored_bytes / MIB:.0f} MiB stored, zstd -1 {img.zstd_bytes / MIB:.0f} MiB"
    )


def _line(rec: dict[str, Any]) -> str:
    ok = sum(r["verified"] for r in rec["receivers"])
    wall = f"{rec['wall_s']:.2f} s" if rec["wall_s"] is not None else "FAILED"
    return (
        f"{rec['scenario']:24} rep {rec.get('rep', 0)} {rec['tool']:13} {wall:>9}  "
        f"{ok}/{rec['receivers_n']} verified  sender exit {rec['sender']['exit']} "
        f"truthful {rec['sender_truthful']}  wire {rec['wire_bytes'] / MIB:.0f} MiB  "
        f"load {rec['load_1min']}"
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _meta(a: argparse.Namespace, reps: int, tag: str) -> dict[str, Any]:
    return {
        "command": "python -m bench.compare " + " ".join(sys.argv[1:]),
        "tag": tag,
        "reps": reps,
        "size": a.size,
        "level": a.level,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "load_end": os.getloadavg(),
    }


if __name__ == "__main__":
    sys.exit(main())
