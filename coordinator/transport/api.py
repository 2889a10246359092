"""GET /api/v1: read-only JSON views of tasksets, tasks, trials, worker logs, slaves and workers, with OpenAPI."""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, Final

import asyncpg
import msgspec
from aiohttp import web

from coordinator.core.errors import Refused, Unavailable
from coordinator.runtime.coordinator import Coordinator
from coordinator.transport import keys
from coordinator.transport.rpc import Tokens, presented_token
from protocol.messages import Role
from protocol.types import MAX_ID, format_timestamp

TASKSET_FIELDS: Final = (
    "id",
    "rsync_name",
    "setup_command",
    "slave_command",
    "worker_type",
    "taskset_class",
    "max_workers",
    "max_trials",
    "status",
    "created_at",
    "finished_at",
)
COUNT_FIELDS: Final = ("task_count", "passed_count", "pending_count", "failed_count")
TRIAL_FIELDS: Final = (
    "id",
    "task_id",
    "slave_id",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "passed",
    "pending",
    "failed",
)
WORKER_LOG_FIELDS: Final = (
    "id",
    "taskset_id",
    "worker_name",
    "started_at",
    "rsync_finished_at",
    "setup_finished_at",
    "rspec_finished_at",
    "finished_at",
    "log",
)
SLAVE_FIELDS: Final = ("id", "taskset_id", "name", "status", "current_trial")


_JSON: Final = msgspec.json.Encoder()


def json_body(data: Any, *, status: int = 200) -> web.Response:
    """A JSON answer, encoded by msgspec: a taskset of 100,000 tasks is 17 MB of it, which the standard
    library's encoder took about a second of the event loop to write."""
    return web.Response(body=_JSON.encode(data), status=status, content_type="application/json", charset="utf-8")


def _value(value: Any) -> Any:
    return format_timestamp(value) if isinstance(value, dt.datetime) else value


def record(row: asyncpg.Record | dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: _value(row[name]) for name in fields}


def not_found(message: str) -> web.Response:
    return json_body({"error": message}, status=404)


def bad_request(message: str) -> web.Response:
    return json_body({"error": message}, status=400)


View = Callable[[web.Request], Awaitable[web.StreamResponse]]


