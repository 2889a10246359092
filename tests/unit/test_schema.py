"""The committed JSON Schema matches the message Structs it is generated from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from protocol.messages import COORDINATOR_METHODS, GLOBAL_NOTIFICATIONS, TASKSET_NOTIFICATIONS, WORKER_METHODS
from protocol.schema import SCHEMA_PATH, protocol_schema, render_schema

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "dump-protocol-schema"


def test_committed_schema_is_current() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render_schema(), (
        "protocol/schema.json is stale: run scripts/dump-protocol-schema"
    )


def test_schema_names_every_method_and_notification() -> None:
    doc = protocol_schema()
    assert set(doc["coordinator_methods"]) == set(COORDINATOR_METHODS)
    assert set(doc["worker_methods"]) == set(WORKER_METHODS)
    assert set(doc["taskset_notifications"]) == set(TASKSET_NOTIFICATIONS)
    assert set(doc["global_notifications"]) == set(GLOBAL_NOTIFICATIONS)
    assert doc["coordinator_methods"]["dequeue_task"]["params"] == {"$ref": "#/$defs/TasksetRefParams"}
    assert doc["coordinator_methods"]["create_taskset"]["resend"] is False
    refs = [ref for ref in _refs(doc) if ref.startswith("#/$defs/")]
    assert refs
    assert all(ref.removeprefix("#/$defs/") in doc["$defs"] for ref in refs), "dangling $ref"


def test_rendering_is_stable_and_sorted() -> None:
    text = render_schema()
    assert text == render_schema()
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_script_is_executable_and_checks() -> None:
    assert SCRIPT.read_text(encoding="utf-8").startswith("#!/usr/bin/env python3\n")
    assert os.access(SCRIPT, os.X_OK)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []
