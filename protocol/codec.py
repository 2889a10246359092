"""The JSON-RPC 2.0 envelope and its JSON and msgpack codecs, built once."""

from __future__ import annotations

import enum
import functools
import re
from typing import Any, Final

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType

from protocol.errors import (
    InvalidParams,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    ProtocolError,
    error_from_code,
)
from protocol.messages import NOTIFICATION_NAMES, MethodSpec, Notification, Params

MAX_FRAME_BYTES: Final = 8 * 1024 * 1024
"""The largest frame (or /rpc body) either side takes; one byte more closes the WebSocket with 1009."""
WS_MAX_MSG_SIZE: Final = MAX_FRAME_BYTES + 1
"""aiohttp's `max_msg_size`, which refuses a message of exactly its value: a frame of `MAX_FRAME_BYTES` passes."""
MAX_BATCH: Final = 1000

RequestId = int | str | None


class Codec(enum.StrEnum):
    JSON = "json"
    MSGPACK = "msgpack"


SUBPROTOCOLS: Final[dict[str, Codec]] = {
    "testfleet.v1.json": Codec.JSON,
    "testfleet.v1.msgpack": Codec.MSGPACK,
}
SUBPROTOCOL_OF: Final[dict[Codec, str]] = {codec: name for name, codec in SUBPROTOCOLS.items()}
CONTENT_TYPES: Final[dict[Codec, str]] = {Codec.JSON: "application/json", Codec.MSGPACK: "application/msgpack"}


class ErrorObject(Struct, frozen=True, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class _Envelope(Struct, frozen=True):
    jsonrpc: Any = UNSET
    id: Any = UNSET
    method: Any = UNSET
    params: Raw | UnsetType = UNSET
    result: Raw | UnsetType = UNSET
    error: Raw | UnsetType = UNSET


class Request(Struct, frozen=True):
    """A decoded request whose params are still raw."""

    id: RequestId
    method: str
    params: Raw | None


class NotificationFrame(Struct, frozen=True):
    """A decoded notification whose params are still raw."""

    method: str
    params: Raw | None


class Response(Struct, frozen=True):
    """A decoded reply: a raw result, or an error."""

    id: RequestId
    result: Raw | None = None
    error: ProtocolError | None = None


Frame = Request | NotificationFrame | Response


class _RequestOut(Struct, frozen=True):
    jsonrpc: str
    id: RequestId
    method: str
    params: Any


class _NotificationOut(Struct, frozen=True):
    jsonrpc: str
    method: str
    params: Any


class _ResultOut(Struct, frozen=True):
    jsonrpc: str
    id: RequestId
    result: Any


class _ErrorOut(Struct, frozen=True):
    jsonrpc: str
    id: RequestId
    error: ErrorObject


_JSON_ENCODER: Final = msgspec.json.Encoder()
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_ENVELOPE_DECODERS: Final[dict[Codec, msgspec.json.Decoder[_Envelope] | msgspec.msgpack.Decoder[_Envelope]]] = {
    Codec.JSON: msgspec.json.Decoder(_Envelope),
    Codec.MSGPACK: msgspec.msgpack.Decoder(_Envelope),
}
_BATCH_DECODERS: Final[dict[Codec, msgspec.json.Decoder[list[Raw]] | msgspec.msgpack.Decoder[list[Raw]]]] = {
    Codec.JSON: msgspec.json.Decoder(list[Raw]),
    Codec.MSGPACK: msgspec.msgpack.Decoder(list[Raw]),
}
_ERROR_DECODERS: Final[dict[Codec, msgspec.json.Decoder[ErrorObject] | msgspec.msgpack.Decoder[ErrorObject]]] = {
    Codec.JSON: msgspec.json.Decoder(ErrorObject),
    Codec.MSGPACK: msgspec.msgpack.Decoder(ErrorObject),
}
# msgspec raises these itself, past its nesting limit and on invalid UTF-8 in a msgpack string.
_UNREADABLE: Final = (RecursionError, UnicodeDecodeError)
_EMPTY_PARAMS: Final = {Codec.JSON: Raw(b"[]"), Codec.MSGPACK: Raw(b"\x90")}


def encode(value: Any, codec: Codec) -> bytes:
    """Any wire value in the chosen codec."""
    if codec is Codec.JSON:
        return _JSON_ENCODER.encode(value)
    return _MSGPACK_ENCODER.encode(value)


def encode_request(request_id: RequestId, method: str, params: Params, codec: Codec) -> bytes:
    return encode(_RequestOut("2.0", request_id, method, params), codec)


def encode_notification(notification: Notification, codec: Codec) -> bytes:
    return encode(_NotificationOut("2.0", NOTIFICATION_NAMES[type(notification)], notification), codec)


def encode_raw_notification(method: str, params: Params, codec: Codec) -> bytes:
    return encode(_NotificationOut("2.0", method, params), codec)


def encode_result(request_id: RequestId, result: Any, codec: Codec) -> bytes:
    return encode(_ResultOut("2.0", request_id, result), codec)


MAX_ERROR_MESSAGE: Final = 1000
MAX_ID_CHARS: Final = 256


def shown(value: Any, limit: int = 80) -> str:
    """A value as an error message names it: its repr, cut to `limit` characters (a peer's value may be
    megabytes long, and every error reply would carry it back); a type JSON has no name for, by its type."""
    if isinstance(value, str):
        text = repr(value[:limit])
    elif isinstance(value, (list, dict)):
        text = repr(value) if len(value) < limit else f"a {type(value).__name__} of {len(value)} items"
    elif isinstance(value, (int, float, bool, type(None))):
        text = repr(value)
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_error(error: ProtocolError, codec: Codec, request_id: RequestId = None) -> bytes:
    rid = error.request_id if request_id is None else request_id
    message = error.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    return encode(_ErrorOut("2.0", rid, ErrorObject(int(error.code), message, error.data)), codec)


def _is_id(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _load(data: bytes | str, codec: Codec) -> _Envelope:
    decoder = _ENVELOPE_DECODERS[codec]
    try:
        if isinstance(decoder, msgspec.json.Decoder):
            return decoder.decode(data)
        return decoder.decode(data.encode() if isinstance(data, str) else data)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"not a JSON-RPC 2.0 object: {exc}") from exc
    except (msgspec.DecodeError, *_UNREADABLE) as exc:
        raise ParseError(f"not valid {codec.value}: {exc}") from exc


def is_batch(data: bytes, codec: Codec) -> bool:
    """Whether the body is an array (a batch) rather than one object."""
    stripped = data.lstrip(b" \t\r\n") if codec is Codec.JSON else data
    if not stripped:
        return False
    first = stripped[0]
    if codec is Codec.JSON:
        return first == ord("[")
    return 0x90 <= first <= 0x9F or first in (0xDC, 0xDD)


def decode_batch(data: bytes, codec: Codec) -> list[Raw]:
    """Split a batch body into its raw members."""
    try:
        items = _BATCH_DECODERS[codec].decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"not a JSON-RPC 2.0 batch: {exc}") from exc
    except (msgspec.DecodeError, *_UNREADABLE) as exc:
        raise ParseError(f"not valid {codec.value}: {exc}") from exc
    if not items:
        raise InvalidRequest("an empty batch is not a request")
    if len(items) > MAX_BATCH:
        raise InvalidRequest(f"a batch holds at most {MAX_BATCH} requests, not {len(items)}")
    return items


