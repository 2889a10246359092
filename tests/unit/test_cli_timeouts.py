"""The timeout rule: unknown without history, else max(least, average x multiplier); hard = soft + margin."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.cli.timeouts import TimeoutRule, build_tasks
from protocol.types import Task


def test_defaults() -> None:
    rule = TimeoutRule()
    assert rule.soft(None) == 600
    assert rule.hard(None) == 660
    assert rule.soft(10) == 60  # the least timeout wins over 2 x 10
    assert rule.soft(45) == 90
    assert rule.hard(45) == 150


def test_multiplier_rounds_up() -> None:
    rule = TimeoutRule(
        unknown_spec_timeout_sec=100, least_timeout_sec=1, average_multiplier=1.5, hard_timeout_margin_sec=0
    )
    assert rule.soft(3) == 5
    assert rule.hard(3) == 5
    assert rule.soft(0) == 1


def test_build_tasks_in_wire_order() -> None:
    rule = TimeoutRule(300, 30, 2.0, 10)
    tasks = build_tasks(["a.py", "b.py"], ["s1", "s2"], [None, 40], rule)
    assert tasks == [Task("a.py", "s1", 310, 300), Task("b.py", "s2", 90, 80)]
    with pytest.raises(ValueError):
        build_tasks(["a.py"], [], [None], rule)


@given(
    average=st.none() | st.integers(0, 10**6),
    unknown=st.integers(1, 10**5),
    least=st.integers(1, 10**5),
    multiplier=st.floats(0.01, 100),
    margin=st.integers(0, 10**5),
)
def test_soft_never_exceeds_hard_and_both_are_valid(
    average: int | None, unknown: int, least: int, multiplier: float, margin: int
) -> None:
    rule = TimeoutRule(unknown, least, multiplier, margin)
    soft, hard = rule.soft(average), rule.hard(average)
    assert 1 <= soft <= hard
    assert hard - soft == margin
    if average is None:
        assert soft == unknown
    else:
        assert soft >= least
        assert soft >= average * multiplier
