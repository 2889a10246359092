"""`testfleet run` and `testfleet local` against real processes: a coordinator, worker daemons and pytest slaves.

Fidelity: on a suite with every outcome, testfleet's test counts add up to plain pytest's on the same
files, and the JUnit XML lists the test cases pytest's own does. Then the exit codes, Ctrl-C, a
coordinator restart in the middle of a run, and `local` leaving no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.cli.main import EXEC_MODULES, SUBCOMMANDS
from tests.e2e.test_cli_support import REPO, Serve, cli_env, copy_suite, run_cli, serve, start_cli, terminate

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        importlib.util.find_spec("worker.slave.remote") is None
        or ("slave" not in EXEC_MODULES and SUBCOMMANDS["slave"].module is None),
        reason="the slave's coordinator side (`testfleet slave`, worker/slave/remote.py) is not built yet",
    ),
]
__all__ = ["serve"]

SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?)\b")


def env_for(server: Serve, **extra: str) -> dict[str, str]:
    return cli_env(**{"TESTFLEET_COORDINATOR": server.url, "TESTFLEET_TOKEN": "client-secret", **extra})


@contextlib.contextmanager
def running_worker(serve: Serve, tmp_path: Path, name: str, *flags: str) -> Iterator[subprocess.Popen[bytes]]:
    """A worker daemon process with these extra flags, logging to tmp_path, stopped (TERM) at the end."""
    log = (tmp_path / f"{name}.log").open("wb")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "worker", "--coordinator", serve.url, "--name", name),
            *("--work-dir", str(tmp_path / "work"), "--log-level", "info", *flags),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=cli_env(),
        cwd=REPO,
    )
    try:
        yield process
    finally:
        terminate(process)
        log.close()


@pytest.fixture
def worker(serve: Serve, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One worker daemon with two slaves."""
    with running_worker(serve, tmp_path, "e2e-worker", "--slaves", "2") as process:
        yield process


def plain_pytest(project: Path, junit: Path) -> dict[str, int]:
    """Plain pytest's counts on the same files, mapped onto testfleet's passed / pending / failed."""
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--continue-on-collection-errors"),
            *(f"--junit-xml={junit}", "-q"),
        ],
        cwd=project,
        capture_output=True,
        text=True,
        check=False,
        env=cli_env(),
    )
    last_line = result.stdout.splitlines()[-1]
    counts = {("error" if word.startswith("error") else word): int(n) for n, word in SUMMARY.findall(last_line)}
    return {
        "passed": counts.get("passed", 0) + counts.get("xpassed", 0),
        "pending": counts.get("skipped", 0) + counts.get("xfailed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0),
    }


def junit_cases(path: Path) -> list[tuple[str, str, str]]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case} & {"failure", "error", "skipped"}
        verdict = "error" if "error" in tags else "failure" if "failure" in tags else "skipped" if tags else "passed"
        cases.append((case.get("classname") or "", case.get("name") or "", verdict))
    return sorted(cases)


def write_sleepy_suite(project: Path, files: int, seconds: float) -> None:
    project.mkdir(parents=True, exist_ok=True)
    (project / "pytest.ini").write_text("[pytest]\n")
    for number in range(files):
        (project / f"test_sleep_{number}.py").write_text(
            f"import time\n\n\ndef test_sleep():\n    time.sleep({seconds})\n"
        )