def decode_frame(data: bytes | str | Raw, codec: Codec) -> Frame:
    """One frame: a request, a notification or a response; anything else raises `ProtocolError`."""
    env = _load(bytes(data) if isinstance(data, Raw) else data, codec)
    rid: RequestId = None
    if env.id is not UNSET:
        if not _is_id(env.id):
            raise InvalidRequest(f"id must be an integer, a string or null, not {shown(env.id)}")
        if isinstance(env.id, str) and len(env.id) > MAX_ID_CHARS:
            # Every reply carries its id back: a long one would be held once per reply.
            raise InvalidRequest(f"an id of {len(env.id)} characters: at most {MAX_ID_CHARS}")
        rid = env.id
    if env.jsonrpc != "2.0":
        # A frame without a method is a response: its id is the receiver's own, and is not echoed.
        raise InvalidRequest('"jsonrpc" must be "2.0"', request_id=rid if env.method is not UNSET else None)
    if env.method is not UNSET:
        if not isinstance(env.method, str):
            raise InvalidRequest('"method" must be a string', request_id=rid)
        if env.result is not UNSET or env.error is not UNSET:
            raise InvalidRequest("a request carries no result or error", request_id=rid)
        params = None if env.params is UNSET else env.params
        if env.id is UNSET:
            return NotificationFrame(env.method, params)
        return Request(rid, env.method, params)
    if env.id is UNSET:
        raise InvalidRequest("a frame needs a method or an id")
    # A malformed response is answered with id null: its id is one of ours, and an error carrying it would
    # read to the peer as the answer to its own request of that id.
    if (env.result is UNSET) == (env.error is UNSET):
        raise InvalidRequest(f"a response (id {shown(rid)}) carries exactly one of result and error")
    if not isinstance(env.error, UnsetType):
        try:
            obj = _ERROR_DECODERS[codec].decode(env.error)
        except (msgspec.MsgspecError, *_UNREADABLE) as exc:
            raise InvalidRequest(f"malformed error object in the response of id {shown(rid)}: {exc}") from exc
        return Response(rid, error=error_from_code(obj.code, obj.message, obj.data, rid))
    assert not isinstance(env.result, UnsetType)
    return Response(rid, result=env.result)


