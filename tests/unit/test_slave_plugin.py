"""The pytest slave, run as real processes over the fixture suites with a list source."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.cli.cases import MARKER, split_output
from protocol.types import SlaveStatus, TrialStatus
from worker.slave.output import bound_with_block
from worker.slave.remote import fit_outputs
from worker.slave.source import (
    CloseEvent,
    FileResult,
    FileTask,
    FinishEvent,
    GiveBackEvent,
    ListEvent,
    ListSource,
    StartEvent,
    parse_task_list,
    read_events,
)
from worker.slave.tally import COUNT_OF_CATEGORY, decide_status
from worker.slave.watchdog import Watchdog

SUITES = Path(__file__).resolve().parents[1] / "fixtures" / "suites"
SLAVE_TIMEOUT_S = 60


@dataclass
class SlaveRun:
    returncode: int
    stdout: str
    stderr: str
    events: list[ListEvent]
    stack_file: Path

    def finished(self) -> list[tuple[str, FileResult]]:
        return [(e.spec_path, e.result) for e in self.events if isinstance(e, FinishEvent)]

    def result(self, spec_path: str) -> FileResult:
        results = [result for path, result in self.finished() if path == spec_path]
        assert len(results) == 1, (spec_path, self.events, self.stdout[-3000:])
        return results[0]

    def counts(self, spec_path: str) -> tuple[TrialStatus, int, int, int]:
        result = self.result(spec_path)
        return result.status, result.passed, result.pending, result.failed

    def closed(self) -> SlaveStatus | None:
        closes = [e.status for e in self.events if isinstance(e, CloseEvent)]
        assert len(closes) <= 1
        return closes[0] if closes else None


def copy_suites(tmp_path: Path, *names: str) -> Path:
    """The named fixture suites copied side by side under `tmp_path/suites`; runs never touch the tree."""
    root = tmp_path / "suites"
    for name in names:
        shutil.copytree(SUITES / name, root / name)
    return root


def slave_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TESTFLEET_"))}
    env.update(extra)
    return env


def slave_command(tmp_path: Path, tasks: list[str], *extra_args: str, cache: bool = False) -> list[str]:
    task_list = tmp_path / "tasks.txt"
    task_list.write_text("".join(f"{task}\n" for task in tasks))
    return [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "worker.slave.plugin",
        *(("-o", f"cache_dir={tmp_path / 'cache'}") if cache else ("-p", "no:cacheprovider")),
        f"--basetemp={tmp_path / 'basetemp'}",
        f"--testfleet-files={task_list}",
        f"--testfleet-results={tmp_path / 'results.jsonl'}",
        f"--testfleet-stack-file={tmp_path / 'stacks.txt'}",
        *extra_args,
    ]


def events_of(tmp_path: Path) -> list[ListEvent]:
    results = tmp_path / "results.jsonl"
    return read_events(results) if results.exists() else []


def run_slave(
    cwd: Path,
    tmp_path: Path,
    tasks: list[str],
    *extra_args: str,
    env: dict[str, str] | None = None,
    cache: bool = False,
) -> SlaveRun:
    """A slave process over `tasks` (lines of `spec_path [hard_s soft_s]`), run to its end."""
    done = subprocess.run(
        slave_command(tmp_path, tasks, *extra_args, cache=cache),
        cwd=cwd,
        env=env or slave_env(),
        capture_output=True,
        text=True,
        timeout=SLAVE_TIMEOUT_S,
        check=False,
    )
    return SlaveRun(done.returncode, done.stdout, done.stderr, events_of(tmp_path), tmp_path / "stacks.txt")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> SlaveRun:
    """One slave over the suites with plain outcomes (slave processes are slow to start)."""
    tmp_path = tmp_path_factory.mktemp("outcomes")
    root = copy_suites(tmp_path, "passing", "failing", "skip_xfail", "import_error", "broken_conftest", "every_outcome")
    tasks = [
        "passing/test_alpha.py",
        "passing/test_beta.py",
        "failing/test_failing.py",
        "skip_xfail/test_skip_xfail.py",
        "import_error/test_import_error.py",
        "broken_conftest/broken/test_one.py",
        "broken_conftest/test_healthy.py",
        "broken_conftest/broken/test_two.py",
        "every_outcome/test_outcomes.py",
        "every_outcome/test_module_skip.py",
        "every_outcome/test_import_error.py",
        "every_outcome/test_empty.py",
        "no_such_dir/test_missing.py",
        "passing/test_alpha.py::test_two",
        "passing",
    ]
    return run_slave(root, tmp_path, tasks)


# -- plain outcomes ---------------------------------------------------------------------


def test_the_slave_ends_normally_whatever_its_tests_did(outcomes: SlaveRun) -> None:
    assert outcomes.returncode == 0, outcomes.stdout[-3000:] + outcomes.stderr[-3000:]
    assert outcomes.closed() is SlaveStatus.NORMAL_EXIT
    assert len(outcomes.finished()) == 15
    starts = [e.spec_path for e in outcomes.events if isinstance(e, StartEvent)]
    assert starts == [path for path, _ in outcomes.finished()]


def test_passing_files_pass_and_keep_their_output_out(outcomes: SlaveRun) -> None:
    assert outcomes.counts("passing/test_alpha.py") == (TrialStatus.PASSED, 3, 0, 0)
    assert outcomes.counts("passing/test_beta.py") == (TrialStatus.PASSED, 2, 0, 0)
    alpha = outcomes.result("passing/test_alpha.py")
    human, records = split_output(alpha.stdout)
    assert (human, alpha.stderr) == ("", "")
    assert records is not None and [r.outcome for r in records] == ["passed"] * 3


def test_a_failing_test_fails_the_file_with_its_report_and_captured_output(outcomes: SlaveRun) -> None:
    assert outcomes.counts("failing/test_failing.py") == (TrialStatus.FAILED, 1, 0, 1)
    result = outcomes.result("failing/test_failing.py")
    assert "test_failing.py::test_fails" in result.stdout
    assert "assert (6 * 7) == 43" in result.stdout
    assert "Captured stdout call" in result.stdout
    assert "stdout of the failing test" in result.stdout
    assert "test_passes" not in split_output(result.stdout)[0]
    assert "test_failing.py::test_fails" in result.stderr
    assert "stderr of the failing test" in result.stderr
    assert "stdout of the failing test" not in result.stderr


def test_skips_and_xfails_only_make_a_pending_file(outcomes: SlaveRun) -> None:
    assert outcomes.counts("skip_xfail/test_skip_xfail.py") == (TrialStatus.PENDING, 0, 3, 0)


def test_an_import_error_is_an_error_with_its_traceback(outcomes: SlaveRun) -> None:
    assert outcomes.counts("import_error/test_import_error.py") == (TrialStatus.ERROR, 0, 0, 1)
    assert "testfleet_no_such_module" in outcomes.result("import_error/test_import_error.py").stdout


def test_a_broken_conftest_errors_only_the_files_under_it(outcomes: SlaveRun) -> None:
    for path in ("broken_conftest/broken/test_one.py", "broken_conftest/broken/test_two.py"):
        assert outcomes.counts(path) == (TrialStatus.ERROR, 0, 0, 1)
        assert "this conftest is broken" in outcomes.result(path).stdout
    assert outcomes.counts("broken_conftest/test_healthy.py") == (TrialStatus.PASSED, 1, 0, 0)
    # The file after the broken ones still runs.
    assert outcomes.counts("every_outcome/test_outcomes.py")[0] is TrialStatus.FAILED


def test_every_outcome_is_counted(outcomes: SlaveRun) -> None:
    # passed: 5 passed + 1 xpassed; pending: 2 skipped + 1 xfailed;
    # failed: 4 failed (one strict xpass) + 3 setup/teardown errors.
    assert outcomes.counts("every_outcome/test_outcomes.py") == (TrialStatus.FAILED, 6, 3, 7)
    assert outcomes.counts("every_outcome/test_module_skip.py") == (TrialStatus.PENDING, 0, 1, 0)
    assert outcomes.counts("every_outcome/test_import_error.py") == (TrialStatus.ERROR, 0, 0, 1)
    stdout = outcomes.result("every_outcome/test_outcomes.py").stdout
    assert "ERROR at setup of every_outcome/test_outcomes.py::test_setup_error" in stdout
    assert "ERROR at teardown of every_outcome/test_outcomes.py::test_fail_then_teardown_error" in stdout
    assert "XPASS(strict)" in stdout


EVERY_OUTCOME_FILES = ("test_outcomes.py", "test_module_skip.py", "test_import_error.py", "test_empty.py")


@pytest.mark.parametrize("name", EVERY_OUTCOME_FILES)
def test_each_trial_ends_with_its_case_records(outcomes: SlaveRun, name: str) -> None:
    result = outcomes.result(f"every_outcome/{name}")
    lines = result.stdout.splitlines()
    marker = len(lines) - 1 - lines[::-1].index(MARKER)
    assert all(line.startswith("{") for line in lines[marker + 1 :]), lines[marker:]
    human, records = split_output(result.stdout)
    assert records is not None and len(records) == len(lines) - marker - 1
    assert human == result.stdout[: len(human)]
    by_count = {"passed": 0, "pending": 0, "failed": 0}
    for record in records:
        by_count[COUNT_OF_CATEGORY[record.outcome]] += 1
        assert record.nodeid.startswith(f"every_outcome/{name}")
        assert record.when in ("collect", "setup", "call", "teardown")
        assert len(record.message) <= 500
    assert (by_count["passed"], by_count["pending"], by_count["failed"]) == (
        result.passed,
        result.pending,
        result.failed,
    )


def test_case_records_say_what_happened_in_order(outcomes: SlaveRun) -> None:
    _, records = split_output(outcomes.result("every_outcome/test_outcomes.py").stdout)
    assert records is not None
    seen = [(r.nodeid.split("::", 1)[1], r.when, r.outcome, r.message) for r in records]
    assert seen[:3] == [
        ("test_pass", "call", "passed", ""),
        ("test_fail", "call", "failed", "assert 0"),
        ("test_skip", "call", "skipped", "skipped"),
    ]
    assert ("test_xfail", "call", "xfailed", "expected") in seen
    assert ("test_xpass", "call", "xpassed", "unexpectedly passes") in seen
    assert ("test_setup_error", "setup", "error", "RuntimeError: setup breaks") in seen
    assert ("test_fail_then_teardown_error", "teardown", "error", "RuntimeError: teardown breaks") in seen
    assert ("TestGroup::test_skipped_in_class", "setup", "skipped", "class skip") in seen
    assert all(r.duration_s >= 0 for r in records)
    _, skip = split_output(outcomes.result("every_outcome/test_module_skip.py").stdout)
    assert skip is not None and [(r.nodeid, r.when, r.outcome) for r in skip] == [
        ("every_outcome/test_module_skip.py", "collect", "skipped")
    ]
    _, broken = split_output(outcomes.result("every_outcome/test_import_error.py").stdout)
    assert broken is not None and [(r.nodeid, r.when, r.outcome) for r in broken] == [
        ("every_outcome/test_import_error.py", "collect", "error")
    ]
    assert split_output(outcomes.result("every_outcome/test_empty.py").stdout)[1] == []


def test_a_file_without_tests_is_pending_with_a_note(outcomes: SlaveRun) -> None:
    assert outcomes.counts("every_outcome/test_empty.py") == (TrialStatus.PENDING, 0, 0, 0)
    assert "no tests ran in every_outcome/test_empty.py" in outcomes.result("every_outcome/test_empty.py").stdout


def test_a_task_may_name_one_test_or_a_whole_directory(outcomes: SlaveRun) -> None:
    assert outcomes.counts("passing/test_alpha.py::test_two") == (TrialStatus.PASSED, 1, 0, 0)
    assert outcomes.counts("passing") == (TrialStatus.PASSED, 5, 0, 0)


def test_a_missing_file_is_an_error(outcomes: SlaveRun) -> None:
    assert outcomes.counts("no_such_dir/test_missing.py") == (TrialStatus.ERROR, 0, 0, 1)
    assert "not found" in outcomes.result("no_such_dir/test_missing.py").stdout


def _summary_counts(line: str) -> dict[str, int]:
    return {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", line)}


def test_counts_add_up_to_what_plain_pytest_reports(outcomes: SlaveRun, tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "every_outcome")
    files = ["test_outcomes.py", "test_module_skip.py", "test_import_error.py", "test_empty.py"]
    plain = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", *files],
        cwd=root / "every_outcome",
        env=slave_env(),
        capture_output=True,
        text=True,
        timeout=SLAVE_TIMEOUT_S,
        check=False,
    )
    summary = _summary_counts(plain.stdout.strip().splitlines()[-1])
    results = [outcomes.result(f"every_outcome/{name}") for name in files]
    assert sum(r.passed for r in results) == summary.get("passed", 0) + summary.get("xpassed", 0)
    assert sum(r.pending for r in results) == summary.get("skipped", 0) + summary.get("xfailed", 0)
    assert sum(r.failed for r in results) == summary.get("failed", 0) + summary.get("errors", 0)


# -- fixtures across files ----------------------------------------------------------------


def test_module_fixtures_end_with_each_file_and_session_fixtures_live_on(tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "fixtures_lifecycle") / "fixtures_lifecycle"
    log = tmp_path / "lifecycle.log"
    # The first file is outside tests/, whose conftest pytest loads at start-up: its fixtures
    # must still reach tests/test_three.py, and tests/test_four.py after it.
    # A package's fixtures live one task too; a directory as a task runs all its files.
    tasks = ["test_one.py", "tests/test_three.py", "test_two.py", "tests/test_four.py", "pkg/test_five.py", "pkg"]
    run = run_slave(root, tmp_path, tasks, env=slave_env(LIFECYCLE_LOG=str(log)))
    assert [run.counts(path) for path in tasks] == [
        (TrialStatus.PASSED, 2, 0, 0),
        (TrialStatus.PASSED, 1, 0, 0),
        (TrialStatus.PASSED, 2, 0, 0),
        (TrialStatus.PASSED, 1, 0, 0),
        (TrialStatus.PASSED, 1, 0, 0),
        (TrialStatus.PASSED, 2, 0, 0),
    ], run.stdout[-3000:]
    assert log.read_text().splitlines() == [
        "session_setup",
        "module_setup test_one",
        "module_teardown test_one",
        "module_setup test_three",
        "module_teardown test_three",
        "module_setup test_two",
        "module_teardown test_two",
        "module_setup test_four",
        "module_teardown test_four",
        "package_setup",
        "module_setup test_five",
        "module_teardown test_five",
        "package_teardown",
        "package_setup",
        "module_setup test_five",
        "module_teardown test_five",
        "module_setup test_six",
        "module_teardown test_six",
        "package_teardown",
        "session_teardown",
    ]


PINNING_PLUGIN = """
import os
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    for index, item in enumerate(session.items):
        last_of_module = index + 1 == len(session.items) or session.items[index + 1].parent is not item.parent
        nextitem = session.items[index + 1] if index + 1 < len(session.items) else None
        if last_of_module and nextitem is not None:
            item.ihook.pytest_runtest_setup(item=item)
            item.ihook.pytest_runtest_call(item=item)
            # The slave's trick: a stand-in whose listchain() is [session].
            session._setupstate.teardown_exact(session)
            stack = ",".join(type(node).__name__ for node in session._setupstate.stack)
            with open(os.environ["PIN_LOG"], "a") as log:
                log.write("stack " + stack + "\\n")
        else:
            item.ihook.pytest_runtest_protocol(item=item, nextitem=nextitem)
    return True
