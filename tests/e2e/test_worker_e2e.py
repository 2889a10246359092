"""Worker daemons and their pytest slaves as real processes against a real coordinator, on the fixture suites.

One `testfleet serve` serves the module; each test starts its own `python -m worker` (a worker type of
its own, so tasksets never reach another test's worker), drives tasksets over /rpc and waits for the
verdict. Statuses are asserted exactly, trial counts as lower bounds (speculation may add trials).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli_support import REPO, SUITES, Serve, cli_env, free_port, terminate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CLIENT_TOKEN = "client-secret"
WORKER_TOKEN = "worker-secret"


# -- the coordinator and its wire ---------------------------------------------------------


@dataclass
class Fleet:
    """A `testfleet serve` and the calls a CI client makes to it."""

    serve: Serve

    @property
    def url(self) -> str:
        return self.serve.url

    def rpc(self, method: str, *params: Any, token: str = CLIENT_TOKEN) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        request = urllib.request.Request(self.url + "/rpc", body, headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.loads(response.read())
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    def api(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def upload(self, rsync_name: str, tree: Path) -> None:
        """PUT a tar.gz of `tree` as the bundle of `rsync_name`."""
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as tar:
            for path in sorted(tree.rglob("*")):
                if "__pycache__" not in path.parts:
                    tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
        request = urllib.request.Request(
            f"{self.url}/api/v1/bundles/{rsync_name}",
            data.getvalue(),
            {"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/gzip"},
            method="PUT",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200

    def submit(
        self,
        rsync_name: str,
        tree: Path,
        files: list[str | tuple[str, int, int]],
        *,
        worker_type: str,
        slave_command: str = "testfleet slave",
        setup_command: str = 'echo "setup for $NUM_SLAVES slaves"',
        max_trials: int = 2,
    ) -> int:
        """Create and dispatch a taskset of `files` (path, or path with hard and soft timeouts); its id."""
        tasks = []
        for entry in files:
            path, hard, soft = (entry, 60, 30) if isinstance(entry, str) else entry
            sha1 = hashlib.sha1((tree / path).read_bytes()).hexdigest()
            tasks.append([path, sha1, hard, soft])
        ref = self.rpc(
            "create_taskset", rsync_name, setup_command, slave_command, worker_type, rsync_name, 1, max_trials, tasks
        )
        self.rpc("dispatch_taskset", ref)
        return int(ref[1])

    def summary(self, taskset_id: int) -> dict[str, Any]:
        summary: dict[str, Any] = self.rpc("query_taskset_summary", ["taskset", taskset_id])
        return summary

    def wait_finished(self, taskset_id: int, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            summary = self.summary(taskset_id)
            if summary["finished_at"] is not None:
                return summary
            assert time.monotonic() < deadline, f"taskset {taskset_id} unfinished: {summary}"
            time.sleep(0.2)

    def tasks(self, taskset_id: int) -> dict[str, dict[str, Any]]:
        return {task["spec_path"]: task for task in self.api(f"/api/v1/tasksets/{taskset_id}/tasks")["tasks"]}

    def trial(self, trial_id: int) -> dict[str, Any]:
        trial: dict[str, Any] = self.api(f"/api/v1/trials/{trial_id}")
        return trial

    def slaves(self, taskset_id: int) -> list[dict[str, Any]]:
        slaves: list[dict[str, Any]] = self.api(f"/api/v1/tasksets/{taskset_id}/slaves")["slaves"]
        return slaves

    def worker_log(self, taskset_id: int) -> str:
        return "".join(log["log"] for log in self.api(f"/api/v1/tasksets/{taskset_id}/worker_logs")["worker_logs"])

    def worker_taskset(self, name: str) -> Any:
        workers = {worker[0]: worker for worker in self.rpc("active_workers")}
        return workers[name][2] if name in workers else "gone"


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """A coordinator with client and worker tokens, on an embedded Postgres under /tmp."""
    data_dir = Path(tempfile.mkdtemp(prefix="testfleet-worker-e2e-", dir="/tmp"))
    env = cli_env(TESTFLEET_CLIENT_TOKEN=CLIENT_TOKEN, TESTFLEET_WORKER_TOKEN=WORKER_TOKEN)
    server = Serve(data_dir, free_port(), env, data_dir / "serve.log")
    server.start()
    try:
        yield Fleet(server)
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def outcomes(task: dict[str, Any]) -> list[tuple[str | None, int | None, int | None, int | None]]:
    return [(trial["status"], trial["passed"], trial["pending"], trial["failed"]) for trial in task["trials"]]


# -- processes ----------------------------------------------------------------------------


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    name: str
    work_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """Live processes started for this worker's tasksets (setup, slaves, what tests started)."""
        return processes_with(f"TESTFLEET_WORKING_PATH={self.work_dir}/")


