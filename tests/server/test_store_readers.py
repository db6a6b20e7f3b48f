"""Reader leases: an image being read (a running send, an export) cannot be deleted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_store import add, block_files

from server.images.store import ImageInUse, ImageNotFound, ImageStore
from server.multicast import command

HOLD = (
    "import sys\n"
    "from pathlib import Path\n"
    "from server.images.store import ImageStore\n"
    "with ImageStore(Path(sys.argv[1])).reading(sys.argv[2], 'fleetcast send'):\n"
    "    print('reading', flush=True)\n"
    "    if sys.stdin.readline() == 'die\\n':\n"
    "        import os; os._exit(9)\n"  # dies holding the lease, like kill -9
)


def hold(root: Path, name: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), name], cwd=Path.cwd(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "reading\n"
    return proc


def release(proc: subprocess.Popen[str], how: str = "done") -> None:
    assert proc.stdin is not None
    proc.stdin.write(how + "\n")
    proc.stdin.close()
    proc.wait(timeout=30)


def test_delete_is_refused_naming_the_reader_until_it_finishes(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "a", [1, 2])
    reader = hold(tmp_path, "a")
    try:
        with pytest.raises(ImageInUse, match=rf"being read by pid {reader.pid} \(fleetcast send\)"):
            store.delete_image("a")
        assert store.exists("a") and len(block_files(store)) == 2
        store.gc()  # gc sweeps nothing an image being read needs
        assert len(block_files(store)) == 2
    finally:
        release(reader)
    assert reader.returncode == 0 and store.readers("a") == []
    store.delete_image("a")
    assert not store.exists("a") and block_files(store) == set()


def test_a_dead_readers_lease_does_not_block_delete(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "a", [1])
    reader = hold(tmp_path, "a")
    release(reader, "die")
    assert reader.returncode == 9
    assert store.readers("a") == []  # its holder file names a dead pid
    store.delete_image("a")
    store.gc()
    assert list(store.readers_dir.glob("*.holder")) == []


def test_a_lease_in_this_process_blocks_delete_too(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    add(store, "a", [1])
    add(store, "b", [2])
    with store.reading("a", "an export"):
        assert store.readers("a") == [f"pid {os.getpid()} (an export)"]
        with pytest.raises(ImageInUse, match="an export"):
            ImageStore(tmp_path).delete_image("a")
        ImageStore(tmp_path).delete_image("b")  # other images are not held
    store.delete_image("a")


def test_reading_a_missing_image_fails_and_leaves_no_lease(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    with pytest.raises(ImageNotFound), store.reading("nope"):
        pass
    assert list(store.readers_dir.glob("*.holder")) == []


def test_delete_during_a_running_send_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "images"
    store = ImageStore(root)
    add(store, "golden", [1, 2])
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    refused: list[str] = []

    class Sent(Exception):
        pass

    async def sending(runner: Any) -> None:  # the send's network part, replaced
        try:
            ImageStore(root).delete_image("golden")
        except ImageInUse as exc:
            refused.append(str(exc))
        raise Sent

    monkeypatch.setattr(command, "_interruptible", sending)
    argv = ["golden", "--group", "239.1.1.1", "--port", "5000", "--iface", "lo",
            "--key-file", str(key), "--data-dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(Sent):
        command.send_main(argv)
    assert refused and f"pid {os.getpid()} (fleetcast send)" in refused[0]
    assert store.exists("golden")
    store.delete_image("golden")  # the lease ended with the send
