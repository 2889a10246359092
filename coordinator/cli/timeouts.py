"""Each file's soft and hard timeouts: unknown without history, else max(least, average x multiplier)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from protocol.types import Task


class TimeoutRule(NamedTuple):
    """soft = unknown without history, else max(least, average * multiplier); hard = soft + margin."""

    unknown_spec_timeout_sec: int = 600
    least_timeout_sec: int = 60
    average_multiplier: float = 2.0
    hard_timeout_margin_sec: int = 60

    def soft(self, average_sec: int | None) -> int:
        if average_sec is None:
            return max(1, self.unknown_spec_timeout_sec)
        return max(1, self.least_timeout_sec, math.ceil(average_sec * self.average_multiplier))

    def hard(self, average_sec: int | None) -> int:
        return self.soft(average_sec) + self.hard_timeout_margin_sec


def build_tasks(
    spec_paths: Sequence[str], spec_sha1s: Sequence[str], averages: Sequence[int | None], rule: TimeoutRule
) -> list[Task]:
    """The taskset's tasks, `[spec_path, spec_sha1, hard, soft]` each."""
    if not len(spec_paths) == len(spec_sha1s) == len(averages):
        raise ValueError("one sha1 and one average per file")
    return [
        Task(path, sha1, rule.hard(average), rule.soft(average))
        for path, sha1, average in zip(spec_paths, spec_sha1s, averages, strict=True)
    ]
