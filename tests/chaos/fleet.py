"""The chaos tests' fleet: real testfleet processes, the faults injected into them, and the invariants checked after.

A `Fleet` (a context manager) owns everything a test starts: the coordinator (`testfleet serve` on its
embedded Postgres), worker daemons (`python -m worker`), the CI client (`testfleet run`) and, through the
workers, the slaves. Every process gets the fleet's tag in its environment, which slaves and their children
inherit, so teardown finds and kills each one of them (orphans and frozen ones included) even when a test
fails half way. Logs and the suite's markers stay under the fleet's directory while the test runs; what a
test measures goes to `test-artifacts/chaos/<test>.json` and is printed. The processes and their faults
are in `tests.chaos.processes`, the network namespace a worker can be cut off in is in `tests.chaos.netns`.

The suite is `tests/fixtures/suites/chaos_fleet`: eight files that pass, one that fails, one that is
pending, each taking `CHAOS_FILE_SECONDS` and leaving start and end markers (see its conftest.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil

from tests.chaos.processes import (
    CLIENT_TOKEN,
    REPO,
    TAG_ENV,
    CiRun,
    Coordinator,
    Worker,
    signal_all,
    tagged_pids,
    wait_for,
)

SUITE: Final = REPO / "tests" / "fixtures" / "suites" / "chaos_fleet"
ARTIFACTS: Final = REPO / "test-artifacts" / "chaos"

EXPECTED: Final = {
    **{f"test_{letter}.py": "passed" for letter in "abcdefgh"},
    "test_fail.py": "failed",
    "test_skip.py": "pending",
}
"""Each file's status in a clean run (test_clean_run proves it)."""
PASSING: Final = sorted(path for path, status in EXPECTED.items() if status == "passed")
MAX_TRIALS: Final = 2


# -- small helpers ------------------------------------------------------------------------------


