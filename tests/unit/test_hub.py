"""A connection's outbox: made on the first queued frame, bounded, and woken on close."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.runtime.hub import Connection, Outbox
from protocol.codec import Codec


async def test_a_connection_only_ever_answered_has_no_outbox() -> None:
    conn = Connection(frozenset(), Codec.JSON)
    conn.close()
    assert conn._outbox is None
    assert conn.closed


async def test_the_first_queued_frame_makes_the_outbox_and_starts_the_writer() -> None:
    conn = Connection(frozenset(), Codec.JSON)
    started: list[int] = []
    conn.on_queued = lambda: started.append(conn.outbox.qsize())
    conn.send(b"one")
    conn.send(b"two")
    assert started == [1, 2]
    assert [conn.outbox.get_nowait(), conn.outbox.get_nowait()] == [b"one", b"two"]
    conn.close()
    assert conn.outbox.get_nowait() is None  # the writer wakes and ends
    conn.send(b"late")
    assert conn.outbox.empty()


async def test_a_full_outbox_closes_the_connection() -> None:
    conn = Connection(frozenset(), Codec.JSON, outbox_frames=2)
    closed = asyncio.Event()
    conn.on_close = closed.set
    for frame in (b"a", b"b", b"c"):
        conn.send(frame)
    assert conn.closed and closed.is_set()
    # The oldest frame gave way to the wake-up, which the writer finds last.
    assert [conn.outbox.get_nowait(), conn.outbox.get_nowait()] == [b"b", None]


async def test_the_outbox_wakes_its_reader_in_order_and_survives_a_cancelled_wait() -> None:
    outbox = Outbox(3)
    with pytest.raises(asyncio.QueueEmpty):
        outbox.get_nowait()
    reading = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    assert not reading.done()
    outbox.put_nowait(b"first")
    outbox.put_nowait(b"second")
    assert await reading == b"first"
    assert await outbox.get() == b"second"
    abandoned = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    outbox.put_nowait(b"third")  # no reader waits: kept for the next
    assert (outbox.qsize(), await outbox.get(), outbox.empty()) == (1, b"third", True)
    for frame in (b"a", b"b", b"c"):
        outbox.put_nowait(frame)
    with pytest.raises(asyncio.QueueFull):
        outbox.put_nowait(b"d")
