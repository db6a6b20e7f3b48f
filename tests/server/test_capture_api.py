"""Capture sessions over the API: a machine's agent uploads only the blocks the store lacks,
every block is verified on arrival, the upload resumes by asking again, and the image
appears only once its manifest is accepted (docs/SERVER.md "Capture")."""

from __future__ import annotations

from apitest import *  # noqa: F403
from apitest import Api
from capturetest import Agent, disk, enrolled, image_of, start_capture

from protocol.codec import compress_block, decode_block
from server.images.store import ImageStore


def _names(api: Api) -> list[str]:
    return [i["name"] for i in api.get("/api/images").json()]


def test_a_capture_session_assigns_the_machine_a_capture_of_its_disk(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:01", "pc-01")
    s = start_capture(api, agent, "golden/ref", disk_rule="sda", after="poweroff", level=5)
    assert (s["kind"], s["target_image"], s["state"], s["image_id"]) == (
        "capture",
        "golden/ref",
        "running",
        None,
    )
    assert [m["machine_id"] for m in s["machines"]] == [agent.machine_id]
    a = agent.assignment()
    assert a["session_id"] == agent.session_id and a["kind"] == "capture"
    assert (a["image"], a["disk_rule"], a["after"], a["level"]) == (
        "golden/ref",
        "sda",
        "poweroff",
        5,
    )
    assert a["block_size"] == 1 << 20 and a["manifest"] == ""
    row = api.get(f"/api/sessions/{agent.session_id}").json()["machines"][0]
    assert row["state"] == "assigned"


def test_only_missing_blocks_are_uploaded_and_the_image_appears_when_complete(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:02")
    start_capture(api, agent, "lab/ref")
    img = image_of(disk(1))
    digests = list(img.payloads)
    r = agent.have(digests)
    assert r.status_code == 200
    assert sorted(r.json()["missing"]) == sorted(d.hex() for d in digests)
    assert r.json()["present"] == {}
    first = digests[0]
    payload, raw_length = img.payloads[first]
    assert agent.put(first, payload, raw_length).status_code == 201
    assert agent.put(first, payload, raw_length).status_code == 200  # already there
    r = agent.have(digests)
    assert r.json()["present"] == {first.hex(): len(payload)}
    assert first.hex() not in r.json()["missing"]
    agent.upload(img)
    assert "lab/ref" not in _names(api)  # every block stored, but no manifest yet
    r = agent.manifest(img.data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "lab/ref" and body["digest"] == img.manifest.digest().hex()
    image = api.get(f"/api/images/{body['image_id']}").json()
    assert image["family"] == "lab" and image["data_blocks"] == len(digests)
    s = api.get(f"/api/sessions/{agent.session_id}").json()
    assert (s["state"], s["image_id"], s["machines"][0]["state"]) == (
        "succeeded",
        body["image_id"],
        "succeeded",
    )
    store = ImageStore(api.settings.image_root)
    for d, (_payload, raw_length) in img.payloads.items():
        assert decode_block(store.read_block(d), raw_length, d)
    assert store.pins() == []  # the pin is released with the session
    cap = api.get("/api/captures", params={"machine_id": agent.machine_id}).json()[0]
    assert (cap["uploaded_blocks"], cap["reused_blocks"]) == (len(digests), 0)
    assert cap["uploaded_bytes"] == sum(len(p) for p, _ in img.payloads.values())
    r = agent.result("verified", uploaded_blocks=5, read_bytes=123)
    assert r.status_code == 200 and r.json()["state"] == "succeeded"
    assert (
        api.get(f"/api/sessions/{agent.session_id}").json()["stats"]["agent"]["read_bytes"] == 123
    )


def test_a_second_capture_of_an_unchanged_disk_uploads_nothing(api: Api) -> None:
    img = image_of(disk(2))
    first = enrolled(api, "52:54:00:c0:00:03")
    start_capture(api, first, "pc/one")
    assert first.upload(img) == (len(img.payloads), 0)
    assert first.manifest(img.data).status_code == 200
    start_capture(api, first, "pc/two")
    assert first.upload(img) == (0, len(img.payloads))
    assert first.manifest(img.data).status_code == 200
    cap = api.get("/api/captures", params={"machine_id": first.machine_id}).json()[0]
    assert cap["target_image"] == "pc/two"
    assert (cap["uploaded_blocks"], cap["uploaded_bytes"]) == (0, 0)
    assert cap["reused_blocks"] == len(img.payloads)


def test_a_corrupted_or_oversized_block_is_refused_naming_it(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:04")
    start_capture(api, agent, "bad")
    img = image_of(disk(3))
    d, (payload, raw_length) = next(iter(img.payloads.items()))
    flipped = bytearray(payload)
    flipped[len(flipped) // 2] ^= 0xFF
    other = compress_block(b"x" * raw_length)
    cases = [
        (bytes(flipped), raw_length, "refused"),  # a bad frame or the wrong content
        (other, raw_length, "hash mismatch"),  # a good frame of another block
        (payload, raw_length + 1, "refused"),  # the wrong raw length
        (bytes(2 << 20), 2 << 20, "block size"),  # larger than the capture's block size
    ]
    for body, length, why in cases:
        r = agent.put(d, body, length)
        assert r.status_code == 422, (why, r.text)
        assert d.hex() in r.json()["detail"] and why in r.json()["detail"]
    r = agent.put("zz" * 32, payload, raw_length)
    assert r.status_code == 422 and "SHA-256" in r.json()["detail"]
    store = ImageStore(api.settings.image_root)
    assert not store.has_block(d)
    assert agent.put(d, payload, raw_length).status_code == 201  # the real one still goes in


def test_a_body_longer_than_its_raw_length_is_refused(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:05")
    start_capture(api, agent, "long")
    r = agent.put("ab" * 32, bytes(100), 10)
    assert r.status_code == 422 and "larger than" in r.json()["detail"]


def test_an_interrupted_upload_resumes_by_asking_again(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:06")
    start_capture(api, agent, "resumed")
    img = image_of(disk(4, blocks=8, zero=()))
    assert agent.upload(img, only=3) == (3, 0)
    # the machine reboots: a new agent process asks again and sends only the rest
    assert agent.assignment()["session_id"] == agent.session_id
    assert agent.upload(img) == (5, 3)
    assert agent.upload(img) == (0, 8)
    assert agent.manifest(img.data).status_code == 200
    assert agent.manifest(img.data).json()["name"] == "resumed"  # a repeat answers the same


def test_a_manifest_naming_missing_blocks_is_refused_and_the_image_stays_hidden(
    api: Api,
) -> None:
    agent = enrolled(api, "52:54:00:c0:00:07")
    start_capture(api, agent, "partial")
    img = image_of(disk(5))
    agent.upload(img, only=1)
    r = agent.manifest(img.data)
    assert r.status_code == 422
    assert f"{len(img.payloads) - 1} data blocks are not in the store" in r.json()["detail"]
    assert "partial" not in _names(api)
    assert agent.manifest(b"{not json").status_code == 422
    assert api.get(f"/api/sessions/{agent.session_id}").json()["state"] == "running"
    agent.upload(img)
    assert agent.manifest(img.data).status_code == 200
    assert "partial" in _names(api)


def test_gc_during_an_open_capture_keeps_its_blocks_and_frees_them_after_a_cancel(
    api: Api,
) -> None:
    agent = enrolled(api, "52:54:00:c0:00:08")
    start_capture(api, agent, "pinned")
    img = image_of(disk(6))
    agent.upload(img)
    store = ImageStore(api.settings.image_root)
    assert store.gc().blocks_removed == 0
    assert all(store.has_block(d) for d in img.payloads)
    assert agent.manifest(img.data).status_code == 200  # nothing was lost
    # a second capture is cancelled half-way: its new blocks go at the next gc
    start_capture(api, agent, "cancelled")
    extra = image_of(disk(7))
    agent.upload(extra)
    assert api.post(f"/api/sessions/{agent.session_id}/cancel").status_code == 200
    r = agent.have(list(extra.payloads))
    assert r.status_code == 409 and "stop uploading" in r.json()["detail"]
    api.post("/api/captures", json={"machine_id": 999, "target_image": "x"})  # releases pins
    assert store.pins() == []
    assert store.gc().blocks_removed == len(extra.payloads)
    assert all(store.has_block(d) for d in img.payloads)


def test_only_the_capture_machine_may_upload_and_only_while_it_runs(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:09")
    other = enrolled(api, "52:54:00:c0:00:0a")
    start_capture(api, agent, "mine")
    other.session_id = agent.session_id
    assert other.have([]).status_code == 403
    assert (
        api.post(f"/api/agent/captures/{agent.session_id}/have", json={"digests": []}).status_code
        == 403
    )
    assert agent.result("failed", read_bytes=0).json()["state"] == "failed"
    s = api.get(f"/api/sessions/{agent.session_id}").json()
    assert s["state"] == "failed" and "failed" in s["reason"]
    assert agent.have([]).status_code == 409


def test_a_verified_result_without_a_manifest_fails_the_capture(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:0b")
    start_capture(api, agent, "nomanifest")
    assert agent.result("verified").json()["state"] == "failed"
    assert "no accepted manifest" in api.get(f"/api/sessions/{agent.session_id}").json()["reason"]


def test_a_capture_is_refused_for_a_taken_name_or_a_busy_machine(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:0c")
    start_capture(api, agent, "first")
    r = api.post("/api/captures", json={"machine_id": agent.machine_id, "target_image": "again"})
    assert r.status_code == 409 and "active session" in r.json()["detail"]
    other = enrolled(api, "52:54:00:c0:00:0d")
    r = api.post("/api/captures", json={"machine_id": other.machine_id, "target_image": "first"})
    assert r.status_code == 409 and "already writing" in r.json()["detail"]
    r = api.post("/api/captures", json={"machine_id": other.machine_id, "target_image": "a b"})
    assert r.status_code == 400 and "invalid image name" in r.json()["detail"]
    r = api.post(
        "/api/captures",
        json={"machine_id": other.machine_id, "target_image": "x", "disk_rule": "a b"},
    )
    assert r.status_code == 422


def _capture(api: Api, agent: Agent, name: str, seed: int) -> int:
    start_capture(api, agent, name)
    img = image_of(disk(seed))
    agent.upload(img)
    r = agent.manifest(img.data)
    assert r.status_code == 200, r.text
    return int(r.json()["image_id"])


def test_restore_deploys_a_backup_to_that_machine_alone_at_once(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:0e")
    image_id = _capture(api, agent, "pc-0e/2026-11-26", 8)
    backups = api.get(f"/api/machines/{agent.machine_id}/backups").json()
    assert [b["image_id"] for b in backups] == [image_id]
    r = api.post(f"/api/machines/{agent.machine_id}/restore", json={"image_id": image_id})
    assert r.status_code == 201, r.text
    s = r.json()
    assert (s["kind"], s["image_id"], s["image_name"], s["state"]) == (
        "deploy",
        image_id,
        "pc-0e/2026-11-26",
        "running",
    )
    assert [m["machine_id"] for m in s["machines"]] == [agent.machine_id]
    assert s["start_policy"]["start"] == "now" and s["start_policy"]["min_receivers"] == 1
    assert (
        api.post(f"/api/machines/{agent.machine_id}/restore", json={"image_id": 999}).status_code
        == 404
    )


def test_a_manifest_resent_after_a_server_crash_mid_accept_completes_the_capture(
    api: Api,
) -> None:
    from server.db import db_session, make_engine
    from server.services.images import sync_store

    agent = enrolled(api, "52:54:00:c0:00:0f")
    start_capture(api, agent, "crashed")
    img = image_of(disk(9))
    agent.upload(img)
    store = ImageStore(api.settings.image_root)
    store.add_image("crashed", img.manifest)  # the server died before its commit ...
    engine = make_engine(api.settings.db_url)
    try:
        with db_session(engine) as db:
            assert sync_store(db, store) == 1  # ... and its restart registered the image
    finally:
        engine.dispose()
    r = agent.manifest(img.data)  # the agent resends its manifest
    assert r.status_code == 200, r.text
    assert api.get(f"/api/sessions/{agent.session_id}").json()["state"] == "succeeded"
    assert _names(api).count("crashed") == 1


def test_a_captured_machine_can_be_deleted_and_its_images_stay(api: Api) -> None:
    agent = enrolled(api, "52:54:00:c0:00:10")
    image_id = _capture(api, agent, "gone/1", 10)
    assert api.delete(f"/api/machines/{agent.machine_id}").status_code == 204
    assert api.get(f"/api/images/{image_id}").json()["name"] == "gone/1"
    assert api.get("/api/captures").json() == []


def test_a_running_capture_survives_a_server_restart(api: Api) -> None:
    from fastapi.testclient import TestClient

    from server.main import create_app

    agent = enrolled(api, "52:54:00:c0:00:11")
    start_capture(api, agent, "restarted")
    img = image_of(disk(11, blocks=8, zero=()))
    assert agent.upload(img, only=4) == (4, 0)
    with TestClient(create_app(api.settings)) as client:  # a new server process
        again = Api(client, api.settings, api.token)
        moved = Agent(again, agent.headers, agent.machine_id, agent.session_id)
        assert again.get(f"/api/sessions/{agent.session_id}").json()["state"] == "running"
        assert moved.upload(img) == (4, 4)
        assert moved.manifest(img.data).status_code == 200
        assert "restarted" in _names(again)
