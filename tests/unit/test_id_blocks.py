"""Id blocks: ids handed out one by one from a reserved block, and how many the block still holds."""

from __future__ import annotations

from coordinator.store.store import IdBlocks


def test_remaining_counts_a_block_down_to_zero() -> None:
    blocks = IdBlocks()
    assert blocks.remaining("trials") == 0
    assert blocks.take("trials") is None
    blocks.add("trials", 5000)
    assert blocks.remaining("trials") == 1000
    assert blocks.take("trials") == 5000
    assert blocks.remaining("trials") == 999
    taken = [blocks.take("trials") for _ in range(999)]
    assert taken[-1] == 5999
    assert blocks.remaining("trials") == 0
    assert blocks.take("trials") is None
    assert blocks.remaining("slaves") == 0


def test_a_new_block_replaces_the_rest_of_the_old() -> None:
    blocks = IdBlocks()
    blocks.add("tasks", 1)
    blocks.take("tasks")
    blocks.add("tasks", 7001)
    assert blocks.remaining("tasks") == 1000
    assert blocks.take("tasks") == 7001
