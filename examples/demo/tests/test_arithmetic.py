"""Quick tests: a tenth of a second in all."""

import pytest


def test_addition() -> None:
    assert 2 + 2 == 4


@pytest.mark.parametrize(("a", "b", "total"), [(1, 2, 3), (10, -4, 6), (0, 0, 0)])
def test_sums(a: int, b: int, total: int) -> None:
    assert a + b == total


def test_division_by_zero() -> None:
    with pytest.raises(ZeroDivisionError):
        _ = 1 / 0
