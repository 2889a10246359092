"""Slaves killed by SIGKILL: in the middle of a file, and between `dequeue_task` and `create_trial`.

The reference first: a clean run of the chaos suite gives the statuses every faulted run must end with.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest

from tests.chaos.fleet import EXPECTED, MAX_TRIALS, PASSING, Fleet, epoch, record_measurements
from tests.chaos.processes import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(180)]


def slave_ids(fleet: Fleet, taskset_id: int) -> dict[str, dict[str, Any]]:
    return {slave["name"]: slave for slave in fleet.api(f"/api/v1/tasksets/{taskset_id}/slaves")["slaves"]}


def test_clean_run(chaos_fleet: Fleet) -> None:
    chaos_fleet.start_coordinator()
    chaos_fleet.start_worker("w1")
    chaos_fleet.start_worker("w2")
    started = time.time()
    run = chaos_fleet.start_run()
    taskset_id = run.taskset_id()
    tasks = chaos_fleet.check_invariants(taskset_id, expected=EXPECTED, run=run)
    # Without faults every file runs once, but the failing one, which runs max_trials times.
    assert {path: len(task["trials"]) for path, task in tasks.items()} == {
        path: MAX_TRIALS if status == "failed" else 1 for path, status in EXPECTED.items()
    }
    record_measurements("clean_run", {"makespan_s": time.time() - started})


def test_slave_killed_mid_file(chaos_fleet: Fleet) -> None:
    """The worker sees the exit, reports the slave, its trial ends as error, and the file runs again elsewhere."""
    chaos_fleet.start_coordinator()
    w1 = chaos_fleet.start_worker("w1")
    chaos_fleet.start_worker("w2")
    run = chaos_fleet.start_run()
    taskset_id = run.taskset_id()
    victim = wait_for(
        "a passing file half way through on w1",
        lambda: [m for m in chaos_fleet.running_on("w1", spec_paths=PASSING) if time.time() - m.at > 0.5],
        90,
        interval=0.05,
    )[0]
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.time()

    tasks = chaos_fleet.check_invariants(taskset_id, expected=EXPECTED, run=run)

    seen = [e for e in w1.events("slave_exited") if e.get("slave_name") == victim.slave]
    assert seen and seen[0]["status"] == "failure_exit", seen
    seen_at = epoch(seen[0]["timestamp"])
    slaves = slave_ids(chaos_fleet, taskset_id)
    assert slaves[victim.slave]["status"] == "failure_exit"
    trials = tasks[victim.spec_path]["trials"]
    killed = [t for t in trials if t["slave_id"] == slaves[victim.slave]["id"]]
    assert [t["status"] for t in killed] == ["error"], trials
    retries = [t for t in trials if t["created_at"] > killed[0]["created_at"]]
    assert retries and retries[-1]["status"] == "passed", trials
    requeued_at = epoch(killed[0]["finished_at"])
    w1_slave_ids = {slave["id"] for name, slave in slaves.items() if name.startswith("w1-")}
    record_measurements(
        "slave_killed_mid_file",
        {
            "exit_seen_by_worker_s": seen_at - killed_at,
            "back_in_queue_after_exit_seen_s": requeued_at - seen_at,
            "rerun_started_after_requeue_s": epoch(retries[0]["created_at"]) - requeued_at,
            "rerun_on_same_worker": retries[0]["slave_id"] in w1_slave_ids,
        },
    )


def test_slave_killed_between_dequeue_and_create_trial(chaos_fleet: Fleet) -> None:
    """A lease whose connection closes goes back to the head of the queue at once: the file runs once, elsewhere."""
    chaos_fleet.start_coordinator(grace_s=10)
    hold = {"CHAOS_HOLD_LEASE": "test_c.py", "CHAOS_HOLD_SECONDS": "120"}
    workers = {name: chaos_fleet.start_worker(name, env=hold) for name in ("w1", "w2")}
    run = chaos_fleet.start_run()
    taskset_id = run.taskset_id()
    holds = wait_for("a slave holding test_c.py's lease", lambda: list(chaos_fleet.markers.glob("hold.*.json")), 90)
    held = json.loads(holds[0].read_text())
    os.kill(held["pid"], signal.SIGKILL)
    killed_at = time.time()

    tasks = chaos_fleet.check_invariants(taskset_id, expected=EXPECTED, run=run)

    worker = workers[held["slave"].split("-")[0]]
    seen = [e for e in worker.events("slave_exited") if e.get("slave_name") == held["slave"]]
    assert seen, worker.events("slave_exited")
    slaves = slave_ids(chaos_fleet, taskset_id)
    victim_id = slaves[held["slave"]]["id"]
    trials = tasks["test_c.py"]["trials"]
    names = {slave["id"]: name for name, slave in slaves.items()}
    context = (held, killed_at, [(names[t["slave_id"]], t) for t in trials])
    assert len(trials) == 1 and trials[0]["slave_id"] != victim_id and trials[0]["status"] == "passed", context
    assert all(t["slave_id"] != victim_id for task in tasks.values() for t in task["trials"])
    record_measurements(
        "slave_killed_holding_a_lease",
        {
            "exit_seen_by_worker_s": epoch(seen[0]["timestamp"]) - killed_at,
            "file_running_elsewhere_after_kill_s": epoch(trials[0]["created_at"]) - killed_at,
            "grace_s": 10,
        },
    )
