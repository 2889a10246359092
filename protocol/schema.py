"""The wire's JSON Schema, generated from the message Structs; `scripts/dump-protocol-schema` writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import msgspec

from protocol import PROTOCOL_VERSION
from protocol.codec import SUBPROTOCOLS
from protocol.messages import (
    COORDINATOR_METHODS,
    GLOBAL_NOTIFICATIONS,
    TASKSET_NOTIFICATIONS,
    WORKER_METHODS,
    MethodSpec,
    Params,
)

SCHEMA_PATH: Final = Path(__file__).with_name("schema.json")
_REF_TEMPLATE: Final = "#/$defs/{name}"


def protocol_schema() -> dict[str, Any]:
    """Every method's params and result and every notification's params, sharing one `$defs`."""
    methods: list[tuple[str, MethodSpec]] = [
        *(("coordinator_methods", spec) for spec in COORDINATOR_METHODS.values()),
        *(("worker_methods", spec) for spec in WORKER_METHODS.values()),
    ]
    notifications: list[tuple[str, str, type[Params]]] = [
        *(("taskset_notifications", name, kind) for name, kind in TASKSET_NOTIFICATIONS.items()),
        *(("global_notifications", name, kind) for name, kind in GLOBAL_NOTIFICATIONS.items()),
    ]
    types: list[Any] = []
    for _, spec in methods:
        types += [spec.params, spec.result]
    types += [kind for _, _, kind in notifications]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF_TEMPLATE)

    doc: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"testfleet wire protocol, version {PROTOCOL_VERSION}",
        "description": (
            "JSON-RPC 2.0 with positional params (docs/PROTOCOL.md). Each method names the schema of "
            "its params array and of its result; each notification the schema of its params array."
        ),
        "subprotocols": sorted(SUBPROTOCOLS),
        "coordinator_methods": {},
        "worker_methods": {},
        "taskset_notifications": {},
        "global_notifications": {},
        "$defs": components,
    }
    found = iter(schemas)
    for table, spec in methods:
        doc[table][spec.name] = {
            "params": next(found),
            "result": next(found),
            "roles": sorted(spec.roles),
            "ws_only": spec.ws_only,
            "resend": spec.resend,
        }
    for table, name, _ in notifications:
        doc[table][name] = {"params": next(found)}
    return doc


def render_schema() -> str:
    """The schema as committed: sorted keys, two-space indent, one final newline."""
    return json.dumps(protocol_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


__all__ = ["SCHEMA_PATH", "protocol_schema", "render_schema"]
