"""The `testfleet` entry point: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Final, NamedTuple


class Subcommand(NamedTuple):
    help: str
    module: str | None
    """`module:function` taking the parser to fill and returning the runner; `None` while not built."""


SUBCOMMANDS: Final[dict[str, Subcommand]] = {
    "serve": Subcommand("run the coordinator", "coordinator.cli.serve:register"),
    "worker": Subcommand("run a worker daemon on this machine", None),
    "slave": Subcommand("run one slave (started by a worker)", None),
    "run": Subcommand("submit the suite, follow it, print the verdict", "coordinator.cli.run:register_run"),
    "submit": Subcommand("submit the suite and print the taskset id", "coordinator.cli.run:register_submit"),
    "wait": Subcommand("wait for a taskset and print its verdict", "coordinator.cli.run:register_wait"),
    "show": Subcommand("show a taskset's status and failures", "coordinator.cli.commands:register_show"),
    "cancel": Subcommand("cancel a taskset", "coordinator.cli.commands:register_cancel"),
    "cancel-user": Subcommand(
        "cancel every active taskset of an rsync name", "coordinator.cli.commands:register_cancel_user"
    ),
    "actives": Subcommand("list the active tasksets", "coordinator.cli.commands:register_actives"),
    "workers": Subcommand("list the live workers", "coordinator.cli.commands:register_workers"),
    "local": Subcommand("run the suite on this machine with an embedded coordinator", "coordinator.cli.local:register"),
}

# Worker and slave code never shares a process with coordinator code: those subcommands
# replace this process with the worker's own entry point.
EXEC_MODULES: Final[dict[str, str]] = {"worker": "worker", "slave": "worker.slave"}


def _not_implemented(name: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"testfleet {name}: not implemented yet", file=sys.stderr)
        return 2

    return run


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(prog="testfleet", description="A distributed test runner.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, sub in SUBCOMMANDS.items():
        sp = subparsers.add_parser(name, help=sub.help, description=sub.help)
        if sub.module is None:
            runners[name] = _not_implemented(name)
            continue
        module_name, _, func = sub.module.partition(":")
        runners[name] = getattr(importlib.import_module(module_name), func)(sp)
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] in EXEC_MODULES:
        module = EXEC_MODULES[args_list[0]]
        os.execv(sys.executable, [sys.executable, "-m", module, *args_list[1:]])  # noqa: S606
    parser, runners = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
