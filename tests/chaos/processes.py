"""The processes of a chaos fleet: the coordinator, worker daemons and the CI client, and how to hurt them.

Each is started in a session of its own with the fleet's tag in its environment (see `tagged_pids`), its
output in a log file of the fleet's. The faults are methods: `Coordinator.crash` (SIGKILL with its whole
Postgres), `Coordinator.crash_postgres_backend`, `Coordinator.stop_postgres`, `Worker.kill_daemon`,
`Worker.freeze` (the whole host), `Worker.freeze_daemon`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psutil

if TYPE_CHECKING:
    from tests.chaos.fleet import Fleet

REPO: Final = Path(__file__).resolve().parents[2]
CLIENT_TOKEN: Final = "chaos-client-token"
WORKER_TOKEN: Final = "chaos-worker-token"
TAG_ENV: Final = "CHAOS_FLEET_TAG"
WORKER_ENV: Final = "CHAOS_WORKER_NAME"
LISTENING: Final = re.compile(r"testfleet coordinator listening on (http://\S+)")
TASKSET_LINE: Final = re.compile(r"testfleet: taskset (\d+):")

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.1) -> T:
    """Poll `probe` until it returns something truthy; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tagged_pids(tag: str, worker: str | None = None) -> list[int]:
    """Live processes whose environment carries the fleet's tag (and the worker's name, when given)."""
    wanted = [f"{TAG_ENV}={tag}".encode()]
    if worker is not None:
        wanted.append(f"{WORKER_ENV}={worker}".encode())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_bytes().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if state != b"Z" and all(item in environ for item in wanted):
            found.append(int(entry.name))
    return sorted(found)


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a JSON-lines log file (other lines skipped)."""
    records = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
    return records


def _stop_group(process: subprocess.Popen[bytes], sig: signal.Signals, timeout: float) -> None:
    """Signal a process we started in its own session, wait, and SIGKILL its group if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


class Coordinator:
    """`testfleet serve` with role tokens and short slave grace; restartable on the same port and data dir."""

    def __init__(self, fleet: Fleet, *, host: str, grace_s: float, heartbeat_s: float | None) -> None:
        self.fleet = fleet
        self.host = host
        self.port = free_port(host)
        self.grace_s = grace_s
        self.heartbeat_s = heartbeat_s
        self.data_dir = fleet.root / "coordinator"
        self.log_path = fleet.log_dir / "coordinator.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "postgres" / "pgdata"

    def start(self, timeout: float = 60.0) -> float:
        """Start it and wait until it listens; the wall-clock time it was seen listening."""
        command = [
            *(sys.executable, "-m", "coordinator.cli.main", "serve", "--host", self.host, "--port", str(self.port)),
            *("--data-dir", str(self.data_dir), "--client-token", CLIENT_TOKEN, "--worker-token", WORKER_TOKEN),
            *("--slave-grace-sec", str(self.grace_s)),
        ]
        if self.heartbeat_s is not None:
            command += ["--heartbeat-sec", str(self.heartbeat_s)]
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- chaos: start {self.starts}\n".encode())
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.fleet.env(),
                cwd=REPO,
                start_new_session=True,
            )
        process = self.process

        def listening() -> bool:
            if process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise AssertionError(f"testfleet serve exited with {process.returncode}:\n{tail}")
            return len(LISTENING.findall(self.log_path.read_text(errors="replace"))) >= self.starts

        wait_for("the coordinator to listen", listening, timeout, interval=0.05)
        return time.time()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a clean stop, its Postgres included); SIGKILL of its group if it does not end in time."""
        if self.process is None:
            return None
        _stop_group(self.process, signal.SIGTERM, timeout)
        return self.process.returncode

    def postgres_pids(self) -> list[int]:
        """The postmaster serving its data dir and every child of it."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            postmaster = psutil.Process(pid)
            if str(self.pgdata) not in " ".join(postmaster.cmdline()):
                return []
            return [pid, *(child.pid for child in postmaster.children(recursive=True))]
        except (OSError, ValueError, IndexError, psutil.Error):
            return []

    def crash(self) -> float:
        """SIGKILL the coordinator and its whole Postgres at once, as a host crash would; the wall-clock time."""
        assert self.process is not None
        victims = [self.process.pid, *self.postgres_pids()]
        signal_all(victims, signal.SIGKILL)
        at = time.time()
        self.process.wait(10)
        wait_for("the killed Postgres processes to be gone", lambda: not any(map(psutil.pid_exists, victims[1:])), 15)
        return at

    def crash_postgres_backend(self) -> float:
        """SIGKILL one of the coordinator's Postgres sessions: the postmaster ends every session and recovers."""
        backends = []
        for pid in self.postgres_pids()[1:]:
            with contextlib.suppress(psutil.Error):
                if "[local]" in " ".join(psutil.Process(pid).cmdline()):
                    backends.append(pid)
        assert backends, "no Postgres session of the coordinator to kill"
        os.kill(backends[0], signal.SIGKILL)
        return time.time()

    def _pg_ctl(self, *args: str) -> None:
        """Run the server's own pg_ctl on the data dir, as the user owning it (the embedded server's, as root)."""
        binary = _split_opts((self.pgdata / "postmaster.opts").read_text())[0]
        owner = self.pgdata.stat().st_uid
        done = subprocess.run(
            [str(Path(binary).with_name("pg_ctl")), "-D", str(self.pgdata), "-w", "-t", "30", *args],
            check=False,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            user=None if owner == os.geteuid() else owner,
            cwd="/",
            timeout=60,
        )
        if done.returncode != 0:
            server_log = ""
            with contextlib.suppress(OSError):
                server_log = (self.pgdata / "log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"pg_ctl {' '.join(args)} failed:\n{done.stdout}{done.stderr}\n{server_log}")

    def stop_postgres(self, timeout_s: float = 60.0) -> tuple[float, float]:
        """Stop Postgres under the running coordinator (fast shutdown) and wait until the coordinator, which
        owns it, has started it again. Returns the wall-clock times it went down and was back."""
        self._pg_ctl("-m", "fast", "stop")
        down_at = time.time()
        deadline = time.monotonic() + timeout_s
        while not (self.events("embedded_postgres_restarted") and self.postgres_pids()):
            if time.monotonic() > deadline:
                raise AssertionError(f"the coordinator did not start Postgres again within {timeout_s} s")
            time.sleep(0.05)
        return down_at, time.time()

    def stop_leftover_postgres(self) -> None:
        """Stop a postmaster still serving the data dir (one the coordinator did not start, or an orphan)."""
        pids = self.postgres_pids()
        if not pids:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._pg_ctl("-m", "fast", "stop")
        signal_all(self.postgres_pids(), signal.SIGKILL)

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in json_lines(self.log_path) if event is None or r.get("event") == event]


