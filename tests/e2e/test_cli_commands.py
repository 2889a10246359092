"""`testfleet submit/wait/show/cancel/cancel-user/actives/workers/run` against a real `testfleet serve` process.

The files are run by a simulated slave (a raw JSON-RPC client in the test), so these tests pin the
client's side alone: exit codes, parseable output, the bundle, Ctrl-C and a coordinator restart.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.e2e.test_cli_support import (
    Outcome,
    Serve,
    SimulatedSlave,
    cli_env,
    copy_suite,
    run_cli,
    serve,
    sim_outcome,
    start_cli,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
__all__ = ["serve"]


def env_for(server: Serve, **extra: str) -> dict[str, str]:
    return cli_env(**{"TESTFLEET_COORDINATOR": server.url, "TESTFLEET_TOKEN": "client-secret", **extra})


def passing(spec_path: str, attempt: int) -> Outcome:
    return ("passed", 1, 0, 0, "")


async def wait_for_active(server: Serve, cwd: Path, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(run_cli, "actives", cwd=cwd, env=env_for(server))
        if result.stdout.strip():
            return result.stdout.strip().splitlines()
        await asyncio.sleep(0.2)
    raise AssertionError("no active taskset appeared")


async def test_submit_wait_show(serve: Serve, tmp_path: Path) -> None:
    project = copy_suite("every_outcome", tmp_path)
    env = env_for(serve, TESTFLEET_RSYNC_NAME="dev1")
    submitted = await asyncio.to_thread(run_cli, "submit", cwd=project, env=env)
    assert submitted.returncode == 0, submitted.stderr
    taskset_id = submitted.stdout.strip()
    assert taskset_id.isdigit()

    slave = SimulatedSlave(serve.url, sim_outcome)
    await slave.run()
    assert slave.bundle is not None
    with tarfile.open(fileobj=io.BytesIO(slave.bundle), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == sorted(p.name for p in project.iterdir())

    waited = await asyncio.to_thread(
        run_cli, "wait", taskset_id, "--junit-xml", str(tmp_path / "out" / "junit.xml"), cwd=project, env=env
    )
    assert waited.returncode == 1, waited.stderr
    assert "FAILED test_outcomes.py (failed, failed, failed)" in waited.stdout
    assert "FAILED test_import_error.py (error, error, error)" in waited.stdout
    assert "assert 0" in waited.stdout  # the failed file's output
    summary = waited.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"testfleet: taskset {taskset_id} failed")
    assert "4 files (0 passed, 2 pending, 2 failed); tests: 6 passed, 4 pending, 8 failed" in summary
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert {s.get("name") for s in junit.iter("testsuite")} == {p.name for p in project.glob("test_*.py")}

    shown = await asyncio.to_thread(run_cli, "show", taskset_id, cwd=project, env=env)
    assert shown.returncode == 1
    rows = [line.split("\t") for line in shown.stdout.splitlines()]
    assert ["status", "failed"] in rows
    assert ["tests_failed", "8"] in rows
    assert ["failed_file", "test_outcomes.py"] in rows
    custom = await asyncio.to_thread(
        run_cli, "show", taskset_id, "--failure-exit-code", "7", "--json", cwd=project, env=env
    )
    assert custom.returncode == 7
    document = json.loads(custom.stdout)
    assert document["files"] == {"total": 4, "passed": 0, "pending": 2, "failed": 2, "undecided": 0}
    assert document["tests"] == {"passed": 6, "pending": 4, "failed": 8}

    # The same tree again: the bundle is not uploaded a second time.
    again = await asyncio.to_thread(run_cli, "submit", cwd=project, env=env)
    assert again.returncode == 0, again.stderr
    assert "unchanged on the coordinator; not uploaded" in again.stderr
    cancelled = await asyncio.to_thread(run_cli, "cancel", again.stdout.strip(), cwd=project, env=env)
    assert cancelled.returncode == 0


async def test_actives_workers_cancel_and_cancel_user(serve: Serve, tmp_path: Path) -> None:
    project = copy_suite("passing", tmp_path)
    env = env_for(serve, TESTFLEET_RSYNC_NAME="dev2")
    first = await asyncio.to_thread(run_cli, "submit", cwd=project, env=env)
    assert first.returncode == 0, first.stderr
    taskset_id = first.stdout.strip()

    busy = await asyncio.to_thread(run_cli, "submit", cwd=project, env=env)
    assert busy.returncode == 2
    assert "refused" in busy.stderr and "dev2" in busy.stderr

    actives = await asyncio.to_thread(run_cli, "actives", cwd=project, env=env)
    fields = actives.stdout.strip().split("\t")
    assert fields[:4] == [taskset_id, "waiting", "dev2", "passing"]
    listed = json.loads((await asyncio.to_thread(run_cli, "actives", "--json", cwd=project, env=env)).stdout)
    assert [t["id"] for t in listed["tasksets"]] == [int(taskset_id)]

    slave = SimulatedSlave(serve.url, passing, delay_s=60)
    running = asyncio.create_task(slave.run())
    try:
        deadline = time.monotonic() + 30
        while True:
            workers = await asyncio.to_thread(run_cli, "workers", cwd=project, env=env)
            if workers.stdout.strip() == f"sim-worker\tdefault\t{taskset_id}":
                break
            assert time.monotonic() < deadline, workers.stdout
            await asyncio.sleep(0.2)
        as_json = json.loads((await asyncio.to_thread(run_cli, "workers", "--json", cwd=project, env=env)).stdout)
        assert as_json == {"workers": [{"name": "sim-worker", "worker_type": "default", "taskset_id": int(taskset_id)}]}

        cancel = await asyncio.to_thread(run_cli, "cancel", taskset_id, cwd=project, env=env)
        assert cancel.returncode == 0, cancel.stderr
        shown = await asyncio.to_thread(run_cli, "show", taskset_id, cwd=project, env=env)
        assert shown.returncode == 2
        assert "status\tcancelled" in shown.stdout
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    second = await asyncio.to_thread(run_cli, "submit", cwd=project, env=env)
    assert second.returncode == 0, second.stderr
    assert (await asyncio.to_thread(run_cli, "actives", cwd=project, env=env)).stdout.strip()
    cancel_user = await asyncio.to_thread(run_cli, "cancel-user", "dev2", cwd=project, env=env)
    assert cancel_user.returncode == 0
    assert (await asyncio.to_thread(run_cli, "actives", cwd=project, env=env)).stdout.strip() == ""
    waited = await asyncio.to_thread(run_cli, "wait", second.stdout.strip(), cwd=project, env=env)
    assert waited.returncode == 2


async def test_errors_exit_2(serve: Serve, tmp_path: Path) -> None:
    project = copy_suite("passing", tmp_path)
    wrong_token = await asyncio.to_thread(run_cli, "submit", cwd=project, env=env_for(serve, TESTFLEET_TOKEN="wrong"))
    assert wrong_token.returncode == 2
    nowhere = cli_env(TESTFLEET_COORDINATOR="http://127.0.0.1:9", TESTFLEET_DISCONNECT_TIMEOUT_SEC="1")
    unreachable = await asyncio.to_thread(run_cli, "run", cwd=project, env=nowhere)
    assert unreachable.returncode == 2
    assert "unreachable" in unreachable.stderr
    # Said as soon as it starts retrying, not only once it gives up.
    assert "cannot reach the coordinator at http://127.0.0.1:9" in unreachable.stderr
    assert "trying again for up to 1 s" in unreachable.stderr
    (tmp_path / "empty").mkdir()
    no_files = await asyncio.to_thread(run_cli, "submit", "empty", env=env_for(serve), cwd=tmp_path)
    assert no_files.returncode == 2
    assert "no test files found" in no_files.stderr
    missing = await asyncio.to_thread(run_cli, "show", "999", cwd=project, env=env_for(serve))
    assert missing.returncode == 2


async def test_run_follows_to_the_verdict(serve: Serve, tmp_path: Path) -> None:
    project = copy_suite("passing", tmp_path)
    process = start_cli("run", "--progress", "plain", "--junit-xml", "junit.xml", cwd=project, env=env_for(serve))
    slave = SimulatedSlave(serve.url, passing, delay_s=0.2)
    await slave.run()
    stdout, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 0, stderr
    assert "files done" in stderr  # plain progress lines, not a live bar
    assert "\x1b[" not in stderr
    assert "2 files (2 passed, 0 pending, 0 failed)" in stdout
    assert len(list(ET.parse(project / "junit.xml").getroot().iter("testcase"))) == 2


async def test_ctrl_c_cancels_the_taskset(serve: Serve, tmp_path: Path) -> None:
    project = copy_suite("passing", tmp_path)
    env = env_for(serve)
    process = start_cli("run", "--progress", "plain", cwd=project, env=env)
    slave = SimulatedSlave(serve.url, passing, delay_s=120)
    running = asyncio.create_task(slave.run())
    try:
        (line,) = await wait_for_active(serve, project)
        taskset_id = line.split("\t")[0]
        await asyncio.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert process.returncode == 2, stderr
    assert f"cancelling taskset {taskset_id}" in stderr
    shown = await asyncio.to_thread(run_cli, "show", taskset_id, "--json", cwd=project, env=env)
    assert json.loads(shown.stdout)["status"] == "cancelled"


async def test_coordinator_restart_does_not_end_the_wait(serve: Serve, tmp_path: Path) -> None:
    project = copy_suite("passing", tmp_path)
    process = start_cli("run", "--progress", "plain", cwd=project, env=env_for(serve))
    first = SimulatedSlave(serve.url, passing, name="sim-a")
    await first.run(stop_after=1)
    serve.stop()
    await asyncio.sleep(2.0)
    assert process.poll() is None, "the client must keep waiting while the coordinator is away"
    serve.start()
    second = SimulatedSlave(serve.url, passing, name="sim-b")
    await second.run()
    stdout, stderr = await asyncio.to_thread(process.communicate, timeout=120)
    assert process.returncode == 0, stderr
    assert "2 files (2 passed, 0 pending, 0 failed)" in stdout
    assert len(first.ran) + len(second.ran) == 2