def viewer(view: View) -> View:
    """Refuse callers without a viewer-granting token; turn an unreachable store into 503."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        tokens: Tokens = request.app[keys.TOKENS]
        if Role.VIEWER not in tokens.roles_for(presented_token(request)):
            return json_body({"error": "this view needs a viewer token"}, status=401)
        try:
            return await view(request)
        except Unavailable as exc:
            return json_body({"error": exc.message}, status=503)
        except Refused as exc:
            return json_body({"error": exc.message}, status=400)

    guarded.__name__ = view.__name__
    guarded.__doc__ = view.__doc__
    return guarded


def _id(request: web.Request, name: str = "id") -> int | None:
    return _positive(request.match_info[name])


def _positive(text: str) -> int | None:
    """An id written in ASCII digits (other scripts' digits are digits to `int` too), or `None`."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    value = int(text)
    return value if 1 <= value <= MAX_ID else None


def _coordinator(request: web.Request) -> Coordinator:
    coordinator: Coordinator = request.app[keys.COORDINATOR]
    return coordinator


async def _taskset_record(coordinator: Coordinator, taskset_id: int) -> dict[str, Any] | None:
    owner = await coordinator.owner(taskset_id)
    if owner is None:
        return None
    await owner.finish_settled()  # a finished status is final: never one that may not commit
    model = owner.model
    body = {name: _value(getattr(model, name)) for name in TASKSET_FIELDS}
    body.update(model.counts())
    return body


@viewer
async def list_tasksets(request: web.Request) -> web.StreamResponse:
    """Tasksets newest first."""
    active_text = request.query.get("active")
    if active_text not in (None, "true", "false"):
        return bad_request(f"active must be true or false, not {active_text!r}")
    active = None if active_text is None else active_text == "true"
    limit_text = request.query.get("limit", "50")
    limit = _positive(limit_text)
    if limit is None or limit > 500:
        return bad_request(f"limit must be between 1 and 500, not {limit_text[:40]!r}")
    before_text = request.query.get("before")
    before = None if before_text is None else _positive(before_text)
    if before_text is not None and before is None:
        return bad_request(f"before must be a positive id, not {before_text[:40]!r}")
    rows = await _coordinator(request).store.fetch("list_tasksets", active, before, limit)
    return json_body({"tasksets": [record(r, TASKSET_FIELDS + COUNT_FIELDS) for r in rows]})


@viewer
async def get_taskset(request: web.Request) -> web.StreamResponse:
    """One taskset."""
    taskset_id = _id(request)
    body = None if taskset_id is None else await _taskset_record(_coordinator(request), taskset_id)
    if body is None:
        return not_found(f"no taskset {request.match_info['id']}")
    return json_body(body)


@viewer
async def taskset_tasks(request: web.Request) -> web.StreamResponse:
    """A taskset's tasks, each with its trials (no outputs)."""
    taskset_id = _id(request)
    store = _coordinator(request).store
    if taskset_id is None or await store.fetchrow("get_taskset", taskset_id) is None:
        return not_found(f"no taskset {request.match_info['id']}")
    # Built as JSON by the database: a taskset of 100,000 tasks took half a second of the event loop here.
    body: str = await store.fetchval("tasks_json_of_taskset", taskset_id)
    return web.Response(body=body.encode(), content_type="application/json", charset="utf-8")


@viewer
async def get_trial(request: web.Request) -> web.StreamResponse:
    """One trial with its stdout and stderr."""
    trial_id = _id(request)
    row = None if trial_id is None else await _coordinator(request).store.fetchrow("get_trial", trial_id)
    if row is None:
        return not_found(f"no trial {request.match_info['id']}")
    return json_body(record(row, (*TRIAL_FIELDS, "stdout", "stderr", "taskset_id", "spec_path")))


@viewer
async def taskset_worker_logs(request: web.Request) -> web.StreamResponse:
    """A taskset's worker logs with their text."""
    taskset_id = _id(request)
    store = _coordinator(request).store
    if taskset_id is None or await store.fetchrow("get_taskset", taskset_id) is None:
        return not_found(f"no taskset {request.match_info['id']}")
    rows = await store.fetch("worker_logs_of_taskset", taskset_id)
    return json_body({"worker_logs": [record(r, WORKER_LOG_FIELDS) for r in rows]})


@viewer
async def taskset_slaves(request: web.Request) -> web.StreamResponse:
    """A taskset's slaves."""
    taskset_id = _id(request)
    store = _coordinator(request).store
    if taskset_id is None or await store.fetchrow("get_taskset", taskset_id) is None:
        return not_found(f"no taskset {request.match_info['id']}")
    slaves = []
    for row in await store.fetch("slaves_of_taskset", taskset_id):
        body = record({**row, "current_trial": row["current_trial_id"]}, SLAVE_FIELDS)
        slaves.append(body)
    return json_body({"slaves": slaves})


@viewer
async def list_workers(request: web.Request) -> web.StreamResponse:
    """The live workers."""
    return json_body({"workers": _coordinator(request).workers.describe()})


def _schema_object(fields: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": fields, "required": list(fields)}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of /api/v1."""
    ts = {"type": ["string", "null"], "format": "date-time"}
    integer = {"type": "integer"}
    maybe_int = {"type": ["integer", "null"]}
    string = {"type": "string"}
    maybe_string = {"type": ["string", "null"]}
    taskset = _schema_object(
        {
            "id": integer,
            "rsync_name": string,
            "setup_command": string,
            "slave_command": string,
            "worker_type": string,
            "taskset_class": string,
            "max_workers": integer,
            "max_trials": integer,
            "status": {"enum": ["rsync_waiting", "waiting", "running", "succeeded", "cancelled", "failed"]},
            "created_at": {"type": "string", "format": "date-time"},
            "finished_at": ts,
            "task_count": integer,
            "passed_count": integer,
            "pending_count": integer,
            "failed_count": integer,
        }
    )
    trial_fields = {
        "id": integer,
        "task_id": integer,
        "slave_id": integer,
        "status": {"enum": [None, "error", "timeout", "failed", "pending", "passed"]},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": ts,
        "finished_at": ts,
        "passed": maybe_int,
        "pending": maybe_int,
        "failed": maybe_int,
    }
    trial = _schema_object(trial_fields)
    trial_with_output = _schema_object(
        {**trial_fields, "stdout": maybe_string, "stderr": maybe_string, "taskset_id": integer, "spec_path": string}
    )
    task = _schema_object(
        {
            "id": integer,
            "taskset_id": integer,
            "spec_path": string,
            "spec_sha1": string,
            "hard_timeout_sec": integer,
            "soft_timeout_sec": integer,
            "status": {"enum": [None, "passed", "pending", "failed"]},
            "trial_count": integer,
            "trials": {"type": "array", "items": {"$ref": "#/components/schemas/Trial"}},
        }
    )
    worker_log = _schema_object(
        {
            "id": integer,
            "taskset_id": integer,
            "worker_name": string,
            "started_at": {"type": "string", "format": "date-time"},
            "rsync_finished_at": ts,
            "setup_finished_at": ts,
            "rspec_finished_at": ts,
            "finished_at": ts,
            "log": string,
        }
    )
    slave = _schema_object(
        {
            "id": integer,
            "taskset_id": integer,
            "name": string,
            "status": {"enum": [None, "normal_exit", "timeout_exit", "failure_exit"]},
            "current_trial": maybe_int,
        }
    )
    worker = _schema_object({"name": string, "worker_type": string, "taskset_id": maybe_int})
    error = _schema_object({"error": string})

    def ok(schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": "OK", "content": {"application/json": {"schema": schema}}}

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def wrapped(key: str, name: str) -> dict[str, Any]:
        return _schema_object({key: {"type": "array", "items": ref(name)}})

    err = {"description": "error", "content": {"application/json": {"schema": ref("Error")}}}
    unavailable = {
        "description": "the database cannot be read now, or has not answered within 10 s",
        "content": {"application/json": {"schema": ref("Error")}},
    }
    id_param = {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
    }

    def by_id(summary: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "get": {
                "summary": summary,
                "parameters": [id_param],
                # An id that is no id (not digits, 0, past the largest) names nothing: 404, as an unknown one.
                "responses": {"200": ok(body), "401": err, "404": err, "503": unavailable},
            }
        }

    return {
        "openapi": "3.1.0",
        "info": {"title": "testfleet read API", "version": "1"},
        "paths": {
            "/api/v1/tasksets": {
                "get": {
                    "summary": "Tasksets, newest first",
                    "parameters": [
                        {"name": "active", "in": "query", "schema": {"type": "string", "enum": ["true", "false"]}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                        {
                            "name": "before",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                        },
                    ],
                    "responses": {
                        "200": ok(wrapped("tasksets", "Taskset")),
                        "400": err,
                        "401": err,
                        "503": unavailable,
                    },
                }
            },
            "/api/v1/tasksets/{id}": by_id("One taskset", ref("Taskset")),
            "/api/v1/tasksets/{id}/tasks": by_id("A taskset's tasks with their trials", wrapped("tasks", "Task")),
            "/api/v1/tasksets/{id}/worker_logs": by_id("A taskset's worker logs", wrapped("worker_logs", "WorkerLog")),
            "/api/v1/tasksets/{id}/slaves": by_id("A taskset's slaves", wrapped("slaves", "Slave")),
            "/api/v1/trials/{id}": by_id("One trial with its output", ref("TrialWithOutput")),
            "/api/v1/workers": {
                "get": {"summary": "Live workers", "responses": {"200": ok(wrapped("workers", "Worker")), "401": err}}
            },
        },
        "components": {
            "schemas": {
                "Taskset": taskset,
                "Task": task,
                "Trial": trial,
                "TrialWithOutput": trial_with_output,
                "WorkerLog": worker_log,
                "Slave": slave,
                "Worker": worker,
                "Error": error,
            }
        },
    }


async def openapi_view(request: web.Request) -> web.StreamResponse:
    return json_body(openapi_document())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/openapi.json", openapi_view)
    app.router.add_get("/api/v1/tasksets", list_tasksets)
    app.router.add_get("/api/v1/tasksets/{id}", get_taskset)
    app.router.add_get("/api/v1/tasksets/{id}/tasks", taskset_tasks)
    app.router.add_get("/api/v1/tasksets/{id}/worker_logs", taskset_worker_logs)
    app.router.add_get("/api/v1/tasksets/{id}/slaves", taskset_slaves)
    app.router.add_get("/api/v1/trials/{id}", get_trial)
    app.router.add_get("/api/v1/workers", list_workers)
