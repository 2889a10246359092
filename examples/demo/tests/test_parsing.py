"""Parsing, with a module-level condition that skips a test (about 1.5 s)."""

import json
import time

import pytest


@pytest.mark.parametrize("text", ['{"a": 1}', "[1, 2, 3]", '"x"'])
def test_json_round_trip(text: str) -> None:
    time.sleep(0.5)
    value = json.loads(text)
    assert json.loads(json.dumps(value)) == value


def test_optional_dependency() -> None:
    toml = pytest.importorskip("tomllib")
    assert toml.loads("a = 1") == {"a": 1}