def processes_with(prefix: str) -> list[int]:
    """Live processes (not zombies) with an environment entry that starts with `prefix`."""
    wanted = prefix.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_bytes().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if state != b"Z" and any(item.startswith(wanted) for item in environ):
            found.append(int(entry.name))
    return found


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def run_worker(
    fleet: Fleet, tmp_path: Path, name: str, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Worker]:
    """A `python -m worker` with two slaves and the worker type `name`; stopped, and all it started, at the end."""
    log_path = tmp_path / f"{name}.log"
    work_dir = tmp_path / f"{name}-work"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "worker", "--coordinator", fleet.url, "--name", name),
                *("--worker-type", name, "--slaves", "2", "--work-dir", str(work_dir)),
                *("--token", WORKER_TOKEN, "--slave-grace-sec", "3", *extra),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=cli_env(**(env or {})),
            cwd=REPO,
        )
    worker = Worker(process, name, work_dir, log_path)
    try:
        wait_until(lambda: fleet.worker_taskset(name) != "gone", 30, f"worker {name} to register")
        yield worker
    finally:
        terminate(process)
        # Slaves stop by themselves once their worker is gone; whatever is still there is killed.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not worker.children(), 20, "the worker's processes to end")
        for pid in worker.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def copy_suites(tmp_path: Path, *names: str) -> Path:
    tree = tmp_path / "tree"
    for name in names:
        shutil.copytree(SUITES / name, tree / name)
    return tree


# -- the cases ----------------------------------------------------------------------------------