"""

PINNING_CONFTEST = """
import os
import pytest


def record(event):
    with open(os.environ["PIN_LOG"], "a") as log:
        log.write(event + "\\n")


@pytest.fixture(scope="session")
def session_fixture():
    record("session_setup")
    yield
    record("session_teardown")


@pytest.fixture(scope="module")
def module_fixture(request):
    record("module_setup " + request.module.__name__)
    yield
    record("module_teardown " + request.module.__name__)


@pytest.fixture(scope="class")
def class_fixture():
    record("class_setup")
    yield
    record("class_teardown")
"""


def test_pytest_still_tears_down_to_the_session_for_a_stand_in_whose_chain_is_the_session(tmp_path: Path) -> None:
    """Pins the pytest internal the slave relies on: SetupState.teardown_exact(x) only uses x.listchain()."""
    suite = tmp_path / "pin"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "pinning_plugin.py").write_text(PINNING_PLUGIN)
    (suite / "conftest.py").write_text(PINNING_CONFTEST)
    body = textwrap.dedent(
        """
        class TestInClass:
            def test_a(self, session_fixture, module_fixture, class_fixture):
                pass
        """
    )
    (suite / "test_first.py").write_text(body)
    (suite / "test_second.py").write_text(body)
    log = tmp_path / "pin.log"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pinning_plugin", "-p", "no:cacheprovider", "-q"],
        cwd=suite,
        env=slave_env(PIN_LOG=str(log), PYTHONPATH=str(suite)),
        capture_output=True,
        text=True,
        timeout=SLAVE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert log.read_text().splitlines() == [
        "session_setup",
        "module_setup test_first",
        "class_setup",
        "class_teardown",
        "module_teardown test_first",
        "stack Session",
        "module_setup test_second",
        "class_setup",
        "class_teardown",
        "module_teardown test_second",
        "session_teardown",
    ]


# -- timeouts, crashes, retries -------------------------------------------------------------


def test_a_soft_timeout_fails_the_running_test_and_the_next_file_still_runs(tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "soft_timeout") / "soft_timeout"
    tasks = ["test_slow.py 20 1", "test_slow_import.py 20 1", "test_quick.py"]
    started = time.monotonic()
    # pytest-timeout's SIGALRM stays armed per test beside the slave's own clock.
    run = run_slave(root, tmp_path, tasks, "--timeout=60")
    assert time.monotonic() - started < 15
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.counts("test_slow.py") == (TrialStatus.TIMEOUT, 1, 0, 1)
    slow = run.result("test_slow.py").stdout
    assert "soft timeout of 1s reached" in slow
    assert "test_sleeps_past_the_soft_timeout" in slow
    assert "test_never_reached" not in slow
    assert run.counts("test_slow_import.py") == (TrialStatus.TIMEOUT, 0, 0, 1)
    assert "soft timeout of 1s reached" in run.result("test_slow_import.py").stdout
    assert run.counts("test_quick.py") == (TrialStatus.PASSED, 1, 0, 0)


def test_a_test_that_swallows_interrupts_ends_by_hard_timeout_with_exit_42(tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "swallow") / "swallow"
    run = run_slave(root, tmp_path, ["test_swallow.py 3 1", "test_never_started.py"])
    assert run.returncode == 42, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.counts("test_swallow.py") == (TrialStatus.TIMEOUT, 0, 0, 1)
    stdout = run.result("test_swallow.py").stdout
    assert "hard timeout of 3s in test_swallow.py" in stdout
    assert "test_swallow.py" in stdout.split("Stacks of all threads:")[1]
    assert "test_swallows_every_interrupt" in run.stack_file.read_text()
    assert run.closed() is SlaveStatus.TIMEOUT_EXIT
    assert [e.spec_path for e in run.events if isinstance(e, StartEvent)] == ["test_swallow.py"]


def test_a_test_that_kills_its_process_leaves_a_started_file(tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "suicide", "passing")
    run = run_slave(root, tmp_path, ["suicide/test_suicide.py", "passing/test_beta.py"])
    assert run.returncode == -signal.SIGKILL
    assert run.events == [StartEvent(1, "suicide/test_suicide.py")]


def test_a_flaky_test_fails_once_then_passes(tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "flaky") / "flaky"
    env = slave_env(FLAKY_MARKER=str(tmp_path / "flaky-marker"))
    # -x stops a file at its first failure, never the slave.
    run = run_slave(root, tmp_path, ["test_flaky.py", "test_flaky.py"], "-x", env=env)
    finished = run.finished()
    assert [(r.status, r.passed, r.failed) for _, r in finished] == [
        (TrialStatus.FAILED, 0, 1),
        (TrialStatus.PASSED, 1, 0),
    ]
    assert "first attempt fails" in finished[0][1].stdout


# -- signals ----------------------------------------------------------------------------------


def _start_interruptible(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    root = copy_suites(tmp_path, "interruptible") / "interruptible"
    log, started = tmp_path / "session.log", tmp_path / "started"
    slave = subprocess.Popen(
        slave_command(tmp_path, ["test_steps.py", "test_steps.py"]),
        cwd=root,
        env=slave_env(LIFECYCLE_LOG=str(log), STARTED_MARKER=str(started)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not started.exists():
        assert slave.poll() is None and time.monotonic() < deadline, "the slave never started test_takes_a_while"
        time.sleep(0.02)
    time.sleep(0.2)
    return slave, log


def test_sigterm_lets_the_test_finish_gives_the_file_back_and_ends_normally(tmp_path: Path) -> None:
    slave, log = _start_interruptible(tmp_path)
    slave.send_signal(signal.SIGUSR2)
    time.sleep(0.2)
    slave.send_signal(signal.SIGTERM)
    output, _ = slave.communicate(timeout=SLAVE_TIMEOUT_S)
    assert slave.returncode == 0, output[-3000:]
    assert "test_takes_a_while" in (tmp_path / "stacks.txt").read_text()
    events = events_of(tmp_path)
    assert events == [
        StartEvent(1, "test_steps.py"),
        GiveBackEvent(1, "test_steps.py"),
        CloseEvent(SlaveStatus.NORMAL_EXIT),
    ]
    assert "1 passed" in output  # the running test finished; the rest did not start
    assert log.read_text() == "session_teardown\n"


def test_a_second_sigterm_interrupts_at_once(tmp_path: Path) -> None:
    slave, _ = _start_interruptible(tmp_path)
    slave.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    slave.send_signal(signal.SIGTERM)
    output, _ = slave.communicate(timeout=SLAVE_TIMEOUT_S)
    assert slave.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    assert events_of(tmp_path)[1:] == [GiveBackEvent(1, "test_steps.py"), CloseEvent(SlaveStatus.NORMAL_EXIT)]


IDLE_SOURCE_PLUGIN = """
import os
import time

