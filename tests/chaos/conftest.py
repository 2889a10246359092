"""Fixtures of the chaos tests: a fleet per test, named after it, whose processes never outlive it.

When a chaos test fails, its logs (coordinator, workers, CI client) and the suite's markers are kept
in test-artifacts/chaos/failed/<test>/.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.chaos.fleet import ARTIFACTS, Fleet, fleet


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def chaos_fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet for this test; its logs stay in the test's tmp_path (and are kept if the test fails)."""
    name = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    with fleet(name, tmp_path) as owned:
        try:
            yield owned
        finally:
            if request.node.stash.get(_FAILED, False):
                kept = ARTIFACTS / "failed" / request.node.name
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(tmp_path, kept, dirs_exist_ok=True)
                shutil.copytree(owned.markers, kept / "markers", dirs_exist_ok=True)
