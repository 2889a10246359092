"""The worker's settings: flags over environment over defaults, validated at the edge."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker.config import (
    SettingsError,
    WorkerSettings,
    build_parser,
    normalize_coordinator_url,
    notices,
    settings_from_args,
)


def test_flags_win_over_environment() -> None:
    env = {"TESTFLEET_COORDINATOR": "http://env:1", "TESTFLEET_SLAVES": "3", "TESTFLEET_WORKER_TYPE": "gpu"}
    settings = settings_from_args(["--coordinator", "http://flag:7878/", "--slaves", "5"], env)
    assert settings.coordinator_url == "http://flag:7878"
    assert settings.slaves == 5
    assert settings.worker_type == "gpu"


def test_every_flag_reads_its_environment_variable() -> None:
    env = {
        "TESTFLEET_COORDINATOR": "https://coord.example:443",
        "TESTFLEET_WORKER_NAME": "box-1",
        "TESTFLEET_WORKER_TYPE": "big",
        "TESTFLEET_SLAVES": "7",
        "TESTFLEET_WORK_DIR": "/tmp/tf-work",
        "TESTFLEET_RSYNC_REMOTE_PATH": "host:/srv/code",
        "TESTFLEET_RSYNC_OPTIONS": "-z --exclude='a b'",
        "TESTFLEET_TOKEN": "sekret",
        "TESTFLEET_WORKER_SLAVE_GRACE_SEC": "2.5",
        "TESTFLEET_WORKER_HEARTBEAT_SEC": "2",
        "TESTFLEET_LOG_LEVEL": "DEBUG",
    }
    settings = settings_from_args([], env)
    assert settings == WorkerSettings(
        coordinator_url="https://coord.example:443",
        name="box-1",
        worker_type="big",
        slaves=7,
        work_dir="/tmp/tf-work",
        rsync_remote_path="host:/srv/code",
        rsync_options=("-z", "--exclude=a b"),
        token="sekret",
        slave_grace_sec=2.5,
        heartbeat_sec=2.0,
        log_level="debug",
    )
    assert settings.bundle_url("my.project") == "https://coord.example:443/api/v1/bundles/my.project"


def test_defaults() -> None:
    settings = settings_from_args(["--coordinator", "ws://127.0.0.1:7878/ws"], {})
    assert settings.coordinator_url == "http://127.0.0.1:7878"
    assert settings.slaves == (os.cpu_count() or 1)
    assert settings.worker_type == "default"
    assert settings.slave_grace_sec == 5.0
    assert settings.rsync_remote_path is None
    assert settings.token is None
    assert settings.heartbeat_sec == 5.0
    assert settings.work_dir.endswith((".cache/testfleet/work", f"testfleet-work-{os.getuid()}"))
    other = settings_from_args(["--coordinator", "http://x"], {})
    assert settings.name != other.name, "the default name carries a unique suffix"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--coordinator", "ftp://x"],
        ["--coordinator", "http://x", "--slaves", "0"],
        ["--coordinator", "http://x", "--slaves", "many"],
        ["--coordinator", "http://x", "--slave-grace-sec", "-1"],
        ["--coordinator", "http://x", "--name", "../etc"],
        ["--coordinator", "http://x", "--rsync-options", "'unbalanced"],
        ["--coordinator", "http://x", "--log-level", "loud"],
        ["--coordinator", "http://x", "--heartbeat-sec", "10"],
        ["--coordinator", "http://x", "--heartbeat-sec", "0"],
        ["--coordinator", "http://x", "--heartbeat-sec", "often"],
    ],
)
def test_bad_settings_are_refused(argv: list[str]) -> None:
    with pytest.raises(SettingsError):
        settings_from_args(argv, {})


def test_url_normalization() -> None:
    assert normalize_coordinator_url("wss://h:1/prefix/ws/") == "https://h:1/prefix"
    assert normalize_coordinator_url("http://h") == "http://h"


def test_help_names_each_variable() -> None:
    text = build_parser().format_help()
    for var in (
        "TESTFLEET_COORDINATOR",
        "TESTFLEET_SLAVES",
        "TESTFLEET_RSYNC_OPTIONS",
        "TESTFLEET_WORKER_SLAVE_GRACE_SEC",
        "TESTFLEET_WORKER_HEARTBEAT_SEC",
    ):
        assert var in text


def test_settings_are_frozen() -> None:
    settings = settings_from_args(["--coordinator", "http://x"], {})
    with pytest.raises(AttributeError):
        settings.slaves = 3  # type: ignore[misc]


def test_coordinators_grace_variable_is_not_the_workers() -> None:
    """One environment for both processes: the coordinator's 15 s re-bind grace does not become the stop wait."""
    env = {"TESTFLEET_COORDINATOR": "http://x", "TESTFLEET_SLAVE_GRACE_SEC": "15"}
    assert settings_from_args([], env).slave_grace_sec == 5.0
    (notice,) = notices(env)
    assert "TESTFLEET_WORKER_SLAVE_GRACE_SEC" in notice
    assert notices({**env, "TESTFLEET_WORKER_SLAVE_GRACE_SEC": "3"}) == []
    assert settings_from_args([], {**env, "TESTFLEET_WORKER_SLAVE_GRACE_SEC": "3"}).slave_grace_sec == 3.0
    assert notices({"TESTFLEET_COORDINATOR": "http://x"}) == []


def test_a_work_directory_that_cannot_be_is_one_line_before_connecting(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    command = [sys.executable, "-m", "worker", "--coordinator", "http://127.0.0.1:9", "--token", "t"]
    done = subprocess.run(
        [*command, "--work-dir", str(tmp_path / "a-file")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"cannot use the work directory {tmp_path / 'a-file'}: File exists" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_pointed_at_something_else_than_a_coordinator_says_so_and_exits(tmp_path: Path) -> None:
    """An HTTP server that answers 404 to the upgrade: one error line and exit 1, not retries forever."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as attempt:
                if attempt.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        command = [sys.executable, "-m", "worker", "--coordinator", f"http://127.0.0.1:{port}", "--token", "t"]
        done = subprocess.run(
            [*command, "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=60, check=False
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert done.returncode == 1, done.stderr
    assert "not a coordinator's WebSocket endpoint (HTTP 404)" in done.stderr
    assert "Traceback" not in done.stderr
