"""Directory collectors for a slave: while it collects one file they enter only the entry on the way to it.

`session.perform_collect([path])` collects every directory above `path` in full, building a
node for each file beside it, and the slave calls it once per file: a directory of N files
would cost N² node builds. These subclasses of pytest's own directory collectors yield just
the entry that leads to the file being collected (the target, kept in the config's stash) and
behave as pytest's otherwise, so package fixtures and `isinstance` checks keep working.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

TARGET = pytest.StashKey[str | None]()
"""The absolute path being collected (as perform_collect makes it absolute), or None."""


def entry_towards(directory: Path, target: str | None) -> Path | None:
    """The entry of `directory` that leads to `target`; None when the whole directory is wanted."""
    if target is None:
        return None
    prefix = os.path.join(str(directory), "")
    if not target.startswith(prefix) or len(target) == len(prefix):
        return None
    return directory / target[len(prefix) :].split(os.sep, 1)[0]


def _collect_entry(directory: pytest.Directory, entry: Path) -> Iterator[pytest.Item | pytest.Collector]:
    # As the stock collectors treat an initial path or one of its parents: no ignore check.
    if entry.is_dir():
        collector = directory.ihook.pytest_collect_directory(path=entry, parent=directory)
        if collector is not None:
            yield collector
    elif entry.is_file():
        yield from directory.ihook.pytest_collect_file(file_path=entry, parent=directory)


class TargetedDir(pytest.Dir):  # type: ignore[misc]  # final in pytest; only collect() changes
    def collect(self) -> Iterable[pytest.Item | pytest.Collector]:
        entry = entry_towards(self.path, self.config.stash.get(TARGET, None))
        return super().collect() if entry is None else _collect_entry(self, entry)


class TargetedPackage(pytest.Package):
    def collect(self) -> Iterable[pytest.Item | pytest.Collector]:
        entry = entry_towards(self.path, self.config.stash.get(TARGET, None))
        return super().collect() if entry is None else _collect_entry(self, entry)


def targeted(collector: pytest.Collector, parent: pytest.Collector) -> pytest.Collector:
    """`collector` remade as its targeted twin when it is one of pytest's stock directory collectors."""
    if type(collector) is pytest.Dir:
        return TargetedDir.from_parent(parent, path=collector.path)
    if type(collector) is pytest.Package:
        return TargetedPackage.from_parent(parent, path=collector.path)
    return collector
