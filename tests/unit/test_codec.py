"""Round trips of every method and notification in both codecs, and the errors bad input earns."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol.codec import (
    MAX_BATCH,
    Codec,
    NotificationFrame,
    Request,
    Response,
    decode_batch,
    decode_frame,
    decode_notification,
    decode_params,
    decode_result,
    encode,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    is_batch,
    lookup,
)
from protocol.errors import (
    Conflict,
    ErrorCode,
    InternalError,
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    NotFound,
    ParseError,
    ProtocolError,
    Unauthorized,
    WrongTransport,
    error_from_code,
)
from protocol.messages import (
    COORDINATOR_METHODS,
    GLOBAL_NOTIFICATIONS,
    NOTIFICATION_NAMES,
    NOTIFICATIONS,
    TASKSET_NOTIFICATIONS,
    WORKER_METHODS,
    ActiveWorker,
    AppendWorkerLogLogParams,
    AssignTasksetParams,
    CancelUserTasksetParams,
    CreateSlaveParams,
    CreateTasksetParams,
    CreateTrialParams,
    CreateWorkerLogParams,
    CurrentTasksetParams,
    CurrentTrialParams,
    DequeuedTask,
    FinishSlaveParams,
    FinishTrialParams,
    ForceFinishSlaveParams,
    ListenToTasksetParams,
    MethodSpec,
    NoParams,
    Notification,
    Params,
    QuerySpecAverageSecParams,
    QuerySpecAverageSecsParams,
    ReversedEnqueueTaskParams,
    SlaveCreated,
    SlaveUpdated,
    TasksetCreated,
    TasksetRefParams,
    TasksetSummary,
    TasksetUpdated,
    TaskUpdated,
    TrialCreated,
    TrialRefParams,
    TrialUpdated,
    WorkerLogCreated,
    WorkerLogRefParams,
    WorkerLogUpdated,
)
from protocol.types import (
    MAX_ID,
    SlaveHash,
    SlaveRef,
    SlaveStatus,
    Task,
    TaskHash,
    TaskRef,
    TasksetHash,
    TasksetRef,
    TasksetStatus,
    TaskStatus,
    Timestamp,
    TrialRef,
    TrialStatus,
    WorkerLogHash,
    WorkerLogRef,
    format_timestamp,
    maybe_timestamp,
    parse_timestamp,
)

ROOT = Path(__file__).resolve().parents[2]
SEED_CANDIDATES = (ROOT / "docs" / "seed" / "PROTOCOL.txt", ROOT.parent / "shared" / "seed" / "PROTOCOL.txt")
CODECS = (Codec.JSON, Codec.MSGPACK)
TS = "2026-11-28T05:31:55.123456Z"
TS2 = "2026-11-28T05:40:01.000001Z"
SHA1 = "0123456789abcdef0123456789abcdef01234567"
TASKSET = TasksetRef(3)
TASK = TaskRef(12)
TRIAL = TrialRef(40)
SLAVE = SlaveRef(5)
WORKER_LOG = WorkerLogRef(7)

PARAMS: dict[str, list[Params]] = {
    "listen_to_global": [NoParams()],
    "listen_to_taskset": [ListenToTasksetParams(TASKSET)],
    "query_spec_average_sec": [QuerySpecAverageSecParams("shop", SHA1)],
    "query_spec_average_secs": [QuerySpecAverageSecsParams("shop", [SHA1, ""]), QuerySpecAverageSecsParams("shop", [])],
    "create_taskset": [
        CreateTasksetParams(
            "dev1-shop",
            "bundle install",
            "pytest -x",
            "default",
            "shop",
            4,
            3,
            [Task("tests/test_a.py", SHA1, 90, 60), Task("tests/test_ünïcode.py", "", 1, 1)],
        ),
        CreateTasksetParams("b", "", "", "gpu", "shop", 1, 1, []),
    ],
    "dispatch_taskset": [TasksetRefParams(TASKSET)],
    "dequeue_task": [TasksetRefParams(TASKSET)],
    "try_finish_taskset": [TasksetRefParams(TASKSET)],
    "fail_taskset": [TasksetRefParams(TASKSET)],
    "cancel_taskset": [TasksetRefParams(TasksetRef(MAX_ID))],
    "cancel_user_taskset": [CancelUserTasksetParams("dev1-shop")],
    "query_taskset_status": [TasksetRefParams(TASKSET)],
    "query_taskset_summary": [TasksetRefParams(TASKSET)],
    "active_tasksets": [NoParams()],
    "reversed_enqueue_task": [ReversedEnqueueTaskParams(TASK)],
    "create_trial": [CreateTrialParams(TASK, SLAVE)],
    "start_trial": [TrialRefParams(TRIAL)],
    "finish_trial": [
        FinishTrialParams(TRIAL, TrialStatus.FAILED, "1 failed\n", "warn: ✓\n", 3, 1, 1),
        FinishTrialParams(TRIAL, TrialStatus.ERROR, "", "ImportError", None, None, None),
    ],
    "current_taskset": [CurrentTasksetParams("w1", "default", TASKSET), CurrentTasksetParams("w1", "default")],
    "active_workers": [NoParams()],
    "create_worker_log": [CreateWorkerLogParams("w1", TASKSET)],
    "append_worker_log_log": [AppendWorkerLogLogParams(WORKER_LOG, "+ bundle install\n")],
    "set_rsync_finished_time": [WorkerLogRefParams(WORKER_LOG)],
    "set_setup_finished_time": [WorkerLogRefParams(WORKER_LOG)],
    "set_rspec_finished_time": [WorkerLogRefParams(WORKER_LOG)],
    "finish_worker_log": [WorkerLogRefParams(WORKER_LOG)],
    "create_slave": [CreateSlaveParams("w1-slave-0", TASKSET)],
    "current_trial": [CurrentTrialParams(SLAVE, TRIAL), CurrentTrialParams(SLAVE)],
    "finish_slave": [FinishSlaveParams(SLAVE, SlaveStatus.NORMAL_EXIT), FinishSlaveParams(SLAVE, None)],
    "force_finish_slave": [ForceFinishSlaveParams("w1-slave-0", SlaveStatus.TIMEOUT_EXIT)],
    # worker methods
    "assign_taskset": [AssignTasksetParams(TASKSET, "dev1-shop", "bundle install", "pytest -x", 3)],
    "taskset_finished": [TasksetRefParams(TASKSET)],
    "query_taskset": [NoParams()],
}

RESULTS: dict[str, list[Any]] = {
    "query_spec_average_sec": [None, 0, 42],
    "query_spec_average_secs": [[], [3, None, 0]],
    "create_taskset": [TASKSET],
    "dequeue_task": [DequeuedTask(TASK, "tests/test_a.py", 90, 60), None],
    "query_taskset_status": list(TasksetStatus),
    "query_taskset_summary": [
        TasksetSummary(TasksetStatus.RUNNING, TS, None, 10, 3, 1, 2),
        TasksetSummary(TasksetStatus.SUCCEEDED, TS, TS2, 10, 9, 1, 0),
    ],
    "active_tasksets": [[], [TasksetRef(1), TasksetRef(2)]],
    "create_trial": [TRIAL],
    "active_workers": [[], [ActiveWorker("w1", "default", TASKSET), ActiveWorker("w2", "gpu", None)]],
    "create_worker_log": [WORKER_LOG],
    "create_slave": [SLAVE],
    "query_taskset": [TASKSET, None],
}

NOTIFICATION_SAMPLES: list[Notification] = [
    TasksetUpdated(TS, TASKSET, TasksetHash(status=TasksetStatus.RUNNING)),
    TasksetUpdated(
        TS,
        TASKSET,
        TasksetHash(
            status=TasksetStatus.FAILED,
            finished_at=TS2,
            task_count=10,
            passed_count=8,
            pending_count=1,
            failed_count=1,
        ),
    ),
    TaskUpdated(TS, TASK, TaskHash(status=TaskStatus.PASSED, trial_count=2)),
    TaskUpdated(TS, TASK, TaskHash(status=None)),
    TrialCreated(TS, TRIAL, TASK, SLAVE, TS),
    TrialUpdated(TS, TRIAL, TASK, TS2, TrialStatus.PASSED, 3, 0, 0),
    TrialUpdated(TS, TRIAL, TASK, None, None, None, None, None),
    WorkerLogCreated(TS, WORKER_LOG, "w1"),
    WorkerLogUpdated(TS, WORKER_LOG, WorkerLogHash(log_appended="+ make\n")),
    WorkerLogUpdated(TS, WORKER_LOG, WorkerLogHash(rsync_finished_at=TS2, setup_finished_at=None)),
    SlaveCreated(TS, SLAVE, "w1-slave-0"),
    SlaveUpdated(TS, SLAVE, SlaveHash(status=SlaveStatus.FAILURE_EXIT)),
    SlaveUpdated(TS, SLAVE, SlaveHash(current_trial=TRIAL)),
    SlaveUpdated(TS, SLAVE, SlaveHash(current_trial=None)),
    TasksetCreated(TS, TASKSET, TS, "dev1-shop", "default", "shop"),
]

ALL_SPECS: list[tuple[dict[str, MethodSpec], MethodSpec]] = [
    *((COORDINATOR_METHODS, spec) for spec in COORDINATOR_METHODS.values()),
    *((WORKER_METHODS, spec) for spec in WORKER_METHODS.values()),
]


def results_of(spec: MethodSpec) -> list[Any]:
    return RESULTS.get(spec.name, [None] if spec.result is None else [])


def spec_id(item: tuple[dict[str, MethodSpec], MethodSpec]) -> str:
    return item[1].name


def raw(value: Any, codec: Codec) -> msgspec.Raw:
    return msgspec.Raw(encode(value, codec))


# -- coverage ------------------------------------------------------------------------


def test_every_method_and_notification_has_samples() -> None:
    assert set(PARAMS) == set(COORDINATOR_METHODS) | set(WORKER_METHODS)
    for _, spec in ALL_SPECS:
        assert results_of(spec), f"no sample result for {spec.name}"
        assert all(type(p) is spec.params for p in PARAMS[spec.name]), spec.name
    assert {NOTIFICATION_NAMES[type(n)] for n in NOTIFICATION_SAMPLES} == set(NOTIFICATIONS)


def _seed() -> dict[str, list[tuple[str, int]]]:
    """Names and argument counts per section (`# Master`, `# Worker`, ...) of the seed signature list."""
    path = next((p for p in SEED_CANDIDATES if p.is_file()), None)
    if path is None:
        pytest.skip("seed/PROTOCOL.txt is not beside the checkout")
    sections: dict[str, list[tuple[str, int]]] = defaultdict(list)
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if heading := re.match(r"^#\s+(\w+)\s*$", line):
            section = heading[1]
        elif section and (signature := re.match(r"^([a-z_]+)\s*:\s*(.+)$", line)):
            *args, _result = (part.strip() for part in signature[2].split("->"))
            if args == ["()"]:
                arity = 0
            elif len(args) == 1 and args[0].startswith("("):
                arity = args[0].count(",") + 1
            else:
                arity = len(args)
            sections[section].append((signature[1], arity))
    return sections


def _arity(kind: type[Params]) -> int:
    return len(kind.__struct_fields__)


def test_seed_methods_and_notifications_are_all_defined_with_their_arity() -> None:
    seed = _seed()
    tables: dict[str, dict[str, type[Params]]] = {
        "Master": {name: spec.params for name, spec in COORDINATOR_METHODS.items()},
        "Worker": {name: spec.params for name, spec in WORKER_METHODS.items()},
        "TasksetNotification": TASKSET_NOTIFICATIONS,
        "GlobalNotification": GLOBAL_NOTIFICATIONS,
    }
    assert set(seed) == set(tables)
    for section, table in tables.items():
        names = [name for name, _ in seed[section]]
        assert names, section
        missing = [name for name in names if name not in table]
        assert not missing, f"{section}: {missing} have no entry"
        for name, arity in seed[section]:
            assert _arity(table[name]) == arity, f"{section}.{name} takes {arity} params in the seed"
    # The only addition to the seed is the documented batch query.
    assert set(COORDINATOR_METHODS) - {name for name, _ in seed["Master"]} == {"query_spec_average_secs"}
    assert set(WORKER_METHODS) == {name for name, _ in seed["Worker"]}
    assert "taskset_finished" in WORKER_METHODS


# -- round trips ---------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("item", ALL_SPECS, ids=spec_id)
def test_params_round_trip(item: tuple[dict[str, MethodSpec], MethodSpec], codec: Codec) -> None:
    table, spec = item
    for params in PARAMS[spec.name]:
        frame = decode_frame(encode_request(17, spec.name, params, codec), codec)
        assert isinstance(frame, Request)
        assert (frame.id, frame.method) == (17, spec.name)
        assert lookup(table, frame.method, frame.id) is spec
        assert decode_params(spec, frame.params, codec, frame.id) == params


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("item", ALL_SPECS, ids=spec_id)
def test_result_round_trip(item: tuple[dict[str, MethodSpec], MethodSpec], codec: Codec) -> None:
    _, spec = item
    for result in results_of(spec):
        frame = decode_frame(encode_result("r-1", result, codec), codec)
        assert isinstance(frame, Response)
        assert frame.id == "r-1"
        assert frame.error is None
        decoded = decode_result(spec, frame.result, codec)
        assert decoded == result
        assert type(decoded) is type(result)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("notification", NOTIFICATION_SAMPLES, ids=lambda n: type(n).__name__)
def test_notification_round_trip(notification: Notification, codec: Codec) -> None:
    name = NOTIFICATION_NAMES[type(notification)]
    frame = decode_frame(encode_notification(notification, codec), codec)
    assert isinstance(frame, NotificationFrame)
    assert frame.method == name
    for table in (NOTIFICATIONS, TASKSET_NOTIFICATIONS, GLOBAL_NOTIFICATIONS):
        if name in table:
            assert decode_notification(name, frame.params, codec, table) == notification


def test_wire_shapes_match_the_protocol_examples() -> None:
    request = encode_request(7, "dequeue_task", TasksetRefParams(TASKSET), Codec.JSON)
    assert json.loads(request) == {"jsonrpc": "2.0", "id": 7, "method": "dequeue_task", "params": [["taskset", 3]]}
    result = encode_result(7, DequeuedTask(TASK, "tests/test_a.py", 90, 60), Codec.JSON)
    assert json.loads(result) == {"jsonrpc": "2.0", "id": 7, "result": [["task", 12], "tests/test_a.py", 90, 60]}
    error = encode_error(NotFound("no taskset 3"), Codec.JSON, 7)
    assert json.loads(error) == {"jsonrpc": "2.0", "id": 7, "error": {"code": -32004, "message": "no taskset 3"}}
    appended = encode_notification(WorkerLogUpdated(TS, WORKER_LOG, WorkerLogHash(log_appended="x")), Codec.JSON)
    assert json.loads(appended)["params"] == [TS, ["worker_log", 7], {"log_appended": "x"}]
    cleared = encode_notification(SlaveUpdated(TS, SLAVE, SlaveHash(current_trial=None)), Codec.JSON)
    assert json.loads(cleared)["params"][2] == {"current_trial": None}
    summary = encode_result(1, TasksetSummary(TasksetStatus.RUNNING, TS, None, 1, 0, 0, 0), Codec.JSON)
    assert json.loads(summary)["result"] == {
        "status": "running",
        "created_at": TS,
        "finished_at": None,
        "task_count": 1,
        "passed_count": 0,
        "pending_count": 0,
        "failed_count": 0,
    }


def test_omitted_optional_params_decode_to_none() -> None:
    spec = COORDINATOR_METHODS["current_taskset"]
    assert decode_params(spec, raw(["w1", "default"], Codec.JSON), Codec.JSON) == CurrentTasksetParams("w1", "default")
    assert decode_params(COORDINATOR_METHODS["active_tasksets"], None, Codec.JSON) == NoParams()
    assert decode_params(COORDINATOR_METHODS["active_tasksets"], None, Codec.MSGPACK) == NoParams()


# -- errors from bad input -------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_garbage_is_a_parse_error(codec: Codec) -> None:
    garbage = b"\xffnot json" if codec is Codec.JSON else b"\xc1"
    for decode in (decode_frame, decode_batch):
        with pytest.raises(ParseError) as caught:
            decode(garbage, codec)
        assert caught.value.code == ErrorCode.PARSE_ERROR
        assert int(caught.value.code) == -32700


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "frame",
    [
        "hello",
        42,
        None,
        {},
        {"jsonrpc": "2.0"},
        {"jsonrpc": "1.0", "id": 1, "method": "dequeue_task"},
        {"id": 1, "method": "dequeue_task"},
        {"jsonrpc": "2.0", "id": 1, "method": 5},
        {"jsonrpc": "2.0", "id": [1], "method": "dequeue_task"},
        {"jsonrpc": "2.0", "id": True, "method": "dequeue_task"},
        {"jsonrpc": "2.0", "id": 1.5, "method": "dequeue_task"},
        {"jsonrpc": "2.0", "id": 1, "method": "x", "result": None},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "id": 1, "result": 1, "error": {"code": 1, "message": "m"}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": "x", "message": "m"}},
        {"jsonrpc": "2.0", "id": 1, "error": "boom"},
        {"jsonrpc": "2.0", "result": 1},
        {"id": 1, "result": None},
        {"jsonrpc": "1.0", "id": 1, "result": None},
    ],
)
def test_non_requests_are_invalid_requests(frame: Any, codec: Codec) -> None:
    with pytest.raises(InvalidRequest) as caught:
        decode_frame(encode(frame, codec), codec)
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    assert int(caught.value.code) == -32600
    if isinstance(frame, dict) and type(frame.get("id")) is int:
        if "method" in frame:
            assert caught.value.request_id == 1, "a request's id is kept when it could be read"
        else:
            # A response's id is the receiver's own: an error carrying it would answer the receiver's request.
            assert caught.value.request_id is None
    if isinstance(frame, dict) and frame.get("id") == 1.5:
        assert "an integer, a string or null" in caught.value.message


@pytest.mark.parametrize("codec", CODECS)
def test_batches(codec: Codec) -> None:
    one = encode_request(1, "active_tasksets", NoParams(), codec)
    body = encode([msgspec.Raw(one), msgspec.Raw(one)], codec)
    assert is_batch(body, codec)
    assert not is_batch(one, codec)
    assert not is_batch(b"", codec)
    if codec is Codec.JSON:
        assert is_batch(b" \r\n\t[1]", codec)
    assert [decode_frame(item, codec) for item in decode_batch(body, codec)] == [decode_frame(one, codec)] * 2
    with pytest.raises(InvalidRequest, match="empty batch"):
        decode_batch(encode([], codec), codec)
    with pytest.raises(InvalidRequest, match="at most"):
        decode_batch(encode([1] * (MAX_BATCH + 1), codec), codec)
    with pytest.raises(InvalidRequest):
        decode_batch(encode({"jsonrpc": "2.0"}, codec), codec)


def test_unknown_methods_are_method_not_found() -> None:
    for table, name in (
        (COORDINATOR_METHODS, "no_such_method"),
        (COORDINATOR_METHODS, "assign_taskset"),
        (WORKER_METHODS, "dequeue_task"),
    ):
        with pytest.raises(MethodNotFound) as caught:
            lookup(table, name, 9)
        assert caught.value.code == ErrorCode.METHOD_NOT_FOUND
        assert int(caught.value.code) == -32601
        assert caught.value.request_id == 9
    with pytest.raises(MethodNotFound):
        decode_notification("trial_deleted", None, Codec.JSON, NOTIFICATIONS)
    with pytest.raises(MethodNotFound):
        decode_notification("trial_created", None, Codec.JSON, GLOBAL_NOTIFICATIONS)


BAD_PARAMS: list[tuple[str, str, Any]] = [
    ("wrong count: none", "dequeue_task", []),
    ("wrong count: too many", "dequeue_task", [["taskset", 3], 1]),
    ("wrong count: one short", "create_trial", [["task", 12]]),
    ("not positional", "dequeue_task", {"taskset_ref": ["taskset", 3]}),
    ("not an array", "dequeue_task", "taskset"),
    ("wrong type: id as string", "dequeue_task", [["taskset", "3"]]),
    ("wrong type: ref as int", "dequeue_task", [3]),
    ("wrong type: bool count", "finish_trial", [["trial", 1], "passed", "", "", True, 0, 0]),
    ("wrong ref kind", "dequeue_task", [["task", 3]]),
    ("wrong ref kind: unknown", "dequeue_task", [["bogus", 3]]),
    ("ref too long", "dequeue_task", [["taskset", 3, 4]]),
    ("ref too short", "dequeue_task", [["taskset"]]),
    ("id out of range: 0", "dequeue_task", [["taskset", 0]]),
    ("id out of range: negative", "start_trial", [["trial", -1]]),
    ("id out of range: too big", "start_trial", [["trial", MAX_ID + 1]]),
    ("negative count", "finish_trial", [["trial", 1], "passed", "", "", -1, 0, 0]),
    ("unknown status", "finish_trial", [["trial", 1], "exploded", "", "", 0, 0, 0]),
    ("unknown slave status", "finish_slave", [["slave", 1], "vanished"]),
    ("max_workers 0", "create_taskset", ["r", "", "", "t", "c", 0, 1, []]),
    ("max_trials 0", "create_taskset", ["r", "", "", "t", "c", 1, 0, []]),
    ("hard timeout 0", "create_taskset", ["r", "", "", "t", "c", 1, 1, [["a.py", "", 0, 1]]]),
    ("task too short", "create_taskset", ["r", "", "", "t", "c", 1, 1, [["a.py", "", 1]]]),
    ("rsync_name traversal", "cancel_user_taskset", ["../etc"]),
    ("rsync_name with a slash", "cancel_user_taskset", ["a/b"]),
    ("rsync_name with a newline", "cancel_user_taskset", ["dev1\n"]),
    ("rsync_name empty", "cancel_user_taskset", [""]),
    ("empty worker name", "current_taskset", ["", "default", None]),
    ("worker method params", "assign_taskset", [["taskset", 1], "r", "", "", 0]),
]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("why", "method", "params"), BAD_PARAMS, ids=[case[0] for case in BAD_PARAMS])
def test_bad_params_are_invalid_params(why: str, method: str, params: Any, codec: Codec) -> None:
    spec = COORDINATOR_METHODS.get(method) or WORKER_METHODS[method]
    frame = decode_frame(encode({"jsonrpc": "2.0", "id": 5, "method": method, "params": params}, codec), codec)
    assert isinstance(frame, Request)
    with pytest.raises(InvalidParams) as caught:
        decode_params(spec, frame.params, codec, frame.id)
    assert caught.value.code == ErrorCode.INVALID_PARAMS
    assert int(caught.value.code) == -32602
    assert caught.value.request_id == 5
    assert method in caught.value.message


@pytest.mark.parametrize("codec", CODECS)
def test_bad_notification_params_and_results_are_invalid_params(codec: Codec) -> None:
    with pytest.raises(InvalidParams):
        decode_notification("trial_created", raw([TS, ["trial", 1]], codec), codec, NOTIFICATIONS)
    with pytest.raises(InvalidParams):
        decode_notification("task_updated", raw([TS, ["task", 1], {"colour": "red"}], codec), codec, NOTIFICATIONS)
    with pytest.raises(InvalidParams):
        yesterday = raw(["yesterday", ["trial", 1], ["task", 1], ["slave", 1], TS], codec)
        decode_notification("trial_created", yesterday, codec, NOTIFICATIONS)
    with pytest.raises(InvalidParams):
        decode_result(COORDINATOR_METHODS["create_trial"], raw(["task", 1], codec), codec)
    with pytest.raises(InvalidParams):
        decode_result(COORDINATOR_METHODS["query_taskset_status"], raw("exploded", codec), codec)
    with pytest.raises(InvalidParams):
        decode_result(COORDINATOR_METHODS["create_slave"], None, codec)


@pytest.mark.parametrize("codec", CODECS)
def test_deep_nesting_is_refused_not_crashing(codec: Codec) -> None:
    # Spelled out as bytes: the encoders refuse this depth themselves.
    depth = 5000
    nested = b"[" * depth + b"]" * depth if codec is Codec.JSON else b"\x91" * depth + b"\x90"
    head = encode({"jsonrpc": "2.0", "id": 1, "result": 0}, codec)
    tail = b"0}" if codec is Codec.JSON else encode(0, codec)
    assert head.endswith(tail)
    body = head[: -len(tail)] + nested + (b"}" if codec is Codec.JSON else b"")
    assert isinstance(decode_frame(head, codec), Response)
    with pytest.raises(ParseError):
        decode_frame(body, codec)
    with pytest.raises(ProtocolError):
        decode_batch(nested, codec)
    with pytest.raises(InvalidParams):
        decode_params(COORDINATOR_METHODS["dequeue_task"], msgspec.Raw(nested), codec)
    with pytest.raises(InvalidParams):
        decode_result(COORDINATOR_METHODS["active_tasksets"], msgspec.Raw(nested), codec)


# -- error replies ---------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "error",
    [
        ParseError(),
        InvalidRequest(),
        MethodNotFound("no method 'x'"),
        InvalidParams("bad"),
        InternalError("internal error 1a2b"),
        Unauthorized(),
        NotFound("no taskset 3", data={"taskset_id": 3}),
        Conflict("dev1-shop has an active taskset"),
        WrongTransport(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_error_replies_round_trip_to_their_subclass(error: ProtocolError, codec: Codec) -> None:
    frame = decode_frame(encode_error(error, codec, 11), codec)
    assert isinstance(frame, Response)
    assert frame.id == 11
    assert frame.result is None
    assert type(frame.error) is type(error)
    assert frame.error is not None
    assert (frame.error.code, frame.error.message, frame.error.data) == (error.code, error.message, error.data)


def test_error_without_readable_id_and_unknown_codes() -> None:
    frame = decode_frame(encode_error(ParseError("not json"), Codec.JSON), Codec.JSON)
    assert isinstance(frame, Response)
    assert frame.id is None
    assert isinstance(frame.error, ParseError)
    unknown = error_from_code(-32099, "custom")
    assert type(unknown) is ProtocolError
    assert unknown.code == -32099
    assert isinstance(error_from_code(-32009, "busy"), Conflict)
    assert Conflict().message == "The state forbids it."


# -- timestamps ------------------------------------------------------------------------


def test_timestamps_have_microseconds_and_z() -> None:
    moment = dt.datetime(2026, 11, 28, 5, 31, 55, 123456, tzinfo=dt.UTC)
    assert format_timestamp(moment) == TS
    assert format_timestamp(moment.replace(microsecond=0)) == "2026-11-28T05:31:55.000000Z"
    assert format_timestamp(moment.astimezone(dt.timezone(dt.timedelta(hours=9)))) == TS
    assert parse_timestamp(TS) == moment
    assert maybe_timestamp(None) is None
    assert maybe_timestamp(moment) == TS
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(dt.datetime(2026, 11, 28))


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-28T05:31:55Z",
        "2026-11-28T05:31:55.123Z",
        "2026-11-28T05:31:55.123456",
        "2026-11-28T05:31:55.123456+00:00",
        "2026-11-28 05:31:55.123456Z",
        TS + "\n",
        "٢٠٢٦-11-28T05:31:55.123456Z",
    ],
)
def test_malformed_timestamps_are_refused(text: str) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(text, Timestamp)
    with pytest.raises(InvalidParams):
        decode_notification("slave_created", raw([text, ["slave", 1], "s"], Codec.JSON), Codec.JSON, NOTIFICATIONS)


def test_formatted_timestamps_validate() -> None:
    start = dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
    for step in range(50):
        moment = start + dt.timedelta(seconds=step * 7919.123457)
        assert msgspec.convert(format_timestamp(moment), Timestamp) == format_timestamp(moment)
        assert parse_timestamp(format_timestamp(moment)) == moment


def test_a_text_frame_decodes_as_it_came() -> None:
    """A WebSocket text frame arrives as str: it decodes like its bytes, for either codec."""
    text = '{"jsonrpc":"2.0","id":7,"method":"start_trial","params":[["trial",5]]}'
    from_text = decode_frame(text, Codec.JSON)
    from_bytes = decode_frame(text.encode(), Codec.JSON)
    assert isinstance(from_text, Request) and isinstance(from_bytes, Request)
    assert (from_text.id, from_text.method) == (from_bytes.id, from_bytes.method) == (7, "start_trial")
    with pytest.raises(InvalidRequest):
        decode_frame("\xc2", Codec.MSGPACK)  # its UTF-8 bytes are a msgpack boolean, not a frame


def test_an_invalid_param_is_named_with_the_value_given() -> None:
    """§3: the message names the offending value; msgspec's own says only where (`$[6]`)."""
    spec = COORDINATOR_METHODS["finish_trial"]
    for codec in CODECS:
        raw = msgspec.Raw(encode([["trial", 1], "passed", "", "", 1, 0, "x"], codec))
        with pytest.raises(InvalidParams) as caught:
            decode_params(spec, raw, codec)
        assert "(param failed, given 'x')" in caught.value.message
        raw = msgspec.Raw(encode([["task", 1], "passed", "", "", 1, 0, 0], codec))
        with pytest.raises(InvalidParams) as caught:
            decode_params(spec, raw, codec)
        assert "(param trial_ref, given 'task')" in caught.value.message


def test_error_replies_stay_small_whatever_the_peer_sent() -> None:
    """A 4 MiB method name came back whole in its error, four times over the connection's replies."""
    for frame in (
        {"jsonrpc": "2.0", "id": 1, "method": "m" * 4_000_000},
        {"jsonrpc": "2.0", "id": [0] * 1_000_000, "method": "x"},
        {"jsonrpc": "2.0", "id": "i" * 1_000_000, "method": "active_tasksets"},
    ):
        for codec in CODECS:
            try:
                lookup(COORDINATOR_METHODS, decode_frame(encode(frame, codec), codec).method)  # type: ignore[union-attr]
            except ProtocolError as exc:
                assert len(encode_error(exc, codec)) < 1200
                assert exc.request_id in (None, 1)
            else:
                raise AssertionError(frame)
