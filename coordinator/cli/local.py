"""`testfleet local`: an embedded coordinator and N workers as child processes, one run, and a clean shutdown.

Layout of the per-project data directory (its history orders the next run, longest files first):
`coordinator/` (the coordinator's embedded Postgres and bundles), `work/` (the workers' code copies),
`logs/` (each child's stderr, kept for the last run). Default: `$XDG_CACHE_HOME/testfleet/local/<project>-<hash>`
(`~/.cache/...`), or `/var/cache/testfleet/local/<project>-<hash>` for root, whose home the embedded
Postgres may not live in.

Every child runs in its own session and gets SIGTERM should this process die; on the way out (a verdict,
an error, Ctrl-C) the workers are stopped first, then the coordinator, each with TERM then KILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import os
import re
import secrets
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final

import msgspec

from coordinator.cli.client import Client
from coordinator.cli.config import (
    DEFAULT_SLAVE_COMMAND,
    LOCAL,
    REPORT,
    TASKSET,
    ClientSettings,
    add_options,
    add_project_dir,
)
from coordinator.cli.errors import CliError
from coordinator.cli.run import (
    EXIT_ERROR,
    Submission,
    cancel_submitted,
    follow_and_report,
    guarded,
    say,
    settings_or_exit,
    submit,
)
from protocol.types import TasksetRef

READY_TIMEOUT_S: Final = 120.0
WORKER_STOP_S: Final = 15.0
COORDINATOR_STOP_S: Final = 30.0
LISTENING: Final = re.compile(r"testfleet coordinator listening on (http://\S+)")
# Variables that would point the embedded coordinator elsewhere than its own directory and loopback.
COORDINATOR_ENV_DROPPED: Final = ("DATABASE_URL",)
PR_SET_PDEATHSIG: Final = 1


def default_data_dir(project_dir: Path, environ: Mapping[str, str]) -> Path:
    """A directory of this project's own under the user's cache (root: /var/cache, never under /root)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", project_dir.name).strip(".-") or "project"
    key = f"{name[:40]}-{hashlib.sha256(str(project_dir).encode()).hexdigest()[:12]}"
    if os.geteuid() == 0:
        return Path("/var/cache/testfleet/local") / key
    cache = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "testfleet" / "local" / key


