"""The progress line of `testfleet run`."""

from __future__ import annotations

from typing import cast

import pytest

from coordinator.cli.client import Client
from coordinator.cli.follow import Follower
from coordinator.cli.progress import NullDisplay, RunState, status_line
from protocol.messages import ActiveWorker
from protocol.types import TasksetRef


def state(status: str, done: int = 1, failed_trials: int = 0) -> RunState:
    run = RunState()
    run.task_count, run.status, run.started_at, run.failed_trials = 4, status, 0.0, failed_trials
    run.passed = done
    return run


@pytest.mark.parametrize(
    ("status", "shows_eta"), [("running", True), ("failed", False), ("succeeded", False), ("cancelled", False)]
)
def test_a_finished_taskset_shows_no_eta(status: str, shows_eta: bool) -> None:
    assert ("ETA" in status_line(state(status), now=10.0)) is shows_eta


def test_failed_attempts_are_counted_as_such() -> None:
    assert "1 failed attempt," in status_line(state("running", failed_trials=1), now=1.0)
    assert "3 failed attempts," in status_line(state("running", failed_trials=3), now=1.0)
    assert "attempt" not in status_line(state("running"), now=1.0)


def mine() -> Follower:
    follower = Follower(cast(Client, None), TasksetRef(7), NullDisplay(), disconnect_timeout_s=1.0)
    follower.worker_type = "gpu"
    return follower


@pytest.mark.parametrize(
    ("workers", "why"),
    [
        ([], "no worker of type 'gpu' is connected"),
        ([("a", "default", None)], "no worker of type 'gpu' is connected"),
        ([("a", "gpu", 3)], "the one worker of type 'gpu' is busy with other tasksets"),
        ([("a", "gpu", 3), ("b", "gpu", 4)], "the 2 workers of type 'gpu' are busy with other tasksets"),
        ([("a", "gpu", 3), ("b", "gpu", None)], None),  # a free one: the push is on its way
        ([("a", "gpu", 7)], None),  # one runs this taskset already
    ],
)
def test_why_a_taskset_waits_for_its_first_worker(workers: list[tuple[str, str, int | None]], why: str | None) -> None:
    live = [ActiveWorker(name, kind, None if ref is None else TasksetRef(ref)) for name, kind, ref in workers]
    said = mine().why_waiting(live)
    assert said is None if why is None else said is not None and why in said
