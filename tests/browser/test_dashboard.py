"""The dashboard in headless Chromium against a real `testfleet serve`: live pages, text-only output, reconnects."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import CHROMIUM
from tests.browser.fleet import Coordinator, Fleet

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import expect

pytestmark = pytest.mark.browser

OpenPage = Callable[..., Any]


def live(page: Any) -> None:
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")


def mark_loaded(page: Any) -> None:
    """Leave a flag in the window: still there at the end means the page never reloaded."""
    page.evaluate("window.__loadedOnce = true")


def assert_not_reloaded(page: Any) -> None:
    assert page.evaluate("window.__loadedOnce") is True


def screenshots(page: Any, artifacts: Path, name: str) -> None:
    """The whole page in light and dark, and on a phone's width."""
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=artifacts / f"{name}.png", full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=artifacts / f"{name}-dark.png", full_page=True)
    page.emulate_media(color_scheme="light")
    size = page.viewport_size
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=artifacts / f"{name}-narrow.png", full_page=True)
    page.set_viewport_size(size)


def test_tasksets_page_follows_a_running_taskset(open_page: OpenPage, fleet: Fleet, artifacts: Path) -> None:
    page = open_page("#/tasksets")
    live(page)
    mark_loaded(page)
    files = ["tests/test_cart.py", "tests/test_orders.py", "tests/test_users.py"]
    taskset = fleet.new_taskset(files, rsync_name="list-live", max_trials=1, dispatch=False)

    row = page.locator(f'#active-tasksets tr[data-taskset-id="{taskset}"]')
    expect(row.locator(".pill")).to_have_text("rsync waiting")
    expect(row).to_contain_text("list-live")
    expect(row).to_contain_text("0 / 3")
    fleet.rpc("dispatch_taskset", ["taskset", taskset])
    expect(row.locator(".pill")).to_have_text("waiting")
    fleet.worker("list-worker", taskset)
    expect(row.locator(".pill")).to_have_text("running")

    slave = fleet.slave("list-worker-slave-1", taskset)
    _, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "passed")
    expect(row).to_contain_text("1 / 3")
    expect(row.locator(".count.passed")).to_have_text("1 passed")
    _, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "failed", "E   assert 1 == 2\n")
    expect(row).to_contain_text("2 / 3")
    expect(row.locator(".count.failed")).to_have_text("1 failed")
    screenshots(page, artifacts, "tasksets-page")

    _, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "pending")
    recent = page.locator(f'#recent-tasksets tr[data-taskset-id="{taskset}"]')
    expect(recent.locator(".pill")).to_have_text("failed")
    expect(recent).to_contain_text("3 / 3")
    expect(row).to_have_count(0)
    assert_not_reloaded(page)


