"""The coordinator's side fails mid-run: the coordinator and its Postgres killed together, or Postgres restarted.

- SIGKILL of the coordinator and every process of its embedded Postgres at once (a host crash), then
  `testfleet serve` again on the same port and data directory: it adopts the data, rebuilds the queue,
  workers, slaves and the CI client reconnect, slaves re-bind their trials within the grace period, and
  the run ends as a clean run does, no result lost or counted twice.
- Postgres failing under a running coordinator, twice in one run: one of its sessions is killed (the
  postmaster then ends every session and recovers, as after a crashed backend), then Postgres is stopped
  (fast shutdown) and started again a few seconds later. The store retries what was in flight, so no
  call fails and nothing is lost.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.chaos.fleet import EXPECTED, Fleet, Watch, epoch, record_measurements
from tests.chaos.processes import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def first_progress_after(tasks: dict[str, dict[str, Any]], moment: float) -> float:
    """The first trial created or finished after `moment` (wall clock)."""
    stamps = [
        epoch(trial[key])
        for task in tasks.values()
        for trial in task["trials"]
        for key in ("created_at", "finished_at")
        if trial[key] is not None and epoch(trial[key]) > moment
    ]
    assert stamps, "nothing happened after the fault"
    return min(stamps)


def mid_run(fleet: Fleet) -> None:
    """Wait until a few files are done and every slave runs one."""
    wait_for(
        "a run half way",
        lambda: sum(m.ended for m in fleet.started()) >= 2 and len([m for m in fleet.started() if not m.ended]) >= 4,
        90,
        interval=0.05,
    )


def test_coordinator_and_postgres_killed_then_restarted(chaos_fleet: Fleet) -> None:
    coordinator = chaos_fleet.start_coordinator(grace_s=10)
    chaos_fleet.start_worker("w1")
    chaos_fleet.start_worker("w2")
    run = chaos_fleet.start_run()
    taskset_id = run.taskset_id()
    mid_run(chaos_fleet)
    crashed_at = coordinator.crash()
    time.sleep(1.0)
    assert run.process.poll() is None, "the CI client must wait for the coordinator to come back"
    restarting_at = time.time()
    back_at = coordinator.start()
    workers_back = Watch("both workers registered again", lambda: chaos_fleet.worker_names() == {"w1", "w2"}, 60)

    tasks = chaos_fleet.check_invariants(taskset_id, expected=EXPECTED, run=run)

    assert "reconnected after" in run.output(), run.output()
    # Every slave re-bound in time: no trial was lost with its slave, so none ended as an error.
    errors = [(path, t) for path, task in tasks.items() for t in task["trials"] if t["status"] == "error"]
    assert not errors, errors
    finished_at = chaos_fleet.api(f"/api/v1/tasksets/{taskset_id}")["finished_at"]
    record_measurements(
        "coordinator_and_postgres_killed",
        {
            "coordinator_down_s": back_at - crashed_at,
            "restart_to_listening_s": back_at - restarting_at,
            "workers_registered_after_back_s": workers_back.result(5) - back_at,
            "run_continued_after_back_s": first_progress_after(tasks, back_at) - back_at,
            "run_ended_after_back_s": epoch(finished_at) - back_at,
            "slave_grace_sec": 10,
        },
    )


def test_postgres_fails_under_the_coordinator(chaos_fleet: Fleet) -> None:
    coordinator = chaos_fleet.start_coordinator()
    chaos_fleet.start_worker("w1", file_s=1.5)
    chaos_fleet.start_worker("w2", file_s=1.5)
    run = chaos_fleet.start_run()
    taskset_id = run.taskset_id()
    mid_run(chaos_fleet)
    crashed_at = coordinator.crash_postgres_backend()
    # One fault at a time: the coordinator commits again (a trial ends) before Postgres is stopped.
    recovered_at = wait_for(
        "a trial to finish after the crash",
        lambda: (
            any(
                trial["finished_at"] and epoch(trial["finished_at"]) > crashed_at
                for task in (chaos_fleet.try_api(f"/api/v1/tasksets/{taskset_id}/tasks") or {"tasks": []})["tasks"]
                for trial in task["trials"]
            )
            and time.time()
        ),
        30,
    )
    # Stopped under it, the coordinator's own Postgres is started again by the coordinator.
    down_at, up_at = coordinator.stop_postgres()

    tasks = chaos_fleet.check_invariants(taskset_id, expected=EXPECTED, run=run)

    # Nothing in flight failed: no error in the coordinator's log, no report the workers gave up on.
    errors_logged = [e for e in coordinator.events() if e.get("level") in ("error", "critical")]
    assert not errors_logged, errors_logged
    given_up = [e for worker in chaos_fleet.workers for e in worker.events("report_failed")]
    assert not given_up, given_up
    retries = coordinator.events("commit_retry")
    errors = [(path, t) for path, task in tasks.items() for t in task["trials"] if t["status"] == "error"]
    assert not errors, errors
    # The coordinator stops the postmaster it started again, as it does the first.
    for worker in chaos_fleet.workers:
        worker.stop()
    coordinator.stop()
    assert not coordinator.postgres_pids()
    record_measurements(
        "postgres_fails",
        {
            "backend_crash_run_continued_after_s": first_progress_after(tasks, crashed_at) - crashed_at,
            "backend_crash_trial_finished_seen_after_s": recovered_at - crashed_at,
            "stopped_postgres_back_after_s": up_at - down_at,
            "stopped_postgres_run_continued_after_back_s": first_progress_after(tasks, up_at) - up_at,
            "commit_retries": len(retries),
        },
    )
