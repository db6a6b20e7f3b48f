"""Helpers for the end-to-end tests: images in a store, fleetcast processes in a lab."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # bench/ is not an installed package; tests may import it
    sys.path.insert(0, str(ROOT))

from bench.lab import Lab, Node  # noqa: E402
from protocol.codec import encode_block, is_zero  # noqa: E402
from protocol.manifest import BlockKind, Manifest  # noqa: E402
from server.images.store import ImageStore  # noqa: E402

MIB = 1 << 20


@dataclass
class BuiltImage:
    """An image in a store under ``data_dir``, and the raw disk it was made from."""

    data_dir: Path
    name: str
    disk: Path
    manifest: Manifest
    sha256: bytes  #: what a fresh target must hash to (unused blocks read as zeros)


def build_image(data_dir: Path, name: str, disk: Path) -> BuiltImage:
    """Put ``disk`` into an image store under ``data_dir`` as image ``name``.

    Uses the store's Python API with whole-disk block classification (every non-zero
    block is DATA), so the target must equal the raw disk byte for byte.
    """
    store = ImageStore(data_dir / "images")
    size = disk.stat().st_size
    m = Manifest.empty(size)
    whole = hashlib.sha256()
    with store.writing(), open(disk, "rb") as f:
        for i in range(m.block_count):
            raw = f.read(m.block_size)
            whole.update(raw)
            if is_zero(raw):
                m.set_kind(i, BlockKind.ZERO)
                continue
            digest, payload = encode_block(raw, 1)
            store.put_block(digest, payload)
            m.set_data(i, digest, len(payload))
        m.image_sha256 = whole.digest()
        m.created = "2026-01-01T00:00:00Z"
        store.add_image(name, m)
    return BuiltImage(data_dir, name, disk, m, whole.digest())


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a whole file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.digest()


# -- running fleetcast in the lab ------------------------------------------------------------


@dataclass
class Fleet:
    """Starts ``fleetcast send`` / ``receive`` processes in a lab, logs in ``logs``."""

    lab: Lab
    image: BuiltImage
    key_file: Path
    logs: Path
    group: str
    port: int

    def send(self, *extra: str, name: str = "sender") -> subprocess.Popen[bytes]:
        """``fleetcast send`` in the sender namespace."""
        argv = ["send", self.image.name, *self._session_args(self.key_file), *extra]
        return self._start(self.lab.sender, argv, name)

    def receive(
        self, node: Node, target: Path | str, *extra: str, key_file: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """``fleetcast receive`` in ``node``'s namespace, its counters in logs/NAME.json."""
        argv = [
            "receive",
            "--target",
            str(target),
            *self._session_args(key_file or self.key_file),
            "--stats-json",
            str(self.stats_path(node)),
            *extra,
        ]
        return self._start(node, argv, node.name)

    def stats_path(self, node: Node) -> Path:
        return self.logs / f"{node.name}.json"

    def stats(self, node: Node) -> dict[str, Any]:
        """The counters ``fleetcast receive --stats-json`` wrote for ``node``."""
        result: dict[str, Any] = json.loads(self.stats_path(node).read_text())
        return result

    def log(self, name: str) -> str:
        """What process ``name`` printed (stdout and stderr)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, proc: subprocess.Popen[bytes], name: str, timeout: float) -> int:
        """Exit status of ``proc``; on timeout fail with its log."""
        try:
            return self.lab.wait(proc, timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not finish in {timeout} s:\n{self.log(name)}")

    def _session_args(self, key: Path) -> list[str]:
        return [
            "--group",
            self.group,
            "--port",
            str(self.port),
            "--iface",
            "lab0",
            "--key-file",
            str(key),
        ]

    def _start(self, node: Node, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "FLEETCAST_DATA": str(self.image.data_dir), "PYTHONPATH": str(ROOT)}
        out = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed by the child's exit)
        try:
            return self.lab.popen(
                node,
                [sys.executable, "-m", "fleetcast", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(ROOT),
            )
        finally:
            out.close()
