"""`testfleet run`, `submit` and `wait`: submit the suite, follow it, report, exit with the verdict.

Exit codes: 0 succeeded, 1 failed (a test file failed), 2 cancelled or an infrastructure error (no
coordinator, a refused call, bad settings, or a taskset failed without a failing file: a worker's code
sync, setup command or slaves failed). Ctrl-C (or SIGTERM) cancels the taskset the command submitted
or waits for; a second one leaves at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from coordinator.cli import bundle
from coordinator.cli.client import Client, CoordinatorUnavailable
from coordinator.cli.config import (
    CONNECTION,
    LOCAL,
    REPORT,
    TASKSET,
    ClientSettings,
    ConfigError,
    add_options,
    add_project_dir,
    resolve,
)
from coordinator.cli.discover import discover, sha1_of
from coordinator.cli.errors import CliError
from coordinator.cli.follow import Follower
from coordinator.cli.junit import write_junit
from coordinator.cli.progress import choose_display
from coordinator.cli.report import fetch_report, plural, print_failures, summary_lines
from coordinator.cli.timeouts import TimeoutRule, build_tasks
from protocol.errors import ProtocolError
from protocol.types import TasksetRef, TasksetStatus

EXIT_SUCCEEDED: Final = 0
EXIT_FAILED: Final = 1
EXIT_ERROR: Final = 2
EXIT_CODES: Final = {TasksetStatus.SUCCEEDED: EXIT_SUCCEEDED, TasksetStatus.FAILED: EXIT_FAILED}
AVERAGES_BATCH: Final = 20_000
WORKER_LOG_TAIL: Final = 30
CANCEL_WAIT_S: Final = 60.0
"""How long an interrupted run tries to cancel its taskset (and then to report it)."""


def say(text: str) -> None:
    """A line of the client's own chatter, on stderr."""
    print(f"testfleet: {text}", file=sys.stderr, flush=True)


@dataclass
class Submission:
    """What a command has put on the coordinator so far, for the interrupt handler to undo."""

    ref: TasksetRef | None = None
    started_at: float = 0.0


# -- submit -----------------------------------------------------------------------------------


async def _averages(client: Client, taskset_class: str, sha1s: list[str]) -> list[int | None]:
    result: list[int | None] = []
    for start in range(0, len(sha1s), AVERAGES_BATCH):
        result.extend(
            await client.call("query_spec_average_secs", taskset_class, sha1s[start : start + AVERAGES_BATCH])
        )
    return result


async def sync_code(client: Client, settings: ClientSettings) -> None:
    """Ship the project: rsync into the remote path when one is set, else the bundle (skipped when unchanged)."""
    project = Path(settings.project_dir)
    if settings.rsync_remote_path:
        excludes = await asyncio.to_thread(bundle.rsync_excludes, project)
        with tempfile.NamedTemporaryFile("wb", prefix="testfleet-rsync-", suffix=".exclude") as handle:
            handle.write(b"".join(os.fsencode(p) + b"\0" for p in excludes))
            handle.flush()
            command = bundle.rsync_command(
                project, settings.rsync_remote_path, settings.rsync_name, settings.rsync_options, Path(handle.name)
            )
            remote = settings.rsync_remote_path
            if ":" not in remote.split("/", 1)[0]:
                await asyncio.to_thread(Path(remote).mkdir, parents=True, exist_ok=True)
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno()
            )
            code = await process.wait()
        if code != 0:
            raise CliError(f"rsync to {remote}/{settings.rsync_name}/ exited with {code}")
        say(f"rsynced the project into {remote.rstrip('/')}/{settings.rsync_name}/")
        return
    files = await asyncio.to_thread(bundle.list_files, project)
    with tempfile.NamedTemporaryFile("w+b", prefix="testfleet-bundle-", suffix=".tar.gz") as handle:
        sha = await asyncio.to_thread(bundle.write_bundle, project, files, handle)
        handle.flush()
        size = handle.tell()
        if await client.bundle_sha256(settings.rsync_name) == sha:
            say(f"bundle {sha[:12]} ({len(files)} files) unchanged on the coordinator; not uploaded")
            return
        stored = await client.put_bundle(settings.rsync_name, Path(handle.name))
    if stored != sha:
        raise CliError(f"the coordinator stored bundle {stored}, not the {sha} that was sent")
    say(f"uploaded bundle {sha[:12]} ({len(files)} files, {size / 1e6:.1f} MB)")


