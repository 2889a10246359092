"""The progress line of `testfleet run`."""

from __future__ import annotations

import pytest

from coordinator.cli.progress import RunState, status_line


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
