"""End-to-end fixtures: a private namespace lab (bench/lab.py), torn down whatever happens."""

from __future__ import annotations

import os
import random
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fleethelp import MIB, ROOT, BuiltImage, Fleet, build_image
from serverlab import ServerLab

from bench.disks import make_realistic_disk
from bench.lab import Lab, lab_unavailable_reason
from server.images.store import ImageStore

_reason: list[str | None] = []


def _unavailable() -> str | None:
    if not _reason:
        _reason.append(lab_unavailable_reason())
    return _reason[0]


@pytest.fixture
def make_lab() -> Iterator[Callable[..., Lab]]:
    """``make_lab(receivers, sender_rate=None)`` -> a started Lab, closed after the test."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    labs: list[Lab] = []

    def factory(receivers: int = 1, *, sender_rate: str | None = None) -> Lab:
        built = Lab(receivers, sender_rate=sender_rate)
        labs.append(built)
        built.start()
        return built

    try:
        yield factory
    finally:
        for built in labs:
            built.close()


@pytest.fixture(scope="session")
def realistic_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A 64 MiB realistic disk (GPT + half-full ext4) captured with ``fleetcast image capture``.

    Built once per test worker. Its unused blocks are not sent: a fresh target file reads
    them as zeros, so a good copy hashes to the manifest's image_sha256.
    """
    root = tmp_path_factory.mktemp("realistic")
    disk = root / "disk.img"
    make_realistic_disk(disk, 64 * MIB, seed=3)
    data = root / "data"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetcast",
            "image",
            "capture",
            "--name",
            "lab-image",
            "--level",
            "1",
            str(disk),
        ],
        env={**os.environ, "FLEETCAST_DATA": str(data), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    _, manifest = ImageStore(data / "images").load_manifest("lab-image")
    return BuiltImage(data, "lab-image", disk, manifest, manifest.image_sha256)


@pytest.fixture(scope="session")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """A 9 MiB disk: compressible, random and zero blocks, and a short last block."""
    root = tmp_path_factory.mktemp("small")
    disk = root / "disk.img"
    rng = random.Random(7)
    with open(disk, "wb") as f:
        f.write(b"fleetcast " * (3 * MIB // 10) + b"fl")
        f.write(rng.randbytes(2 * MIB))
        f.write(bytes(3 * MIB))
        f.write(rng.randbytes(MIB + 12345))
    return build_image(root / "data", "small-image", disk)


@pytest.fixture
def make_fleet(make_lab: Callable[..., Lab], tmp_path: Path) -> Callable[..., Fleet]:
    """``make_fleet(image, receivers)`` -> a Fleet on a new lab with a fresh key."""

    def factory(image: BuiltImage, receivers: int, **lab_kw: Any) -> Fleet:
        lab = make_lab(receivers, **lab_kw)
        key = tmp_path / "session.key"
        if not key.exists():
            key.write_text(secrets.token_bytes(32).hex() + "\n")
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        group = (
            f"239.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(250)}"
        )
        return Fleet(lab, image, key, logs, group, 20000 + secrets.randbelow(20000))

    return factory


@pytest.fixture
def server_lab(
    request: pytest.FixtureRequest,
    make_lab: Callable[..., Lab],
    small_image: BuiltImage,
    tmp_path: Path,
) -> Iterator[ServerLab]:
    """A lab with the server in the sender namespace and the test module's ``AGENTS``
    (default 2) machine namespaces; its processes are stopped whatever happens."""
    sl = ServerLab(make_lab(getattr(request.module, "AGENTS", 2)), small_image.data_dir, tmp_path)
    try:
        yield sl
    finally:
        sl.close()
