"""String handling, with a skipped test and an expected failure."""

import sys
import time

import pytest


def test_upper() -> None:
    time.sleep(0.3)
    assert "fleet".upper() == "FLEET"


@pytest.mark.parametrize(("line", "fields"), [("a,b,c", 3), ("a", 1), ("", 1)])
def test_split(line: str, fields: int) -> None:
    assert len(line.split(",")) == fields


@pytest.mark.skipif(sys.platform != "win32", reason="only meaningful on Windows")
def test_windows_paths() -> None:
    assert "C:\\tmp".startswith("C:")


@pytest.mark.xfail(reason="a known bug, kept visible", strict=True)
def test_known_bug() -> None:
    assert "straße".upper() == "STRASSE".lower()
