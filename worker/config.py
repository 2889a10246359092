"""The worker's settings: one frozen Struct built once from flags and `TESTFLEET_*` variables."""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shlex
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Final, NamedTuple

import msgspec
from msgspec import Meta

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$"

WorkerName = Annotated[str, Meta(min_length=1, max_length=200, pattern=NAME_PATTERN)]


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `python -m worker` needs, validated."""

    coordinator_url: str
    """The coordinator's HTTP base, e.g. `http://127.0.0.1:7878` (no trailing slash, no `/ws`)."""
    name: WorkerName
    worker_type: Annotated[str, Meta(min_length=1, max_length=255)] = "default"
    slaves: Annotated[int, Meta(ge=1, le=4096)] = 1
    work_dir: str
    rsync_remote_path: str | None = None
    rsync_options: tuple[str, ...] = ()
    token: str | None = None
    slave_grace_sec: Annotated[float, Meta(ge=0)] = 5.0
    log_level: str = "info"
    heartbeat_sec: Annotated[float, Meta(gt=0, lt=10)] = 5.0
    """How often `current_taskset` is repeated; the coordinator wants one at least every 10 s."""
    hard_timeout_margin_sec: Annotated[float, Meta(ge=0)] = 5.0
    """How long past a trial's hard timeout the worker waits for the slave to end it itself."""
    stack_dump_wait_sec: Annotated[float, Meta(ge=0)] = 1.0
    """Time between SIGUSR2 (stack dump) and SIGKILL of a slave past its hard timeout."""

    def bundle_url(self, rsync_name: str) -> str:
        """Where the coordinator serves the code bundle of `rsync_name`."""
        return f"{self.coordinator_url}/api/v1/bundles/{urllib.parse.quote(rsync_name, safe='')}"

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir)


class _Option(NamedTuple):
    flag: str
    metavar: str
    env: str
    help: str


_OPTIONS: Final = (
    _Option(
        "--coordinator", "URL", "TESTFLEET_COORDINATOR", "the coordinator's URL, e.g. http://127.0.0.1:7878 (required)"
    ),
    _Option(
        "--name", "NAME", "TESTFLEET_WORKER_NAME", "this worker's name (default: host name + '-' + a random suffix)"
    ),
    _Option(
        "--worker-type", "TYPE", "TESTFLEET_WORKER_TYPE", "tasksets of this worker_type are run here (default: default)"
    ),
    _Option("--slaves", "N", "TESTFLEET_SLAVES", "slave processes per taskset (default: the CPU count)"),
    _Option(
        "--work-dir",
        "DIR",
        "TESTFLEET_WORK_DIR",
        "where code is synced (default: ~/.cache/testfleet/work, else /tmp/testfleet-work-UID)",
    ),
    _Option(
        "--rsync-remote-path",
        "PATH",
        "TESTFLEET_RSYNC_REMOTE_PATH",
        "sync code with rsync from PATH/<rsync_name>/ instead of downloading the coordinator's bundle",
    ),
    _Option(
        "--rsync-options",
        "OPTIONS",
        "TESTFLEET_RSYNC_OPTIONS",
        "extra rsync options, split like a shell would (--rsync-options='-z --exclude=.git')",
    ),
    _Option("--token", "TOKEN", "TESTFLEET_TOKEN", "the worker role's token"),
    _Option(
        "--slave-grace-sec",
        "SEC",
        "TESTFLEET_WORKER_SLAVE_GRACE_SEC",
        "seconds between SIGTERM and SIGKILL when stopping slaves (default: 5)",
    ),
    _Option(
        "--heartbeat-sec",
        "SEC",
        "TESTFLEET_WORKER_HEARTBEAT_SEC",
        "seconds between heartbeats, below 10 (default: 5); keep it at or below the coordinator's "
        "--heartbeat-sec, which drops a worker silent for 3 of its periods",
    ),
    _Option("--log-level", "LEVEL", "TESTFLEET_LOG_LEVEL", f"one of {', '.join(LOG_LEVELS)} (default: info)"),
)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The worker's flags; each also read from the environment variable its help names."""
    parser = parser or argparse.ArgumentParser(
        prog="testfleet worker",
        description="Run a worker daemon: sync code, run the setup command and keep slaves busy.",
    )
    for option in _OPTIONS:
        parser.add_argument(option.flag, metavar=option.metavar, default=None, help=f"{option.help} [env {option.env}]")
    return parser