async def submit(client: Client, settings: ClientSettings, paths: Sequence[str], submission: Submission) -> TasksetRef:
    """Discover, hash, time, create, sync and dispatch; the taskset's ref."""
    project = Path(settings.project_dir)
    spec_paths = await asyncio.to_thread(discover, paths, project)
    shipped = set(await asyncio.to_thread(bundle.list_files, project))
    # A spec path is a shipped file, or one's test (`file::test`); a file's own name may hold `::`.
    unshipped = [p for p in spec_paths if p not in shipped and p.split("::", 1)[0] not in shipped]
    if unshipped:
        # Ignored by git, so neither the bundle nor rsync takes them to the workers: they could only fail.
        shown = ", ".join(unshipped[:5]) + (f" and {len(unshipped) - 5} more" if len(unshipped) > 5 else "")
        say(f"left out {plural(len(unshipped), 'test file')} that git ignores (not sent to the workers): {shown}")
        left_out = set(unshipped)
        spec_paths = [p for p in spec_paths if p not in left_out]
    if not spec_paths:
        raise CliError(f"no test files found under {', '.join(paths) or project}")
    sha1s = await asyncio.to_thread(lambda: [sha1_of(project / p) for p in spec_paths])
    averages = await _averages(client, settings.taskset_class, sha1s)
    rule = TimeoutRule(
        settings.unknown_spec_timeout_sec,
        settings.least_timeout_sec,
        settings.average_multiplier,
        settings.hard_timeout_margin_sec,
    )
    tasks = build_tasks(spec_paths, sha1s, averages, rule)
    known = sum(a is not None for a in averages)
    ref: TasksetRef = await client.call(
        "create_taskset",
        settings.rsync_name,
        settings.setup,
        settings.slave_command,
        settings.worker_type,
        settings.taskset_class,
        settings.max_workers,
        settings.max_trials,
        tasks,
    )
    submission.ref = ref
    submission.started_at = time.monotonic()
    say(f"taskset {ref.id}: {plural(len(tasks), 'file')} ({known} with history) as {settings.rsync_name}")
    await sync_code(client, settings)
    await client.call("dispatch_taskset", ref)
    return ref


# -- report ------------------------------------------------------------------------------------


async def report_and_exit_code(client: Client, settings: ClientSettings, ref: TasksetRef) -> int:
    """Print the failures and the summary, write the JUnit XML, and return the exit code of the verdict."""
    report = await fetch_report(client, ref.id, outputs_of="all" if settings.junit_xml else "failed")
    print_failures(report)
    print("", flush=True)
    for line in summary_lines(report):
        print(line, flush=True)
    if settings.junit_xml:
        path = Path(settings.project_dir) / settings.junit_xml
        await asyncio.to_thread(write_junit, report, path)
        say(f"JUnit XML written to {path}")
    status = TasksetStatus(report.taskset.status)
    if status is TasksetStatus.FAILED and not report.failed_tasks:
        # Not a test's failure: the code sync, the setup command or the slaves failed on a worker.
        await print_worker_logs(client, ref, "failed without a failing file")
        return EXIT_ERROR
    not_run = len(report.undecided_tasks)
    if status is TasksetStatus.FAILED and not_run:
        # Files failed, and the workers stopped before the rest ran (too many slaves failed, say): say why.
        await print_worker_logs(client, ref, f"ended with {plural(not_run, 'file')} not run")
    return EXIT_CODES.get(status, EXIT_ERROR)


async def print_worker_logs(client: Client, ref: TasksetRef, why: str, lines: int = WORKER_LOG_TAIL) -> None:
    body = await client.get_json(f"/api/v1/tasksets/{ref.id}/worker_logs")
    print(f"\ntaskset {ref.id} {why}; the end of each worker's log:", flush=True)
    for worker_log in body.get("worker_logs", []):
        print(f"{'-' * 10} worker {worker_log.get('worker_name')} {'-' * 10}")
        print("\n".join(str(worker_log.get("log") or "").splitlines()[-lines:]), flush=True)


async def follow_and_report(client: Client, settings: ClientSettings, ref: TasksetRef, started_at: float) -> int:
    follower = Follower(
        client, ref, choose_display(settings.progress), disconnect_timeout_s=settings.disconnect_timeout_sec
    )
    follower.state.started_at = started_at
    await follower.wait()
    return await report_and_exit_code(client, settings, ref)


# -- signals and errors --------------------------------------------------------------------------


async def cancel_submitted(client: Client, submission: Submission) -> bool:
    """Cancel the submitted taskset, trying for up to CANCEL_WAIT_S; whether it is cancelled (or none was)."""
    if submission.ref is None:
        return True
    taskset_id = submission.ref.id
    say(f"interrupted: cancelling taskset {taskset_id}")
    try:
        await asyncio.wait_for(client.call("cancel_taskset", submission.ref), CANCEL_WAIT_S)
    except (ProtocolError, CoordinatorUnavailable, TimeoutError, OSError) as exc:
        why = str(exc) or f"the coordinator did not answer within {CANCEL_WAIT_S:.0f} s"
        say(
            f"could not cancel taskset {taskset_id}: {why}; it may still be running "
            f"(`testfleet cancel {taskset_id}` cancels it)"
        )
        return False
    return True