def test_taskset_page_follows_files_slaves_logs_and_timeline(
    open_page: OpenPage, fleet: Fleet, artifacts: Path
) -> None:
    files = [f"tests/{area}/test_{name}.py" for area in ("api", "models") for name in ("cart", "orders", "users")]
    taskset = fleet.new_taskset(files, rsync_name="page-live", max_trials=2)
    page = open_page(f"#/tasksets/{taskset}")
    live(page)
    mark_loaded(page)
    decided = page.locator("#decided")
    expect(decided).to_have_text("0 / 6")
    expect(page.locator("h1")).to_have_text("page-live")
    expect(page.locator(".title-row .pill")).to_have_text("waiting")

    log = fleet.worker("box-1", taskset)
    expect(page.locator(".title-row .pill")).to_have_text("running")
    fleet.log(log, "$ rsync --archive\nsent 2,048 bytes\n")
    log_text = page.locator(f'.worker-log[data-worker-log-id="{log}"] pre')
    expect(log_text).to_contain_text("sent 2,048 bytes")
    fleet.rpc("set_rsync_finished_time", ["worker_log", log], token="worker-secret")
    fleet.log(log, "+ make setup\nsetup done\n")
    expect(log_text).to_contain_text("sent 2,048 bytes\n+ make setup\nsetup done")

    slaves = [fleet.slave(f"box-1-slave-{n}", taskset) for n in (1, 2)]
    expect(page.locator("#slaves tr[data-slave-id]")).to_have_count(2)
    first = fleet.begin(taskset, slaves[0])
    second = fleet.begin(taskset, slaves[1])
    expect(page.locator('.stat[data-stat="running"] .stat-value')).to_have_text("2")
    expect(page.locator(f'#slaves tr[data-slave-id="{slaves[0]}"] a')).to_have_attribute("title", first[2])
    expect(page.locator("#timeline .bar")).to_have_count(2)

    fleet.finish(first[1], "passed", "3 passed\n")
    fleet.finish(second[1], "failed", "E   AssertionError: expected 200, got 500\n", "traceback on stderr\n")
    expect(decided).to_have_text("1 / 6")
    # Failures come first: the failed try's file is waiting for its retry.
    failing = page.locator(f'#files tr[data-task-id="{second[0]}"]')
    expect(failing.locator(".pill")).to_have_text("retrying")
    expect(page.locator("#timeline .bar[data-status='failed']")).to_have_count(1)

    for _ in range(4):
        _, trial, path = fleet.begin(taskset, slaves[0])
        fleet.finish(trial, "failed" if path == second[2] else "passed", "ran again\n")
    expect(decided).to_have_text("5 / 6")
    expect(failing.locator(".pill")).to_have_text("failed")
    expect(page.locator('.stat[data-stat="failed"] .stat-value')).to_have_text("1")
    third = fleet.begin(taskset, slaves[1])
    expect(page.locator('.stat[data-stat="running"] .stat-value')).to_have_text("1")

    # A file's tries, and a try's output only once asked for.
    failing.click()
    panel = page.locator("#file")
    expect(panel.locator("h2")).to_have_text(second[2])
    expect(panel.locator("table.trials tbody tr")).to_have_count(2)
    expect(panel.locator(".stream.stdout pre")).to_have_text("ran again\n")
    panel.locator("table.trials tbody tr").first.click()
    expect(panel.locator(".stream.stdout pre")).to_have_text("E   AssertionError: expected 200, got 500\n")
    expect(panel.locator(".stream.stderr pre")).to_have_text("traceback on stderr\n")
    assert f"#/tasksets/{taskset}/files/{second[0]}/trials/{second[1]}" in page.url
    screenshots(page, artifacts, "taskset-page")

    # All files, sortable.
    page.locator("#files .segmented button", has_text="All files").click()
    expect(page.locator("#files tbody tr")).to_have_count(6)
    page.locator("#files th button", has_text="File").click()
    expect(page.locator("#files tbody tr").first).to_contain_text("tests/api/test_cart.py")

    fleet.finish(third[1], "passed")
    fleet.finish_slave(slaves[0], "normal_exit")
    fleet.finish_slave(slaves[1], "timeout_exit")
    expect(page.locator(".title-row .pill")).to_have_text("failed")
    expect(decided).to_have_text("6 / 6")
    expect(page.locator(f'#slaves tr[data-slave-id="{slaves[1]}"] .pill')).to_have_text("timeout exit")
    expect(page.locator(f'#slaves tr[data-slave-id="{slaves[0]}"] .pill')).to_have_text("normal exit")
    expect(page.locator("#timeline .bar")).to_have_count(7)
    assert_not_reloaded(page)


def test_recent_tasksets_are_paginated(open_page: OpenPage, fleet: Fleet) -> None:
    # A taskset without files succeeds as soon as it is dispatched.
    ids = [fleet.new_taskset([], rsync_name=f"empty-{n}") for n in range(23)]
    page = open_page("#/tasksets")
    rows = page.locator("#recent-tasksets tbody tr")
    expect(rows).to_have_count(20)
    expect(rows.first).to_have_attribute("data-taskset-id", str(ids[-1]))
    page.locator("#recent-tasksets .pager a", has_text="Older").click()
    expect(rows.first).to_have_attribute("data-taskset-id", str(ids[2]))
    assert "before=" in page.url
    page.locator("#recent-tasksets .pager a", has_text="Newest").click()
    expect(rows.first).to_have_attribute("data-taskset-id", str(ids[-1]))


