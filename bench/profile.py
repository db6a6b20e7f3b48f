"""Where fleetcast's time goes: py-spy on a running sender and receiver, summarised.

``python -m bench.compare --profile ...`` attaches ``py-spy record --format raw`` (collapsed
stacks, one line per distinct stack with its sample count) to the fleetcast sender and to
receiver r0 of every fleetcast run, then ``summarize`` turns each file into the functions
with the most samples on their own (self) and under them (inclusive). py-spy is in the
optional ``bench`` extra; it needs root (ptrace) and attaches by PID across namespaces.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def available() -> bool:
    """Is py-spy installed (in the venv or on PATH)?"""
    return _py_spy() is not None


def _py_spy() -> str | None:
    venv = Path(sys.executable).with_name("py-spy")
    return str(venv) if venv.exists() else shutil.which("py-spy")


def start(pid: int, out: Path, rate: int = 200) -> subprocess.Popen[bytes]:
    """Sample ``pid`` (all its threads) into ``out`` until it exits; returns py-spy's Popen."""
    exe = _py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
    argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw"]
    argv += ["--nonblocking", "--threads", "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Wait for py-spy to write its file (it stops when its target exits), else kill it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def summarize(path: Path, top: int = 12) -> str:
    """Markdown: the ``top`` frames by self samples and by inclusive samples in ``path``."""
    self_count: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += n
        self_count[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"(no samples in {path.name})\n"
    rows = ["| frame | self | inclusive |", "|---|---|---|"]
    for frame, n in self_count.most_common(top):
        rows.append(f"| `{frame}` | {n / total:.1%} | {incl[frame] / total:.1%} |")
    ours = [
        (f, n)
        for f, n in incl.most_common()
        if any(p in f for p in ("protocol/", "client/", "server/"))
    ]
    rows += ["", "| fleetcast frame (inclusive) | share |", "|---|---|"]
    rows += [f"| `{f}` | {n / total:.1%} |" for f, n in ours[:top]]
    return f"{total} samples\n\n" + "\n".join(rows) + "\n"


def _short(frame: str) -> str:
    """``send_burst (server/multicast/sender.py:120)`` without the line number or venv path."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/work/main/", "/lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})" if file else name
