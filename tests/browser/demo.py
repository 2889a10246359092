"""Keep a coordinator busy so the dashboard has something to show: `python -m tests.browser.demo URL`.

The coordinator must run with the tokens of `tests.browser.fleet` (or none). It plays one earlier run (history
for the ETA), then a taskset of 48 files on two workers with three slaves each, some slow, some flaky, some
failing, and keeps going until every file is decided.
"""

from __future__ import annotations

import argparse
import random
import threading
import time

from tests.browser.fleet import WORKER_TOKEN, Fleet, RpcError

AREAS = ("api", "models", "checkout", "search")
NAMES = (
    "orders",
    "users",
    "payments",
    "cart",
    "auth",
    "billing",
    "emails",
    "coupons",
    "reviews",
    "stock",
    "tax",
    "ship",
)
PATHS = [f"tests/{area}/test_{name}.py" for area in AREAS for name in NAMES]


def output(path: str, status: str, rng: random.Random) -> tuple[str, str]:
    count = rng.randint(3, 40)
    rule = "=" * 30
    lines = [f"{rule} test session starts {rule}", f"collected {count} items", ""]
    if status == "failed":
        lines += [
            f"{path} ..F.",
            "",
            f"{rule} FAILURES {rule}",
            f"{'_' * 20} test_total_includes_tax {'_' * 20}",
            "",
            "    def test_total_includes_tax(order):",
            ">       assert order.total == Decimal('10.80')",
            "E       AssertionError: assert Decimal('10.00') == Decimal('10.80')",
            "",
            f"{path}:42: AssertionError",
            f"{rule} 1 failed, {count - 1} passed in 1.92s {rule}",
        ]
        return "\n".join(lines) + "\n", ""
    if status == "pending":
        lines += [f"{path} ..s.", f"{rule} {count - 1} passed, 1 skipped in 0.61s {rule}"]
    else:
        lines += [f"{path} ....", f"{rule} {count} passed in 0.83s {rule}"]
    return "\n".join(lines) + "\n", ""


def run_slave(url: str, taskset: int, name: str, seed: int, speed: float) -> None:
    rng = random.Random(seed)
    fleet = Fleet(url)
    try:
        slave = fleet.slave(name, taskset)
        while True:
            try:
                _task, trial, path = fleet.begin(taskset, slave)
            except (RpcError, TypeError):
                break
            slow = "payments" in path or "search" in path
            straggler = path == "tests/search/test_reviews.py"
            time.sleep((12.0 if straggler else rng.uniform(1.5, 4.5 if slow else 2.5)) * speed)
            roll = rng.random()
            status = "failed" if ("coupons" in path or roll < 0.07) else "pending" if roll < 0.15 else "passed"
            if "stock" in path and roll < 0.5:
                status = "error"
            stdout, stderr = output(path, status, rng)
            fleet.finish(trial, status, stdout, stderr)
        fleet.finish_slave(slave, "normal_exit")
    finally:
        fleet.close()


def history(fleet: Fleet) -> None:
    """A quick earlier run of the same files, so the ETA has averages to go on."""
    fleet.rpc("cancel_user_taskset", "nightly-main")
    taskset = fleet.new_taskset(PATHS, rsync_name="nightly-main", taskset_class="shop")
    fleet.worker("ci-box-0", taskset)
    slave = fleet.slave("ci-box-0-slave-1", taskset)
    for _ in PATHS:
        _task, trial, _path = fleet.begin(taskset, slave)
        fleet.finish(trial, "passed", "ok\n")
    fleet.finish_slave(slave)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--speed", type=float, default=1.0, help="multiply every trial's duration")
    parser.add_argument("--no-history", action="store_true")
    args = parser.parse_args()
    fleet = Fleet(args.url)
    try:
        if not args.no_history:
            history(fleet)
        fleet.rpc("cancel_user_taskset", "feature-checkout")
        taskset = fleet.new_taskset(PATHS, rsync_name="feature-checkout", taskset_class="shop", max_trials=3)
        print(f"taskset {taskset}: {args.url}/#/tasksets/{taskset}", flush=True)
        threads = []
        for box in (1, 2):
            worker = f"ci-box-{box}"
            log = fleet.worker(worker, taskset)
            fleet.log(log, f"$ rsync --archive --delete {worker}:/srv/checkout/ ./\n")
            fleet.log(log, "sent 1,204,331 bytes  received 9,876 bytes\n")
            fleet.rpc("set_rsync_finished_time", ["worker_log", log], token=WORKER_TOKEN)
            fleet.log(log, "$ bash -ex setup\n+ pip install -r requirements.txt\n+ createdb shop_test\n")
            fleet.rpc("set_setup_finished_time", ["worker_log", log], token=WORKER_TOKEN)
            for n in (1, 2, 3):
                name = f"{worker}-slave-{n}"
                fleet.log(log, f"starting {name}\n")
                thread = threading.Thread(target=run_slave, args=(args.url, taskset, name, box * 10 + n, args.speed))
                thread.start()
                threads.append(thread)
        for thread in threads:
            thread.join()
    finally:
        fleet.close()


if __name__ == "__main__":
    main()