@functools.cache
def _decoder(kind: Any, codec: Codec) -> msgspec.json.Decoder[Any] | msgspec.msgpack.Decoder[Any]:
    if codec is Codec.JSON:
        return msgspec.json.Decoder(kind)
    return msgspec.msgpack.Decoder(kind)


def decode_params(spec: MethodSpec, raw: Raw | None, codec: Codec, request_id: RequestId = None) -> Params:
    """Typed params for a method; `InvalidParams` on a wrong count, type or range."""
    try:
        params = _decoder(spec.params, codec).decode(_EMPTY_PARAMS[codec] if raw is None else raw)
    except UnicodeDecodeError as exc:
        if codec is not Codec.JSON or raw is None:
            # A msgpack str is UTF-8 by msgpack's own rule: there is no text to read with replacements.
            raise InvalidParams(f"invalid params for {spec.name}: {exc}", request_id=request_id) from exc
        # JSON bytes that are not UTF-8 (possible over /rpc; a WebSocket text frame is UTF-8 by rule): read
        # with the invalid bytes replaced, as §2 says of output, and then checked like any params.
        return decode_params(spec, Raw(bytes(raw).decode("utf-8", "replace").encode()), codec, request_id)
    except (msgspec.MsgspecError, RecursionError) as exc:
        where = _offending(spec, raw, codec, str(exc))
        raise InvalidParams(f"invalid params for {spec.name}: {exc}{where}", request_id=request_id) from exc
    assert isinstance(params, Params)
    return params


_AT: Final = re.compile(r"at `\$((?:\[\d+\])+)`")


def _offending(spec: MethodSpec, raw: Raw | None, codec: Codec, message: str) -> str:
    """` (param NAME, given VALUE)` for a message that points at a place in the params (§3: name the value)."""
    found = _AT.search(message)
    if found is None or raw is None:
        return ""
    path = [int(index) for index in re.findall(r"\d+", found.group(1))]
    names = getattr(spec.params, "__struct_fields__", ())
    name = names[path[0]] if path[0] < len(names) else None
    try:
        value: Any = (msgspec.json if codec is Codec.JSON else msgspec.msgpack).decode(raw)
        for index in path:
            value = value[index]
    except Exception:
        return f" (param {name})" if name else ""
    given = shown(value)
    return f" (param {name}, given {given})" if name else f" (given {given})"


def decode_notification(method: str, raw: Raw | None, codec: Codec, table: dict[str, type[Params]]) -> Params:
    """Typed params of a notification named in `table`."""
    kind = table.get(method)
    if kind is None:
        raise MethodNotFound(f"no notification {shown(method)}")
    try:
        params = _decoder(kind, codec).decode(_EMPTY_PARAMS[codec] if raw is None else raw)
    except (msgspec.MsgspecError, *_UNREADABLE) as exc:
        raise InvalidParams(f"invalid params for {method}: {exc}") from exc
    assert isinstance(params, Params)
    return params


def decode_result(spec: MethodSpec, raw: Raw | None, codec: Codec) -> Any:
    """A method's typed result; a result of the wrong shape is `InvalidParams` from the peer."""
    try:
        return _decoder(spec.result, codec).decode(raw if raw is not None else encode(None, codec))
    except (msgspec.MsgspecError, *_UNREADABLE) as exc:
        raise InvalidParams(f"unexpected result for {spec.name}: {exc}") from exc


def lookup(table: dict[str, MethodSpec], method: str, request_id: RequestId = None) -> MethodSpec:
    """The spec of a method, or `MethodNotFound`."""
    spec = table.get(method)
    if spec is None:
        raise MethodNotFound(f"no method {shown(method)}", request_id=request_id)
    return spec


__all__ = [
    "CONTENT_TYPES",
    "MAX_FRAME_BYTES",
    "SUBPROTOCOLS",
    "SUBPROTOCOL_OF",
    "WS_MAX_MSG_SIZE",
    "Codec",
    "Frame",
    "NotificationFrame",
    "ProtocolError",
    "Request",
    "Response",
    "decode_batch",
    "decode_frame",
    "decode_notification",
    "decode_params",
    "decode_result",
    "encode",
    "encode_error",
    "encode_notification",
    "encode_request",
    "encode_result",
    "is_batch",
    "lookup",
]