def default_name() -> str:
    """The host name (made safe for a name) plus a short random suffix."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip(".-_") or "worker"
    return f"{host[:180]}-{secrets.token_hex(3)}"


def default_work_dir() -> str:
    """`~/.cache/testfleet/work` when the home directory exists, else a per-user directory under /tmp."""
    try:
        home = Path.home()
    except (KeyError, RuntimeError):
        home = None
    if home is not None and home.is_dir() and os.access(home, os.W_OK):
        return str(home / ".cache" / "testfleet" / "work")
    return f"/tmp/testfleet-work-{os.getuid()}"


def normalize_coordinator_url(url: str) -> str:
    """An `http(s)://host[:port][/prefix]` base; `ws(s)://` and a trailing `/ws` are accepted too."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the coordinator URL must be http(s)://host[:port], not {url!r}")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/ws")
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


class SettingsError(ValueError):
    """The flags or environment do not make valid settings."""


# The coordinator's variable of the same flag name: its re-bind grace, not the worker's stop wait.
COORDINATOR_GRACE_ENV: Final = "TESTFLEET_SLAVE_GRACE_SEC"


def notices(environ: Mapping[str, str]) -> list[str]:
    """What the worker should warn about in its environment: settings it reads no longer, or never did."""
    if environ.get(COORDINATOR_GRACE_ENV) and not environ.get("TESTFLEET_WORKER_SLAVE_GRACE_SEC"):
        return [
            f"{COORDINATOR_GRACE_ENV} is the coordinator's re-bind grace and is ignored here; the worker's "
            "wait between SIGTERM and SIGKILL is TESTFLEET_WORKER_SLAVE_GRACE_SEC (or --slave-grace-sec)"
        ]
    return []


def settings_from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """Parse flags (over environment variables, over defaults) into settings; `SettingsError` on bad values."""
    args = build_parser().parse_args(argv)
    return settings_from_namespace(args, os.environ if environ is None else environ)


def settings_from_namespace(args: argparse.Namespace, environ: Mapping[str, str]) -> WorkerSettings:
    """Settings from parsed flags, falling back to the environment."""

    def pick(option: _Option) -> str | None:
        value: str | None = getattr(args, option.flag.lstrip("-").replace("-", "_"))
        if value is None:
            value = environ.get(option.env) or None
        return value

    raw = {option.flag: pick(option) for option in _OPTIONS}
    coordinator = raw["--coordinator"]
    if coordinator is None:
        raise SettingsError("--coordinator (or TESTFLEET_COORDINATOR) is required")
    try:
        values: dict[str, object] = {
            "coordinator_url": normalize_coordinator_url(coordinator),
            "name": raw["--name"] or default_name(),
            "worker_type": raw["--worker-type"] or "default",
            "slaves": int(raw["--slaves"]) if raw["--slaves"] else (os.cpu_count() or 1),
            "work_dir": str(Path(raw["--work-dir"]).expanduser().absolute())
            if raw["--work-dir"]
            else default_work_dir(),
            "rsync_remote_path": raw["--rsync-remote-path"],
            "rsync_options": tuple(shlex.split(raw["--rsync-options"] or "")),
            "token": raw["--token"],
            "slave_grace_sec": float(raw["--slave-grace-sec"]) if raw["--slave-grace-sec"] else 5.0,
            "heartbeat_sec": float(raw["--heartbeat-sec"]) if raw["--heartbeat-sec"] else 5.0,
            "log_level": (raw["--log-level"] or "info").lower(),
        }
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc
    if values["log_level"] not in LOG_LEVELS:
        raise SettingsError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {values['log_level']!r}")
    try:
        return msgspec.convert(values, WorkerSettings)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"invalid worker settings: {exc}") from exc


WORKER_ENV_VARS: Final = frozenset(option.env for option in _OPTIONS)
"""The worker's own variables; its children get them rewritten or not at all."""
