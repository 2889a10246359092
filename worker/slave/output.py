"""Bounded capture of a trial's output: keep its head and tail, count what was dropped."""

from __future__ import annotations

from collections import deque
from typing import Final

MAX_OUTPUT_BYTES: Final = 4 * 1024 * 1024


def truncation_line(dropped: int) -> str:
    """The line that stands where output was dropped."""
    return f"\n[testfleet: {dropped} bytes truncated]\n"


class OutputBuffer:
    """Bytes fed in chunks; keeps the first and the last `limit // 2` bytes."""

    def __init__(self, limit: int = MAX_OUTPUT_BYTES) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += chunk[:room]
            chunk = chunk[room:]
        if not chunk:
            return
        self._tail.append(chunk)
        self._tail_size += len(chunk)
        while self._tail_size - len(self._tail[0]) >= self._tail_limit:
            self._tail_size -= len(self._tail.popleft())

    def text(self) -> str:
        """The kept bytes as text (invalid UTF-8 replaced), with the truncation line between head and tail."""
        tail = b"".join(self._tail)
        if len(tail) > self._tail_limit:
            tail = tail[len(tail) - self._tail_limit :]
        dropped = self.total - len(self._head) - len(tail)
        if dropped <= 0:
            return (bytes(self._head) + tail).decode("utf-8", errors="replace")
        head = bytes(self._head).decode("utf-8", errors="replace")
        return head + truncation_line(dropped) + tail.decode("utf-8", errors="replace")


def encodable(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate (a test's own message may hold one) as its escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def bound_text(text: str, limit: int = MAX_OUTPUT_BYTES) -> str:
    """`text` cut to about `limit` UTF-8 bytes the way `OutputBuffer` cuts a stream."""
    if len(text) * 4 <= limit:
        return text
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    buffer = OutputBuffer(limit)
    buffer.feed(data)
    return buffer.text()


def bound_with_block(text: str, block: str, limit: int = MAX_OUTPUT_BYTES) -> str:
    """`text` cut (head and tail) so that it and `block`, appended whole on a line of its own, fit `limit` bytes."""
    if not block:
        return bound_text(text, limit)
    room = limit - len(block.encode("utf-8", errors="replace")) - 1
    text = bound_text(text, room) if room > 0 else ""
    if text and not text.endswith("\n"):
        text += "\n"
    return text + block
