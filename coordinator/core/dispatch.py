"""Which free worker takes which taskset: FIFO by taskset age, matched by worker_type, up to max_workers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple


class Opening(NamedTuple):
    """A dispatched taskset that may take more workers."""

    taskset_id: int
    worker_type: str
    max_workers: int
    assigned: int


class Assignment(NamedTuple):
    worker_name: str
    taskset_id: int


def plan_assignments(free_workers: Mapping[str, str], openings: Iterable[Opening]) -> list[Assignment]:
    """Pair free workers (name → worker_type) with the oldest tasksets of their type that have room."""
    openings = list(openings)
    room = {o.taskset_id: o.max_workers - o.assigned for o in openings if o.assigned < o.max_workers}
    by_type: dict[str, list[int]] = {}
    for o in sorted(openings, key=lambda o: o.taskset_id):
        if o.taskset_id in room:
            by_type.setdefault(o.worker_type, []).append(o.taskset_id)
    plan: list[Assignment] = []
    for name in sorted(free_workers):
        queue = by_type.get(free_workers[name])
        while queue and room[queue[0]] <= 0:
            queue.pop(0)
        if not queue:
            continue
        taskset_id = queue[0]
        room[taskset_id] -= 1
        plan.append(Assignment(name, taskset_id))
    return plan
