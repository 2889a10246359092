"""The `--exec` slave: one process per file over the exec fixture scripts."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.types import SlaveStatus, TrialStatus
from worker.slave.exec_runner import command_for, run_exec, run_file
from worker.slave.output import OutputBuffer, bound_text
from worker.slave.source import CloseEvent, FileResult, FileTask, GiveBackEvent, ListSource, StartEvent, read_events

SCRIPTS = Path(__file__).resolve().parents[1] / "fixtures" / "suites" / "exec"
PYTHON = f"{shlex.quote(sys.executable)} {{path}}"


def task(name: str, hard: int = 30, soft: int = 20) -> FileTask:
    return FileTask(1, name, hard, soft)


def run_script(name: str, hard: int = 30, soft: int = 20, kill_grace_s: float = 5.0) -> FileResult:
    result = run_file(task(name, hard, soft), PYTHON, cwd=SCRIPTS, kill_grace_s=kill_grace_s)
    assert result is not None
    return result


def test_the_path_replaces_every_placeholder_or_comes_last() -> None:
    assert command_for("runner --file={path} -v", "dir/a b.sh") == ["runner", "--file=dir/a b.sh", "-v"]
    assert command_for("'my runner' --quiet", "t.sh") == ["my runner", "--quiet", "t.sh"]
    assert command_for("diff {path} {path}.expected", "x") == ["diff", "x", "x.expected"]
    with pytest.raises(ValueError, match="empty"):
        command_for("  ", "x")


def test_exit_zero_passes_and_anything_else_fails_with_its_output() -> None:
    ok = run_script("ok.py")
    assert (ok.status, ok.passed, ok.pending, ok.failed) == (TrialStatus.PASSED, 1, 0, 0)
    assert ok.stdout == "all good\n"
    failed = run_script("fail.py")
    assert (failed.status, failed.passed, failed.pending, failed.failed) == (TrialStatus.FAILED, 0, 0, 1)
    assert failed.stdout == "some output\ntestfleet: exit status 3\n"
    assert failed.stderr == "something went wrong\n"


def test_a_command_that_cannot_start_is_an_error() -> None:
    result = run_file(task("ok.py"), "/nonexistent/testfleet-runner {path}", cwd=SCRIPTS)
    assert result is not None
    assert (result.status, result.failed) == (TrialStatus.ERROR, 1)
    assert "/nonexistent/testfleet-runner" in result.stdout


def test_the_file_reads_an_empty_stdin() -> None:
    assert run_script("reads_stdin.py").stdout == "''\n"


def test_a_soft_timeout_terminates_the_group() -> None:
    started = time.monotonic()
    result = run_script("sleepy.py", hard=20, soft=1)
    assert time.monotonic() - started < 5
    assert (result.status, result.failed) == (TrialStatus.TIMEOUT, 1)
    assert result.stdout.startswith("going to sleep\n")
    assert "soft timeout of 1s reached: SIGTERM" in result.stdout


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    started = time.monotonic()
    result = run_script("stubborn.py", hard=20, soft=1, kill_grace_s=0.5)
    assert time.monotonic() - started < 5
    assert result.status is TrialStatus.TIMEOUT
    assert "still running 0.5s after SIGTERM: SIGKILL" in result.stdout


def test_a_hard_timeout_kills_at_once() -> None:
    started = time.monotonic()
    result = run_script("stubborn.py", hard=2, soft=1, kill_grace_s=30)
    assert time.monotonic() - started < 6
    assert result.status is TrialStatus.TIMEOUT
    assert "hard timeout of 2s reached: SIGKILL" in result.stdout


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_what_a_file_leaves_running_is_killed_with_it() -> None:
    started = time.monotonic()
    result = run_script("background.py")
    assert time.monotonic() - started < 5
    assert result.status is TrialStatus.PASSED
    grandchild = int(result.stdout.split()[0])
    deadline = time.monotonic() + 5
    while _alive(grandchild):
        assert time.monotonic() < deadline, "the background process outlived its file"
        time.sleep(0.05)


def test_big_output_keeps_its_head_and_tail() -> None:
    result = run_script("loud.py")
    assert result.status is TrialStatus.PASSED
    assert len(result.stdout.encode()) < 4 * 1024 * 1024 + 100
    assert result.stdout.startswith("x" * 1023 + "\n")
    assert result.stdout.endswith("the end\n")
    assert "[testfleet: 2097160 bytes truncated]" in result.stdout


def test_run_exec_drives_a_source_to_its_end(tmp_path: Path) -> None:
    files = ["ok.py", "fail.py", "ok.py"]
    source = ListSource([FileTask(i, name, 30, 20) for i, name in enumerate(files, 1)], tmp_path / "events.jsonl")
    assert run_exec(source, PYTHON, cwd=SCRIPTS) is SlaveStatus.NORMAL_EXIT
    assert [(t.spec_path, r.status) for t, r in source.results] == [
        ("ok.py", TrialStatus.PASSED),
        ("fail.py", TrialStatus.FAILED),
        ("ok.py", TrialStatus.PASSED),
    ]
    assert source.closed is SlaveStatus.NORMAL_EXIT


def test_sigterm_stops_the_file_and_gives_it_back(tmp_path: Path) -> None:
    (tmp_path / "tasks.txt").write_text("sleepy.py\nok.py\n")
    results = tmp_path / "results.jsonl"
    slave = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.slave.exec_runner",
            f"--files={tmp_path / 'tasks.txt'}",
            f"--results={results}",
            PYTHON,
        ],
        cwd=SCRIPTS,
    )
    deadline = time.monotonic() + 20
    while not results.exists():
        assert slave.poll() is None and time.monotonic() < deadline, "the slave never started a file"
        time.sleep(0.02)
    time.sleep(0.3)
    slave.send_signal(signal.SIGTERM)
    assert slave.wait(timeout=20) == 0
    assert read_events(results) == [
        StartEvent(1, "sleepy.py"),
        GiveBackEvent(1, "sleepy.py"),
        CloseEvent(SlaveStatus.NORMAL_EXIT),
    ]


# -- bounded output ---------------------------------------------------------------------


def test_an_output_buffer_keeps_head_and_tail_and_counts_the_rest() -> None:
    buffer = OutputBuffer(limit=10)
    for chunk in (b"abc", b"defgh", b"ijklmnop", b"qrst"):
        buffer.feed(chunk)
    assert buffer.total == 20
    assert buffer.text() == "abcde\n[testfleet: 10 bytes truncated]\npqrst"


def test_small_output_is_kept_whole() -> None:
    buffer = OutputBuffer(limit=10)
    buffer.feed(b"0123456789")
    assert buffer.text() == "0123456789"
    assert bound_text("short", limit=10) == "short"
    assert bound_text("0123456789abcdef", limit=8) == "0123\n[testfleet: 8 bytes truncated]\ncdef"
