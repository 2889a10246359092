"""`testfleet serve` as a real process: starts on the embedded Postgres, refuses unsafe binds, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

pytestmark = pytest.mark.e2e


def start_serve(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli.main", "serve", "--port", "0", "--data-dir", str(data_dir), *extra],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if match:
            # Keep reading its log so a full pipe never blocks the coordinator.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    proc.stderr.close()
    raise AssertionError("testfleet serve did not start")


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.stderr is not None:
            proc.stderr.close()


def rpc(url: str, method: str, *params: object) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    request = urllib.request.Request(url + "/rpc", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


def postmaster_alive(data_dir: Path) -> bool:
    pid_file = data_dir / "postgres" / "pgdata" / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_keeps_state_across_a_clean_restart(tmp_path: Path) -> None:
    data_dir = Path(f"/tmp/testfleet-e2e-serve-{os.getpid()}-{time.monotonic_ns()}")
    try:
        proc, url = start_serve(data_dir)
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
                assert json.loads(resp.read())["database"] is True
            created = rpc(url, "create_taskset", "e2e", "", "", "default", "c", 1, 1, [["a.py", "s", 5, 3]])
            ref = created["result"]  # type: ignore[index]
        finally:
            assert stop(proc) == 0
        assert not postmaster_alive(data_dir), "the embedded Postgres outlived its coordinator"
        proc, url = start_serve(data_dir)
        try:
            assert rpc(url, "query_taskset_status", ref)["result"] == "rsync_waiting"  # type: ignore[index]
        finally:
            assert stop(proc) == 0
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def test_serve_refuses_public_bind_with_open_roles(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.cli.main", "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0" in out.stderr and "--insecure" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.cli.main", "serve", "--data-dir", "/root/testfleet-data"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if os.geteuid() == 0:
        assert out.returncode == 2 and "/root" in out.stderr


def serve_once(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--port", "99999"), "'99999' is not a port"),
        (("--heartbeat-sec", "-1"), "'-1' is not a positive number of seconds"),
        (("--log-level", "bogus"), "invalid choice: 'bogus'"),
    ],
)
def test_serve_refuses_bad_settings_as_usage_errors(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = serve_once("serve", "--data-dir", str(tmp_path), *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_setting_in_the_environment_breaks_only_serve(tmp_path: Path) -> None:
    """Before, it broke every command, `--help` included, with a traceback."""
    env = {"TESTFLEET_PORT": "abc", "TESTFLEET_HEARTBEAT_SEC": "x"}
    assert serve_once("--help", env=env).returncode == 0
    out = serve_once("serve", "--data-dir", str(tmp_path), env=env)
    assert out.returncode == 2 and "'abc' is not a port" in out.stderr, out.stderr


def test_what_keeps_serve_from_starting_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    cases = [
        (("--data-dir", str(tmp_path / "a-file")), "cannot start: File exists"),
        (("--data-dir", str(tmp_path / "d"), "--database-url", "notaurl"), "cannot start: invalid DSN"),
    ]
    for args, message in cases:
        out = serve_once("serve", "--port", "0", *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr, out.stderr
    taken, url = start_serve(tmp_path / "first")
    try:
        port = url.rsplit(":", 1)[1]
        out = serve_once("serve", "--port", port, "--data-dir", str(tmp_path / "second"))
        assert out.returncode == 2 and "cannot start" in out.stderr and "in use" in out.stderr, out.stderr
    finally:
        stop(taken)


def test_a_switch_in_the_environment_is_a_word_serve_knows(tmp_path: Path) -> None:
    """`TESTFLEET_INSECURE=maybe` was read as false without a word; now it is a usage error."""
    out = serve_once("serve", "--data-dir", str(tmp_path), env={"TESTFLEET_INSECURE": "maybe"})
    assert out.returncode == 2 and "TESTFLEET_INSECURE must be 1, true, yes or on" in out.stderr, out.stderr
    assert "'maybe'" in out.stderr and "Traceback" not in out.stderr
    # A known word counts: "off" keeps the public-bind check, "on" passes it (and then the start fails on
    # the data directory, a file, before anything listens).
    (tmp_path / "a-file").write_text("")
    public = ("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "a-file"))
    out = serve_once(*public, env={"TESTFLEET_INSECURE": "off"})
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0" in out.stderr, out.stderr
    out = serve_once(*public, env={"TESTFLEET_INSECURE": "On"})
    assert out.returncode == 2 and "cannot start: File exists" in out.stderr, out.stderr


def test_roles_sharing_a_token_are_named_and_an_empty_token_is_none(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    args = ("serve", "--data-dir", str(tmp_path / "a-file"), "--client-token", "same", "--worker-token", "same")
    out = serve_once(*args)
    assert "token_shared" in out.stderr and "client and worker roles" in out.stderr, out.stderr
    out = serve_once("serve", "--data-dir", str(tmp_path / "a-file"), "--client-token", "a", "--worker-token", "b")
    assert "token_shared" not in out.stderr, out.stderr
    # A viewer token beside an open client or worker role guards nothing (those roles may view): said at start.
    out = serve_once("serve", "--data-dir", str(tmp_path / "a-file"), "--viewer-token", "v", "--client-token", "c")
    assert "viewer_token_unused" in out.stderr, out.stderr
    out = serve_once(
        "serve",
        "--data-dir",
        str(tmp_path / "a-file"),
        *("--viewer-token", "v", "--client-token", "c"),
        "--worker-token=w",
    )
    assert "viewer_token_unused" not in out.stderr, out.stderr
    # An empty token leaves its role open, which a public address refuses, as it refuses no token at all.
    out = serve_once(
        "serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--client-token", "", "--worker-token", "w"
    )
    assert out.returncode == 2 and "the client role(s) have no token" in out.stderr, out.stderr


def test_serve_starts_its_postgres_again_when_it_dies(tmp_path: Path) -> None:
    """Before, a killed embedded Postgres stayed dead under a coordinator that waited for it for good."""
    data_dir = Path(f"/tmp/testfleet-e2e-revive-{os.getpid()}-{time.monotonic_ns()}")
    try:
        proc, url = start_serve(data_dir)
        try:
            created = rpc(url, "create_taskset", "revive", "", "", "default", "c", 1, 1, [["a.py", "s", 5, 3]])
            ref = created["result"]  # type: ignore[index]
            pid_file = data_dir / "postgres" / "pgdata" / "postmaster.pid"
            first = int(pid_file.read_text().split()[0])
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while True:
                # Until a new postmaster serves: right after the kill the old one may still be a zombie that
                # `kill(pid, 0)` finds, and a backend it left may still answer the health check.
                try:
                    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
                        healthy = json.loads(resp.read())["database"] is True
                    if healthy and postmaster_alive(data_dir) and int(pid_file.read_text().split()[0]) != first:
                        break
                except (OSError, ValueError, IndexError):
                    pass  # 503 while the database is away; the pid file being written
                assert time.monotonic() < deadline, "the embedded Postgres did not come back"
                time.sleep(0.2)
            deadline = time.monotonic() + 30
            while "result" not in (status := rpc(url, "query_taskset_status", ref)):  # type: ignore[operator]
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            assert status["result"] == "rsync_waiting"  # type: ignore[index]
        finally:
            assert stop(proc) == 0
        assert not postmaster_alive(data_dir)
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)


def test_library_warnings_are_log_lines_like_the_coordinators_own() -> None:
    """The database driver's warnings came out as bare tracebacks among the JSON lines."""
    script = (
        "import logging\n"
        "from protocol.logs import configure_logging\n"
        "configure_logging('info')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('asyncpg.pool').warning('Failed to restore the pool', exc_info=True)\n"
        "logging.getLogger('asyncpg.pool').info('not shown')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["logger"] == "asyncpg.pool" and record["level"] == "warning"
    assert record["event"] == "Failed to restore the pool" and "ZeroDivisionError" in record["exception"]


def test_a_request_the_server_cannot_read_is_one_warning_line() -> None:
    """A malformed request was an error with a traceback: any outsider could fill the log with them."""
    script = (
        "import logging\n"
        "from aiohttp.http_exceptions import BadStatusLine\n"
        "from protocol.logs import configure_logging\n"
        "configure_logging('info')\n"
        "for error in (BadStatusLine(b'\\x16\\x03'), ConnectionResetError('reset by peer'), ValueError('ours')):\n"
        "    try:\n"
        "        raise error\n"
        "    except Exception as exc:\n"
        "        logging.getLogger('aiohttp.server').exception('Error handling request from %s', '127.0.0.1')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    bad, reset, ours = (json.loads(line) for line in done.stderr.splitlines())
    for record, name in ((bad, "BadStatusLine"), (reset, "ConnectionResetError")):
        assert record["level"] == "warning" and "exception" not in record
        assert record["event"].startswith(f"Error handling request from 127.0.0.1: {name}"), record
    assert ours["level"] == "error" and "ValueError: ours" in ours["exception"]  # a fault of ours keeps its trace


def test_the_worker_logs_library_records_as_its_own_lines_too() -> None:
    """The worker's libraries (the WebSocket client, say) wrote bare text among its JSON lines."""
    script = (
        "import logging, sys\n"
        "import worker.__main__ as entry\n"
        "entry.configure_logging('warning', colors=True)\n"
        "logging.getLogger('aiohttp.client').warning('Unclosed client session')\n"
        "import structlog\n"
        "structlog.get_logger('testfleet.worker').info('not shown')\n"
        "structlog.get_logger('testfleet.worker').warning('shown')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    first, second = (json.loads(line) for line in done.stderr.splitlines())
    assert first["logger"] == "aiohttp.client" and first["event"] == "Unclosed client session"
    assert second["event"] == "shown" and second["level"] == "warning"


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the peer closed `sock` (reading and dropping what it sends); fails after `seconds`."""
    started = time.monotonic()
    sock.settimeout(seconds)
    while sock.recv(4096):
        pass
    return time.monotonic() - started


def _reply_head(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a reply: {data!r}"
        data += chunk
    return data


def test_serve_closes_connections_whose_requests_stall() -> None:
    """No request, a request trickled in, a stalled body, a stalled upload, an idle keep-alive: each connection
    is closed after the request timeout (a stalled body with a 408), while a quiet WebSocket stays open."""
    data_dir = Path(f"/tmp/testfleet-e2e-serve-{os.getpid()}-{time.monotonic_ns()}")
    try:
        proc, url = start_serve(data_dir, "--request-timeout-sec", "1")
        address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
        try:
            with contextlib.ExitStack() as sockets:

                def connect() -> socket.socket:
                    return sockets.enter_context(socket.create_connection(address))

                silent = connect()
                trickle = connect()
                trickle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                body = connect()
                body.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
                body.sendall(b'Content-Length: 100\r\n\r\n{"jsonrpc"')
                upload = connect()
                upload.sendall(b"PUT /api/v1/bundles/stall HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nab")
                idle = connect()
                idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b" 200 " in _reply_head(idle).split(b"\r\n", 1)[0]

                async def quiet_websocket() -> object:
                    async with aiohttp.ClientSession() as session, session.ws_connect(url + "/ws") as ws:
                        await asyncio.sleep(2.5)  # longer than the request timeout, shorter than a heartbeat
                        await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "active_tasksets", "params": []})
                        return (await ws.receive_json(timeout=10))["result"]

                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    websocket = pool.submit(asyncio.run, quiet_websocket())
                    # A header line every 0.2 s keeps no connection open past the timeout.
                    deadline = time.monotonic() + 8
                    with pytest.raises(OSError):
                        while time.monotonic() < deadline:
                            trickle.sendall(b"X-Slow: 1\r\n")
                            time.sleep(0.2)
                            trickle.setblocking(False)
                            try:
                                if trickle.recv(4096) == b"":
                                    raise ConnectionResetError("closed")
                            except BlockingIOError:
                                pass
                            finally:
                                trickle.setblocking(True)
                    assert time.monotonic() < deadline, "a request trickled in a header at a time was never cut off"
                    assert _closed_within(silent, 8) < 8
                    for stalled in (body, upload):
                        head = _reply_head(stalled)
                        assert head.startswith(b"HTTP/1.1 408 "), head
                        _closed_within(stalled, 8)
                    _closed_within(idle, 8)
                    assert websocket.result(timeout=30) == []
                assert not list((data_dir / "bundles").glob("*.part")), "a stalled upload left its part file"
                # A body that keeps coming, slowly, has all the time it needs: 2 s here, twice the timeout.
                slow = connect()
                call = b'{"jsonrpc": "2.0", "id": 7, "method": "active_tasksets", "params": []}'
                slow.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
                slow.sendall(f"Content-Length: {len(call)}\r\nConnection: close\r\n\r\n".encode())
                for i in range(0, len(call), 9):
                    slow.sendall(call[i : i + 9])
                    time.sleep(0.25)
                head = _reply_head(slow)
                assert head.startswith(b"HTTP/1.1 200 "), head
                assert rpc(url, "active_tasksets") == {"jsonrpc": "2.0", "id": 1, "result": []}
        finally:
            assert stop(proc) == 0
    finally:
        subprocess.run(["rm", "-rf", str(data_dir)], check=False)
