"""The worker log's outbound side: lines from every phase, batched into `append_worker_log_log` calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Final, Self

import structlog

from protocol.peer import Disconnected

FLUSH_INTERVAL_S: Final = 0.5
FLUSH_BYTES: Final = 64 * 1024
MAX_PENDING_BYTES: Final = 4 * 1024 * 1024
"""Text kept while the coordinator cannot be reached; beyond it the oldest text is dropped."""

Sink = Callable[[str], Awaitable[None]]


class WorkerLog:
    """Collects text and sends it in batches: every `interval_s`, or sooner once `flush_bytes` are waiting.

    Use as an async context manager; leaving it sends what is left. A batch the coordinator did not get
    because the connection dropped is kept and sent with the next one; any other failure is logged and
    the batch dropped, so a broken log never stops a taskset.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        interval_s: float = FLUSH_INTERVAL_S,
        flush_bytes: int = FLUSH_BYTES,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._sink = sink
        self._interval_s = interval_s
        self._flush_bytes = flush_bytes
        self._max_pending_bytes = max_pending_bytes
        self._log: structlog.typing.FilteringBoundLogger = log or structlog.get_logger()
        self._parts: list[str] = []
        self._size = 0
        self._dropped = 0
        self._full = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        self._flusher = asyncio.create_task(self._run(), name="worker-log-flusher")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def write(self, text: str) -> None:
        """Queue text as is (callers end their lines with a newline)."""
        if not text:
            return
        self._parts.append(text)
        self._size += len(text)
        if self._size > self._max_pending_bytes:
            self._trim()
        if self._size >= self._flush_bytes:
            self._full.set()

    def line(self, text: str, prefix: str = "") -> None:
        """Queue one line, with an optional prefix, adding the newline."""
        self.write(f"{prefix}{text}\n" if not text.endswith("\n") else f"{prefix}{text}")

    async def flush(self) -> bool:
        """Send what is waiting now; False when the connection was down and the text is kept for later."""
        async with self._lock:
            if not self._parts:
                return True
            body = "".join(self._parts)
            dropped = self._dropped
            self._parts.clear()
            self._size = 0
            self._dropped = 0
            text = body
            if dropped:
                text = f"[testfleet: {dropped} characters of log dropped while the coordinator was away]\n{body}"
            try:
                await self._sink(text)
            except Disconnected:
                self._parts.insert(0, body)
                self._size += len(body)
                self._dropped += dropped
                self._trim()
                return False
            except Exception as exc:
                self._log.warning("worker_log_append_failed", error=repr(exc), chars=len(text))
            return True

    async def aclose(self) -> None:
        """Stop the flusher and send the rest."""
        if self._closing:
            return
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        await self.flush()

    def _trim(self) -> None:
        while self._size > self._max_pending_bytes and self._parts:
            head = self._parts[0]
            excess = self._size - self._max_pending_bytes
            if len(head) <= excess:
                self._parts.pop(0)
                self._size -= len(head)
                self._dropped += len(head)
            else:
                self._parts[0] = head[excess:]
                self._size -= excess
                self._dropped += excess

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._full.wait()
            self._full.clear()
            if not await self.flush():
                await asyncio.sleep(self._interval_s)