def data_dir_of(settings: ClientSettings, project: Path) -> Path:
    if settings.local_data_dir:
        return Path(os.path.abspath(os.path.expanduser(settings.local_data_dir)))
    return default_data_dir(project, os.environ)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux), so no child outlives `local`."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Fleet:
    """The children `local` started, stopped in reverse order."""

    logs: Path
    children: list[Child] = field(default_factory=list)

    async def start(self, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path) -> Child:
        log_path = self.logs / f"{name}.log"
        log = log_path.open("wb")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        except BaseException:
            log.close()
            raise
        child = Child(name, process, log_path, log)
        self.children.append(child)
        return child

    async def stop(self, child: Child, grace_s: float) -> None:
        process = child.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                say(f"{child.name} did not stop within {grace_s:.0f}s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        child.log.close()

    async def stop_all(self) -> None:
        workers = [c for c in self.children if c.name != "coordinator"]
        await asyncio.gather(*(self.stop(c, WORKER_STOP_S) for c in workers))
        for child in self.children:
            if child.name == "coordinator":
                await self.stop(child, COORDINATOR_STOP_S)
        self.children.clear()


async def _wait_listening(child: Child) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            match = LISTENING.search(child.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
        if child.process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    raise CliError(f"the embedded coordinator did not start; its log ({child.log_path}) ends with:\n{child.tail()}")


def _child_env(drop: Sequence[str] = (), **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTFLEET_") and k not in drop}
    # The slaves find `testfleet` next to this interpreter even when its directory is not on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]) if env.get("PATH") else bin_dir
    env.update(extra)
    return env


@asynccontextmanager
async def embedded_fleet(
    settings: ClientSettings, data_dir: Path, client_token: str
) -> AsyncIterator[tuple[str, Fleet]]:
    """Start the coordinator and the workers; yield the coordinator's URL; stop them all on the way out."""
    logs = data_dir / "logs"
    for sub in ("coordinator", "work", "logs"):
        (data_dir / sub).mkdir(parents=True, exist_ok=True)
    fleet = Fleet(logs)
    worker_token = secrets.token_urlsafe(24)
    try:
        coordinator = await fleet.start(
            "coordinator",
            [
                *(sys.executable, "-m", "coordinator.cli.main", "serve", "--host", "127.0.0.1", "--port", "0"),
                *("--data-dir", str(data_dir / "coordinator"), "--log-level", "warning"),
            ],
            _child_env(
                COORDINATOR_ENV_DROPPED, TESTFLEET_CLIENT_TOKEN=client_token, TESTFLEET_WORKER_TOKEN=worker_token
            ),
            data_dir,
        )
        url = await _wait_listening(coordinator)
        slaves = settings.slaves or os.cpu_count() or 1
        for number in range(1, settings.workers + 1):
            await fleet.start(
                f"worker-{number}",
                [
                    *(sys.executable, "-m", "worker", "--coordinator", url, "--name", f"local-{number}"),
                    *("--slaves", str(slaves), "--work-dir", str(data_dir / "work")),
                    *("--worker-type", settings.worker_type, "--log-level", "warning"),
                ],
                _child_env(TESTFLEET_TOKEN=worker_token),
                data_dir,
            )
        say(f"embedded coordinator at {url}, {settings.workers} worker(s) of {slaves} slave(s); data in {data_dir}")
        yield url, fleet
    finally:
        await asyncio.shield(fleet.stop_all())


async def _clear_leftovers(client: Client) -> None:
    """Cancel tasksets a killed earlier run left active: this coordinator serves this project alone."""
    refs: list[TasksetRef] = await client.call("active_tasksets")
    for ref in refs:
        say(f"cancelling taskset {ref.id}, left active by an earlier run")
        await client.call("cancel_taskset", ref)


async def _workers_ready(client: Client, fleet: Fleet, expected: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if len(await client.call("active_workers")) >= expected:
            return
        for child in fleet.children:
            if child.process.returncode is not None:
                raise CliError(
                    f"{child.name} exited with {child.process.returncode}; its log ends with:\n{child.tail()}"
                )
        await asyncio.sleep(0.1)
    raise CliError("the local workers did not connect to the embedded coordinator")


async def local_async(settings: ClientSettings, paths: Sequence[str]) -> int:
    project = Path(settings.project_dir)
    data_dir = data_dir_of(settings, project)
    client_token = secrets.token_urlsafe(24)
    submission = Submission()

    async def work() -> int:
        async with embedded_fleet(settings, data_dir, client_token) as (url, fleet):
            slave_command = settings.slave_command
            if slave_command == DEFAULT_SLAVE_COMMAND:
                # `testfleet slave` with this interpreter, one exec fewer (the module is named, not imported).
                slave_command = f"exec {shlex.quote(sys.executable)} -m worker.slave"
            local_settings = msgspec.structs.replace(
                settings, coordinator=url, token=client_token, slave_command=slave_command
            )
            async with Client(url, client_token, retry_for_s=30.0) as client:
                try:
                    await _clear_leftovers(client)
                    await _workers_ready(client, fleet, settings.workers)
                    ref = await submit(client, local_settings, paths, submission)
                    return await follow_and_report(client, local_settings, ref, submission.started_at)
                except asyncio.CancelledError:
                    # Interrupted: record the taskset as cancelled while the coordinator still runs.
                    await asyncio.shield(cancel_submitted(client, submission))
                    raise

    async def interrupt() -> None:
        return

    try:
        return await guarded(work, interrupt)
    finally:
        say(f"logs of the embedded coordinator and workers: {data_dir / 'logs'}")


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("paths", nargs="*", metavar="PATHS", help="test files or directories (default: testpaths)")
    add_project_dir(parser)
    add_options(parser, TASKSET)
    add_options(parser, REPORT)
    add_options(parser, LOCAL)

    def run(args: argparse.Namespace) -> int:
        settings = settings_or_exit(args)
        return EXIT_ERROR if settings is None else asyncio.run(local_async(settings, args.paths))

    return run


__all__ = ["default_data_dir", "embedded_fleet", "local_async", "register"]
