"""What a slave process takes from its surroundings: its environment, its worker's liveness, its output pipes.

The worker's side of this contract is in the docstring of `worker.slaves`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Final, NamedTuple

COORDINATOR_ENV: Final = "TESTFLEET_COORDINATOR"
TOKEN_ENV: Final = "TESTFLEET_TOKEN"  # noqa: S105 - the name of a variable
TASKSET_ENV: Final = "TESTFLEET_TASKSET_ID"
SLAVE_NAME_ENV: Final = "TESTFLEET_SLAVE_NAME"
STATE_FILE_ENV: Final = "TESTFLEET_SLAVE_STATE_FILE"
WORKER_PID_ENV: Final = "TESTFLEET_WORKER_PID"
NUM_SLAVES_ENV: Final = "NUM_SLAVES"
SLAVE_NUMBER_ENV: Final = "SLAVE_NUMBER"
WORKING_PATH_ENV: Final = "TESTFLEET_WORKING_PATH"
STACK_DUMP_ENV: Final = "TESTFLEET_SLAVE_STACK_DUMP_FILE"


class SlaveEnvError(ValueError):
    """The environment does not say which coordinator and taskset the slave serves."""


class SlaveEnv(NamedTuple):
    """What a slave learns from its environment (see `worker.slaves` for what the worker sets)."""

    coordinator_url: str
    taskset_id: int
    slave_name: str
    token: str | None = None
    state_file: str | None = None
    num_slaves: int = 1
    worker_pid: int | None = None


def slave_env(environ: Mapping[str, str]) -> SlaveEnv:
    """The slave's settings from `environ`; `SlaveEnvError` naming the variable that is missing or wrong."""
    url = environ.get(COORDINATOR_ENV, "").strip()
    if not url:
        raise SlaveEnvError(f"{COORDINATOR_ENV} is not set: the slave does not know its coordinator")
    raw_id = environ.get(TASKSET_ENV, "").strip()
    if not raw_id:
        raise SlaveEnvError(f"{TASKSET_ENV} is not set: the slave does not know its taskset")
    taskset_id = _positive(TASKSET_ENV, raw_id)
    name = environ.get(SLAVE_NAME_ENV, "").strip() or f"{socket.gethostname()}-{os.getpid()}"
    raw_slaves = environ.get(NUM_SLAVES_ENV, "").strip()
    raw_pid = environ.get(WORKER_PID_ENV, "").strip()
    return SlaveEnv(
        coordinator_url=url,
        taskset_id=taskset_id,
        slave_name=name[:255],
        token=environ.get(TOKEN_ENV) or None,
        state_file=environ.get(STATE_FILE_ENV) or None,
        num_slaves=_positive(NUM_SLAVES_ENV, raw_slaves) if raw_slaves else 1,
        worker_pid=_positive(WORKER_PID_ENV, raw_pid) if raw_pid else None,
    )


def _positive(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SlaveEnvError(f"{name} must be a positive integer, not {raw!r}") from None
    if value < 1:
        raise SlaveEnvError(f"{name} must be a positive integer, not {raw!r}")
    return value


def pipe_identities(*fds: int) -> set[tuple[int, int]]:
    """(device, inode) of those of `fds` that are pipes."""
    identities = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            info = os.fstat(fd)
            if stat.S_ISFIFO(info.st_mode):
                identities.add((info.st_dev, info.st_ino))
    return identities


def hold_pipes(*fds: int) -> list[int]:
    """A read end of each distinct pipe among `fds`, opened through /proc/self/fd (Linux), non-blocking.

    A pipe with a reader never fails a write with EPIPE. While the worker lives the slave never reads
    these, so the worker gets all of its output; once the worker is gone, what the slave wrote before it
    noticed waits in the pipe (up to the pipe's buffer) until `drain` discards it, instead of failing
    whatever wrote it: pytest's report of the test that just ended, or a log line. Without /proc: none.
    """
    readers: list[int] = []
    seen: set[tuple[int, int]] = set()
    for fd in fds:
        identity = pipe_identities(fd)
        if not identity or identity <= seen:
            continue
        with contextlib.suppress(OSError):
            readers.append(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            seen |= identity
    return readers


def drain(fd: int) -> bool:
    """Read and drop what waits in the non-blocking pipe `fd`; `False` once no writer is left (EOF)."""
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def silence_pipes(identities: set[tuple[int, int]], keep: Collection[int] = ()) -> int:
    """Point every descriptor of this process open on one of the pipes `identities` at /dev/null; how many.

    Once the worker that read the slave's output is gone, nothing reads its pipe, and pytest holds copies
    of the descriptors (capture saves them): all of them must write elsewhere. `keep` (the read ends of
    `hold_pipes`) stay as they are.
    """
    if not identities:
        return 0
    devnull = os.open(os.devnull, os.O_WRONLY)
    silenced = 0
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            with contextlib.suppress(OSError):
                info = os.fstat(fd)
                if fd != devnull and fd not in keep and (info.st_dev, info.st_ino) in identities:
                    os.dup2(devnull, fd, inheritable=os.get_inheritable(fd))
                    silenced += 1
    finally:
        os.close(devnull)
    return silenced


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/`pid`/stat after the command name (state first), if readable."""
    try:
        line = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return line.rpartition(b")")[2].split()


def start_time_of(pid: int) -> bytes | None:
    """The start time of `pid` from /proc (to tell it from a later process with the same pid), if known."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def process_alive(pid: int, start_time: bytes | None) -> bool:
    """Whether `pid` still names the process whose start time was `start_time` (a zombie is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc: the signal check is all there is
    if fields and fields[0] in (b"Z", b"X"):
        return False
    return start_time is None or len(fields) <= 19 or fields[19] == start_time
