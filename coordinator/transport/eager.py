"""Run a send now, without a task: most sends finish at once, and only a full socket makes one wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def run_eagerly(coro: Coroutine[Any, Any, None], done: Callable[[BaseException | None], None]) -> None:
    """Run `coro` as far as it goes now, the rest as the futures it waits on complete; then `done(error)`.

    For the coordinator's frame sends: an uncompressed frame is written to the socket at once, and the
    send waits only when the peer has let the socket's buffer fill (for it to drain). A task per send
    would cost a task's creation and a turn of the event loop for the few that wait.
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        done(None)
        return
    except (Exception, asyncio.CancelledError) as exc:
        done(exc)
        return
    if isinstance(waiting_on, asyncio.Future):
        # What a task does with the future its coroutine waits on: mark it taken (other sends may wait
        # on the same future), and go on once it is done.
        waiting_on._asyncio_future_blocking = False
        waiting_on.add_done_callback(lambda _: run_eagerly(coro, done))
    else:  # a bare yield: go on at the next turn of the loop
        asyncio.get_running_loop().call_soon(run_eagerly, coro, done)
