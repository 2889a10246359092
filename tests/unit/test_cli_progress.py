"""The progress line of `testfleet run`."""

from __future__ import annotations

import datetime as dt
from typing import cast

import pytest

from coordinator.cli.client import Client
from coordinator.cli.follow import Follower, _Seen
from coordinator.cli.progress import NullDisplay, RunState, status_line
from protocol.messages import ActiveWorker, TrialUpdated
from protocol.types import TaskRef, TasksetRef, TrialRef, TrialStatus

TS = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


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


def test_a_connection_counts_running_trials_and_failed_attempts_afresh() -> None:
    """Trials that ended while the client was away stayed 'running' in its progress line for good."""
    follower = mine()
    follower.state.running = {1, 2, 3}  # as notifications left them before the coordinator went away
    body = {
        "tasks": [
            {"id": 10, "trials": [{"id": 1, "status": "passed", "finished_at": "t"}]},
            {"id": 11, "trials": [{"id": 2, "status": "error", "finished_at": "t"}, {"id": 4, "status": None}]},
            {"id": 12, "trials": [{"id": 3, "status": "timeout", "finished_at": "t"}]},
            {"id": 13, "trials": []},
        ]
    }
    follower.apply_trials(body)
    assert follower.state.running == {4}
    assert follower.state.failed_trials == 2
    # A notification that comes later counts on top, once.
    follower.on_notification(
        "trial_updated", TrialUpdated(TS, TrialRef(4), TaskRef(11), TS, TrialStatus.FAILED, 0, 0, 1)
    )
    follower.on_notification(
        "trial_updated", TrialUpdated(TS, TrialRef(2), TaskRef(11), TS, TrialStatus.ERROR, 0, 0, 1)
    )
    assert follower.state.running == set() and follower.state.failed_trials == 3


def test_what_notifications_say_during_the_read_wins_over_it() -> None:
    """A trial that ended while the read was on its way must not come back as running from the read."""
    follower = mine()
    follower._seen = _Seen()
    follower.on_notification(
        "trial_updated", TrialUpdated(TS, TrialRef(7), TaskRef(1), TS, TrialStatus.FAILED, 0, 0, 1)
    )
    seen, follower._seen = follower._seen, None
    stale = {"tasks": [{"id": 1, "trials": [{"id": 7, "status": None, "finished_at": None}]}]}
    follower.apply_trials(stale, seen)
    assert follower.state.running == set() and follower.state.failed_trials == 1
