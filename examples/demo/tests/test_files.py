"""Temporary files (about 1 s)."""

import time
from pathlib import Path


def test_write_and_read(tmp_path: Path) -> None:
    time.sleep(0.5)
    path = tmp_path / "note.txt"
    path.write_text("hello")
    assert path.read_text() == "hello"


def test_listing(tmp_path: Path) -> None:
    time.sleep(0.5)
    for name in ("a", "b"):
        (tmp_path / name).touch()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
