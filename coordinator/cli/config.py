"""The CI client's settings: one frozen Struct built once from flags, `TESTFLEET_*` variables and `[tool.testfleet]`.

Precedence: a flag wins over its environment variable, which wins over the project's
`pyproject.toml` (`[tool.testfleet]`, keys with `_` or `-`), which wins over the default.
Tokens are never read from `pyproject.toml`: a secret does not belong in the repository.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec
from msgspec import Meta

from coordinator.cli.errors import CliError

DEFAULT_COORDINATOR: Final = "http://127.0.0.1:7878"
DEFAULT_SLAVE_COMMAND: Final = "testfleet slave"
RSYNC_NAME_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9._@+-]*$"

RsyncName = Annotated[str, Meta(min_length=1, max_length=255, pattern=RSYNC_NAME_PATTERN)]
Name = Annotated[str, Meta(min_length=1, max_length=255)]
PositiveInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Progress = Literal["auto", "live", "plain", "none"]


class ConfigError(CliError):
    """The flags, environment or `[tool.testfleet]` do not make valid settings."""


class ClientSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything `run`, `submit`, `wait` and `local` need, validated."""

    project_dir: str
    coordinator: str = DEFAULT_COORDINATOR
    token: str | None = None
    rsync_name: RsyncName
    worker_type: Name = "default"
    taskset_class: Name
    max_workers: PositiveInt = 1000
    max_trials: Annotated[int, Meta(ge=1, le=1000)] = 3
    setup: Annotated[str, Meta(max_length=65536)] = ""
    slave_command: Annotated[str, Meta(max_length=65536)] = DEFAULT_SLAVE_COMMAND
    unknown_spec_timeout_sec: PositiveInt = 600
    least_timeout_sec: PositiveInt = 60
    average_multiplier: Annotated[float, Meta(gt=0, le=1000)] = 2.0
    hard_timeout_margin_sec: Annotated[int, Meta(ge=0, le=2**30)] = 60
    junit_xml: str | None = None
    rsync_remote_path: str | None = None
    rsync_options: tuple[str, ...] = ()
    progress: Progress = "auto"
    disconnect_timeout_sec: Annotated[float, Meta(gt=0)] = 600.0
    # `testfleet local` only.
    workers: Annotated[int, Meta(ge=1, le=256)] = 1
    slaves: Annotated[int, Meta(ge=1, le=4096)] | None = None
    local_data_dir: str | None = None


class Option(NamedTuple):
    field: str
    flag: str
    metavar: str
    help: str
    kind: type = str
    from_project: bool = True
    """Whether `[tool.testfleet]` may set it."""

    @property
    def env(self) -> str:
        return f"TESTFLEET_{self.field.upper()}"


CONNECTION: Final = (
    Option("coordinator", "--coordinator", "URL", f"the coordinator's URL (default {DEFAULT_COORDINATOR})"),
    Option("token", "--token", "TOKEN", "the coordinator's client token", from_project=False),
)
TASKSET: Final = (
    Option("rsync_name", "--rsync-name", "NAME", "name of your code copy, one active taskset each (default $USER)"),
    Option("worker_type", "--worker-type", "TYPE", "run on workers of this type (default: default)"),
    Option("taskset_class", "--taskset-class", "CLASS", "history key of the run (default: the project's name)"),
    Option("max_workers", "--max-workers", "N", "use at most N workers (default 1000)", int),
    Option("max_trials", "--max-trials", "N", "attempts per file before it fails (default 3)", int),
    Option("setup", "--setup", "CMD", "setup command fed to `bash -ex` once per worker (default: none)"),
    Option("slave_command", "--slave-command", "CMD", f"command of each slave (default: {DEFAULT_SLAVE_COMMAND})"),
    Option(
        "unknown_spec_timeout_sec",
        "--unknown-spec-timeout-sec",
        "SEC",
        "soft timeout of a file without history (default 600)",
        int,
    ),
    Option("least_timeout_sec", "--least-timeout-sec", "SEC", "least soft timeout of a known file (default 60)", int),
    Option(
        "average_multiplier",
        "--average-multiplier",
        "X",
        "soft timeout of a known file = its average x X (default 2.0)",
        float,
    ),
    Option(
        "hard_timeout_margin_sec",
        "--hard-timeout-margin-sec",
        "SEC",
        "hard timeout = soft timeout + SEC (default 60)",
        int,
    ),
    Option(
        "rsync_remote_path",
        "--rsync-remote-path",
        "PATH",
        "sync code with `rsync -a --delete` into PATH/<rsync_name>/ instead of uploading a bundle",
    ),
    Option("rsync_options", "--rsync-options", "OPTIONS", "extra rsync options, split like a shell would"),
)
REPORT: Final = (
    Option("junit_xml", "--junit-xml", "FILE", "write a JUnit XML report to FILE"),
    Option("progress", "--progress", "MODE", "auto (a live bar on a terminal, lines in CI), live, plain or none"),
    Option(
        "disconnect_timeout_sec",
        "--disconnect-timeout-sec",
        "SEC",
        "give up (exit 2) after the coordinator has been unreachable this long (default 600)",
        float,
    ),
)
LOCAL: Final = (
    Option("workers", "--workers", "N", "local worker processes (default 1)", int),
    Option("slaves", "--slaves", "M", "slaves per worker (default: the CPU count)", int),
    Option(
        "local_data_dir",
        "--data-dir",
        "DIR",
        "where the embedded coordinator keeps its history (default: a per-project directory in the user's cache)",
    ),
)
ALL_OPTIONS: Final = (*CONNECTION, *TASKSET, *REPORT, *LOCAL)
PROJECT_KEYS: Final = frozenset(o.field for o in ALL_OPTIONS if o.from_project)