from worker.slave.session import SlaveSession
from worker.slave.source import FileTask, ListSource


class WaitingSource(ListSource):
    # Hands out one file, then waits for work that never comes, like an empty coordinator queue.
    def next_task(self):
        task = super().next_task()
        if task is None:
            open(os.environ["IDLE_MARKER"], "w").close()
            time.sleep(60)
        return task


def pytest_configure(config):
    source = WaitingSource([FileTask(1, "test_alpha.py", 60, 30)], os.environ["RESULTS"])
    config.pluginmanager.register(SlaveSession(config, source), "testfleet-slave-session")
"""


def test_sigterm_while_waiting_for_work_ends_the_slave_normally(tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "passing") / "passing"
    (tmp_path / "idle_source.py").write_text(IDLE_SOURCE_PLUGIN)
    marker, results = tmp_path / "idle", tmp_path / "results.jsonl"
    env = slave_env(IDLE_MARKER=str(marker), RESULTS=str(results), PYTHONPATH=str(tmp_path))
    slave = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "idle_source",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'bt'}",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert slave.poll() is None and time.monotonic() < deadline, "the slave never went idle"
        time.sleep(0.02)
    slave.send_signal(signal.SIGTERM)
    output, _ = slave.communicate(timeout=10)
    assert slave.returncode == 0, output[-3000:]
    events = read_events(results)
    assert [type(e) for e in events] == [StartEvent, FinishEvent, CloseEvent]
    assert events[-1] == CloseEvent(SlaveStatus.NORMAL_EXIT)


# -- without activation ----------------------------------------------------------------------


def test_loading_the_plugin_without_activation_leaves_pytest_alone(tmp_path: Path) -> None:
    root = copy_suites(tmp_path, "failing") / "failing"
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_failing.py"]
    # An inherited slave variable must not turn a nested pytest into a slave.
    env = slave_env(TESTFLEET_TASKSET_ID="7")
    runs = [
        subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=SLAVE_TIMEOUT_S, check=False)
        for command in (base, [*base, "-p", "worker.slave.plugin"])
    ]
    plain, with_plugin = runs
    assert with_plugin.returncode == plain.returncode == pytest.ExitCode.TESTS_FAILED
    assert with_plugin.stdout.strip().splitlines()[-1].split(" in ")[0] == "1 failed, 1 passed"
    assert plain.stdout.strip().splitlines()[-1].split(" in ")[0] == "1 failed, 1 passed"
    assert not (tmp_path / "results.jsonl").exists()


# -- the pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timed_out", "load_error", "counts", "status"),
    [
        (True, True, (1, 1, 1), TrialStatus.TIMEOUT),
        (False, True, (1, 0, 0), TrialStatus.ERROR),
        (False, False, (5, 1, 1), TrialStatus.FAILED),
        (False, False, (5, 1, 0), TrialStatus.PENDING),
        (False, False, (5, 0, 0), TrialStatus.PASSED),
        (False, False, (0, 0, 0), TrialStatus.PENDING),
    ],
)
def test_trial_status_follows_the_protocol(
    timed_out: bool, load_error: bool, counts: tuple[int, int, int], status: TrialStatus
) -> None:
    passed, pending, failed = counts
    decided = decide_status(timed_out=timed_out, load_error=load_error, passed=passed, pending=pending, failed=failed)
    assert decided is status


def test_task_lists_take_optional_timeouts() -> None:
    text = "# comment\n\na.py\nspaced name.py 30 10\nb.py 9\n"
    assert parse_task_list(text, hard_timeout_sec=60, soft_timeout_sec=20) == [
        FileTask(1, "a.py", 60, 20),
        FileTask(2, "spaced name.py", 30, 10),
        FileTask(3, "b.py 9", 60, 20),
    ]
    with pytest.raises(ValueError, match="soft <= hard"):
        parse_task_list("a.py 5 10\n", hard_timeout_sec=60, soft_timeout_sec=20)


def test_a_list_source_records_every_event(tmp_path: Path) -> None:
    first, second = FileTask(1, "a.py", 10, 5), FileTask(2, "b.py", 10, 5)
    source = ListSource([first, second], tmp_path / "events.jsonl")
    result = FileResult(TrialStatus.PASSED, 1, 0, 0)
    assert source.next_task() == first
    source.start(first)
    source.finish(first, result)
    assert source.next_task() == second
    source.start(second)
    source.give_back(second)
    source.close(SlaveStatus.NORMAL_EXIT)
    assert source.next_task() is None
    events = read_events(tmp_path / "events.jsonl")
    assert [type(e) for e in events] == [StartEvent, FinishEvent, StartEvent, GiveBackEvent, CloseEvent]
    finish = events[1]
    assert isinstance(finish, FinishEvent) and finish.result == result
    assert source.results == [(first, result)] and source.given_back == [second]


def test_the_watchdog_repeats_the_soft_deadline_and_fires_the_hard_one_once() -> None:
    softs: list[float] = []
    hard = threading.Event()
    watchdog = Watchdog(lambda: softs.append(time.monotonic()), hard.set, repeat_s=0.05)
    watchdog.start()
    try:
        watchdog.arm(0.05, 60)
        time.sleep(0.3)
        assert watchdog.soft_fired
        assert watchdog.disarm() is True
        fired = len(softs)
        assert fired >= 3
        time.sleep(0.1)
        assert len(softs) == fired, "a disarmed watchdog stays quiet"
        watchdog.arm(60, 0.05)
        assert hard.wait(5)
        assert watchdog.disarm() is False
    finally:
        watchdog.stop()


def test_the_case_block_survives_truncation() -> None:
    block = f"{MARKER}\n" + "".join(f'{{"nodeid": "t.py::test_{n}", "outcome": "passed"}}\n' for n in range(50))
    stdout = bound_with_block("x" * 10_000 + "\n", block, limit=4_000)
    assert len(stdout.encode()) <= 4_000 + 100  # the truncation line comes on top, as with bound_text
    assert stdout.endswith(block) and "bytes truncated" in stdout
    human, records = split_output(stdout)
    assert records is not None and len(records) == 50
    assert human.startswith("xxx")
    fitted, _ = fit_outputs("\x01" * 20_000 + "\n" + block, "", budget=30_000)
    assert fitted.endswith("\n" + block) and len(fitted) < 20_000


def _write_project(root: Path, files: dict[str, str]) -> Path:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_pytest_exit_in_a_test_ends_its_file_as_an_error_and_the_slave_serves_on(tmp_path: Path) -> None:
    """pytest.exit() ends pytest's session; in a slave it ends the file, which gets its verdict at once
    (before, the slave ended with its file unfinished, and the file waited for its hard timeout)."""
    root = _write_project(
        tmp_path / "project",
        {
            "test_exits.py": """
                import pytest

                def test_before():
                    pass

                def test_exits():
                    pytest.exit("the environment is gone", returncode=3)

                def test_after():
                    pass
            """,
            "test_fine.py": "def test_fine():\n    pass\n",
        },
    )
    run = run_slave(root, tmp_path, ["test_exits.py", "test_fine.py"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.counts("test_exits.py") == (TrialStatus.FAILED, 1, 0, 1)
    assert "pytest.exit() in test_exits.py::test_exits: the environment is gone" in run.result("test_exits.py").stdout
    assert run.counts("test_fine.py") == (TrialStatus.PASSED, 1, 0, 0)


def test_without_the_terminal_plugin_the_slave_counts_as_pytest_does(tmp_path: Path) -> None:
    """`-p no:terminal` (in addopts, say) takes away the hook that names each report's category."""
    root = copy_suites(tmp_path, "every_outcome")
    files = [f"every_outcome/{name}" for name in EVERY_OUTCOME_FILES]
    (tmp_path / "plain").mkdir()
    (tmp_path / "bare").mkdir()
    plain = run_slave(root, tmp_path / "plain", files)
    bare = run_slave(root, tmp_path / "bare", files, "-p", "no:terminal")
    assert bare.returncode == 0, bare.stderr[-2000:]
    for name in files:
        assert bare.counts(name) == plain.counts(name), name


