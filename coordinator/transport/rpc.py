"""JSON-RPC over /ws and POST /rpc: decoding, roles, dispatch to the runtime, and error mapping."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec
import structlog
from aiohttp import web

from coordinator.core import errors as core_errors
from coordinator.core.taskset import Wait
from coordinator.runtime.coordinator import Coordinator, Handler, Submission
from coordinator.runtime.hub import Connection
from coordinator.transport import keys
from protocol import codec as wire
from protocol import errors as perr
from protocol.messages import COORDINATOR_METHODS, Role

log = structlog.get_logger("testfleet.rpc")

T = TypeVar("T")


@dataclass(frozen=True)
class Tokens:
    """Role tokens; a role without a token is open to everyone, with what its token would grant (the client
    and worker roles grant the viewer's methods too, so while either is open, so is viewing)."""

    viewer: str | None = None
    client: str | None = None
    worker: str | None = None

    def roles_for(self, presented: str | None) -> frozenset[Role]:
        roles: set[Role] = set()
        # Bytes that are not UTF-8 (in a header, or in a token set from the environment) come as lone surrogates:
        # both sides are encoded keeping them, so such a token matches only itself and nothing raises.
        given = None if presented is None else presented.encode(errors="surrogatepass")
        for token, grants in (
            (self.viewer, {Role.VIEWER}),
            (self.client, {Role.CLIENT, Role.VIEWER}),
            (self.worker, {Role.WORKER, Role.VIEWER}),
        ):
            if token is None or (
                given is not None and hmac.compare_digest(token.encode(errors="surrogatepass"), given)
            ):
                roles |= grants
        return frozenset(roles)


def presented_token(request: web.Request) -> str | None:
    """`Authorization: Bearer TOKEN` (the scheme's name in any case, as HTTP has it), else `?token=TOKEN`."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.query.get("token")


def to_protocol_error(exc: BaseException, request_id: wire.RequestId = None) -> perr.ProtocolError:
    """The JSON-RPC error a domain or protocol exception becomes."""
    if isinstance(exc, perr.ProtocolError):
        if exc.request_id is None:
            exc.request_id = request_id
        return exc
    if isinstance(exc, core_errors.NotFound):
        return perr.NotFound(exc.message, request_id=request_id)
    if isinstance(exc, core_errors.Conflict):
        return perr.Conflict(exc.message, request_id=request_id)
    if isinstance(exc, core_errors.InvalidArgument):
        return perr.InvalidParams(exc.message, request_id=request_id)
    if isinstance(exc, core_errors.Unavailable):
        correlation = uuid.uuid4().hex[:12]
        log.error("rpc_unavailable", correlation_id=correlation, error=exc.message)
        return perr.InternalError(
            f"the store is unavailable, try again (correlation id {correlation})", request_id=request_id
        )
    correlation = uuid.uuid4().hex[:12]
    log.error("rpc_internal_error", correlation_id=correlation, error=repr(exc), exc_info=exc)
    return perr.InternalError(f"internal error (correlation id {correlation})", request_id=request_id)


class Dispatcher:
    """Turns one decoded request into a reply frame."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.metrics = coordinator.metrics
        self._latency = {name: self.metrics.rpc_latency.labels(name) for name in COORDINATOR_METHODS}
        # Methods that can often be answered without waiting: their handler's synchronous form.
        self._immediate: dict[str, Callable[[Connection | None, Any], Any]] = {
            "dequeue_task": coordinator.dequeue_task_now,
        }
        # Methods whose command can often go to its owner straight from the read loop, answered by callback.
        self._submitters: dict[str, Callable[[Connection | None, Any], Submission | None]] = {
            "create_trial": coordinator.create_trial_now,
            "start_trial": coordinator.start_trial_now,
            "finish_trial": coordinator.finish_trial_now,
        }

    def _without_wait(
        self,
        forms: Mapping[str, Callable[[Connection | None, Any], T]],
        request: wire.Request | wire.NotificationFrame,
        codec: wire.Codec,
        roles: frozenset[Role],
        conn: Connection,
    ) -> tuple[wire.Request, T, float] | None:
        """The request (a call, not a notification), what its method's synchronous form in `forms` makes
        of it, and when it started.

        `None` when the method has no such form here, the frame is a notification, or resolving or the
        form raised: then `handle` takes the call, errors included.
        """
        form = forms.get(request.method)
        if form is None or not isinstance(request, wire.Request):
            return None
        started = time.perf_counter()
        try:
            _, params = self._resolve(request, request.id, codec, roles, conn)
            return request, form(conn, params), started
        except Exception:
            return None

    def answer_now(
        self,
        request: wire.Request | wire.NotificationFrame,
        codec: wire.Codec,
        roles: frozenset[Role],
        conn: Connection,
    ) -> bytes | None:
        """The reply to a call that needs no wait, or `None`: then `handle` answers it, errors included."""
        outcome = self._without_wait(self._immediate, request, codec, roles, conn)
        if outcome is None or isinstance(outcome[1], Wait):
            return None
        call, result, started = outcome
        self._latency[call.method].observe(time.perf_counter() - started)
        return wire.encode_result(call.id, result, codec)

    def submit_now(
        self,
        request: wire.Request | wire.NotificationFrame,
        codec: wire.Codec,
        roles: frozenset[Role],
        conn: Connection,
        write: Callable[[bytes], None],
    ) -> bool:
        """Hand a call's command to its owner without a task; `write` gets the reply once it is committed.

        `False` when the call takes the full path instead (`handle`, errors included): an unknown method
        here, bad params, a taskset not loaded, or anything its handler would have to wait for or refuse.
        """
        outcome = self._without_wait(self._submitters, request, codec, roles, conn)
        if outcome is None:
            return False
        call, submission, started = outcome
        if submission is None:
            return False
        owner, command, needs = submission
        request_id = call.id
        latency = self._latency[call.method]

        def settle(result: Any, error: BaseException | None) -> None:
            latency.observe(time.perf_counter() - started)
            if error is None:
                write(wire.encode_result(request_id, result, codec))
                return
            failure = to_protocol_error(error, request_id)
            self.metrics.rpc_errors.labels(str(int(failure.code))).inc()
            write(wire.encode_error(failure, codec, request_id))

        try:
            owner.submit(command, settle, needs)
        except core_errors.Unavailable:
            return False
        return True

    async def handle(
        self,
        request: wire.Request | wire.NotificationFrame,
        codec: wire.Codec,
        roles: frozenset[Role],
        conn: Connection | None,
    ) -> bytes | None:
        """The encoded reply, or `None` for a notification."""
        request_id = request.id if isinstance(request, wire.Request) else None
        started = time.perf_counter()
        try:
            handler, params = self._resolve(request, request_id, codec, roles, conn)
            result = await handler(conn, params)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            error = to_protocol_error(exc, request_id)
            self.metrics.rpc_errors.labels(str(int(error.code))).inc()
            if isinstance(request, wire.NotificationFrame):
                return None
            return wire.encode_error(error, codec, request_id)
        finally:
            latency = self._latency.get(request.method)
            if latency is not None:
                latency.observe(time.perf_counter() - started)
        if isinstance(request, wire.NotificationFrame):
            return None
        return wire.encode_result(request_id, result, codec)

    def _resolve(
        self,
        request: wire.Request | wire.NotificationFrame,
        request_id: wire.RequestId,
        codec: wire.Codec,
        roles: frozenset[Role],
        conn: Connection | None,
    ) -> tuple[Handler, Any]:
        """The handler and typed params of a request the caller may make; its JSON-RPC error otherwise."""
        spec = wire.lookup(COORDINATOR_METHODS, request.method, request_id)
        if not (spec.roles & roles):
            raise perr.Unauthorized(f"{spec.name} needs the {' or '.join(sorted(spec.roles))} token")
        if spec.ws_only and conn is None:
            raise perr.WrongTransport(f"{spec.name} needs a /ws connection")
        params = wire.decode_params(spec, request.params, codec, request_id)
        return self.coordinator.handlers[spec.name], params


async def body_bytes(request: web.Request, most: int, timeout_s: float) -> bytes:
    """Up to `most` bytes of the request's body, as soon as some have come (`b""` at its end); `TimeoutError`
    when none come for `timeout_s`. A body may take as long as it needs, but its bytes must not stop coming."""
    return await asyncio.wait_for(request.content.read(most), timeout_s)


async def too_slow(request: web.Request, message: str) -> web.StreamResponse:
    """408 for a request whose bytes stopped coming, and the connection closed once it is written (rather than
    kept open a while to read the rest, which is not coming)."""
    response = web.json_response({"error": message}, status=408)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def codec_of_content_type(content_type: str) -> wire.Codec | None:
    """msgpack for its media types, JSON for JSON and for the types plain HTTP tools send by default."""
    base = content_type.split(";", maxsplit=1)[0].strip().lower()
    if base in ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack"):
        return wire.Codec.MSGPACK
    if base in ("application/json", "", "text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        return wire.Codec.JSON
    return None


async def rpc_view(request: web.Request) -> web.StreamResponse:
    """POST /rpc: one request or a batch, answered in the body's codec."""
    dispatcher: Dispatcher = request.app[keys.DISPATCHER]
    tokens: Tokens = request.app[keys.TOKENS]
    codec = codec_of_content_type(request.content_type)
    if codec is None:
        return web.json_response({"error": f"unsupported content type {request.content_type!r}"}, status=415)
    limit = wire.MAX_FRAME_BYTES
    if request.content_length is not None and request.content_length > limit:
        return web.json_response({"error": f"the body exceeds {limit} bytes"}, status=413)
    received = bytearray()
    timeout_s = dispatcher.coordinator.settings.request_timeout_s
    try:
        # Read on to the end (or just past the limit).
        while len(received) <= limit:
            chunk = await body_bytes(request, limit + 1 - len(received), timeout_s)
            if not chunk:
                break
            received += chunk
    except (web.RequestPayloadError, aiohttp.ClientPayloadError):
        # Its framing or content encoding is broken (a body said to be gzip that is not, say).
        return web.json_response({"error": "the body could not be read"}, status=400)
    except TimeoutError:
        return await too_slow(request, f"the body's bytes stopped coming for {timeout_s:g} s")
    body = bytes(received)
    if len(body) > limit:
        return web.json_response({"error": f"the body exceeds {limit} bytes"}, status=413)
    roles = tokens.roles_for(presented_token(request))
    content_type = wire.CONTENT_TYPES[codec]

    async def one(data: bytes | msgspec.Raw) -> bytes | None:
        try:
            frame = wire.decode_frame(data, codec)
        except perr.ProtocolError as exc:
            return wire.encode_error(exc, codec)
        if isinstance(frame, wire.Response):
            return wire.encode_error(perr.InvalidRequest("a response is not a request", request_id=frame.id), codec)
        return await dispatcher.handle(frame, codec, roles, None)

    try:
        batch = wire.decode_batch(body, codec) if wire.is_batch(body, codec) else None
    except perr.ProtocolError as exc:
        return web.Response(body=wire.encode_error(exc, codec), content_type=content_type)
    if batch is None:
        reply = await one(body)
        if reply is None:
            return web.Response(status=204)
        return web.Response(body=reply, content_type=content_type)
    replies = [r for r in [await one(item) for item in batch] if r is not None]
    if not replies:
        return web.Response(status=204)
    if codec is wire.Codec.JSON:
        payload = b"[" + b",".join(replies) + b"]"
    else:
        payload = wire.encode([msgspec.Raw(r) for r in replies], codec)
    return web.Response(body=payload, content_type=content_type)
