"""Processes the worker owns: output capture, process-group stops, reaping, hard timeouts, slot restarts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from protocol.types import SlaveStatus
from worker.slaves import (
    PoolOutcome,
    SlaveExit,
    SlavePlan,
    SlavePool,
    exit_status,
    group_alive,
    read_state,
    run_command,
    spawn,
)

REPO = Path(__file__).resolve().parents[2]


def members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in a group, zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_bytes().rpartition(b")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                found.append((int(entry.name), fields[0].decode()))
    return found


def live_members(pgid: int) -> list[int]:
    return [pid for pid, state in members(pgid) if state not in ("Z", "X")]


async def bash(
    script: str, tmp_path: Path, *, stop: asyncio.Event | None = None, grace_s: float = 5.0
) -> tuple[int | None, list[str]]:
    lines: list[str] = []
    code = await run_command(
        ["bash", "-ex"],
        cwd=tmp_path,
        env=os.environ,
        on_line=lines.append,
        stop=stop or asyncio.Event(),
        grace_s=grace_s,
        stdin_text=script,
    )
    return code, lines


async def test_output_stdin_and_exit_code(tmp_path: Path) -> None:
    code, lines = await bash("echo out\necho err >&2\nexit 7\n", tmp_path)
    assert code == 7
    assert "out" in lines and "err" in lines
    assert "+ echo out" in lines, "bash -x traces each command"


async def test_long_lines_and_bad_bytes(tmp_path: Path) -> None:
    code, lines = await bash(
        "set +x\nhead -c 150000 /dev/zero | tr '\\0' a\necho\nprintf 'bad \\377 byte\\nno newline'\n", tmp_path
    )
    assert code == 0
    assert lines[0] == "+ set +x"
    assert [len(line) for line in lines[1:4]] == [65536, 65536, 150000 - 2 * 65536]
    assert "bad \ufffd byte" in lines
    assert lines[-1] == "no newline"


async def test_stop_kills_a_group_that_ignores_term(tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(
        bash("trap '' TERM\nsleep 1000 &\necho ready\nsleep 1000\n", tmp_path, stop=stop, grace_s=0.5)
    )
    child_pgids = await wait_for_children(tmp_path)
    started = time.monotonic()
    stop.set()
    code, _ = await task
    assert code is None
    assert time.monotonic() - started >= 0.5, "KILL only after the grace"
    for pgid in child_pgids:
        assert live_members(pgid) == []
        assert not group_alive(pgid)


async def wait_for_children(tmp_path: Path) -> list[int]:
    """The process groups of bash children of this test process once they run."""
    for _ in range(200):
        groups = [
            int(fields[2])
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit()
            and (fields := (entry / "stat").read_bytes().rpartition(b")")[2].split())
            and int(fields[1]) == os.getpid()
        ]
        if groups and all(len(live_members(g)) >= 2 for g in groups):
            return groups
        await asyncio.sleep(0.02)
    raise AssertionError("no child started")


async def test_a_group_that_handles_term_ends_before_the_grace(tmp_path: Path) -> None:
    stop = asyncio.Event()
    script = "trap 'echo cleaning up; exit 0' TERM\nsleep 1000 &\nwait $!\n"
    task = asyncio.create_task(bash(script, tmp_path, stop=stop, grace_s=30))
    await wait_for_children(tmp_path)
    started = time.monotonic()
    stop.set()
    code, lines = await task
    assert code is None
    assert time.monotonic() - started < 5
    assert "cleaning up" in lines


async def test_leftovers_of_a_finished_command_are_stopped(tmp_path: Path) -> None:
    lines: list[str] = []
    child = await spawn(
        ["bash", "-ex"], cwd=tmp_path, env=os.environ, on_line=lines.append, stdin_text="sleep 1000 &\n"
    )
    assert await asyncio.wait_for(child.finished(grace_s=0.5), 10) == 0
    assert live_members(child.pid) == []


def test_orphans_are_reaped_when_the_worker_is_the_subreaper(tmp_path: Path) -> None:
    script = """
