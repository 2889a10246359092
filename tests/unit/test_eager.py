"""`run_eagerly`: sends run now, and the few that wait go on when what they wait for completes."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.transport.eager import run_eagerly


async def test_a_coroutine_that_does_not_wait_ends_before_the_call_returns() -> None:
    steps: list[str] = []
    outcomes: list[BaseException | None] = []

    async def send() -> None:
        steps.append("sent")

    run_eagerly(send(), outcomes.append)
    assert steps == ["sent"] and outcomes == [None]


async def test_sends_waiting_on_one_future_all_go_on_when_it_completes() -> None:
    drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcomes: list[tuple[int, BaseException | None]] = []

    async def send(n: int) -> None:
        await drained  # as every send of a connection waits on its one drain

    for n in range(3):
        run_eagerly(send(n), lambda error, n=n: outcomes.append((n, error)))
    assert outcomes == []
    drained.set_result(None)
    await asyncio.sleep(0)
    assert sorted(outcomes) == [(0, None), (1, None), (2, None)]


async def test_errors_raised_at_once_or_after_a_wait_reach_done() -> None:
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcomes: list[BaseException | None] = []

    async def broken() -> None:
        raise ConnectionResetError("gone")

    async def waits_then_fails() -> None:
        await lost

    run_eagerly(broken(), outcomes.append)
    run_eagerly(waits_then_fails(), outcomes.append)
    assert len(outcomes) == 1 and isinstance(outcomes[0], ConnectionResetError)
    lost.set_exception(ConnectionError("connection lost"))
    await asyncio.sleep(0)
    assert len(outcomes) == 2 and isinstance(outcomes[1], ConnectionError)


async def test_a_bare_yield_goes_on_at_the_next_turn_of_the_loop() -> None:
    outcomes: list[BaseException | None] = []

    async def send() -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    run_eagerly(send(), outcomes.append)
    assert outcomes == []
    for _ in range(5):
        await asyncio.sleep(0)
    assert outcomes == [None]


async def test_cancelling_what_a_send_waits_on_ends_it_with_the_cancellation() -> None:
    waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outcomes: list[BaseException | None] = []

    async def send() -> None:
        await waited

    run_eagerly(send(), outcomes.append)
    waited.cancel()
    await asyncio.sleep(0)
    assert len(outcomes) == 1 and isinstance(outcomes[0], asyncio.CancelledError)


@pytest.mark.parametrize("n", [1, 50])
async def test_many_sends_in_a_row_each_end_once(n: int) -> None:
    outcomes: list[BaseException | None] = []

    async def send() -> None:
        return None

    for _ in range(n):
        run_eagerly(send(), outcomes.append)
    assert outcomes == [None] * n