def _split_opts(text: str) -> list[str]:
    """postmaster.opts: the binary and each option in double quotes."""
    return [match.group(1) if match.group(1) is not None else match.group(2) for match in _OPT.finditer(text)]


_OPT: Final = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


class Worker:
    """A worker daemon (`python -m worker`), optionally inside a network namespace."""

    def __init__(
        self,
        fleet: Fleet,
        name: str,
        *,
        slaves: int,
        url: str,
        netns: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.fleet = fleet
        self.name = name
        self.slaves = slaves
        self.url = url
        self.netns = netns
        self.extra_env = env or {}
        self.log_path = fleet.log_dir / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        command = [
            *prefix,
            *(sys.executable, "-m", "worker", "--coordinator", self.url, "--name", self.name),
            *("--slaves", str(self.slaves), "--work-dir", str(self.fleet.root / f"work-{self.name}")),
            *("--token", WORKER_TOKEN, "--slave-grace-sec", "2"),
        ]
        env = self.fleet.env(**{WORKER_ENV: self.name}, **self.extra_env)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=REPO,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def host_pids(self) -> list[int]:
        """Every live process of this worker's "host": the daemon, its slaves and what they started."""
        return tagged_pids(self.fleet.tag, self.name)

    def kill_daemon(self) -> float:
        """SIGKILL the daemon alone (its slaves live on); the wall-clock time."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        at = time.time()
        self.process.wait(10)
        return at

    def freeze(self) -> float:
        """SIGSTOP the daemon and every slave: the host stops dead, its sockets stay open."""
        signal_all(self.host_pids(), signal.SIGSTOP)
        return time.time()

    def freeze_daemon(self) -> float:
        """SIGSTOP the daemon's process group alone (its slaves run in groups of their own)."""
        os.killpg(self.pid, signal.SIGSTOP)
        return time.time()

    def thaw(self) -> float:
        signal_all(self.host_pids(), signal.SIGCONT)
        return time.time()

    def stop(self) -> None:
        """SIGTERM the daemon (it stops its slaves); SIGKILL whatever of this host is left after a while."""
        self.thaw()
        if self.process is not None:
            _stop_group(self.process, signal.SIGTERM, 20)
        with contextlib.suppress(AssertionError):
            wait_for(f"the slaves of {self.name} to end", lambda: not self.host_pids(), 10)
        signal_all(self.host_pids(), signal.SIGKILL)

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        return [r for r in json_lines(self.log_path) if event is None or r.get("event") == event]


class CiRun:
    """`testfleet run` on the fleet's copy of the suite, as CI would run it."""

    def __init__(self, fleet: Fleet, *, url: str, rsync_name: str, paths: list[str], max_trials: int) -> None:
        self.fleet = fleet
        self.stdout_path = fleet.log_dir / f"run-{rsync_name}.stdout"
        self.stderr_path = fleet.log_dir / f"run-{rsync_name}.stderr"
        command = [
            *(sys.executable, "-m", "coordinator.cli.main", "run", "--coordinator", url, "--token", CLIENT_TOKEN),
            *("--rsync-name", rsync_name, "--taskset-class", rsync_name, "--max-trials", str(max_trials)),
            *("--progress", "plain", "--unknown-spec-timeout-sec", "60", "--hard-timeout-margin-sec", "30"),
            *paths,
        ]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=fleet.env(),
                cwd=fleet.project,
                start_new_session=True,
            )

    def taskset_id(self, timeout: float = 60.0) -> int:
        def found() -> int | None:
            match = TASKSET_LINE.search(self.stderr_path.read_text(errors="replace"))
            if match is None and self.process.poll() is not None:
                raise AssertionError(f"testfleet run ended early:\n{self.output()}")
            return int(match.group(1)) if match else None

        return wait_for("testfleet run to submit its taskset", found, timeout)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"testfleet run did not end within {timeout:g} s:\n{self.output()}") from None

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        _stop_group(self.process, signal.SIGKILL, 5)
