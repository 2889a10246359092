"""The queue-driven pytest slave: files from a `TaskSource`, one long session, one trial per file.

Loaded with `python -m pytest -p worker.slave.plugin -o cache_dir=DIR-cache --basetemp=DIR` (a cache
and a basetemp of the slave's own: slaves share a checkout), it only registers its options until
activated by one of them:

- `--testfleet-slave`: files come from the coordinator, through the `TaskSource` that
  `worker.slave.remote.make_source(config)` builds from the TESTFLEET_* variables;
- `--testfleet-files=LIST`: files come from a list (`spec_path [hard_s soft_s]` a line), results go
  to `--testfleet-results=FILE` as JSON lines; for debugging, tests and benchmarks.

Give option values with `=`: pytest finds its rootdir before it loads `-p` plugins, so a value in
a separate word would be taken for a test path.

An environment variable alone never activates it: the suite under test may itself start pytest
with this plugin in child processes, and those inherit the slave's environment.

Once active it replaces collection and the run loop. Each file is collected on its own
(`session.perform_collect([path])`), so a broken conftest or import only errors the files it
touches; its items go through the runtest hook (other plugins still wrap each test); at the end of
the file everything below the session is torn down, so module, class and package fixtures live
one file and session fixtures the slave's whole life.

Counts, by pytest's own summary categories: passed = passed + xpassed; pending = skipped +
xfailed (a module skipped as a whole counts one); failed = failed (strict xpass included) +
errors (setup, teardown, and one per collector that failed to collect). The trial status
follows PROTOCOL.md §7; a file that runs no test at all (none defined, all deselected) is
`pending` with 0/0/0 and a note. A trial's stdout holds, in the order they happened, each
collection error and each failing test's report (traceback) with its captured stdout and log
sections (from its last report, which repeats the earlier phases'), then our own `testfleet:`
notes, and it ends with the block of per-test records (`[testfleet:cases]`, then a JSON line for
each report counted, PROTOCOL.md §2); its stderr holds the failing tests' captured stderr. Each is
kept to 4 MiB (head and tail; the record block is kept whole). -x and --maxfail stop a file at that
many failures, never the slave; so does a stop a plugin asks for (`--sw` at a failure).

Soft timeout: a watchdog thread sends SIGUSR1 to the main thread (every second until the file
ends), whose handler fails the running test phase or collection; the rest of the file is
skipped and the trial is `timeout`. Code that swallows BaseException or never releases the GIL
outlasts it and meets the hard timeout. Hard timeout: the stacks of
all threads go to the slave's stack file and into the trial's output, the trial is reported as
`timeout`, and the process exits with 42. SIGUSR2 dumps the stacks into the stack file at any time.
SIGTERM lets the running test finish, gives the file back and ends the slave; a second one raises
KeyboardInterrupt. The process exits 0 whenever the slave ran to its end, whatever the tests did.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

import pytest

from worker.slave.environment import STACK_DUMP_ENV
from worker.slave.session import SlaveSession
from worker.slave.source import ListSource, TaskSource, parse_task_list

STACK_FILE_ENV: Final = "TESTFLEET_STACK_FILE"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testfleet", "testfleet slave")
    group.addoption(
        "--testfleet-slave",
        action="store_true",
        default=False,
        help="run as a testfleet slave, taking files from the coordinator named by the TESTFLEET_* variables",
    )
    group.addoption(
        "--testfleet-files",
        metavar="LIST",
        default=None,
        help="run as a slave over the files listed in LIST, one `spec_path [hard_s soft_s]` a line (debugging aid)",
    )
    group.addoption(
        "--testfleet-results",
        metavar="FILE",
        default=None,
        help="with --testfleet-files: append each trial event to FILE as a JSON line",
    )
    group.addoption(
        "--testfleet-hard-timeout",
        type=int,
        default=1800,
        metavar="SEC",
        help="with --testfleet-files: hard timeout of lines that name none (default 1800)",
    )
    group.addoption(
        "--testfleet-soft-timeout",
        type=int,
        default=600,
        metavar="SEC",
        help="with --testfleet-files: soft timeout of lines that name none (default 600)",
    )
    group.addoption(
        "--testfleet-stack-file",
        metavar="FILE",
        default=None,
        help=f"where the slave writes stack dumps (SIGUSR2, hard timeout) [env {STACK_FILE_ENV}; with "
        f"--testfleet-slave also {STACK_DUMP_ENV}, the worker's; default a file named after the pid in "
        "the temporary directory, removed on a normal exit]",
    )


def pytest_configure(config: pytest.Config) -> None:
    source = make_source(config)
    if source is not None:
        # A worker reads the dump of a slave it killed from the path it gave (worker.slaves).
        worker_file = os.environ.get(STACK_DUMP_ENV) if config.getoption("testfleet_slave") else None
        stack_file = config.getoption("testfleet_stack_file") or worker_file or os.environ.get(STACK_FILE_ENV)
        session = SlaveSession(config, source, stack_path=Path(stack_file) if stack_file else None)
        config.pluginmanager.register(session, "testfleet-slave-session")


def make_source(config: pytest.Config) -> TaskSource | None:
    """The source the options ask for, or `None` when the slave is not activated."""
    files = config.getoption("testfleet_files")
    remote = config.getoption("testfleet_slave")
    if files is not None and remote:
        raise pytest.UsageError("--testfleet-files and --testfleet-slave exclude each other")
    if files is not None:
        try:
            tasks = parse_task_list(
                Path(files).read_text(encoding="utf-8"),
                hard_timeout_sec=config.getoption("testfleet_hard_timeout"),
                soft_timeout_sec=config.getoption("testfleet_soft_timeout"),
            )
        except (OSError, ValueError) as exc:
            raise pytest.UsageError(f"--testfleet-files {files}: {exc}") from exc
        return ListSource(tasks, config.getoption("testfleet_results"))
    if remote:
        try:
            module = importlib.import_module("worker.slave.remote")
        except ImportError as exc:
            raise pytest.UsageError(f"--testfleet-slave: the coordinator source is unavailable ({exc})") from exc
        factory = cast(Callable[[pytest.Config], TaskSource], module.make_source)
        return factory(config)
    return None
