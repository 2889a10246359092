"""Property tests: whatever arrives, the codec answers with a frame or a `ProtocolError`, never a crash."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
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
    is_batch,
)
from protocol.errors import ProtocolError
from protocol.messages import COORDINATOR_METHODS, NOTIFICATIONS, WORKER_METHODS

# Nothing under the checkout: pytest refuses to collect beside a `.hypothesis` directory (norecursedirs).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "testfleet-hypothesis"))
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SPECS = [*COORDINATOR_METHODS.values(), *WORKER_METHODS.values()]
CODECS = st.sampled_from([Codec.JSON, Codec.MSGPACK])

# Values a JSON document can hold, leaning towards what the wire uses: refs, statuses, timestamps.
_wire_words = st.sampled_from(
    ["taskset", "task", "trial", "slave", "worker_log", "passed", "failed", "2.0", "2026-11-28T05:31:55.123456Z"]
)
_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | _wire_words
)
json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | _wire_words, inner, max_size=4),
    max_leaves=10,
)
# msgpack adds binary, extension types and non-string keys.
_msgpack_scalars = (
    _json_scalars | st.binary(max_size=20) | st.builds(msgspec.msgpack.Ext, st.integers(0, 127), st.binary(max_size=8))
)
msgpack_values = st.recursive(
    _msgpack_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10) | st.integers(-5, 5) | _wire_words, inner, max_size=4)
    ),
    max_leaves=10,
)
# Things shaped like envelopes, so the checks past the first one are reached too.
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0"]) | json_values,
        "id": st.integers(-3, 3) | st.text(max_size=3) | json_values,
        "method": st.sampled_from([*COORDINATOR_METHODS, *WORKER_METHODS, *NOTIFICATIONS]) | json_values,
        "params": json_values,
        "result": json_values,
        "error": st.fixed_dictionaries(
            {"code": st.integers(-32800, -32000) | json_values, "message": st.text(max_size=10) | json_values},
            optional={"data": json_values},
        )
        | json_values,
    },
)


def _encode(value: Any, codec: Codec) -> bytes:
    return encode(value, codec)


def _check_frame(data: bytes, codec: Codec) -> None:
    try:
        frame = decode_frame(data, codec)
    except ProtocolError:
        return
    assert isinstance(frame, Request | NotificationFrame | Response)
    if isinstance(frame, Request | NotificationFrame):
        for spec in SPECS:
            with contextlib.suppress(ProtocolError):
                decode_params(spec, frame.params, codec, frame.id if isinstance(frame, Request) else None)
        with contextlib.suppress(ProtocolError):
            decode_notification(frame.method, frame.params, codec, NOTIFICATIONS)
    elif frame.error is None:
        for spec in SPECS:
            with contextlib.suppress(ProtocolError):
                decode_result(spec, frame.result, codec)


def _check_body(data: bytes, codec: Codec) -> None:
    batch = is_batch(data, codec)
    assert isinstance(batch, bool)
    try:
        items = decode_batch(data, codec)
    except ProtocolError:
        items = []
    for item in items:
        _check_frame(bytes(item), codec)
    _check_frame(data, codec)


def _check_params(data: bytes, codec: Codec) -> None:
    for spec in SPECS:
        with contextlib.suppress(ProtocolError):
            decode_params(spec, msgspec.Raw(data), codec)
        with contextlib.suppress(ProtocolError):
            decode_result(spec, msgspec.Raw(data), codec)
    for name in NOTIFICATIONS:
        with contextlib.suppress(ProtocolError):
            decode_notification(name, msgspec.Raw(data), codec, NOTIFICATIONS)


@FUZZ
@given(data=st.binary(max_size=200), codec=CODECS)
def test_arbitrary_bytes(data: bytes, codec: Codec) -> None:
    _check_body(data, codec)
    _check_params(data, codec)


@FUZZ
@given(value=json_values)
def test_arbitrary_json_values(value: Any) -> None:
    data = _encode(value, Codec.JSON)
    _check_body(data, Codec.JSON)
    _check_params(data, Codec.JSON)


@FUZZ
@given(value=msgpack_values)
def test_arbitrary_msgpack_values(value: Any) -> None:
    data = _encode(value, Codec.MSGPACK)
    _check_body(data, Codec.MSGPACK)
    _check_params(data, Codec.MSGPACK)


@FUZZ
@given(envelope=envelopes, codec=CODECS)
def test_envelope_shaped_values(envelope: dict[str, Any], codec: Codec) -> None:
    _check_body(_encode(envelope, codec), codec)
    _check_body(_encode([envelope, envelope], codec), codec)


@FUZZ
@given(params=st.lists(json_values, max_size=9), codec=CODECS)
def test_positional_params_for_every_method(params: list[Any], codec: Codec) -> None:
    _check_params(_encode(params, codec), codec)
