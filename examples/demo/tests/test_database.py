"""A module fixture shared by the file's tests (about 2 s)."""

import time
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def table() -> Iterator[dict[str, int]]:
    time.sleep(1.0)  # an expensive set-up, paid once for the file
    rows = {"first": 1, "second": 2}
    yield rows
    rows.clear()


def test_lookup(table: dict[str, int]) -> None:
    time.sleep(0.5)
    assert table["first"] == 1


def test_insert(table: dict[str, int]) -> None:
    time.sleep(0.5)
    table["third"] = 3
    assert len(table) == 3