def add_project_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--project-dir",
        metavar="DIR",
        default=None,
        help="the project to run: its files are shipped and its pyproject.toml read (default: the current "
        "directory) (env TESTFLEET_PROJECT_DIR)",
    )


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    """One flag per option; its help names the environment variable behind it."""
    for option in options:
        parser.add_argument(
            option.flag,
            dest=option.field,
            metavar=option.metavar,
            default=None,
            help=f"{option.help} (env {option.env})",
        )


def project_dir_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Path:
    chosen = getattr(args, "project_dir", None) or environ.get("TESTFLEET_PROJECT_DIR") or os.getcwd()
    path = Path(chosen).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(f"the project directory {path} does not exist")
    return path


def read_pyproject(project_dir: Path) -> dict[str, Any]:
    """The project's pyproject.toml as a dict; empty when there is none."""
    path = project_dir / "pyproject.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def project_table(pyproject: Mapping[str, Any], where: str = "pyproject.toml") -> dict[str, Any]:
    """`[tool.testfleet]` with keys normalised to underscores; unknown keys are an error."""
    tool = pyproject.get("tool", {})
    table = tool.get("testfleet", {}) if isinstance(tool, dict) else {}
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [tool.testfleet] must be a table")
    normalised = {str(key).replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(set(normalised) - PROJECT_KEYS)
    if unknown:
        secret = [k for k in unknown if k == "token"]
        hint = " (tokens come from --token or TESTFLEET_TOKEN only)" if secret else ""
        raise ConfigError(
            f"{where}: unknown key(s) in [tool.testfleet]: {', '.join(unknown)}{hint}; "
            f"known: {', '.join(sorted(PROJECT_KEYS))}"
        )
    return normalised


def default_rsync_name(environ: Mapping[str, str]) -> str:
    """$USER made into a valid rsync_name."""
    user = environ.get("USER") or environ.get("LOGNAME")
    if not user:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "testfleet"
    name = re.sub(r"[^A-Za-z0-9._@+-]+", "-", user).lstrip(".-@+") or "testfleet"
    return name[:255]


def default_taskset_class(pyproject: Mapping[str, Any], project_dir: Path) -> str:
    project = pyproject.get("project", {})
    name = project.get("name") if isinstance(project, dict) else None
    return str(name) if isinstance(name, str) and name else project_dir.name or "default"


def _convert(option: Option, value: Any, source: str) -> Any:
    if option.field == "rsync_options":
        if isinstance(value, list):
            return tuple(str(v) for v in value)
        try:
            return tuple(shlex.split(str(value)))
        except ValueError as exc:
            raise ConfigError(f"{source}: {option.field}: {exc}") from exc
    if isinstance(value, str) and option.kind is not str:
        try:
            return option.kind(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {option.field} must be a {option.kind.__name__}, not {value!r}") from exc
    return value


def resolve(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    options: Iterable[Option] = ALL_OPTIONS,
) -> ClientSettings:
    """Settings from parsed flags over the environment over `[tool.testfleet]` over defaults."""
    project_dir = project_dir_from(args, environ)
    pyproject = read_pyproject(project_dir)
    table = project_table(pyproject, str(project_dir / "pyproject.toml"))
    values: dict[str, Any] = {"project_dir": str(project_dir)}
    for option in options:
        flag_value = getattr(args, option.field, None)
        if flag_value is not None:
            values[option.field] = _convert(option, flag_value, option.flag)
        elif environ.get(option.env):
            values[option.field] = _convert(option, environ[option.env], option.env)
        elif option.from_project and option.field in table:
            values[option.field] = _convert(option, table[option.field], "[tool.testfleet]")
    values.setdefault("rsync_name", default_rsync_name(environ))
    values.setdefault("taskset_class", default_taskset_class(pyproject, project_dir))
    try:
        settings = msgspec.convert(values, ClientSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
    _check(settings)
    return settings


def _check(settings: ClientSettings) -> None:
    """`ConfigError` for what would only fail later: text that is not UTF-8, a report file that cannot be."""
    for name in settings.__struct_fields__:
        value = getattr(settings, name)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"{name} is not valid UTF-8: {value!r}") from None
    if settings.junit_xml:
        path = Path(settings.project_dir) / settings.junit_xml
        if path.is_dir():
            raise ConfigError(f"--junit-xml: {path} is a directory")
    if settings.local_data_dir:
        data_dir = Path(os.path.expanduser(settings.local_data_dir))
        if data_dir.exists() and not data_dir.is_dir():
            raise ConfigError(f"--data-dir: {data_dir} is not a directory")