def test_a_lone_surrogate_in_a_failure_message_is_kept_as_its_escape(tmp_path: Path) -> None:
    root = _write_project(
        tmp_path / "project",
        {"test_surrogate.py": 'def test_message():\n    assert 0, "bytes \\udcff here"\n'},
    )
    # pytest's own report of it writes the byte raw: read the slave's stdout leniently.
    run = run_slave(root, tmp_path, ["test_surrogate.py"], env=slave_env(PYTHONIOENCODING="utf-8:backslashreplace"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.counts("test_surrogate.py") == (TrialStatus.FAILED, 0, 0, 1)
    assert "bytes \\udcff here" in run.result("test_surrogate.py").stdout


def test_a_file_whose_path_holds_brackets_is_collected_alone(tmp_path: Path) -> None:
    """pytest refuses `[` in a path argument (it reads a parametrization): such a file is reached through
    its directory, and only it is collected there."""
    test = "import pytest\n\n\n@pytest.mark.parametrize('n', [1, 2, 3])\ndef test_n(n):\n    assert n != 3\n"
    root = _write_project(tmp_path / "project", {"test_[top].py": test, "test_other.py": "def test_o():\n    pass\n"})
    (root / "sub[1]").mkdir()
    (root / "sub[1]" / "deep").mkdir()
    (root / "sub[1]" / "deep" / "test_[x].py").write_text(test)
    (root / "sub[1]" / "deep" / "test_sibling.py").write_text("def test_s():\n    assert 0\n")
    run = run_slave(root, tmp_path, ["test_[top].py", "sub[1]/deep/test_[x].py"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.counts("test_[top].py") == (TrialStatus.FAILED, 2, 0, 1)
    assert run.counts("sub[1]/deep/test_[x].py") == (TrialStatus.FAILED, 2, 0, 1)


def test_a_forked_child_of_a_test_ends_on_sigterm_as_under_plain_pytest(tmp_path: Path) -> None:
    """multiprocessing forks on Linux: the child inherited the slave's SIGTERM handling, so
    `Process.terminate()` no longer ended it."""
    root = _write_project(
        tmp_path / "project",
        {
            "test_fork.py": """
                import multiprocessing
                import os
                import signal
                import time

                def sleeper():
                    time.sleep(60)

                def test_terminate_ends_the_child():
                    child = multiprocessing.get_context("fork").Process(target=sleeper)
                    child.start()
                    time.sleep(0.3)
                    child.terminate()
                    child.join(10)
                    assert child.exitcode == -signal.SIGTERM

                def test_the_slave_keeps_its_own_handling():
                    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
                    pid = os.fork()
                    if pid == 0:
                        os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
                    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            """,
        },
    )
    run = run_slave(root, tmp_path, ["test_fork.py"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.counts("test_fork.py") == (TrialStatus.PASSED, 2, 0, 0), run.result("test_fork.py").stdout[-3000:]


@pytest.mark.parametrize("mode", ["importlib", "prepend"])
def test_a_file_that_failed_to_import_fails_again_on_a_retry_in_the_same_slave(tmp_path: Path, mode: str) -> None:
    """In importlib mode pytest leaves a module that raised in sys.modules and reuses it: a retry in the
    same slave collected only what was defined before the error, and the file passed."""
    root = _write_project(
        tmp_path / "project",
        {
            "test_broken.py": """
                def test_first():
                    pass

                from no_such_package import helper

                def test_uses_helper():
                    assert helper() == 1
            """,
        },
    )
    (root / "sub").mkdir()
    (root / "sub" / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.fixture\ndef value():\n    return 1\n\n\nraise RuntimeError('conftest breaks')\n"
    )
    (root / "sub" / "test_uses_conftest.py").write_text("def test_value(value):\n    assert value == 1\n")
    tasks = ["test_broken.py", "test_broken.py", "sub/test_uses_conftest.py", "sub/test_uses_conftest.py"]
    run = run_slave(root, tmp_path, tasks, f"--import-mode={mode}")
    assert run.returncode == 0, run.stderr[-2000:]
    verdicts = [(path, result.status, result.passed) for path, result in run.finished()]
    assert verdicts == [(path, TrialStatus.ERROR, 0) for path in tasks], run.stdout[-3000:]
    retry = [result for path, result in run.finished() if path == "test_broken.py"][1]
    assert "no_such_package" in retry.stdout


def test_a_retry_in_the_same_slave_imports_its_file_afresh(tmp_path: Path) -> None:
    """Module state and the ids pytest keeps on a parametrize mark carried over into a retry: a generated
    id was escaped a second time (`[\\\\xe4]` for `[\\xe4]`), and a counter at module level went on."""
    root = _write_project(
        tmp_path / "project",
        {
            "test_again.py": """
                import pytest

                RUNS = []

                @pytest.mark.parametrize("v", ["\\u00e4"], ids=lambda v: v)
                def test_param(v, request):
                    RUNS.append(request.node.name)
                    assert RUNS == ["test_param[\\\\xe4]"], RUNS
            """,
        },
    )
    run = run_slave(root, tmp_path, ["test_again.py", "test_again.py"])
    assert run.returncode == 0, run.stderr[-2000:]
    verdicts = [(result.status, result.passed) for _, result in run.finished()]
    assert verdicts == [(TrialStatus.PASSED, 1)] * 2, run.stdout[-3000:]


def test_the_cache_fixture_and_cache_options_work_and_a_stop_ends_only_its_file(tmp_path: Path) -> None:
    """The slave has a pytest cache of its own: `cache` works, and `--lf`, `--ff`, `--nf`, `--sw` in addopts
    no longer stop every slave as unknown options. `--sw` stops a file at its first failure, not the slave."""
    root = _write_project(
        tmp_path / "project",
        {
            "test_cache.py": """
                def test_cache(cache):
                    cache.set("testfleet/probe", 1)
                    assert cache.get("testfleet/probe", None) == 1
            """,
            "test_fails_first.py": "def test_one():\n    assert 0\n\ndef test_two():\n    pass\n",
            "test_after.py": "def test_after():\n    pass\n",
        },
    )
    tasks = ["test_cache.py", "test_fails_first.py", "test_after.py"]
    for options in (("--lf",), ("--ff",), ("--nf",), ("--sw",)):
        (tmp_path / options[0]).mkdir()
        run = run_slave(root, tmp_path / options[0], tasks, *options, cache=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.counts("test_cache.py") == (TrialStatus.PASSED, 1, 0, 0), options
        assert run.counts("test_after.py") == (TrialStatus.PASSED, 1, 0, 0), options
        expected = (TrialStatus.FAILED, 0, 0, 1) if options == ("--sw",) else (TrialStatus.FAILED, 1, 0, 1)
        assert run.counts("test_fails_first.py") == expected, (options, run.result("test_fails_first.py").stdout)
    assert "pytest was asked to stop" in run.result("test_fails_first.py").stdout


def test_a_file_whose_name_holds_a_double_colon_is_a_file(tmp_path: Path) -> None:
    """`path::name` names a test, unless the whole of it names a file: such a file is collected whole
    (before, the client left it out as a file git ignores, and the slave looked for a test in `test_co`)."""
    root = _write_project(
        tmp_path / "project",
        {
            "test_co::lon.py": "def test_x():\n    assert 0\n",
            "test_plain.py": "def test_one():\n    pass\n\ndef test_two():\n    assert 0\n",
        },
    )
    (root / "a::b").mkdir()
    (root / "a::b" / "test_deep.py").write_text("def test_d():\n    pass\n")
    run = run_slave(root, tmp_path, ["test_co::lon.py", "a::b/test_deep.py", "test_plain.py::test_one"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.counts("test_co::lon.py") == (TrialStatus.FAILED, 0, 0, 1)
    assert run.counts("a::b/test_deep.py") == (TrialStatus.PASSED, 1, 0, 0)
    assert run.counts("test_plain.py::test_one") == (TrialStatus.PASSED, 1, 0, 0)


def test_a_session_fixture_whose_teardown_fails_is_told_on_the_slaves_stderr(tmp_path: Path) -> None:
    """It ends after the verdict, so it reaches the worker's log only; before, it went into pytest's
    capture and was lost."""
    root = _write_project(
        tmp_path / "project",
        {
            "conftest.py": """
                import pytest

                @pytest.fixture(scope="session")
                def resource():
                    yield 1
                    raise RuntimeError("session teardown boom")
            """,
            "test_uses.py": "def test_a(resource):\n    assert resource == 1\n",
        },
    )
    run = run_slave(root, tmp_path, ["test_uses.py"])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.counts("test_uses.py") == (TrialStatus.PASSED, 1, 0, 0)
    assert "testfleet: a session fixture's teardown failed" in run.stderr
    assert "RuntimeError: session teardown boom" in run.stderr
