"""GET /api/agent/sessions/{sid}/blocks/{index}: catch-up's stored blocks over HTTP.

The payload is the store's, byte for byte; its digest header is the manifest's; a Range
gives a 206 (a dropped download resumes); only a target machine of the session may read.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import zstandard
from apitest import *  # noqa: F403
from apitest import Api
from catchuptest import MIB, captured, disk_bytes, enroll, machines, session

from server.images.store import ImageStore
from server.services.blocks import BlockReader, RangeNotSatisfiable, WouldBlock, parse_range


def _url(sid: int, index: int) -> str:
    return f"/api/agent/sessions/{sid}/blocks/{index}"


def test_a_block_is_the_stored_payload_with_the_manifests_digest(api: Api) -> None:
    captured(api, "golden")
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    _, manifest = ImageStore(api.settings.image_root).load_manifest("golden")
    raw = disk_bytes()
    for index in (0, 2):  # 0: random, stored raw; 2: text, a zstd frame
        r = api.client.get(_url(sid, index), headers=agent)
        assert r.status_code == 200, r.text
        entry = manifest.block(index)
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["x-fleetcast-digest"] == entry.digest.hex()
        assert int(r.headers["content-length"]) == entry.stored_size == len(r.content)
        plain = r.content if entry.is_raw else zstandard.decompress(r.content)
        assert plain == raw[index * MIB : (index + 1) * MIB]
        assert hashlib.sha256(plain).hexdigest() == r.headers["x-fleetcast-digest"]
    assert manifest.block(0).is_raw and not manifest.block(2).is_raw


def test_ranges_resume_a_download_and_a_bad_range_is_416(api: Api) -> None:
    captured(api, "golden")
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid], running=False)  # a pending session serves blocks too
    agent = enroll(api, mid)
    whole = api.client.get(_url(sid, 0), headers=agent).content
    size = len(whole)

    head = api.client.get(_url(sid, 0), headers={**agent, "Range": "bytes=0-99"})
    assert head.status_code == 206
    assert head.headers["content-range"] == f"bytes 0-99/{size}"
    assert head.content == whole[:100]
    rest = api.client.get(_url(sid, 0), headers={**agent, "Range": "bytes=100-"})
    assert rest.status_code == 206 and head.content + rest.content == whole
    assert rest.headers["content-range"] == f"bytes 100-{size - 1}/{size}"
    assert rest.headers["x-fleetcast-digest"] == head.headers["x-fleetcast-digest"]
    clipped = api.client.get(
        _url(sid, 0), headers={**agent, "Range": f"bytes={size - 5}-{size * 2}"}
    )
    assert clipped.status_code == 206 and clipped.content == whole[-5:]

    for bad in (f"bytes={size}-", "bytes=9-3", "bytes=0-1,5-9", "items=0-1", "bytes=-"):
        r = api.client.get(_url(sid, 0), headers={**agent, "Range": bad})
        assert r.status_code == 416, (bad, r.status_code)
        assert r.headers["content-range"] == f"bytes */{size}"
        assert "range" in r.json()["detail"].lower()


def test_zero_blocks_and_indexes_past_the_end_are_404_with_the_reason(api: Api) -> None:
    captured(api, "golden")
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    zero = api.client.get(_url(sid, 1), headers=agent)
    assert zero.status_code == 404 and "zero block" in zero.json()["detail"]
    past = api.client.get(_url(sid, 3), headers=agent)
    assert past.status_code == 404
    assert "out of range" in past.json()["detail"] and "3 blocks" in past.json()["detail"]
    assert api.client.get(_url(sid + 100, 0), headers=agent).status_code in (403, 404)


def test_only_a_target_machine_of_the_session_may_read_its_blocks(api: Api) -> None:
    captured(api, "golden")
    target, stranger = machines(api, 2)
    sid = session(api, "golden", [target])
    assert api.client.get(_url(sid, 0)).status_code == 401
    assert api.client.get(_url(sid, 0), headers=enroll(api, stranger)).status_code == 403
    assert api.get(_url(sid, 0)).status_code == 403  # an admin's token is not a machine's
    assert api.client.get(_url(sid, 0), headers=enroll(api, target)).status_code == 200


def test_a_server_without_catch_up_refuses_blocks(api: Api) -> None:
    captured(api, "golden")
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    api.client.app.state.settings.catchup = False  # type: ignore[attr-defined]
    r = api.client.get(_url(sid, 0), headers=agent)
    assert r.status_code == 403 and "FLEETCAST_CATCHUP" in r.json()["detail"]


def test_a_deleted_image_is_a_clear_404_not_a_stale_block(api: Api) -> None:
    captured(api, "golden")
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    assert api.client.get(_url(sid, 0), headers=agent).status_code == 200
    ImageStore(api.settings.image_root).delete_image("golden")  # behind the server's back
    r = api.client.get(_url(sid, 0), headers=agent)
    assert r.status_code == 404 and "golden" in r.json()["detail"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (0, 999, False)),
        ("bytes=0-0", (0, 0, True)),
        ("bytes=10-", (10, 999, True)),
        ("bytes=-10", (990, 999, True)),
        ("bytes=-5000", (0, 999, True)),
        ("bytes = 5 - 9", (5, 9, True)),
        ("bytes=990-5000", (990, 999, True)),
    ],
)
def test_parse_range(header: str | None, expected: tuple[int, int, bool]) -> None:
    assert parse_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=-0", "bytes=5-4", "bytes=a-b", "0-1"])
def test_parse_range_refuses(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable) as err:
        parse_range(header, 1000)
    assert err.value.size == 1000


def test_a_block_not_in_the_page_cache_is_read_in_a_worker_thread(api: Api) -> None:
    captured(api)
    (mid,) = machines(api, 1)
    sid = session(api, "golden", [mid])
    agent = enroll(api, mid)
    store = ImageStore(api.settings.image_root)
    _, manifest = store.load_manifest("golden")
    path = store.block_path(manifest.digest_of(2))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop its pages from the cache
    finally:
        os.close(fd)
    with pytest.raises(WouldBlock):
        BlockReader(store).read("golden", 2, nowait=True)
    r = api.client.get(_url(sid, 2), headers=agent)  # the route falls back to a thread
    assert r.status_code == 200 and r.content == path.read_bytes()
