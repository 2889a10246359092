"""The per-file clock of a slave: one thread that fires a file's soft deadline (repeatedly) and its hard deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Watchdog:
    """Armed per file; `on_soft` runs at the soft deadline and every `repeat_s` after, `on_hard` once at the hard one.

    Both callbacks run on the watchdog's thread while it holds its lock, so they never race
    with `arm` or `disarm`; `on_hard` is expected not to return (the slave exits).
    """

    def __init__(
        self,
        on_soft: Callable[[], None],
        on_hard: Callable[[], None],
        *,
        repeat_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_soft = on_soft
        self._on_hard = on_hard
        self._repeat_s = repeat_s
        self._clock = clock
        self._cond = threading.Condition()
        self._soft_at: float | None = None
        self._hard_at: float | None = None
        self._soft_fired = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="testfleet-watchdog", daemon=True)

    @property
    def soft_fired(self) -> bool:
        """Whether the armed file's soft deadline has passed."""
        return self._soft_fired

    def start(self) -> None:
        self._thread.start()

    def arm(self, soft_timeout_sec: float, hard_timeout_sec: float) -> None:
        """Start the clock of a file."""
        with self._cond:
            now = self._clock()
            self._soft_at = now + soft_timeout_sec
            self._hard_at = now + hard_timeout_sec
            self._soft_fired = False
            self._cond.notify()

    def disarm(self) -> bool:
        """Stop the clock; return whether the soft deadline fired."""
        with self._cond:
            fired = self._soft_fired
            self._soft_at = self._hard_at = None
            self._soft_fired = False
            self._cond.notify()
            return fired

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._soft_at is None or self._hard_at is None:
                    self._cond.wait()
                    continue
                now = self._clock()
                if now >= self._hard_at:
                    self._soft_at = self._hard_at = None
                    self._on_hard()
                elif now >= self._soft_at:
                    self._soft_fired = True
                    self._soft_at = now + self._repeat_s
                    self._on_soft()
                else:
                    self._cond.wait(min(self._soft_at, self._hard_at) - now)
