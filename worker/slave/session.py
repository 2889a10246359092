"""An active slave's session: lazy per-file collection, the run loop, counting, timeouts and signals.

See `worker.slave.plugin` for how it is activated and what it promises.
"""

from __future__ import annotations

import contextlib
import enum
import faulthandler
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, Final, cast

import pytest

from protocol.types import SlaveStatus
from worker.slave.directories import TARGET, targeted
from worker.slave.source import FileTask, TaskRefused, TaskSource
from worker.slave.tally import FileTally
from worker.slave.watchdog import Watchdog

HARD_TIMEOUT_EXIT: Final = 42
REPORT_WAIT_S: Final = 5.0


def file_of(spec_path: str, root: Path) -> str:
    """The file (or directory) part of a spec path: all of it when that names a file, as a file whose
    name holds `::` does; else what comes before its first `::` (`path::test` names one test)."""
    if "::" not in spec_path or (root / spec_path).is_file():
        return spec_path
    return spec_path.split("::", 1)[0]


def collect_argument(spec_path: str, root: Path) -> str:
    """What to hand `perform_collect` for a spec path.

    pytest reads `[...]` in an argument as a parametrization and `::` as a test's name, and refuses the
    first in a path: a file whose path holds either is reached through its nearest directory without
    them (the targeted directory collectors, given the file as the target, then enter only the way to it).
    """
    path = file_of(spec_path, root)
    if path != spec_path:
        return spec_path
    parts = path.split("/")
    odd = next((i for i, part in enumerate(parts) if "[" in part or "::" in part), None)
    return path if odd is None else "/".join(parts[:odd]) or "."


def _clear_stop(session: pytest.Session) -> None:
    """Unset `session.shouldstop`, which pytest 8 refuses through its setter (it warns and keeps it)."""
    if "_shouldstop" in vars(session):
        session._shouldstop = False  # no public way: the runner reads it per item, so clearing is safe
    else:
        session.shouldstop = False


_FORK_HOOK: list[Callable[[], None]] = []


def _run_fork_hook() -> None:
    for hook in _FORK_HOOK:
        hook()


