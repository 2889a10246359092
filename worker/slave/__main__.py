"""`python -m worker.slave` (`testfleet slave`): one slave of the taskset that the TESTFLEET_* variables name.

By default it becomes pytest with the slave plugin (`os.execve`, so the process the worker signals and
waits for is pytest itself):

    python -m pytest -p worker.slave.plugin -o cache_dir=DIR-cache --basetemp=DIR --testfleet-slave [ARGS]

where ARGS are the words after `--` and DIR is the slave's own directory under the temporary
directory (`testfleet-<uid>/<hash of the working path>/slave-<SLAVE_NUMBER>`; pytest empties it when
the slave starts). DIR-cache is its own pytest cache, emptied before each start: the `cache` fixture
and options such as `--lf` or `--ff` in `addopts` work, within one slave's life. `--exec 'CMD {path}'`
runs each file as a command instead (see `worker.slave.exec_runner`). Either way files come from the
coordinator (`worker.slave.remote`).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final, NoReturn

from worker.slave.environment import (
    COORDINATOR_ENV,
    NUM_SLAVES_ENV,
    SLAVE_NAME_ENV,
    SLAVE_NUMBER_ENV,
    STACK_DUMP_ENV,
    STATE_FILE_ENV,
    TASKSET_ENV,
    TOKEN_ENV,
    WORKER_PID_ENV,
    WORKING_PATH_ENV,
    SlaveEnvError,
    slave_env,
)

USAGE_EXIT: Final = 2
KILL_GRACE_S: Final = 5.0
"""The exec runner's default (`worker.slave.exec_runner.KILL_GRACE_S`), not imported: the pytest slave
execs before it imports anything it does not need, its coordinator client included."""

_ENV_VARS: Final = (
    (COORDINATOR_ENV, "the coordinator's URL (required)"),
    (TASKSET_ENV, "the taskset to take files from (required)"),
    (TOKEN_ENV, "the worker role's token"),
    (SLAVE_NAME_ENV, "this slave's name (default: host name and pid)"),
    (WORKING_PATH_ENV, "the synced code (keys the slave's --basetemp)"),
    (STATE_FILE_ENV, "where the running trial is written for the worker"),
    (STACK_DUMP_ENV, "where SIGUSR2 and hard timeouts dump the stacks"),
    (WORKER_PID_ENV, "the worker; the slave stops once it is gone"),
    (SLAVE_NUMBER_ENV, "this slave's slot (keys its --basetemp)"),
    (NUM_SLAVES_ENV, "how many slaves its worker runs"),
)
_ENV_HELP: Final = "environment:\n" + "".join(f"  {name:<33} {text}\n" for name, text in _ENV_VARS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testfleet slave",
        usage="%(prog)s [--exec 'CMD {path}'] [-- PYTEST_ARGS...]",
        description="Run one slave: take files from the coordinator's queue until it has none.",
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--exec",
        dest="exec_template",
        metavar="'CMD {path}'",
        default=None,
        help="run each file as this command instead of with pytest ({path} is replaced, else appended)",
    )
    parser.add_argument(
        "--kill-grace",
        type=float,
        default=KILL_GRACE_S,
        metavar="SEC",
        help=f"with --exec: seconds from SIGTERM to SIGKILL of a file's process group (default {KILL_GRACE_S:g})",
    )
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our options, and the words after the first `--` (for pytest)."""
    words = list(argv)
    if "--" in words:
        cut = words.index("--")
        return words[:cut], words[cut + 1 :]
    return words, []


def basetemp_for(environ: Mapping[str, str]) -> Path:
    """The slave's own pytest --basetemp: one per working path and slot, reused (and emptied) by the next slave."""
    working = os.path.abspath(environ.get(WORKING_PATH_ENV) or os.getcwd())
    key = hashlib.sha1(working.encode(), usedforsecurity=False).hexdigest()[:12]
    slot = environ.get(SLAVE_NUMBER_ENV, "").strip()
    name = f"slave-{slot}" if slot.isdigit() else f"slave-pid{os.getpid()}"
    root = Path(tempfile.gettempdir()) / f"testfleet-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        info = root.lstat()
    except OSError:
        return Path(tempfile.mkdtemp(prefix="testfleet-slave-")) / name
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        # Someone else's directory (or a link): do not put test files in it.
        return Path(tempfile.mkdtemp(prefix="testfleet-slave-")) / name
    # pytest creates the basetemp itself but not its parent.
    (root / key).mkdir(mode=0o700, exist_ok=True)
    return root / key / name