def test_deep_links_workers_and_trials(open_page: OpenPage, fleet: Fleet, artifacts: Path) -> None:
    taskset = fleet.new_taskset(["tests/test_deep.py"], rsync_name="deep-links", worker_type="gpu")
    fleet.worker("gpu-box", taskset, worker_type="gpu")
    slave = fleet.slave("gpu-box-slave-1", taskset)
    task, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "passed", "deep output\n")

    page = open_page(f"#/tasksets/{taskset}/files/{task}/trials/{trial}")
    expect(page.locator("#file .stream.stdout pre")).to_have_text("deep output\n")
    page.goto(page.url.split("#")[0] + f"#/trials/{trial}")
    expect(page.locator(".stream.stdout pre")).to_have_text("deep output\n")
    page.goto(page.url.split("#")[0] + "#/workers")
    row = page.locator('#workers tr[data-worker="gpu-box"]')
    expect(row).to_contain_text("gpu")
    expect(row).to_contain_text("deep-links")
    screenshots(page, artifacts, "workers-page")
    page.goto(page.url.split("#")[0] + "#/tasksets/999999")
    expect(page.locator(".notice")).to_contain_text("no taskset 999999")


def test_markup_in_names_output_and_logs_is_shown_as_text(open_page: OpenPage, fleet: Fleet) -> None:
    path = "tests/<img src=x onerror=window.__pwned=1>.py"
    stdout = '<script>window.__pwned = 2</script><img src=x onerror="window.__pwned = 3">\n'
    log_line = "<img src=x onerror=window.__pwned=4> <b>not bold</b>\n"
    slave_name = "<i onmouseover=window.__pwned=5>slave</i>"
    taskset = fleet.new_taskset([path], rsync_name="markup", taskset_class="<u>shop</u>")
    page = open_page(f"#/tasksets/{taskset}")
    live(page)
    log = fleet.worker("<em>box</em>", taskset)
    fleet.log(log, log_line)
    slave = fleet.slave(slave_name, taskset)
    _, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "failed", stdout, "<script>alert(1)</script>")

    expect(page.locator("#files td.path")).to_have_text(path)
    expect(page.locator(".subtitle")).to_contain_text("<u>shop</u>")
    expect(page.locator(f'.worker-log[data-worker-log-id="{log}"] pre')).to_have_text(log_line)
    expect(page.locator(".worker-name")).to_have_text("<em>box</em>")
    expect(page.locator(f'#slaves tr[data-slave-id="{slave}"] td').first).to_have_text(slave_name)
    page.locator("#files tbody tr").first.click()
    expect(page.locator("#file .stream.stdout pre")).to_have_text(stdout)
    expect(page.locator("#file .stream.stderr pre")).to_have_text("<script>alert(1)</script>")
    page.goto(page.url.split("#")[0] + "#/tasksets")
    expect(page.locator(f'tr[data-taskset-id="{taskset}"] .meta')).to_contain_text("<u>shop</u>")

    assert page.evaluate("window.__pwned") is None
    assert page.locator("#view img, #view script, #view u, #view em, #view i").count() == 0


def test_without_the_viewer_token_the_page_says_what_is_missing(open_page: OpenPage, allowed_errors: list[str]) -> None:
    allowed_errors.append("status of 401")
    page = open_page("#/tasksets", token=None)
    expect(page.locator(".notice.error")).to_contain_text("needs a viewer token")
    expect(page.locator("#connection")).to_have_attribute("data-state", "unauthorized")


