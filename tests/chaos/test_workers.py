"""Workers that die, freeze or drop off the network while their slaves run files: the files move, the run ends right.

- SIGKILL of the daemon: its slaves notice their worker is gone and stop by themselves (the running test
  may finish first); whatever they did not finish runs on the other worker.
- SIGSTOP of the whole host (the daemon and every slave): it misses its heartbeats and is dropped; its
  slaves' connections go silent and are closed, the slaves are lost after the grace period, their trials
  end as `error`, and the files run on the other worker. Woken up, the host rejoins.
- SIGSTOP of the daemon's process group alone: the daemon is dropped, but its slaves, in process groups
  of their own, keep their connections and finish their files; woken up, the daemon rejoins.
- A cut network between a worker's host (a network namespace joined by a veth pair) and the coordinator:
  the same, without anything frozen; the worker rejoins when the link comes back.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.chaos.fleet import EXPECTED, Fleet, Marker, Watch, epoch, exit_code_of, record_measurements, verdict_of
from tests.chaos.netns import NetnsUnavailable, NetworkNamespace
from tests.chaos.processes import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def busy_on(fleet: Fleet, worker: str, slaves: int = 2) -> list[Marker]:
    """Wait until every slave of `worker` runs a file, the files at least half a second in."""

    def busy() -> list[Marker] | None:
        running = [m for m in fleet.running_on(worker) if time.time() - m.at > 0.3]
        return running if len({m.slave for m in running}) == slaves else None

    return wait_for(f"every slave of {worker} busy", busy, 90, interval=0.05)


def lost_trials(
    fleet: Fleet, tasks: dict[str, dict[str, Any]], taskset_id: int, running: list[Marker]
) -> list[dict[str, Any]]:
    """For each file that was running on the faulted worker: its trial there and the trial that decided it."""
    slaves = {s["name"]: s["id"] for s in fleet.api(f"/api/v1/tasksets/{taskset_id}/slaves")["slaves"]}
    found = []
    for marker in running:
        trials = tasks[marker.spec_path]["trials"]
        there = [t for t in trials if t["slave_id"] == slaves[marker.slave]]
        assert len(there) == 1, (marker, trials)
        later = [t for t in trials if t["created_at"] > there[0]["created_at"]]
        found.append({"spec_path": marker.spec_path, "there": there[0], "later": later})
    return found


def test_worker_daemon_killed(chaos_fleet: Fleet) -> None:
    chaos_fleet.start_coordinator()
    w1 = chaos_fleet.start_worker("w1")
    chaos_fleet.start_worker("w2")
    run = chaos_fleet.start_run()
    taskset_id = run.taskset_id()
    running = busy_on(chaos_fleet, "w1")
    dropped = Watch("w1 dropped", lambda: "w1" not in (chaos_fleet.worker_names() or {"w1"}), 60, 0.05)
    killed_at = w1.kill_daemon()
    stopped_at = wait_for("the slaves of w1 to stop by themselves", lambda: not w1.host_pids() and time.time(), 40)

    tasks = chaos_fleet.check_invariants(taskset_id, expected=EXPECTED, run=run)

    outcomes = lost_trials(chaos_fleet, tasks, taskset_id, running)
    for outcome in outcomes:
        # Told to stop, a slave lets its running test end: the file either finished there or ran again.
        there = outcome["there"]
        assert there["status"] in ("passed", "failed", "pending") or outcome["later"], outcome
    # Everything started once w1's slaves were gone ran on w2.
    names = {s["id"]: s["name"] for s in chaos_fleet.api(f"/api/v1/tasksets/{taskset_id}/slaves")["slaves"]}
    later = [t for task in tasks.values() for t in task["trials"] if epoch(t["created_at"]) > stopped_at]
    assert all(names[t["slave_id"]].startswith("w2-") for t in later), later
    record_measurements(
        "worker_daemon_killed",
        {
            "worker_dropped_s": dropped.result(30) - killed_at,
            "slaves_stopped_by_themselves_s": stopped_at - killed_at,
            "files_running_there": [f"{o['spec_path']}: {o['there']['status']}" for o in outcomes],
        },
    )


def _silent_host(
    fleet: Fleet,
    worker_name: str,
    go_silent: Any,
    come_back: Any,
    test: str,
    *,
    slaves_silent: bool = True,
    with_cli: bool = True,
) -> None:
    """A worker goes silent mid-run: the run ends while it stays silent, then it rejoins.

    With `slaves_silent` its slaves went silent too, so their files must have moved to the other worker.
    Without `with_cli` the taskset is submitted over /rpc instead of by `testfleet run`.
    """
    run = fleet.start_run() if with_cli else fleet.submit()
    taskset_id = run.taskset_id()
    running = busy_on(fleet, worker_name)
    silent_at = go_silent()
    dropped = Watch(f"{worker_name} dropped", lambda: worker_name not in (fleet.worker_names() or {worker_name}), 90)
    # The files move and the run ends while the host stays silent.
    code = run.wait(150)
    ended_at = time.time()
    assert code == exit_code_of(verdict_of(EXPECTED)), run.output()
    dropped_at = dropped.result(5)
    back_at = come_back()
    rejoined_at = wait_for(
        f"{worker_name} to rejoin", lambda: worker_name in (fleet.worker_names() or ()) and time.time(), 60, 0.1
    )

    tasks = fleet.check_invariants(taskset_id, expected=EXPECTED, run=run)

    outcomes = lost_trials(fleet, tasks, taskset_id, running)
    measured = {
        "worker_dropped_s": dropped_at - silent_at,
        "run_ended_while_silent_s": ended_at - silent_at,
        "rejoined_after_back_s": rejoined_at - back_at,
        "coordinator_heartbeat_sec": (fleet.coordinator.heartbeat_s or 10) if fleet.coordinator else None,
        "slave_grace_sec": fleet.coordinator.grace_s if fleet.coordinator else None,
    }
    if not slaves_silent:
        # The slaves never stopped: each file finished where it ran, with its real result.
        for outcome in outcomes:
            assert outcome["there"]["status"] != "error", outcome
        record_measurements(test, measured)
        return
    moved = []
    for outcome in outcomes:
        there = outcome["there"]
        assert there["status"] == "error", outcome  # lost with its slave
        assert outcome["later"], outcome  # and run again elsewhere
        moved.append(
            {
                "spec_path": outcome["spec_path"],
                "back_in_queue_s": epoch(there["finished_at"]) - silent_at,
                "running_elsewhere_s": epoch(outcome["later"][0]["created_at"]) - silent_at,
            }
        )
    measured["files_back_in_queue_s"] = max(m["back_in_queue_s"] for m in moved)
    measured["files_running_elsewhere_s"] = max(m["running_elsewhere_s"] for m in moved)
    record_measurements(test, measured)


def test_worker_host_frozen(chaos_fleet: Fleet) -> None:
    name = "worker_host_frozen"
    if os.environ.get("CHAOS_DEFAULT_TIMINGS"):  # measures the default settings, for docs/RELIABILITY.md
        chaos_fleet.start_coordinator(grace_s=15, heartbeat_s=None)
        name += "_defaults"
    else:
        chaos_fleet.start_coordinator(grace_s=2, heartbeat_s=3)
    w1 = chaos_fleet.start_worker("w1")
    chaos_fleet.start_worker("w2")
    _silent_host(chaos_fleet, "w1", w1.freeze, w1.thaw, name)


def test_worker_daemon_frozen(chaos_fleet: Fleet) -> None:
    chaos_fleet.start_coordinator(grace_s=2, heartbeat_s=3)
    w1 = chaos_fleet.start_worker("w1")
    chaos_fleet.start_worker("w2")
    # Submitted over /rpc (bundle PUT, create_taskset, dispatch_taskset), as a client without the CLI.
    _silent_host(
        chaos_fleet, "w1", w1.freeze_daemon, w1.thaw, "worker_daemon_frozen", slaves_silent=False, with_cli=False
    )


def test_worker_network_cut(chaos_fleet: Fleet) -> None:
    namespace = NetworkNamespace(chaos_fleet.tag)
    chaos_fleet.cleanups.append(namespace.delete)
    try:
        namespace.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot make a network namespace here (needs root and the `ip` command): {exc}")
    # Off loopback the coordinator wants tokens for every role; the fleet always gives them.
    chaos_fleet.start_coordinator(host=namespace.host_address, grace_s=2, heartbeat_s=3)
    chaos_fleet.start_worker("w1", netns=namespace.name)
    chaos_fleet.start_worker("w2")
    _silent_host(chaos_fleet, "w1", namespace.cut, namespace.heal, "worker_network_cut")