def cache_dir_beside(basetemp: Path) -> Path:
    """The slave's own pytest cache: slaves sharing a checkout would race on its `.pytest_cache`."""
    return basetemp.with_name(f"{basetemp.name}-cache")


def _cache_disabled(words: Sequence[str]) -> bool:
    """Whether the words block pytest's cache plugin (then a `cache_dir` option is an unknown one)."""
    return any(
        word == "-pno:cacheprovider"
        or (word == "-p" and index + 1 < len(words) and words[index + 1] == "no:cacheprovider")
        for index, word in enumerate(words)
    )


def pytest_argv(environ: Mapping[str, str], extra: Sequence[str]) -> tuple[list[str], Path | None]:
    """The pytest command line of a slave, and the cache directory of its own it names (to empty first)."""
    argv = [sys.executable, "-m", "pytest", "-p", "worker.slave.plugin"]
    given_basetemp = any(word == "--basetemp" or word.startswith("--basetemp=") for word in extra)
    basetemp = None if given_basetemp else basetemp_for(environ)
    cache = None
    if not _cache_disabled(extra):
        cache = cache_dir_beside(basetemp or basetemp_for(environ))
        argv += ["-o", f"cache_dir={cache}"]
    if basetemp is not None:
        argv.append(f"--basetemp={basetemp}")
    return [*argv, "--testfleet-slave", *extra], cache


def _fail(message: str) -> NoReturn:
    print(f"testfleet slave: {message}", file=sys.stderr)
    raise SystemExit(USAGE_EXIT)


def _register_stack_dump(environ: Mapping[str, str]) -> BinaryIO | None:
    path = environ.get(STACK_DUMP_ENV)
    if not path:
        return None
    try:
        dump = open(path, "ab", buffering=0)  # noqa: SIM115 - lives as long as the process
    except OSError:
        return None
    faulthandler.register(signal.SIGUSR2, file=dump, all_threads=True)
    return dump


def run_exec_slave(template: str, kill_grace_s: float, environ: Mapping[str, str]) -> int:
    """The per-file command runner over the coordinator's queue; 0 once the queue is done."""
    from worker.slave.exec_runner import run_exec
    from worker.slave.remote import CoordinatorError, RemoteSource

    dump = _register_stack_dump(environ)
    source = RemoteSource(slave_env(environ))
    try:
        run_exec(source, template, kill_grace_s=kill_grace_s)
    except CoordinatorError as exc:
        print(str(exc), file=sys.stderr)
        return USAGE_EXIT
    finally:
        if dump is not None:
            faulthandler.unregister(signal.SIGUSR2)
            dump.close()
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    ours, extra = split_argv(sys.argv[1:] if argv is None else argv)
    options = build_parser().parse_args(ours)
    env = os.environ if environ is None else environ
    try:
        slave_env(env)
    except SlaveEnvError as exc:
        _fail(str(exc))
    if options.exec_template is not None:
        if extra:
            _fail("arguments after -- are for pytest; with --exec put them in the command")
        if not options.exec_template.strip():
            _fail("--exec needs a command, e.g. --exec 'bash {path}'")
        return run_exec_slave(options.exec_template, options.kill_grace, env)
    sys.stdout.flush()
    sys.stderr.flush()
    argv, cache = pytest_argv(env, extra)
    if cache is not None:
        # An empty cache: `--lf` or `--sw` from another run must not choose this slave's tests.
        shutil.rmtree(cache, ignore_errors=True)
    os.execve(sys.executable, argv, dict(env))  # noqa: S606 - argument list, no shell


if __name__ == "__main__":
    sys.exit(main())
