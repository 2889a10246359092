"""`testfleet serve`: the coordinator process, on the embedded Postgres unless given a database URL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import asyncpg
import msgspec
import structlog
from aiohttp import web

from coordinator.runtime.coordinator import RuntimeSettings
from coordinator.store.embedded import EmbeddedPostgres, EmbeddedPostgresError
from coordinator.transport import keys
from coordinator.transport.app import build_app
from coordinator.transport.rpc import Tokens
from protocol.logs import configure_logging

log = structlog.get_logger("testfleet.serve")

GC_YOUNG_THRESHOLD = 10_000


class ServeSettings(msgspec.Struct, frozen=True):
    host: str = "127.0.0.1"
    port: int = 7878
    data_dir: str = ""
    database_url: str | None = None
    client_token: str | None = None
    worker_token: str | None = None
    viewer_token: str | None = None
    insecure: bool = False
    slave_grace_sec: float = 15.0
    heartbeat_sec: float = 10.0
    output_limit_bytes: int = 4 * 1024 * 1024
    request_timeout_sec: float = 30.0
    log_level: str = "info"


def default_data_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/testfleet"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "testfleet")


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"TESTFLEET_{name}", default)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0 to 65535)")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults from the environment stay text: argparse converts them as it converts a flag's value, so a
    # bad one is a usage error of this command (naming its flag), not a crash of every command.
    def opt(flag: str, var: str, help_: str, **kw: object) -> None:
        parser.add_argument(flag, help=f"{help_} (env TESTFLEET_{var})", **kw)  # type: ignore[arg-type]

    opt("--host", "HOST", "address to listen on; 127.0.0.1 by default", default=env("HOST", "127.0.0.1"))
    opt("--port", "PORT", "port to listen on; 0 picks a free one", type=_port, default=env("PORT", "7878"))
    opt("--data-dir", "DATA_DIR", "where the embedded Postgres and bundles live", default=env("DATA_DIR"))
    opt(
        "--database-url",
        "DATABASE_URL",
        "a Postgres URL instead of the embedded server (DATABASE_URL is read too)",
        default=env("DATABASE_URL") or os.environ.get("DATABASE_URL"),
    )
    opt("--client-token", "CLIENT_TOKEN", "token of the client (CI) role", default=env("CLIENT_TOKEN"))
    opt("--worker-token", "WORKER_TOKEN", "token of the worker role", default=env("WORKER_TOKEN"))
    opt("--viewer-token", "VIEWER_TOKEN", "token of the viewer role", default=env("VIEWER_TOKEN"))
    opt(
        "--insecure",
        "INSECURE",
        "listen on a public address even with open roles",
        action="store_true",
        default=env("INSECURE"),  # text until settings_from reads it: a bad value is this command's usage error
    )
    opt(
        "--slave-grace-sec",
        "SLAVE_GRACE_SEC",
        "seconds a disconnected slave has to re-bind",
        type=_seconds,
        default=env("SLAVE_GRACE_SEC", "15"),
    )
    opt(
        "--heartbeat-sec",
        "HEARTBEAT_SEC",
        "a worker missing 3 heartbeats of this period is dropped",
        type=_seconds,
        default=env("HEARTBEAT_SEC", "10"),
    )
    opt(
        "--request-timeout-sec",
        "REQUEST_TIMEOUT_SEC",
        "seconds a connection has to send a request's headers (or a /rpc body, or an upload's next bytes);"
        " an idle keep-alive connection is closed after as long",
        type=_seconds,
        default=env("REQUEST_TIMEOUT_SEC", "30"),
    )
    opt(
        "--log-level",
        "LOG_LEVEL",
        "debug, info, warning or error",
        choices=("debug", "info", "warning", "error"),
        default=env("LOG_LEVEL", "info"),
    )


POSTGRES_WATCH_S: Final = 2.0
"""How often `serve` checks that the embedded Postgres it started still runs."""
TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS: Final = frozenset({"", "0", "false", "no", "off"})


class UsageError(ValueError):
    """A setting `serve` cannot take; said in one line, exit 2."""


def _switch(value: bool | str | None, variable: str) -> bool:
    """A flag's value: True when given, else its variable's word."""
    if value is None or isinstance(value, bool):
        return bool(value)
    word = value.strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise UsageError(f"{variable} must be 1, true, yes or on (or 0, false, no, off or empty), not {value!r}")
    return word in TRUE_WORDS


def _token(value: str | None) -> str | None:
    """An empty token is no token: the role is open, as the public-bind check already counted it."""
    return value or None


def settings_from(args: argparse.Namespace) -> ServeSettings:
    """The settings of the parsed command line; `UsageError` for a value argparse could not check."""
    return ServeSettings(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir or default_data_dir(),
        database_url=args.database_url,
        client_token=_token(args.client_token),
        worker_token=_token(args.worker_token),
        viewer_token=_token(args.viewer_token),
        insecure=_switch(args.insecure, "TESTFLEET_INSECURE"),
        slave_grace_sec=args.slave_grace_sec,
        heartbeat_sec=args.heartbeat_sec,
        request_timeout_sec=args.request_timeout_sec,
        log_level=args.log_level,
    )


def is_loopback(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


async def serve(settings: ServeSettings, ready: Callable[[str], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT; 0 on a clean stop."""
    from coordinator.store.migrate import migrate
    from coordinator.store.pool import create_pool
    from coordinator.store.store import Store

    data_dir = Path(settings.data_dir)
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    embedded = None
    dsn = settings.database_url
    if dsn is None:
        embedded = EmbeddedPostgres()
        dsn = await asyncio.to_thread(embedded.start, data_dir / "postgres")
    try:
        pool = await create_pool(dsn)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
            store = Store(pool)
            app = build_app(
                store,
                tokens=Tokens(settings.viewer_token, settings.client_token, settings.worker_token),
                bundle_dir=data_dir / "bundles",
                settings=RuntimeSettings(
                    slave_grace_s=settings.slave_grace_sec,
                    heartbeat_s=settings.heartbeat_sec,
                    output_limit=settings.output_limit_bytes,
                    request_timeout_s=settings.request_timeout_sec,
                ),
            )
            runner = web.AppRunner(
                app,
                handle_signals=False,
                access_log=None,
                shutdown_timeout=5.0,
                # A connection that has not sent a whole request's headers this long after it opened (or after
                # its last reply) is closed: one that sends nothing, or a byte now and then, holds no file for
                # good. A WebSocket, once upgraded, is the liveness pings' to judge.
                keepalive_timeout=settings.request_timeout_sec,
            )
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
            await site.start()
            port = settings.port
            sockets = getattr(site._server, "sockets", None)
            if sockets:
                port = sockets[0].getsockname()[1]
            url = f"http://{settings.host}:{port}"
            log.info("coordinator_listening", url=url, embedded=embedded is not None)
            print(f"testfleet coordinator listening on {url}", file=sys.stderr, flush=True)
            if ready is not None:
                ready(url)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            if embedded is not None:
                coordinator = app[keys.COORDINATOR]
                coordinator.spawn(_keep_alive(embedded), "embedded-postgres-watch")
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            try:
                await stop.wait()
            finally:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
                log.info("coordinator_stopping")
                await runner.cleanup()
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    return 0