import asyncio, os
from pathlib import Path
from worker.slaves import become_subreaper, reap_orphans, run_command, _scan_proc

async def main():
    assert become_subreaper()
    stop = asyncio.Event()
    task = asyncio.create_task(run_command(
        ["bash", "-ex"], cwd=Path("."), env=os.environ, on_line=lambda line: None, stop=stop, grace_s=0.3,
        stdin_text="trap '' TERM\\nsleep 1000 &\\nsleep 1000 &\\nsleep 1000\\n"))
    await asyncio.sleep(0.5)
    stop.set()
    print("code", await task)
    for _ in range(50):
        reap_orphans()
        if not _scan_proc()[1]:
            break
        await asyncio.sleep(0.05)
    print("zombies", len(_scan_proc()[1]))

asyncio.run(main())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert out == ["code", "None", "zombies", "0"]


def test_exit_status() -> None:
    assert exit_status(0, False) is None
    assert exit_status(42, False) is SlaveStatus.TIMEOUT_EXIT
    assert exit_status(-9, True) is SlaveStatus.TIMEOUT_EXIT
    assert exit_status(3, False) is SlaveStatus.FAILURE_EXIT
    assert exit_status(-15, False) is SlaveStatus.FAILURE_EXIT


def test_read_state(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    assert read_state(path) is None
    path.write_text('{"trial_id": 3, "hard_timeout_sec": 60, "spec_path": "t.py", "extra": 1}')
    state = read_state(path)
    assert state is not None and (state.trial_id, state.hard_timeout_sec) == (3, 60)
    path.write_text('{"trial_id": 3, "hard_')
    assert read_state(path) is None


def plan(tmp_path: Path, command: str, *, num_slaves: int = 1, max_failures: int = 3, **overrides: float) -> SlavePlan:
    return SlavePlan(
        command=command,
        cwd=str(tmp_path),
        env={"PATH": os.environ["PATH"], "TESTFLEET_TASKSET_ID": "9"},
        num_slaves=num_slaves,
        name_prefix="w1-t9",
        state_dir=str(tmp_path / ".slaves"),
        max_failures=max_failures,
        grace_s=overrides.get("grace_s", 1.0),
        hard_timeout_margin_s=overrides.get("hard_timeout_margin_s", 0.2),
        stack_dump_wait_s=overrides.get("stack_dump_wait_s", 0.3),
        poll_s=0.05,
    )


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[int, str]] = []
        self.exits: list[SlaveExit] = []

    def on_line(self, slot: int, line: str) -> None:
        self.lines.append((slot, line))

    async def on_exit(self, ended: SlaveExit) -> None:
        self.exits.append(ended)


def pool(slave_plan: SlavePlan, recorder: Recorder) -> SlavePool:
    return SlavePool(slave_plan, on_line=recorder.on_line, on_exit=recorder.on_exit)


async def test_slaves_get_their_environment(tmp_path: Path) -> None:
    rec = Recorder()
    command = (
        'set +x\necho "env $TESTFLEET_SLAVE_NAME $SLAVE_NUMBER $NUM_SLAVES $PYTEST_XDIST_WORKER '
        '$TESTFLEET_WORKER_PID $TESTFLEET_TASKSET_ID $(basename $TESTFLEET_SLAVE_STATE_FILE)"\n'
        'read -t 1 line && echo "stdin: $line" || echo stdin closed\n'
    )
    outcome = await pool(plan(tmp_path, command, num_slaves=3), rec).run()
    assert outcome is PoolOutcome.ALL_EXITED
    envs = sorted(line for _, line in rec.lines if line.startswith("env "))
    assert envs == [f"env w1-t9-s{n}-g0 {n} 3 gw{n} {os.getpid()} 9 w1-t9-s{n}-g0.json" for n in range(3)]
    assert sorted(slot for slot, line in rec.lines if line == "stdin closed") == [0, 1, 2]
    assert [e.status for e in rec.exits] == [None, None, None]