STATE_CHECKS = r"""
async () => {
  const { TasksetState } = await import("/static/js/model.js");
  const { parseRoute } = await import("/static/js/app.js");
  const state = new TasksetState(7);
  const taskset = { id: 7, status: "running", task_count: 2, passed_count: 1, pending_count: 0, failed_count: 0 };
  const log = { id: 3, worker_name: "w", log: "one\ntwo\n" };
  state.load({ taskset, tasks: [{ id: 11, status: null, trial_count: 0, trials: [] }], slaves: [], workerLogs: [log] });
  const ts = "2026-01-01T00:00:00.000000Z";
  // Held during the fetch: the first append was already read by it, the second was not.
  state.replay([
    ["worker_log_updated", [ts, ["worker_log", 3], { log_appended: "two\n" }]],
    ["taskset_updated", [ts, ["taskset", 7], { passed_count: 0 }]],
    ["worker_log_updated", [ts, ["worker_log", 3], { log_appended: "three\n" }]],
    ["trial_created", [ts, ["trial", 5], ["task", 11], ["slave", 2], ts]],
    ["trial_created", [ts, ["trial", 5], ["task", 11], ["slave", 2], ts]],
  ]);
  state.apply("taskset_updated", [ts, ["taskset", 7], { status: "failed", finished_at: ts }]);
  state.apply("taskset_updated", [ts, ["taskset", 7], { status: "running" }]);
  return {
    log: state.workerLogs.get(3).log,
    passed: state.taskset.passed_count,
    status: state.taskset.status,
    trials: state.tasks.get(11).trialIds,
    routes: ["#/tasksets/12/files/345/trials/678", "#/trials/9", "#/tasksets?before=40", "#/nope"].map(parseRoute),
  };
}
"""


def test_state_replays_held_notifications_once_and_never_goes_backwards(open_page: OpenPage) -> None:
    page = open_page("#/workers")
    result = page.evaluate(STATE_CHECKS)
    assert result["log"] == "one\ntwo\nthree\n"
    assert result["passed"] == 1
    assert result["status"] == "failed"
    assert result["trials"] == [5]
    assert result["routes"] == [
        {"name": "taskset", "id": 12, "file": 345, "trial": 678},
        {"name": "trial", "id": 9},
        {"name": "tasksets", "before": 40},
        {"name": "unknown", "path": "/nope"},
    ]


def test_reconnects_and_resyncs_after_the_coordinator_restarts(
    open_page: OpenPage, coordinator: Coordinator, fleet: Fleet, allowed_errors: list[str]
) -> None:
    allowed_errors.extend([r"WebSocket connection to .* failed", r"ERR_CONNECTION_REFUSED", r"ERR_CONNECTION_RESET"])
    files = ["tests/test_one.py", "tests/test_two.py", "tests/test_three.py"]
    taskset = fleet.new_taskset(files, rsync_name="restart", max_trials=1)
    log = fleet.worker("restart-box", taskset)
    slave = fleet.slave("restart-box-slave-1", taskset)
    _, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "passed")

    page = open_page(f"#/tasksets/{taskset}")
    live(page)
    mark_loaded(page)
    expect(page.locator("#decided")).to_have_text("1 / 3")

    coordinator.stop(signal.SIGKILL)
    expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    coordinator.start()
    fleet.reconnect()
    # A change made while the page was away arrives by the resync...
    fleet.log(log, "back after the restart\n")
    slave = fleet.slave("restart-box-slave-2", taskset)
    _, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "passed")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=20_000)
    expect(page.locator("#decided")).to_have_text("2 / 3")
    expect(page.locator(f'.worker-log[data-worker-log-id="{log}"] pre')).to_contain_text("back after the restart")
    # ...and later ones live again.
    _, trial, _ = fleet.begin(taskset, slave)
    fleet.finish(trial, "failed")
    expect(page.locator("#decided")).to_have_text("3 / 3")
    expect(page.locator(".title-row .pill")).to_have_text("failed")
    assert_not_reloaded(page)