async def _keep_alive(embedded: EmbeddedPostgres) -> None:
    """Start the embedded Postgres again when its postmaster dies (killed, say): the coordinator owns it,
    and nothing else would. The store's retries and the owners' read-backs carry the calls over the gap."""
    while True:
        await asyncio.sleep(POSTGRES_WATCH_S)
        try:
            await asyncio.to_thread(embedded.revive)
        except Exception as exc:
            log.error("embedded_postgres_restart_failed", error=str(exc) or type(exc).__name__)


def tune_gc() -> None:
    """Collect young objects far less often, so a call's objects die before they reach the old generation.

    With the default threshold (700 allocations) the objects of calls waiting on a commit survive two
    young collections and pile into the oldest generation, whose full scans then walk every task state
    of every loaded taskset: about 15 % of the coordinator's time and its longest pauses under load. A far
    higher threshold holds more garbage cycles between collections: at 50,000, about 50 MB more with
    15,000 idle connections (scripts/bench-dispatch).
    """
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 10)


def shared_tokens(settings: ServeSettings) -> list[list[str]]:
    """The roles that share one token, in groups: a peer presenting it acts in each of them."""
    by_token: dict[str, list[str]] = {}
    for role, token in (
        ("client", settings.client_token),
        ("worker", settings.worker_token),
        ("viewer", settings.viewer_token),
    ):
        if token is not None:
            by_token.setdefault(token, []).append(role)
    return [roles for roles in by_token.values() if len(roles) > 1]


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except UsageError as exc:
        print(f"testfleet serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    for roles in shared_tokens(settings):
        # Allowed (a small setup may want one token), but each role exists to keep the others' powers apart.
        structlog.get_logger("testfleet.serve").warning(
            "token_shared",
            roles=roles,
            note=f"one token opens the {' and '.join(roles)} roles; a peer that has it acts in each",
        )
    if settings.viewer_token is not None and (settings.client_token is None or settings.worker_token is None):
        structlog.get_logger("testfleet.serve").warning(
            "viewer_token_unused",
            note="the viewer token guards nothing while the client or worker role is open: "
            "those roles may view, so everyone may; set --client-token and --worker-token too",
        )
    if not is_loopback(settings.host) and not settings.insecure:
        open_roles = [r for r, t in (("client", settings.client_token), ("worker", settings.worker_token)) if not t]
        if open_roles:
            print(
                f"testfleet serve: refusing to listen on {settings.host} while the {' and '.join(open_roles)} "
                "role(s) have no token; set --client-token and --worker-token, or pass --insecure",
                file=sys.stderr,
            )
            return 2
    if (
        settings.database_url is None
        and Path(settings.data_dir).resolve().is_relative_to("/root")
        and os.geteuid() == 0
    ):
        print(
            f"testfleet serve: the data directory {settings.data_dir} is under /root; the embedded Postgres "
            "cannot run there as root. Pick another --data-dir.",
            file=sys.stderr,
        )
        return 2
    tune_gc()
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            return int(uvloop.run(serve(settings)))
        return asyncio.run(serve(settings))
    except _STARTUP_FAILURES as exc:
        # What keeps it from starting (the port is taken, the data directory is unusable or in use, the
        # database cannot be reached): one line, not a traceback.
        print(f"testfleet serve: cannot start: {_describe(exc)}", file=sys.stderr)
        return 2


_STARTUP_FAILURES: Final = (OSError, EmbeddedPostgresError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return str(exc) or type(exc).__name__


def register(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    add_arguments(parser)
    return run
