"""`python -m worker.slave` as a real process against a real coordinator, without a worker: stops and reconnects.

The environment a worker would give its slaves is set here, so each test can signal the slave itself,
restart the coordinator under it, or start a second slave after the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli_support import SUITES, Serve, cli_env, free_port
from tests.e2e.test_worker_e2e import (
    CLIENT_TOKEN,
    WORKER_TOKEN,
    Fleet,
    copy_suites,
    fleet,
    outcomes,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
__all__ = ["fleet"]


@contextlib.contextmanager
def slave(
    fleet: Fleet, tree: Path, taskset_id: int, name: str, *args: str, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m worker.slave` in a session of its own, as a worker would start it; killed if still there."""
    log = tree.parent / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.slave", *args],
            cwd=tree,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=cli_env(
                TESTFLEET_COORDINATOR=fleet.url,
                TESTFLEET_TOKEN=WORKER_TOKEN,
                TESTFLEET_TASKSET_ID=str(taskset_id),
                TESTFLEET_SLAVE_NAME=name,
                TESTFLEET_WORKING_PATH=str(tree),
                TESTFLEET_SLAVE_STATE_FILE=str(tree.parent / f"{name}.json"),
                SLAVE_NUMBER="0",
                NUM_SLAVES="1",
                **env,
            ),
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def slave_output(tree: Path, name: str) -> str:
    return (tree.parent / f"{name}.log").read_text(errors="replace")


def test_sigterm_in_the_middle_of_a_file_gives_it_back(fleet: Fleet, tmp_path: Path) -> None:
    tree = copy_suites(tmp_path, "interruptible")
    started = tmp_path / "started"
    taskset_id = fleet.submit("slave-term", tree, ["interruptible/test_steps.py"], worker_type="nobody")
    with slave(fleet, tree, taskset_id, "slave-term-a", STARTED_MARKER=str(started)) as first:
        wait_until(started.exists, 60, "the long test to start")
        first.send_signal(signal.SIGTERM)
        # The running test ends (2 s), the rest of the file does not run, the slave ends by itself.
        assert first.wait(30) == 0, slave_output(tree, "slave-term-a")
    task = fleet.tasks(taskset_id)["interruptible/test_steps.py"]
    assert task["status"] is None  # back in the queue
    (interrupted,) = task["trials"]
    assert interrupted["status"] == "error"
    assert "SIGTERM interrupted this file" in fleet.trial(interrupted["id"])["stdout"]
    assert json.loads((tmp_path / "slave-term-a.json").read_text()) == {"trial_id": None}
    assert fleet.summary(taskset_id)["status"] == "waiting"

    started.unlink()
    with slave(fleet, tree, taskset_id, "slave-term-b") as second:
        assert second.wait(60) == 0, slave_output(tree, "slave-term-b")
    task = fleet.tasks(taskset_id)["interruptible/test_steps.py"]
    assert task["status"] == "passed"
    assert outcomes(task) == [("error", None, None, None), ("passed", 3, 0, 0)]
    assert fleet.summary(taskset_id)["status"] == "succeeded"
    assert {s["name"]: s["status"] for s in fleet.slaves(taskset_id)} == {
        "slave-term-a": "normal_exit",
        "slave-term-b": "normal_exit",
    }


def test_an_idle_slave_stops_at_once_on_sigterm(fleet: Fleet, tmp_path: Path) -> None:
    tree = copy_suites(tmp_path, "passing")
    # Not dispatched yet: the slave waits in dequeue_task.
    ref = fleet.rpc(
        "create_taskset", "slave-idle", "", "", "nobody", "slave-idle", 1, 1, [["passing/test_alpha.py", "x", 60, 30]]
    )
    taskset_id = int(ref[1])
    with slave(fleet, tree, taskset_id, "slave-idle-a") as idle:
        wait_until(lambda: fleet.slaves(taskset_id), 60, "the slave to connect")
        wait_until(lambda: "test session starts" in slave_output(tree, "slave-idle-a"), 30, "the session")
        time.sleep(0.5)  # in dequeue_task by now
        idle.send_signal(signal.SIGTERM)
        assert idle.wait(10) == 0, slave_output(tree, "slave-idle-a")
    assert [s["status"] for s in fleet.slaves(taskset_id)] == ["normal_exit"]
    fleet.rpc("dispatch_taskset", ref)
    with slave(fleet, tree, taskset_id, "slave-idle-b") as second:
        assert second.wait(60) == 0, slave_output(tree, "slave-idle-b")
    assert fleet.summary(taskset_id)["status"] == "succeeded"
    assert outcomes(fleet.tasks(taskset_id)["passing/test_alpha.py"]) == [("passed", 3, 0, 0)]


def test_a_slave_rides_out_a_coordinator_restart(tmp_path: Path) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="testfleet-slave-e2e-", dir="/tmp"))
    env = cli_env(TESTFLEET_CLIENT_TOKEN=CLIENT_TOKEN, TESTFLEET_WORKER_TOKEN=WORKER_TOKEN)
    server = Serve(data_dir, free_port(), env, data_dir / "serve.log")
    server.start()
    try:
        restarting = Fleet(server)
        tree = copy_suites(tmp_path, "interruptible")
        started = tmp_path / "started"
        taskset_id = restarting.submit("slave-restart", tree, ["interruptible/test_steps.py"], worker_type="nobody")
        with slave(restarting, tree, taskset_id, "slave-restart", STARTED_MARKER=str(started)) as running:
            wait_until(started.exists, 60, "the long test to start")
            server.stop()
            server.start()
            # The slave reconnects, re-binds to its trial, and reports it to the new coordinator.
            assert running.wait(60) == 0, slave_output(tree, "slave-restart")
        task = restarting.tasks(taskset_id)["interruptible/test_steps.py"]
        assert outcomes(task) == [("passed", 3, 0, 0)]
        assert restarting.summary(taskset_id)["status"] == "succeeded"
        assert [s["status"] for s in restarting.slaves(taskset_id)] == ["normal_exit"]
        assert "slave_rebound" in slave_output(tree, "slave-restart")
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_the_exec_slave_runs_each_file_as_a_command(fleet: Fleet, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(SUITES / "exec", tree)
    taskset_id = fleet.submit("slave-exec", tree, ["ok.py", "fail.py"], worker_type="nobody", max_trials=1)
    with slave(fleet, tree, taskset_id, "slave-exec", "--exec", f"{sys.executable} {{path}}") as process:
        assert process.wait(60) == 0, slave_output(tree, "slave-exec")
    tasks = fleet.tasks(taskset_id)
    assert outcomes(tasks["ok.py"]) == [("passed", 1, 0, 0)]
    assert outcomes(tasks["fail.py"]) == [("failed", 0, 0, 1)]
    failed = fleet.trial(tasks["fail.py"]["trials"][0]["id"])
    assert "some output" in failed["stdout"] and "exit status 3" in failed["stdout"]
    assert "something went wrong" in failed["stderr"]
    assert fleet.summary(taskset_id)["status"] == "failed"
    assert [s["status"] for s in fleet.slaves(taskset_id)] == ["normal_exit"]