async def test_every_outcome_matches_plain_pytest(
    serve: Serve, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    project = copy_suite("every_outcome", tmp_path)
    expected = plain_pytest(project, tmp_path / "pytest.xml")
    assert expected == {"passed": 6, "pending": 4, "failed": 8}
    run = await asyncio.to_thread(
        run_cli,
        "run",
        "--max-trials",
        "1",
        "--junit-xml",
        str(tmp_path / "testfleet.xml"),
        cwd=project,
        env=env_for(serve),
    )
    assert run.returncode == 1, run.stderr
    taskset_id = run.stdout.strip().splitlines()[-1].split()[2]
    shown = await asyncio.to_thread(run_cli, "show", taskset_id, "--json", cwd=project, env=env_for(serve))
    document = json.loads(shown.stdout)
    assert document["tests"] == expected
    assert document["files"] == {"total": 4, "passed": 0, "pending": 2, "failed": 2, "undecided": 0}
    ours, theirs = junit_cases(tmp_path / "testfleet.xml"), junit_cases(tmp_path / "pytest.xml")
    assert ours == theirs


async def test_a_test_printing_nul_bytes_gets_its_verdict(
    serve: Serve, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """Binary output (NUL bytes, which the store's text cannot hold) is stored with U+FFFD in their place;
    the trial's result is not refused over and over."""
    project = tmp_path / "binary"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_binary.py").write_text(
        "import os\n\n\ndef test_writes_binary():\n"
        "    print('before\\x00after')\n    os.write(1, b'raw\\x00bytes\\n')\n    assert False\n"
    )
    (project / "test_fine.py").write_text("def test_fine():\n    print('\\x00')\n")
    run = await asyncio.to_thread(
        run_cli, "run", "--max-trials", "1", "--progress", "plain", cwd=project, env=env_for(serve), timeout=90
    )
    assert run.returncode == 1, run.stderr
    assert "2 files (1 passed, 0 pending, 1 failed)" in run.stdout, run.stdout
    assert "before\ufffdafter" in run.stdout, run.stdout


async def test_passing_suite_exits_0_and_history_orders_the_next_run(
    serve: Serve, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    project = copy_suite("passing", tmp_path)
    first = await asyncio.to_thread(run_cli, "run", "--progress", "plain", cwd=project, env=env_for(serve))
    assert first.returncode == 0, first.stderr
    assert "2 files (2 passed, 0 pending, 0 failed)" in first.stdout
    second = await asyncio.to_thread(run_cli, "run", cwd=project, env=env_for(serve))
    assert second.returncode == 0, second.stderr
    assert "2 files (2 with history)" in second.stderr
    assert "unchanged on the coordinator; not uploaded" in second.stderr


async def test_ctrl_c_cancels_a_real_run(serve: Serve, worker: subprocess.Popen[bytes], tmp_path: Path) -> None:
    project = tmp_path / "sleepy"
    write_sleepy_suite(project, files=4, seconds=30)
    process = start_cli("run", "--progress", "plain", cwd=project, env=env_for(serve))
    deadline = time.monotonic() + 60
    while "running" not in (await asyncio.to_thread(run_cli, "actives", cwd=project, env=env_for(serve))).stdout:
        assert time.monotonic() < deadline, "the taskset never ran"
        await asyncio.sleep(0.3)
    await asyncio.sleep(2.0)
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 2, stderr
    taskset_id = re.search(r"cancelling taskset (\d+)", stderr)
    assert taskset_id is not None, stderr
    shown = await asyncio.to_thread(run_cli, "show", taskset_id.group(1), "--json", cwd=project, env=env_for(serve))
    assert json.loads(shown.stdout)["status"] == "cancelled"
    # The worker gave its slaves up and is free again.
    deadline = time.monotonic() + 60
    while (
        await asyncio.to_thread(run_cli, "workers", cwd=project, env=env_for(serve))
    ).stdout.strip() != "e2e-worker\tdefault\t-":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.3)


async def test_coordinator_restart_mid_run_keeps_the_verdict(
    serve: Serve, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    project = tmp_path / "sleepy"
    write_sleepy_suite(project, files=6, seconds=1.5)
    (project / "test_fails.py").write_text(
        "import time\n\n\ndef test_fails():\n    time.sleep(1.5)\n    assert False\n"
    )
    process = start_cli("run", "--progress", "plain", "--max-trials", "1", cwd=project, env=env_for(serve))
    deadline = time.monotonic() + 60
    while "running" not in (await asyncio.to_thread(run_cli, "actives", cwd=project, env=env_for(serve))).stdout:
        assert time.monotonic() < deadline, "the taskset never ran"
        await asyncio.sleep(0.3)
    await asyncio.sleep(2.0)
    serve.stop()
    await asyncio.sleep(1.0)
    assert process.poll() is None, "the client must keep waiting while the coordinator is away"
    serve.start()
    stdout, stderr = await asyncio.to_thread(process.communicate, timeout=180)
    assert process.returncode == 1, stderr
    assert "7 files (6 passed, 0 pending, 1 failed)" in stdout
    assert "FAILED test_fails.py" in stdout


def _children_of_data_dir(data_dir: Path) -> list[str]:
    """Command lines of the processes that run in the data directory or name it (the slaves run in its work/)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(data_dir) in command or cwd.startswith(str(data_dir)):
            found.append(command)
    return found


async def test_files_not_run_after_the_slaves_kept_dying_are_explained(tmp_path: Path) -> None:
    """Files whose tests end their slave use up a worker's slave failures; the files left over are not
    run, and the report shows the worker's log saying why."""
    project = tmp_path / "dying"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    for name in ("test_crash_1.py", "test_crash_2.py"):
        (project / name).write_text("import os\n\n\ndef test_x():\n    os._exit(3)\n")
    for number in range(5):
        (project / f"test_ok_{number}.py").write_text("def test_ok():\n    pass\n")
    local = await asyncio.to_thread(
        run_cli,
        "local",
        "--slaves",
        "1",
        "--data-dir",
        str(tmp_path / "local-data"),
        "--progress",
        "plain",
        cwd=project,
        env=cli_env(),
        timeout=240,
    )
    assert local.returncode == 1, local.stderr
    summary = next(line for line in local.stdout.splitlines() if line.startswith("testfleet: taskset"))
    not_run = re.search(r"(\d+) not run", summary)
    assert not_run is not None and int(not_run[1]) >= 5, local.stdout  # the healthy files at least
    assert f"with {not_run[1]} files not run; the end of each worker's log:" in local.stdout, local.stdout
    assert "slave failure exits" in local.stdout, local.stdout
    # Each crashed attempt says how its slave ended, and on which file.
    assert "[testfleet: the slave exited with 3 while it ran test_crash_1.py]" in local.stdout, local.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_test_files_git_ignores_are_left_out_and_named(tmp_path: Path) -> None:
    """They are not sent to the workers, so running them could only fail ("file not found")."""
    project = tmp_path / "ignoring"
    (project / "gen").mkdir(parents=True)
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / ".gitignore").write_text("gen/\n")
    (project / "test_ok.py").write_text("def test_ok():\n    pass\n")
    (project / "test_co::lon.py").write_text("def test_colon():\n    pass\n")  # shipped: its name is no test id
    (project / "gen" / "test_generated.py").write_text("def test_generated():\n    pass\n")
    subprocess.run(["git", "init", "-q", str(project)], check=True, capture_output=True)
    local = await asyncio.to_thread(
        run_cli, "local", "--data-dir", str(tmp_path / "local-data"), cwd=project, env=cli_env(), timeout=240
    )
    assert local.returncode == 0, local.stdout + local.stderr
    assert "left out 1 test file that git ignores (not sent to the workers): gen/test_generated.py" in local.stderr
    assert "2 files (2 passed, 0 pending, 0 failed)" in local.stdout


async def test_local_runs_and_cleans_up(tmp_path: Path) -> None:
    project = copy_suite("every_outcome", tmp_path)
    data_dir = tmp_path / "local-data"
    expected = plain_pytest(project, tmp_path / "pytest.xml")
    local = await asyncio.to_thread(
        run_cli,
        "local",
        "--slaves",
        "2",
        "--max-trials",
        "1",
        "--data-dir",
        str(data_dir),
        "--junit-xml",
        str(tmp_path / "local.xml"),
        cwd=project,
        env=cli_env(),
        timeout=240,
    )
    assert local.returncode == 1, local.stderr
    assert (
        f"tests: {expected['passed']} passed, {expected['pending']} pending, {expected['failed']} failed"
        in local.stdout
    )
    assert ET.parse(tmp_path / "local.xml").getroot().tag == "testsuites"
    assert _children_of_data_dir(data_dir) == []


async def test_local_ctrl_c_stops_everything(tmp_path: Path) -> None:
    project = tmp_path / "sleepy"
    write_sleepy_suite(project, files=3, seconds=60)
    data_dir = tmp_path / "local-data"
    process = start_cli(
        "local", "--slaves", "2", "--data-dir", str(data_dir), "--progress", "plain", cwd=project, env=cli_env()
    )
    try:
        deadline = time.monotonic() + 120
        while len([c for c in _children_of_data_dir(data_dir) if "worker.slave" in c]) < 2:
            assert time.monotonic() < deadline, "the slaves never started"
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 2, stderr
    assert "cancelling taskset" in stderr
    assert _children_of_data_dir(data_dir) == [], "testfleet local left processes behind"
    assert os.path.isdir(data_dir / "logs")


async def test_rsync_transport(serve: Serve, tmp_path: Path) -> None:
    """With a remote path on both sides the code goes by rsync, not by the coordinator's bundle."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    remote = tmp_path / "remote"
    remote.mkdir()
    with running_worker(serve, tmp_path, "rsync-worker", "--slaves", "1", "--rsync-remote-path", str(remote)):
        project = copy_suite("passing", tmp_path)
        env = env_for(serve, TESTFLEET_RSYNC_REMOTE_PATH=str(remote), TESTFLEET_RSYNC_NAME="dev3")
        run = await asyncio.to_thread(run_cli, "run", cwd=project, env=env)
        assert run.returncode == 0, run.stderr
        assert "rsynced the project" in run.stderr
        assert sorted(p.name for p in (remote / "dev3").iterdir()) == sorted(p.name for p in project.iterdir())
        assert (tmp_path / "work" / "dev3" / "test_alpha.py").is_file()


async def test_a_run_without_a_worker_says_so_and_goes_on_when_one_comes(serve: Serve, tmp_path: Path) -> None:
    """Before, a run with no worker of its type connected waited without a word."""
    project = tmp_path / "quick"
    write_sleepy_suite(project, files=2, seconds=0)
    process = start_cli("run", "--progress", "plain", "--worker-type", "e2e-late", cwd=project, env=env_for(serve))
    assert process.stderr is not None
    lines: list[str] = []

    def read_until(text: str) -> None:
        assert process.stderr is not None
        while (line := process.stderr.readline()) and text not in line:
            lines.append(line)
        lines.append(line)

    await asyncio.wait_for(asyncio.to_thread(read_until, "no worker of type 'e2e-late'"), 60)
    assert "the taskset waits for one" in lines[-1], lines
    with running_worker(serve, tmp_path, "late-worker", "--worker-type", "e2e-late", "--slaves", "1"):
        _, stderr = await asyncio.to_thread(process.communicate, timeout=120)
    assert process.returncode == 0, "".join(lines) + stderr
    assert stderr.count("no worker of type") == 0  # said once, not at every ask


async def test_an_interrupt_while_the_coordinator_is_away_says_the_taskset_may_still_run(
    serve: Serve, worker: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    """Before, the cancel gave up with an empty reason, and the run then waited for the coordinator to
    print a report of a taskset that went on running."""
    project = tmp_path / "sleepy"
    write_sleepy_suite(project, files=4, seconds=30)
    process = start_cli("run", "--progress", "plain", "--disconnect-timeout-sec", "3", cwd=project, env=env_for(serve))
    deadline = time.monotonic() + 60
    while "running" not in (await asyncio.to_thread(run_cli, "actives", cwd=project, env=env_for(serve))).stdout:
        assert time.monotonic() < deadline, "the taskset never ran"
        await asyncio.sleep(0.3)
    serve.stop(signal.SIGKILL)
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 2, stderr
    said = re.search(r"could not cancel taskset (\d+): .+; it may still be running \(`testfleet cancel \1`", stderr)
    assert said is not None, stderr
    serve.start()
    shown = await asyncio.to_thread(run_cli, "show", said.group(1), "--json", cwd=project, env=env_for(serve))
    assert json.loads(shown.stdout)["status"] == "running"
    cancelled = await asyncio.to_thread(run_cli, "cancel", said.group(1), cwd=project, env=env_for(serve))
    assert cancelled.returncode == 0, cancelled.stderr