def test_every_kind_of_file_over_the_bundle(fleet: Fleet, tmp_path: Path) -> None:
    """Plain outcomes, broken files, both timeouts, a crashing and a flaky test: one taskset, two slaves."""
    tree = copy_suites(
        tmp_path,
        *("passing", "failing", "skip_xfail", "import_error", "broken_conftest"),
        *("soft_timeout", "flaky", "swallow", "suicide"),
    )
    fleet.upload("e2e-outcomes", tree)
    files: list[str | tuple[str, int, int]] = [
        "passing/test_alpha.py",
        "passing/test_beta.py",
        "failing/test_failing.py",
        "skip_xfail/test_skip_xfail.py",
        "import_error/test_import_error.py",
        "broken_conftest/broken/test_one.py",
        "broken_conftest/broken/test_two.py",
        "broken_conftest/test_healthy.py",
        ("soft_timeout/test_slow.py", 20, 1),
        ("soft_timeout/test_slow_import.py", 20, 1),
        "soft_timeout/test_quick.py",
        "flaky/test_flaky.py",
        ("swallow/test_swallow.py", 3, 1),
        "suicide/test_suicide.py",
    ]
    with run_worker(fleet, tmp_path, "e2e-outcomes", env={"FLAKY_MARKER": str(tmp_path / "flaky-marker")}) as worker:
        taskset_id = fleet.submit("e2e-outcomes", tree, files, worker_type="e2e-outcomes")
        summary = fleet.wait_finished(taskset_id)
        tasks = fleet.tasks(taskset_id)
        log = fleet.worker_log(taskset_id)
        slaves = fleet.slaves(taskset_id)
        assert worker.process.poll() is None, worker.log()[-3000:]

    assert {path: task["status"] for path, task in tasks.items()} == {
        "passing/test_alpha.py": "passed",
        "passing/test_beta.py": "passed",
        "failing/test_failing.py": "failed",
        "skip_xfail/test_skip_xfail.py": "pending",
        "import_error/test_import_error.py": "failed",
        "broken_conftest/broken/test_one.py": "failed",
        "broken_conftest/broken/test_two.py": "failed",
        "broken_conftest/test_healthy.py": "passed",
        "soft_timeout/test_slow.py": "failed",
        "soft_timeout/test_slow_import.py": "failed",
        "soft_timeout/test_quick.py": "passed",
        "flaky/test_flaky.py": "passed",
        "swallow/test_swallow.py": "failed",
        "suicide/test_suicide.py": "failed",
    }, log[-4000:]
    assert (summary["status"], summary["task_count"], summary["passed_count"]) == ("failed", 14, 5)
    assert (summary["pending_count"], summary["failed_count"]) == (1, 8)

    assert outcomes(tasks["passing/test_alpha.py"])[-1] == ("passed", 3, 0, 0)
    assert outcomes(tasks["skip_xfail/test_skip_xfail.py"])[-1] == ("pending", 0, 3, 0)
    for path, expected in [
        ("failing/test_failing.py", ("failed", 1, 0, 1)),
        ("import_error/test_import_error.py", ("error", 0, 0, 1)),
        ("broken_conftest/broken/test_one.py", ("error", 0, 0, 1)),
        ("soft_timeout/test_slow.py", ("timeout", 1, 0, 1)),
        ("soft_timeout/test_slow_import.py", ("timeout", 0, 0, 1)),
    ]:
        assert len(tasks[path]["trials"]) >= 2, path
        assert set(outcomes(tasks[path])) == {expected}, path
    failing = fleet.trial(tasks["failing/test_failing.py"]["trials"][0]["id"])
    assert "assert (6 * 7) == 43" in failing["stdout"] and "stderr of the failing test" in failing["stderr"]

    flaky = outcomes(tasks["flaky/test_flaky.py"])
    assert flaky[0] == ("failed", 0, 0, 1) and ("passed", 1, 0, 0) in flaky

    # The swallowing test outlives its soft timeout; the slave ends the trial at the hard one and exits 42.
    swallow = tasks["swallow/test_swallow.py"]
    assert len(swallow["trials"]) >= 2 and {t["status"] for t in swallow["trials"]} == {"timeout"}
    assert "hard timeout of 3s" in fleet.trial(swallow["trials"][0]["id"])["stdout"]
    # The test that kills its own slave: the worker reports the trial and starts a fresh slave.
    suicide = tasks["suicide/test_suicide.py"]
    assert len(suicide["trials"]) >= 2 and {t["status"] for t in suicide["trials"]} == {"error"}
    ran_suicide = {trial["slave_id"] for trial in suicide["trials"]}
    statuses = {slave["id"]: slave["status"] for slave in slaves}
    assert {statuses[slave_id] for slave_id in ran_suicide} == {"failure_exit"}
    ran_swallow = {trial["slave_id"] for trial in swallow["trials"]}
    assert {statuses[slave_id] for slave_id in ran_swallow} == {"timeout_exit"}
    # Each of those trials ended its slave, and a fresh slave took the slot.
    assert len(ran_suicide) == len(suicide["trials"]) and len(ran_swallow) == len(swallow["trials"])
    assert ran_suicide.isdisjoint(ran_swallow) and len(slaves) > 2

    assert "[setup] setup for 2 slaves" in log
    assert "exited with 42" in log and "exited with 137" in log