async def guarded(work: Callable[[], Awaitable[int]], on_interrupt: Callable[[], Awaitable[None]]) -> int:
    """Run `work` until it returns or SIGINT/SIGTERM arrives; then `on_interrupt` and exit 2.

    Errors the client expects become one line on stderr and exit code 2.
    """
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal() -> None:
        if interrupted.is_set():
            say("interrupted again: leaving without waiting")
            os._exit(130)
        interrupted.set()

    for signum in signals:
        loop.add_signal_handler(signum, on_signal)
    task = asyncio.ensure_future(work())
    stopper = asyncio.ensure_future(interrupted.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await on_interrupt()
            return EXIT_ERROR
        return task.result()
    except CliError as exc:
        say(str(exc))
        return EXIT_ERROR
    except ProtocolError as exc:
        say(f"the coordinator refused: {exc.message}")
        return EXIT_ERROR
    except OSError as exc:
        # A file or directory the command cannot use (a data directory where none can be made, say).
        say(describe_os_error(exc))
        return EXIT_ERROR
    except Exception:
        # Never exit 1 for a bug of ours: that code means a test failed.
        traceback.print_exc()
        say("internal error (the traceback above); exiting 2")
        return EXIT_ERROR
    finally:
        stopper.cancel()
        for signum in signals:
            loop.remove_signal_handler(signum)


def quiet_logging() -> None:
    """Library events (the peer's reconnects) as warnings and worse only, on stderr: stdout is the report's."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def describe_os_error(exc: OSError) -> str:
    """One line for a failed file operation: what failed, on which path."""
    if exc.filename is None:
        return str(exc)
    target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else str(exc.filename)
    return f"{exc.strerror or type(exc).__name__}: {target}"


def settings_or_exit(args: argparse.Namespace) -> ClientSettings | None:
    quiet_logging()
    try:
        return resolve(args, os.environ)
    except ConfigError as exc:
        say(str(exc))
        return None


# -- the commands --------------------------------------------------------------------------------


def _client(settings: ClientSettings) -> Client:
    """The client of `run` and `wait`: it retries for the disconnect timeout, and says so when it starts to."""
    return Client(settings.coordinator, settings.token, retry_for_s=settings.disconnect_timeout_sec, warn=say)


async def run_async(settings: ClientSettings, paths: Sequence[str], *, follow: bool = True) -> int:
    submission = Submission()
    async with _client(settings) as client:

        async def work() -> int:
            ref = await submit(client, settings, paths, submission)
            if not follow:
                print(ref.id, flush=True)
                return EXIT_SUCCEEDED
            return await follow_and_report(client, settings, ref, submission.started_at)

        async def interrupt() -> None:
            # Without the cancel, the report would only wait for a coordinator that is away.
            if await cancel_submitted(client, submission) and submission.ref is not None and follow:
                try:
                    await asyncio.wait_for(report_and_exit_code(client, settings, submission.ref), CANCEL_WAIT_S)
                except Exception as exc:
                    say(f"no report: {str(exc) or 'the coordinator did not answer'}")

        return await guarded(work, interrupt)


async def wait_async(settings: ClientSettings, taskset_id: int) -> int:
    ref = TasksetRef(taskset_id)
    submission = Submission(ref, time.monotonic())
    async with _client(settings) as client:

        async def work() -> int:
            return await follow_and_report(client, settings, ref, submission.started_at)

        async def interrupt() -> None:
            await cancel_submitted(client, submission)

        return await guarded(work, interrupt)


def _add_common(parser: argparse.ArgumentParser, *, taskset: bool, local: bool = False) -> None:
    add_project_dir(parser)
    if not local:
        add_options(parser, CONNECTION)
    if taskset:
        add_options(parser, TASKSET)
    add_options(parser, REPORT)
    if local:
        add_options(parser, LOCAL)


def register_run(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("paths", nargs="*", metavar="PATHS", help="test files or directories (default: testpaths)")
    _add_common(parser, taskset=True)

    def run(args: argparse.Namespace) -> int:
        settings = settings_or_exit(args)
        return EXIT_ERROR if settings is None else asyncio.run(run_async(settings, args.paths))

    return run


def register_submit(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("paths", nargs="*", metavar="PATHS", help="test files or directories (default: testpaths)")
    add_project_dir(parser)
    add_options(parser, CONNECTION)
    add_options(parser, TASKSET)

    def run(args: argparse.Namespace) -> int:
        settings = settings_or_exit(args)
        return EXIT_ERROR if settings is None else asyncio.run(run_async(settings, args.paths, follow=False))

    return run


def register_wait(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("taskset_id", type=int, metavar="ID", help="the taskset to wait for")
    _add_common(parser, taskset=False)

    def run(args: argparse.Namespace) -> int:
        settings = settings_or_exit(args)
        return EXIT_ERROR if settings is None else asyncio.run(wait_async(settings, args.taskset_id))

    return run


register = register_run
