"""The worker log's batching: few `append_worker_log_log` calls, nothing lost on a short disconnect."""

from __future__ import annotations

import asyncio

from protocol.peer import Disconnected
from worker.worker_log import WorkerLog


class Sink:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.failures: list[type[Exception]] = []

    async def __call__(self, text: str) -> None:
        if self.failures:
            raise self.failures.pop(0)()
        self.calls.append(text)


async def test_lines_within_an_interval_go_in_one_call() -> None:
    sink = Sink()
    async with WorkerLog(sink, interval_s=0.2) as log:
        for n in range(100):
            log.line(f"line {n}", "[slave 1] ")
        await asyncio.sleep(0.05)
        assert sink.calls == []
        await asyncio.sleep(0.3)
        assert len(sink.calls) == 1
        log.line("last")
    assert sink.calls[0].splitlines() == [f"[slave 1] line {n}" for n in range(100)]
    assert sink.calls[1] == "last\n", "closing sends the rest"


async def test_a_full_buffer_is_sent_before_the_interval() -> None:
    sink = Sink()
    async with WorkerLog(sink, interval_s=60, flush_bytes=1000) as log:
        log.write("x" * 600)
        await asyncio.sleep(0.05)
        assert sink.calls == []
        log.write("y" * 600)
        await asyncio.sleep(0.05)
        assert sink.calls == ["x" * 600 + "y" * 600]


async def test_text_is_kept_over_a_disconnect_and_capped() -> None:
    sink = Sink()
    sink.failures = [Disconnected, Disconnected]
    log = WorkerLog(sink, interval_s=60, max_pending_bytes=100)
    log.write("a" * 60)
    assert not await log.flush()
    log.write("b" * 60)
    assert not await log.flush()
    assert await log.flush()
    [text] = sink.calls
    assert text == "[testfleet: 20 characters of log dropped while the coordinator was away]\n" + "a" * 40 + "b" * 60


async def test_other_errors_drop_the_batch_without_stopping_the_log() -> None:
    sink = Sink()
    sink.failures = [RuntimeError]
    async with WorkerLog(sink, interval_s=0.05) as log:
        log.line("lost")
        await asyncio.sleep(0.2)
        log.line("kept")
    assert sink.calls == ["kept\n"]
