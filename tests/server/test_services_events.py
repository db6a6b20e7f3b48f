"""The live event fan-out: bounded per-subscriber queues, thread-safe publishing, SSE framing."""

from __future__ import annotations

import asyncio
import json
import threading

from server.events import EventBus


async def test_a_slow_subscriber_loses_its_oldest_messages_and_nobody_else_does() -> None:
    bus = EventBus(queue_size=8)
    bus.bind(asyncio.get_running_loop())
    slow, fast = bus.subscribe(), bus.subscribe()
    got: list[int] = []
    for i in range(20):
        bus.publish("tick", n=i)
        got.append((await fast.queue.get())["n"])
    assert got == list(range(20)) and fast.dropped == 0
    assert slow.queue.qsize() == 8 and slow.dropped == 12
    assert [slow.queue.get_nowait()["n"] for _ in range(8)] == list(range(12, 20))


async def test_publishing_from_other_threads_is_delivered_on_the_loop() -> None:
    bus = EventBus(queue_size=1000)
    bus.bind(asyncio.get_running_loop())
    sub = bus.subscribe()
    threads = [
        threading.Thread(target=lambda t=t: [bus.publish("x", t=t, i=i) for i in range(50)])
        for t in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    msgs = [await asyncio.wait_for(sub.queue.get(), 5) for _ in range(200)]
    for t in range(4):
        assert [m["i"] for m in msgs if m["t"] == t] == list(range(50))


async def test_sse_frames_carry_the_kind_and_json_and_unsubscribe_at_the_end() -> None:
    bus = EventBus(queue_size=4)
    bus.bind(asyncio.get_running_loop())
    sub = bus.subscribe()
    stream = bus.sse(sub, keepalive=0.05)
    assert (await anext(stream)).startswith(":")
    bus.publish("session.running", session_id=3)
    frame = await anext(stream)
    head, data = frame.strip().split("\n")
    assert head == "event: session.running"
    assert json.loads(data.removeprefix("data: ")) == {"kind": "session.running", "session_id": 3}
    assert await anext(stream) == ": keepalive\n\n"
    await stream.aclose()
    assert sub not in bus.subscribers


def test_publishing_without_a_loop_is_a_no_op() -> None:
    EventBus().publish("nothing", a=1)