def epoch(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 timestamp (the API's and the logs')."""
    return dt.datetime.fromisoformat(stamp).timestamp()


def verdict_of(expected: dict[str, str]) -> str:
    return "failed" if "failed" in expected.values() else "succeeded"


def exit_code_of(verdict: str) -> int:
    return {"succeeded": 0, "failed": 1}[verdict]


def record_measurements(test: str, values: dict[str, Any]) -> None:
    """Print what a test measured and keep it in test-artifacts/chaos/<test>.json for docs/RELIABILITY.md."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}
    (ARTIFACTS / f"{test}.json").write_text(json.dumps(rounded, indent=2, sort_keys=True) + "\n")
    print(f"\n[chaos] {test}: {json.dumps(rounded, sort_keys=True)}")


class Watch:
    """Polls a condition in a thread of its own and notes the wall-clock time it first held (bounded in time)."""

    def __init__(self, what: str, probe: Callable[[], object], timeout: float, interval: float = 0.1) -> None:
        self.what = what
        self.at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(probe, timeout, interval), daemon=True)
        self._thread.start()

    def _run(self, probe: Callable[[], object], timeout: float, interval: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if probe():
                    self.at = time.time()
                    return
            self._stop.wait(interval)

    def result(self, timeout: float) -> float:
        """When the condition first held; AssertionError if it did not within `timeout` more seconds."""
        self._thread.join(timeout)
        self._stop.set()
        if self.at is None:
            raise AssertionError(f"never saw {self.what}")
        return self.at


# -- runs, the fleet, its invariants ------------------------------------------------------------


class RpcRun:
    """A taskset submitted without the CLI: the bundle PUT to /api/v1/bundles, then create and dispatch over /rpc.

    It answers like `CiRun`: `wait()` gives the exit code the CLI would (0 succeeded, 1 failed, 2 otherwise).
    """

    def __init__(self, fleet: Fleet, *, rsync_name: str, paths: list[str], max_trials: int) -> None:
        self.fleet = fleet
        fleet.upload_bundle(rsync_name)
        tasks = [[path, hashlib.sha1((fleet.project / path).read_bytes()).hexdigest(), 90, 60] for path in paths]
        ref = fleet.rpc(
            "create_taskset", rsync_name, "", "testfleet slave", "default", rsync_name, 1000, max_trials, tasks
        )
        fleet.rpc("dispatch_taskset", ref)
        self.ref = ref
        self.status: dict[str, Any] = {}

    def taskset_id(self, timeout: float = 0.0) -> int:
        return int(self.ref[1])

    def wait(self, timeout: float) -> int:
        def finished() -> dict[str, Any] | None:
            body = self.fleet.try_api(f"/api/v1/tasksets/{self.ref[1]}")
            return body if body and body["finished_at"] else None

        self.status = wait_for(f"taskset {self.ref[1]} to finish", finished, timeout, interval=0.2)
        return {"succeeded": 0, "failed": 1}.get(self.status["status"], 2)

    def output(self) -> str:
        return json.dumps(self.status)

    def kill(self) -> None:
        """Nothing runs on our side."""


@dataclass
class Marker:
    """One start marker the suite left: which file ran, in which process and slave, when (wall clock)."""

    spec_path: str
    pid: int
    slave: str
    at: float
    ended: bool


@dataclass
class Fleet:
    """Owns every process and directory of one chaos test; `close()` leaves nothing behind."""

    name: str
    log_dir: Path
    tag: str = ""
    root: Path = field(default_factory=Path)
    coordinator: Coordinator | None = None
    workers: list[Worker] = field(default_factory=list)
    runs: list[CiRun | RpcRun] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tag = f"{self.name}-{os.getpid()}-{time.time_ns()}"
        # Under /tmp: the embedded Postgres opens every parent of its data dir to its system user.
        self.root = Path(tempfile.mkdtemp(prefix="testfleet-chaos-", dir="/tmp"))
        self.root.chmod(0o755)
        self.markers.mkdir()
        shutil.copytree(SUITE, self.project)

    @property
    def markers(self) -> Path:
        return self.root / "markers"

    @property
    def project(self) -> Path:
        return self.root / "project"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment for our processes: no TESTFLEET_* or CI settings, this venv first on PATH."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TESTFLEET_", "CHAOS_")) and k not in ("CI",)}
        env.pop("DATABASE_URL", None)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env[TAG_ENV] = self.tag
        env["CHAOS_MARKER_DIR"] = str(self.markers)
        env.update(extra)
        return env

    # -- starting things ----------------------------------------------------------------------

    def start_coordinator(
        self, *, host: str = "127.0.0.1", grace_s: float = 5.0, heartbeat_s: float | None = None
    ) -> Coordinator:
        self.coordinator = Coordinator(self, host=host, grace_s=grace_s, heartbeat_s=heartbeat_s)
        self.coordinator.start()
        return self.coordinator

    def start_worker(
        self,
        name: str,
        *,
        slaves: int = 2,
        file_s: float = 1.0,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Worker:
        assert self.coordinator is not None
        worker = Worker(
            self,
            name,
            slaves=slaves,
            url=self.coordinator.url,
            netns=netns,
            env={"CHAOS_FILE_SECONDS": str(file_s), **(env or {})},
        )
        self.workers.append(worker)
        worker.start()
        return worker

    def start_run(self, *, paths: list[str] | None = None, max_trials: int = MAX_TRIALS) -> CiRun:
        assert self.coordinator is not None
        run = CiRun(
            self,
            url=self.coordinator.url,
            rsync_name=f"{self.name}-{len(self.runs)}",
            paths=paths or [],
            max_trials=max_trials,
        )
        self.runs.append(run)
        return run

    def submit(self, *, paths: list[str] | None = None, max_trials: int = MAX_TRIALS) -> RpcRun:
        """Upload the suite and submit it over /rpc, without the CLI (every file, or `paths`)."""
        run = RpcRun(
            self,
            rsync_name=f"{self.name}-{len(self.runs)}",
            paths=paths or sorted(EXPECTED),
            max_trials=max_trials,
        )
        self.runs.append(run)
        return run

    def upload_bundle(self, rsync_name: str) -> str:
        """PUT a tar.gz of the suite as the bundle of `rsync_name`; its sha256."""
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as tar:
            for path in sorted(self.project.rglob("*")):
                if "__pycache__" not in path.parts:
                    tar.add(path, arcname=str(path.relative_to(self.project)), recursive=False)
        assert self.coordinator is not None
        request = urllib.request.Request(
            f"{self.coordinator.url}/api/v1/bundles/{rsync_name}",
            data.getvalue(),
            {"Authorization": f"Bearer {CLIENT_TOKEN}", "Content-Type": "application/gzip"},
            method="PUT",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return str(json.loads(response.read())["sha256"])

    def rpc(self, method: str, *params: Any) -> Any:
        """A JSON-RPC call over POST /rpc with the client token; AssertionError on an error reply."""
        assert self.coordinator is not None
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_TOKEN}"}
        request = urllib.request.Request(self.coordinator.url + "/rpc", body, headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            reply = json.loads(response.read())
        assert "error" not in reply, (method, reply["error"])
        return reply["result"]

    # -- looking at it ------------------------------------------------------------------------

    def api(self, path: str, timeout: float = 10.0) -> Any:
        assert self.coordinator is not None
        request = urllib.request.Request(
            self.coordinator.url + path, headers={"Authorization": f"Bearer {CLIENT_TOKEN}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def try_api(self, path: str) -> Any:
        """The API's answer, or None while the coordinator is unreachable or answers with an error."""
        try:
            return self.api(path, timeout=5)
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def tasks(self, taskset_id: int) -> dict[str, dict[str, Any]]:
        return {task["spec_path"]: task for task in self.api(f"/api/v1/tasksets/{taskset_id}/tasks")["tasks"]}

    def worker_names(self) -> set[str] | None:
        body = self.try_api("/api/v1/workers")
        return None if body is None else {worker["name"] for worker in body["workers"]}

    def started(self) -> list[Marker]:
        """Every file start the suite marked so far, oldest first."""
        found = []
        for path in self.markers.glob("*.start"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                ended = path.with_suffix(".end").exists()
                found.append(Marker(record["spec_path"], record["pid"], record["slave"] or "", record["at"], ended))
        return sorted(found, key=lambda marker: marker.at)

    def running_on(self, worker: str, *, spec_paths: list[str] | None = None) -> list[Marker]:
        """Files running now in slaves of `worker` (started, not ended, the process alive)."""
        return [
            m
            for m in self.started()
            if not m.ended
            and m.slave.startswith(f"{worker}-")
            and (spec_paths is None or m.spec_path in spec_paths)
            and psutil.pid_exists(m.pid)
        ]

    # -- the invariants -----------------------------------------------------------------------

    def check_invariants(
        self,
        taskset_id: int,
        *,
        expected: dict[str, str],
        max_trials: int = MAX_TRIALS,
        run: CiRun | RpcRun | None = None,
        exit_code: int | None = None,
        settle_s: float = 45.0,
    ) -> dict[str, dict[str, Any]]:
        """After the fault: the run ends as a clean run does, and its records add up.

        - the verdict and every file's status equal a clean run's (`expected`);
        - the taskset's counts equal its tasks' statuses (no result lost or counted twice);
        - no trial is left unfinished (status null) once the taskset has finished (given `settle_s`
          for slaves that are still being stopped to report);
        - no file has more than max_trials + 1 trials, nor ran more often than that;
        - the CI client, when there is one, exits with the verdict's code (and `testfleet run` prints the
          clean run's file counts).
        """
        verdict = verdict_of(expected)
        if run is not None:
            code = run.wait(180)
            assert code == (exit_code_of(verdict) if exit_code is None else exit_code), run.output()
        if isinstance(run, CiRun):
            counts = {status: list(expected.values()).count(status) for status in ("passed", "pending", "failed")}
            summary = f"{len(expected)} files ({counts['passed']} passed, {counts['pending']} pending, "
            summary += f"{counts['failed']} failed)"
            assert summary in run.output(), run.output()
        taskset = wait_for(
            f"taskset {taskset_id} to finish",
            lambda: (body := self.try_api(f"/api/v1/tasksets/{taskset_id}")) and body["finished_at"] and body,
            120,
            interval=0.2,
        )
        assert taskset["status"] == verdict, taskset

        def settled() -> dict[str, dict[str, Any]] | None:
            tasks = self.tasks(taskset_id)
            open_trials = [t for task in tasks.values() for t in task["trials"] if t["status"] is None]
            return None if open_trials else tasks

        tasks = wait_for(f"every trial of taskset {taskset_id} to finish", settled, settle_s, interval=0.25)
        statuses = {path: task["status"] for path, task in tasks.items()}
        assert statuses == expected, statuses
        for status in ("passed", "pending", "failed"):
            assert taskset[f"{status}_count"] == list(statuses.values()).count(status), taskset
        assert taskset["task_count"] == len(expected), taskset
        for path, task in tasks.items():
            assert len(task["trials"]) <= max_trials + 1, (path, task["trials"])
            assert task["trial_count"] == len(task["trials"]), task
        executions: dict[str, int] = {}
        for marker in self.started():
            executions[marker.spec_path] = executions.get(marker.spec_path, 0) + 1
        assert all(count <= max_trials + 1 for count in executions.values()), executions
        return tasks

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything this fleet started, whatever state it is in."""
        errors: list[BaseException] = []

        def attempt(step: Callable[[], object]) -> None:
            try:
                step()
            except BaseException as exc:  # one failed step must not leave the rest running
                errors.append(exc)

        for run in self.runs:
            attempt(run.kill)
        for worker in self.workers:
            attempt(worker.stop)
        if self.coordinator is not None:
            attempt(self.coordinator.stop)
            attempt(self.coordinator.stop_leftover_postgres)
        leftovers = tagged_pids(self.tag)
        signal_all(leftovers, signal.SIGCONT)
        signal_all(leftovers, signal.SIGKILL)
        for cleanup in reversed(self.cleanups):
            attempt(cleanup)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def fleet(name: str, log_dir: Path) -> Iterator[Fleet]:
    """A fleet whose processes are all gone when the block ends, failed or not."""
    owned = Fleet(name, log_dir)
    try:
        yield owned
    finally:
        owned.close()