def _at_fork_in_child(hook: Callable[[], None]) -> None:
    """Run `hook` in the child of every later fork; the latest hook replaces the one before (a hook
    registered with the interpreter cannot be taken back, so one is registered, once)."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_run_fork_hook)
    _FORK_HOOK[:] = [hook]


class _Stopped(BaseException):
    """SIGTERM while the slave waited for work."""


class _State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    RUNNING = "running"
    REPORTING = "reporting"


class _FileEnd(enum.Enum):
    COMPLETE = "complete"
    INTERRUPTED = "interrupted"


class SlaveSession:
    """The hooks of an active slave: lazy per-file collection, the run loop, counting, timeouts, signals."""

    def __init__(self, config: pytest.Config, source: TaskSource, *, stack_path: Path | None = None) -> None:
        """`stack_path`: where stack dumps go; by default a file named after the pid in the
        temporary directory, removed when the slave ends normally."""
        self._config = config
        self._source = source
        self._stack_owned = stack_path is None
        self._stack_path = stack_path or Path(tempfile.gettempdir()) / f"testfleet-slave-{os.getpid()}.stacks"
        self._stack_file: BinaryIO | None = None
        self._watchdog = Watchdog(self._on_soft_deadline, self._on_hard_deadline)
        self._directories: dict[Path, pytest.Collector] = {}
        self._collected = 0
        # Per file collected: the modules of that file its collection imported (a retry imports them afresh).
        self._imported_by: dict[str, list[str]] = {}
        # -x and --maxfail stop a file, not the slave: pytest's own check (which cannot be
        # undone once it fires) is turned off and the slave counts failures per file.
        self._maxfail: int = config.option.maxfail
        config.option.maxfail = 0
        self._current: tuple[FileTask, FileTally] | None = None
        self._state = _State.STARTING
        self._phase_active = False
        self._terms = 0
        self._main_ident = threading.get_ident()
        self._signals_installed = False
        self._finished_normally = False

    # -- collection: nothing up front, one file at a time -------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> bool:
        _keep_pending_conftests(session)
        return True

    @pytest.hookimpl(tryfirst=True, specname="pytest_collect_directory")
    def pytest_collect_directory_reused(self, path: Path, parent: pytest.Collector) -> pytest.Collector | None:
        # Since pytest 9.1 conftest fixtures belong to the Directory node that collected the
        # conftest (by identity), and every perform_collect builds fresh Directory nodes:
        # handing back the first node of each directory keeps those fixtures visible. The
        # nodes kept are the targeted twins of pytest's (see worker.slave.directories).
        known = self._directories.get(path)
        return known if known is not None and known.parent is parent else None

    @pytest.hookimpl(wrapper=True, specname="pytest_collect_directory")
    def pytest_collect_directory_remembered(
        self, path: Path, parent: pytest.Collector
    ) -> Generator[None, pytest.Collector | None, pytest.Collector | None]:
        collector = yield
        if collector is not None:
            collector = targeted(collector, parent)
            self._directories[path] = collector
        return collector

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if self._current is not None:
            self._current[1].add_collect_report(report)

    def pytest_deselected(self, items: Sequence[pytest.Item]) -> None:
        if self._current is not None:
            self._current[1].deselected += len(items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self._current is not None:
            self._current[1].add_test_report(report, self._category(report))

    def _category(self, report: pytest.TestReport) -> str:
        """The summary category pytest counts a report under; its own reckoning when no plugin gives one
        (the terminal plugin gives it, and `-p no:terminal` takes that away)."""
        status = self._config.hook.pytest_report_teststatus(report=report, config=self._config)
        if status:
            return str(status[0])
        if hasattr(report, "wasxfail"):
            return "xfailed" if report.skipped else "xpassed"
        if report.failed and report.when != "call":
            return "error"
        return report.outcome

    # -- the phases a soft timeout may interrupt ------------------------------------

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        self._phase_active = True
        try:
            yield
        finally:
            self._phase_active = False

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        with self._interruptible():
            return (yield)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        with self._interruptible():
            return (yield)

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        with self._interruptible():
            return (yield)

    # -- the run loop -----------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        self._main_ident = threading.get_ident()
        restore = self._install_signals(session)
        self._watchdog.start()
        try:
            self._loop(session)
        finally:
            self._watchdog.stop()
            restore()
        return True

    def _loop(self, session: pytest.Session) -> None:
        while not session.shouldstop:
            task: FileTask | None = None
            try:
                self._state = _State.IDLE
                task = self._source.next_task()
                self._state = _State.REPORTING
                if task is None:
                    break
                end = self._run_file(session, task)
            except TaskRefused:
                continue  # nothing ran: the next file
            except _Stopped:
                if task is not None:
                    self._source.give_back(task)
                break
            except KeyboardInterrupt:
                self._watchdog.disarm()
                self._current = None
                if task is not None:
                    self._source.give_back(task)
                self._source.close(SlaveStatus.NORMAL_EXIT)
                raise
            if end is _FileEnd.INTERRUPTED:
                self._source.give_back(task)
        self._state = _State.REPORTING
        self._teardown_session(session)
        self._source.close(SlaveStatus.NORMAL_EXIT)
        self._finished_normally = True

    def _run_file(self, session: pytest.Session, task: FileTask) -> _FileEnd:
        tally = FileTally(task.spec_path)
        session.testsfailed = 0
        self._state = _State.RUNNING
        self._source.start(task)
        self._current = (task, tally)
        self._watchdog.arm(task.soft_timeout_sec, task.hard_timeout_sec)
        items = self._collect(session, task, tally)
        end = self._run_items(session, items, tally)
        self._teardown_file(session, tally)
        if session.shouldstop and not self._terms:
            # Asked by a plugin or option (`--sw` at a failure, say): that ends this file, as -x does,
            # not the slave.
            tally.note(f"pytest was asked to stop ({session.shouldstop}); the rest of {task.spec_path} did not run")
            _clear_stop(session)
            if self._terms:
                session.shouldstop = "testfleet: SIGTERM"  # one that came while the other was cleared
        timed_out = self._watchdog.disarm()
        self._state = _State.REPORTING
        self._current = None
        if end is _FileEnd.INTERRUPTED:
            return end
        if timed_out:
            tally.note(f"soft timeout of {task.soft_timeout_sec}s reached; the rest of {task.spec_path} did not run")
        self._source.finish(task, tally.result(timed_out=timed_out))
        return end

    def _collect(self, session: pytest.Session, task: FileTask, tally: FileTally) -> Sequence[pytest.Item]:
        items: Sequence[pytest.Item] = ()
        # The path as perform_collect makes it absolute (no symlinks resolved), without a test's "::" part.
        root = self._config.invocation_params.dir
        target = os.path.abspath(root / file_of(task.spec_path, root))
        self._config.stash[TARGET] = target
        for name in self._imported_by.pop(target, ()):
            sys.modules.pop(name, None)
        modules_before = set(sys.modules)
        try:
            with self._interruptible():
                items = session.perform_collect([collect_argument(task.spec_path, root)])
        except pytest.UsageError as exc:
            # After a failed collect report this only repeats that nothing was found.
            if not tally.load_error:
                tally.add_load_error(f"ERROR collecting {task.spec_path}", "\n".join(map(str, exc.args)))
        except (Exception, pytest.fail.Exception) as exc:
            tally.add_load_error(f"ERROR collecting {task.spec_path}", "".join(traceback.format_exception(exc)))
        finally:
            self._config.stash[TARGET] = None
        imported = set(sys.modules) - modules_before
        if tally.load_error:
            self._forget_half_imports(imported, target)
        self._imported_by[target] = self._modules_of(target, imported)
        # perform_collect counts one file; the terminal's progress wants the slave's running total.
        self._collected += len(items)
        session.testscollected = self._collected
        if not items and not tally.load_error and not tally.pending and not self._watchdog.soft_fired:
            deselected = f" ({tally.deselected} deselected)" if tally.deselected else ""
            tally.note(f"no tests ran in {task.spec_path}{deselected}")
        return items

    def _modules_of(self, target: str, names: set[str]) -> list[str]:
        """Those of the modules `names` (still imported, and not plugins pytest registered) whose file is
        `target`.

        A file collected again in this slave (a retry) is imported afresh, as in a new process: its
        module's state, and what pytest keeps on its marks (parametrize ids), would carry over. Only what
        collecting that file imported: a module that other code imported first (a library module collected
        for its doctests) stays, as it would under pytest, and so does a conftest registered as a plugin.
        """
        plugins = self._config.pluginmanager
        found = []
        for name in names:
            module = sys.modules.get(name)
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and os.path.abspath(path) == target and not plugins.is_registered(module):
                found.append(name)
        return found

    def _forget_half_imports(self, imported: set[str], target: str) -> None:
        """Drop from sys.modules the test module and conftests whose import this collection began
        (`imported`) and did not finish.

        pytest's importlib import mode puts a module in sys.modules before running it and leaves it there
        when it raises; its next import of the same path returns that half-run module. A retry of the file
        in this slave would then collect only what was defined before the error, and pass. (Plain pytest
        never imports a file twice in one process; Python's own import, the default mode, removes a
        module that failed.) A conftest that pytest registered as a plugin stays.
        """
        plugins = self._config.pluginmanager
        unfinished = self._modules_of(target, imported)
        for name in imported:
            module = sys.modules.get(name)
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and os.path.basename(path) == "conftest.py" and not plugins.is_registered(module):
                unfinished.append(name)
        for name in unfinished:
            sys.modules.pop(name, None)

    def _run_items(self, session: pytest.Session, items: Sequence[pytest.Item], tally: FileTally) -> _FileEnd:
        for index, item in enumerate(items):
            if self._watchdog.soft_fired or (self._maxfail and tally.failed >= self._maxfail):
                return _FileEnd.COMPLETE
            if session.shouldstop:
                return _FileEnd.INTERRUPTED if self._terms else _FileEnd.COMPLETE
            # For the last item of the file the session stands in as the next item: its
            # listchain() is [session], so teardown_exact pops module, class and package nodes
            # and keeps the session (and its fixtures) on the stack.
            nextitem = items[index + 1] if index + 1 < len(items) else cast(pytest.Item, session)
            try:
                item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            except pytest.fail.Exception:
                # A soft timeout that landed just as a phase ended, outside pytest's own catch.
                return _FileEnd.COMPLETE
            except pytest.exit.Exception as exc:
                # The test ended pytest's session its own way: here that ends its file, as an error of the
                # file, and the slave goes on with the next (a slave that stopped would leave its file
                # unfinished, and its worker would count a failed slave).
                reason = f"pytest.exit() in {item.nodeid}: {exc.msg}"
                tally.add_error(f"pytest.exit() in {item.nodeid}", reason + "\n", when="call", message=reason)
                return _FileEnd.COMPLETE
            finally:
                self._phase_active = False
        return _FileEnd.COMPLETE

    def _teardown_file(self, session: pytest.Session, tally: FileTally) -> None:
        """Pop what a cut-short file left above the session, or the next file's setup would assert."""
        try:
            with self._interruptible():
                session._setupstate.teardown_exact(cast(pytest.Item, session))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            tally.add_error(f"ERROR at teardown of {tally.spec_path}", "".join(traceback.format_exception(exc)))

    def _teardown_session(self, session: pytest.Session) -> None:
        try:
            session._setupstate.teardown_exact(None)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            # By now the taskset has its verdict (a slave learns that no file is left only once every file
            # is decided): the error can only go to the worker's log, through the slave's real stderr, which
            # pytest's capture holds at this point.
            text = "testfleet: a session fixture's teardown failed\n" + "".join(traceback.format_exception(exc))
            capture = session.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                os.write(2, text.encode(errors="backslashreplace"))

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # The tests' verdicts travel as trials; the exit code only says how the slave ended.
        if self._finished_normally:
            session.exitstatus = pytest.ExitCode.OK

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self._stack_file is not None:
            self._stack_file.close()
            self._stack_file = None
            if self._stack_owned and self._finished_normally:
                self._stack_path.unlink(missing_ok=True)

    # -- signals and deadlines ----------------------------------------------------------

    def _install_signals(self, session: pytest.Session) -> Callable[[], None]:
        self._stack_path.parent.mkdir(parents=True, exist_ok=True)
        self._stack_file = open(self._stack_path, "w+b", buffering=0)  # noqa: SIM115 - lives as long as the slave
        faulthandler.register(signal.SIGUSR2, file=self._stack_file, all_threads=True)
        if threading.current_thread() is not threading.main_thread():
            # Signal handlers belong to the main thread: no soft timeout and no SIGTERM handling here.
            return lambda: faulthandler.unregister(signal.SIGUSR2)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self._terms += 1
            if self._terms > 1:
                raise KeyboardInterrupt
            if self._state is _State.IDLE:
                raise _Stopped
            session.shouldstop = "testfleet: SIGTERM"

        def on_sigusr1(signum: int, frame: FrameType | None) -> None:
            __tracebackhide__ = True
            if self._phase_active and self._watchdog.soft_fired:
                task = self._current[0] if self._current else None
                limit = f" of {task.soft_timeout_sec}s" if task else ""
                pytest.fail(f"testfleet: soft timeout{limit} reached", pytrace=True)

        previous: dict[int, Any] = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm),
            signal.SIGUSR1: signal.signal(signal.SIGUSR1, on_sigusr1),
        }
        self._signals_installed = True
        ours = {signal.SIGTERM: on_sigterm, signal.SIGUSR1: on_sigusr1}

        def restore() -> None:
            self._signals_installed = False
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            faulthandler.unregister(signal.SIGUSR2)

        def in_forked_child() -> None:
            # A test's forked child (multiprocessing's default on Linux) is no slave: a SIGTERM must end
            # it as it would under plain pytest (`Process.terminate()`), not stop a session it has not got.
            if not self._signals_installed:
                return
            self._signals_installed = False
            for signum, handler in ours.items():
                if signal.getsignal(signum) is handler:
                    signal.signal(signum, signal.SIG_DFL)
            faulthandler.unregister(signal.SIGUSR2)

        _at_fork_in_child(in_forked_child)
        return restore

    def _on_soft_deadline(self) -> None:
        if self._signals_installed:
            signal.pthread_kill(self._main_ident, signal.SIGUSR1)

    def _on_hard_deadline(self) -> None:
        current = self._current
        stacks = self._dump_stacks()
        if current is not None:
            task, tally = current
            # The test that was running counts as failed, as it does at a soft timeout.
            title = f"hard timeout of {task.hard_timeout_sec}s in {task.spec_path}"
            tally.add_error(
                title,
                f"testfleet: the slave exits with {HARD_TIMEOUT_EXIT}. Stacks of all threads:\n{stacks}",
                when="call",
                message=title,
            )
            result = tally.result(timed_out=True)
            _call_bounded(lambda: self._source.finish(task, result))
        _call_bounded(lambda: self._source.close(SlaveStatus.TIMEOUT_EXIT))
        os._exit(HARD_TIMEOUT_EXIT)

    def _dump_stacks(self) -> str:
        if self._stack_file is None:
            return ""
        fd = self._stack_file.fileno()
        start = os.lseek(fd, 0, os.SEEK_END)
        faulthandler.dump_traceback(file=self._stack_file, all_threads=True)
        end = os.lseek(fd, 0, os.SEEK_END)
        return os.pread(fd, end - start, start).decode("utf-8", errors="replace")


def _call_bounded(call: Callable[[], None]) -> None:
    """Run `call` on a helper thread and wait at most REPORT_WAIT_S for it."""
    helper = threading.Thread(target=call, name="testfleet-report", daemon=True)
    helper.start()
    helper.join(REPORT_WAIT_S)


class _PendingConftests(dict[Path, object]):
    """A dict that survives `clear()`."""

    def clear(self) -> None:
        # pytest empties this at the end of each perform_collect; a conftest loaded at start-up
        # whose directory the first file did not enter would never get its fixtures registered.
        return


def _keep_pending_conftests(session: pytest.Session) -> None:
    manager = session._fixturemanager
    pending = getattr(manager, "_pending_conftests", None)
    if isinstance(pending, dict):
        manager._pending_conftests = _PendingConftests(pending)  # type: ignore[misc]