def test_a_failing_setup_fails_the_taskset(fleet: Fleet, tmp_path: Path) -> None:
    tree = copy_suites(tmp_path, "passing")
    fleet.upload("e2e-setup", tree)
    with run_worker(fleet, tmp_path, "e2e-setup") as worker:
        taskset_id = fleet.submit(
            "e2e-setup",
            tree,
            ["passing/test_alpha.py"],
            worker_type="e2e-setup",
            setup_command="echo preparing the tree\nfalse\necho never",
        )
        summary = fleet.wait_finished(taskset_id, 60)
        wait_until(lambda: fleet.worker_taskset(worker.name) is None, 30, "the worker to be free again")
    assert summary["status"] == "failed"
    log = fleet.worker_log(taskset_id)
    assert "[setup] preparing the tree" in log and "[setup] + false" in log and "never" not in log
    assert "setup command exited with 1" in log
    assert fleet.tasks(taskset_id)["passing/test_alpha.py"]["trials"] == []
    assert fleet.slaves(taskset_id) == []


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed (.ci/run installs Debian's)")
def test_fixture_lifecycles_across_files_over_rsync(fleet: Fleet, tmp_path: Path) -> None:
    """Code by rsync; module and package fixtures live one file, session fixtures the slave's life."""
    remote = tmp_path / "remote"
    tree = remote / "e2e-rsync"
    shutil.copytree(SUITES / "fixtures_lifecycle", tree)
    logs = tmp_path / "lifecycle"
    logs.mkdir()
    files = [
        "test_one.py",
        "test_two.py",
        "tests/test_three.py",
        "tests/test_four.py",
        "pkg/test_five.py",
        "pkg/test_six.py",
    ]
    # Each slave process logs on its own ($$ is the slave command's shell); `-- -q` reaches pytest.
    command = f'export LIFECYCLE_LOG="{logs}/slave-$SLAVE_NUMBER-$$.log"\ntestfleet slave -- -q'
    with run_worker(fleet, tmp_path, "e2e-rsync", "--rsync-remote-path", str(remote)):
        taskset_id = fleet.submit("e2e-rsync", tree, list(files), worker_type="e2e-rsync", slave_command=command)
        summary = fleet.wait_finished(taskset_id, 90)
    log = fleet.worker_log(taskset_id)
    assert summary["status"] == "succeeded", log[-4000:]
    assert {path: task["status"] for path, task in fleet.tasks(taskset_id).items()} == dict.fromkeys(files, "passed")
    assert f"[sync] $ rsync -a --delete {remote}/e2e-rsync/" in log
    assert (tmp_path / "e2e-rsync-work" / "e2e-rsync" / "pkg" / "test_five.py").is_file()

    slave_logs = sorted(logs.iterdir())
    assert 1 <= len(slave_logs) <= 2
    modules = []
    for path in slave_logs:
        events = path.read_text().splitlines()
        # One session for every file the slave ran ...
        assert events[0] == "session_setup" and events[-1] == "session_teardown", events
        assert events.count("session_setup") == 1, events
        # ... and each file's module fixture set up and torn down before the next file starts.
        module_events = [event for event in events if event.startswith("module_")]
        for setup, teardown in zip(module_events[::2], module_events[1::2], strict=True):
            assert (setup.split()[0], teardown.split()[0]) == ("module_setup", "module_teardown")
            assert setup.split()[1] == teardown.split()[1]
            modules.append(setup.split()[1])
        package_events = [event for event in events if event.startswith("package_")]
        assert package_events == ["package_setup", "package_teardown"] * (len(package_events) // 2)
    assert sorted(modules) == sorted(Path(path).stem for path in files)


def test_cancel_in_the_middle_of_a_file(fleet: Fleet, tmp_path: Path) -> None:
    tree = copy_suites(tmp_path, "long_steps")
    fleet.upload("e2e-cancel", tree)
    started = tmp_path / "started"
    with run_worker(fleet, tmp_path, "e2e-cancel", env={"STARTED_MARKER": str(started)}) as worker:
        taskset_id = fleet.submit("e2e-cancel", tree, ["long_steps/test_long_steps.py"], worker_type="e2e-cancel")
        wait_until(started.exists, 60, "the long test to start")
        wait_until(lambda: len(fleet.slaves(taskset_id)) == 2, 60, "the other slave to connect")
        time.sleep(1)  # and to be waiting for a file
        fleet.rpc("cancel_taskset", ["taskset", taskset_id])
        summary = fleet.summary(taskset_id)
        # The worker stops its slaves (TERM, then KILL after its 3 s grace) and is free again.
        wait_until(lambda: not worker.children(), 20, "the slaves to end")
        wait_until(lambda: fleet.worker_taskset(worker.name) is None, 20, "the worker to be free again")
        assert worker.process.poll() is None

        def finished_slaves() -> list[dict[str, Any]]:
            slaves = fleet.slaves(taskset_id)
            return slaves if slaves and all(slave["status"] is not None for slave in slaves) else []

        slaves = wait_until(finished_slaves, 20, "every slave to be finished")
    assert summary["status"] == "cancelled"
    assert fleet.summary(taskset_id)["status"] == "cancelled"
    # Both ended on their own within the grace: the running one after its test, the idle one at once.
    assert [slave["status"] for slave in slaves] == ["normal_exit", "normal_exit"]
    (trial,) = fleet.tasks(taskset_id)["long_steps/test_long_steps.py"]["trials"]
    assert trial["status"] == "error"
    assert "SIGTERM interrupted this file" in fleet.trial(trial["id"])["stdout"]


def test_slaves_stop_by_themselves_when_their_worker_dies(fleet: Fleet, tmp_path: Path) -> None:
    tree = copy_suites(tmp_path, "interruptible")
    fleet.upload("e2e-orphans", tree)
    started = tmp_path / "started"
    env = {"STARTED_MARKER": str(started), "TAKES_SEC": "5"}
    with run_worker(fleet, tmp_path, "e2e-orphans", env=env) as worker:
        taskset_id = fleet.submit("e2e-orphans", tree, ["interruptible/test_steps.py"], worker_type="e2e-orphans")
        wait_until(started.exists, 60, "the long test to start")
        # Both slaves up, the idle one waiting for a file, while the long test still runs (5 s).
        wait_until(lambda: len(fleet.slaves(taskset_id)) == 2, 60, "the other slave to connect")
        time.sleep(0.5)
        slaves = worker.children()
        assert slaves
        worker.process.kill()
        worker.process.wait()
        # Within the poll period the slaves notice: the idle one stops at once; the running file goes on
        # to its end and is reported (before, it was cut short, and that cost it one of its attempts).
        wait_until(lambda: not worker.children(), 30, "the orphaned slaves to end")
    task = fleet.tasks(taskset_id)["interruptible/test_steps.py"]
    assert task["status"] == "passed"
    (trial,) = task["trials"]
    assert trial["status"] == "passed"
    assert {slave["status"] for slave in fleet.slaves(taskset_id)} == {"normal_exit"}
    assert fleet.wait_finished(taskset_id, 30)["status"] == "succeeded"


def test_a_slave_that_cannot_stop_itself_is_killed_by_its_worker(fleet: Fleet, tmp_path: Path) -> None:
    """A test holding the GIL outlasts both timeouts of its slave: the worker ends it from the state file."""
    tree = copy_suites(tmp_path, "gil_hog", "passing")
    fleet.upload("e2e-gil", tree)
    files: list[str | tuple[str, int, int]] = [("gil_hog/test_gil_hog.py", 2, 1), "passing/test_alpha.py"]
    with run_worker(fleet, tmp_path, "e2e-gil") as worker:
        taskset_id = fleet.submit("e2e-gil", tree, files, worker_type="e2e-gil", max_trials=1)
        # Hard timeout 2 s, then the worker's margin of 5 s, SIGUSR2 (stacks), a second, SIGKILL.
        summary = fleet.wait_finished(taskset_id, 60)
        assert worker.process.poll() is None
    tasks = fleet.tasks(taskset_id)
    assert summary["status"] == "failed"
    assert {path: task["status"] for path, task in tasks.items()} == {
        "gil_hog/test_gil_hog.py": "failed",
        "passing/test_alpha.py": "passed",
    }
    trials = tasks["gil_hog/test_gil_hog.py"]["trials"]  # a speculative duplicate may have joined the first
    statuses = {slave["id"]: slave["status"] for slave in fleet.slaves(taskset_id)}
    for trial in trials:
        assert trial["status"] == "timeout"
        killed = fleet.trial(trial["id"])
        assert "the worker killed the slave" in killed["stdout"]
        assert "test_gil_hog.py" in killed["stderr"]  # the stack dump the slave wrote on SIGUSR2
        assert statuses[trial["slave_id"]] == "timeout_exit"
    assert "killed past its hard timeout" in fleet.worker_log(taskset_id)
