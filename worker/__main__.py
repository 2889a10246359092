"""`python -m worker`: parse the settings, set up logging and signals, run the daemon until told to stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence

import structlog

from protocol.errors import ProtocolError
from protocol.logs import configure_logging
from worker.config import SettingsError, WorkerSettings, build_parser, notices, settings_from_namespace
from worker.daemon import Daemon, make_work_dir
from worker.slaves import become_subreaper


async def serve(settings: WorkerSettings) -> int:
    """Run the daemon; SIGTERM or SIGINT stops its slaves and ends it with 0."""
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    try:
        await Daemon(settings, reap_orphans=become_subreaper()).run(shutdown)
    except ProtocolError as exc:
        structlog.get_logger("testfleet.worker").error("worker_refused", error=exc.message, code=int(exc.code))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_namespace(args, os.environ)
    except SettingsError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level, colors=True)
    try:
        make_work_dir(settings.work_path)
    except OSError as exc:
        # Checked before anything connects: a worker that cannot work would otherwise take tasksets.
        print(
            f"testfleet worker: cannot use the work directory {settings.work_path}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    for notice in notices(os.environ):
        structlog.get_logger("testfleet.worker").warning("worker_setting_ignored", detail=notice)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