async def test_failed_slaves_are_replaced_until_they_succeed(tmp_path: Path) -> None:
    rec = Recorder()
    command = (
        "n=$(cat count 2>/dev/null || echo 0)\necho $((n+1)) > count\n"
        "[ $n -ge 2 ] && exit 0\n[ $n -eq 1 ] && exit 42\nexit 3\n"
    )
    outcome = await pool(plan(tmp_path, command, max_failures=1), rec).run()
    assert outcome is PoolOutcome.ALL_EXITED
    assert [(e.slave_name, e.returncode, e.status) for e in rec.exits] == [
        ("w1-t9-s0-g0", 3, SlaveStatus.FAILURE_EXIT),
        ("w1-t9-s0-g1", 42, SlaveStatus.TIMEOUT_EXIT),
        ("w1-t9-s0-g2", 0, None),
    ]


async def test_too_many_failure_exits_exhaust_the_budget(tmp_path: Path) -> None:
    rec = Recorder()
    slaves = pool(plan(tmp_path, "exit 3", num_slaves=1, max_failures=2), rec)
    outcome = await slaves.run()
    assert outcome is PoolOutcome.FAILURE_BUDGET_EXHAUSTED
    assert [e.returncode for e in rec.exits] == [3, 3, 3]
    assert slaves.failures == 3


async def test_stop_terms_then_kills_every_slave_and_starts_no_new_one(tmp_path: Path) -> None:
    rec = Recorder()
    slaves = pool(plan(tmp_path, "trap '' TERM\necho up\nsleep 1000\n", num_slaves=2, grace_s=0.3), rec)
    run = asyncio.create_task(slaves.run())
    while len([line for _, line in rec.lines if line == "up"]) < 2:
        await asyncio.sleep(0.02)
    pgids = [r.child.pid for r in slaves._running.values()]
    await slaves.stop()
    assert await asyncio.wait_for(run, 10) is PoolOutcome.STOPPED
    assert sorted(e.slave_name for e in rec.exits) == ["w1-t9-s0-g0", "w1-t9-s1-g0"]
    assert all(e.stopping and e.status is SlaveStatus.FAILURE_EXIT for e in rec.exits)
    for pgid in pgids:
        assert live_members(pgid) == []


async def test_the_worker_enforces_hard_timeouts_from_the_state_file(tmp_path: Path) -> None:
    rec = Recorder()
    command = """
set +e
if [ -e started ]; then exit 0; fi
touch started
trap 'echo "stack of the hung test" > "$TESTFLEET_STACK_FILE"' USR2
echo '{"trial_id": 7, "hard_timeout_sec": 1, "spec_path": "tests/test_hang.py"}' > "$TESTFLEET_SLAVE_STATE_FILE.tmp"
mv "$TESTFLEET_SLAVE_STATE_FILE.tmp" "$TESTFLEET_SLAVE_STATE_FILE"
while true; do sleep 0.05; done
"""
    started = time.monotonic()
    outcome = await pool(plan(tmp_path, command), rec).run()
    elapsed = time.monotonic() - started
    assert outcome is PoolOutcome.ALL_EXITED
    first, second = rec.exits
    assert first.status is SlaveStatus.TIMEOUT_EXIT
    assert first.killed_trial_id == 7
    assert first.stack_dump == "stack of the hung test\n"
    assert first.returncode == -9
    assert second.status is None and second.slave_name == "w1-t9-s0-g1"
    assert 1.2 <= elapsed < 10
    assert list((tmp_path / ".slaves").iterdir()) == [], "state and dump files are cleaned up"


async def test_a_trial_within_its_hard_timeout_is_left_alone(tmp_path: Path) -> None:
    rec = Recorder()
    state = json.dumps({"trial_id": 8, "hard_timeout_sec": 30})
    command = (
        f"echo '{state}' > \"$TESTFLEET_SLAVE_STATE_FILE\"\nsleep 1\n"
        'echo \'{"trial_id": null}\' > "$TESTFLEET_SLAVE_STATE_FILE"\n'
    )
    assert await pool(plan(tmp_path, command), rec).run() is PoolOutcome.ALL_EXITED
    assert [e.status for e in rec.exits] == [None]
