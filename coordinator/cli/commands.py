"""`show`, `cancel`, `cancel-user`, `actives` and `workers`: one call each, output a script can parse.

Plain output is tab-separated lines without a header; `--json` prints one JSON document instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from coordinator.cli.client import Client
from coordinator.cli.config import CONNECTION, add_options, add_project_dir, resolve
from coordinator.cli.errors import CliError
from coordinator.cli.report import fetch_report, print_failures
from coordinator.cli.run import quiet_logging
from protocol.errors import ProtocolError
from protocol.types import TasksetRef

EXIT_ERROR = 2


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
    sys.stdout.flush()


def _row(*values: object) -> None:
    print("\t".join("-" if v is None else str(v) for v in values), flush=True)


def _command(
    parser: argparse.ArgumentParser, body: Callable[[Client, argparse.Namespace], Awaitable[int]], *, json_flag: bool
) -> Callable[[argparse.Namespace], int]:
    add_project_dir(parser)
    add_options(parser, CONNECTION)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON document")

    async def main(args: argparse.Namespace) -> int:
        settings = resolve(args, os.environ)
        async with Client(settings.coordinator, settings.token, retry_for_s=10.0) as client:
            return await body(client, args)

    def run(args: argparse.Namespace) -> int:
        quiet_logging()
        try:
            return asyncio.run(main(args))
        except CliError as exc:
            print(f"testfleet: {exc}", file=sys.stderr)
        except ProtocolError as exc:
            print(f"testfleet: the coordinator refused: {exc.message}", file=sys.stderr)
        except Exception:
            traceback.print_exc()
            print("testfleet: internal error (the traceback above)", file=sys.stderr)
        return EXIT_ERROR

    return run


def register_show(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("taskset_id", type=int, metavar="ID")
    parser.add_argument(
        "--failure-exit-code",
        type=int,
        default=1,
        metavar="N",
        help="exit code when the taskset failed (default 1); succeeded or active is 0, cancelled 2",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also print each failed file's output")

    async def body(client: Client, args: argparse.Namespace) -> int:
        report = await fetch_report(client, args.taskset_id, outputs_of="failed" if args.verbose else "none")
        if args.json:
            _print_json(report.to_json())
        else:
            document = report.to_json()
            for key in ("id", "status", "rsync_name", "taskset_class", "created_at", "finished_at"):
                _row(key, document[key])
            for key, value in document["files"].items():
                _row(f"files_{key}", value)
            for key, value in document["tests"].items():
                _row(f"tests_{key}", value)
            for path in document["failed_files"]:
                _row("failed_file", path)
            for path in document["flaky_files"]:
                _row("flaky_file", path)
            if args.verbose:
                print_failures(report)
        status = report.taskset.status
        if status == "failed":
            return int(args.failure_exit_code)
        return EXIT_ERROR if status == "cancelled" else 0

    return _command(parser, body, json_flag=True)


def register_cancel(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("taskset_id", type=int, metavar="ID")

    async def body(client: Client, args: argparse.Namespace) -> int:
        await client.call("cancel_taskset", TasksetRef(args.taskset_id))
        print(f"testfleet: cancelled taskset {args.taskset_id} (unless it had finished)", file=sys.stderr)
        return 0

    return _command(parser, body, json_flag=False)


def register_cancel_user(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    parser.add_argument("rsync_name", metavar="NAME")

    async def body(client: Client, args: argparse.Namespace) -> int:
        await client.call("cancel_user_taskset", args.rsync_name)
        print(f"testfleet: cancelled every active taskset of {args.rsync_name}", file=sys.stderr)
        return 0

    return _command(parser, body, json_flag=False)


def register_actives(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    async def body(client: Client, args: argparse.Namespace) -> int:
        refs: list[TasksetRef] = await client.call("active_tasksets")
        records = await asyncio.gather(*(client.get_json(f"/api/v1/tasksets/{ref.id}") for ref in refs))
        rows = [
            {k: r.get(k) for k in ("id", "status", "rsync_name", "taskset_class", "worker_type", "created_at")}
            | {k: r.get(k) for k in ("task_count", "passed_count", "pending_count", "failed_count")}
            for r in records
        ]
        if args.json:
            _print_json({"tasksets": rows})
        else:
            for row in rows:
                _row(*row.values())
        return 0

    return _command(parser, body, json_flag=True)


def register_workers(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    async def body(client: Client, args: argparse.Namespace) -> int:
        workers = await client.call("active_workers")
        rows = [
            {
                "name": w.worker_name,
                "worker_type": w.worker_type,
                "taskset_id": w.taskset_ref.id if w.taskset_ref else None,
            }
            for w in workers
        ]
        if args.json:
            _print_json({"workers": rows})
        else:
            for row in rows:
                _row(row["name"], row["worker_type"], row["taskset_id"])
        return 0

    return _command(parser, body, json_flag=True)
