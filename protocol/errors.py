"""JSON-RPC error codes (PROTOCOL.md §3) and the one exception that carries them."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.IntEnum):
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    UNAUTHORIZED = -32001
    NOT_FOUND = -32004
    CONFLICT = -32009
    WRONG_TRANSPORT = -32010


class ProtocolError(Exception):
    """A JSON-RPC error: what went wrong, its code, and the request id when one could be read."""

    code: ErrorCode | int = ErrorCode.INTERNAL_ERROR

    def __init__(
        self,
        message: str | None = None,
        *,
        code: ErrorCode | int | None = None,
        data: Any = None,
        request_id: int | str | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.message = message or (self.__doc__ or "error").strip().splitlines()[0]
        self.data = data
        self.request_id = request_id
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({int(self.code)}, {self.message!r})"


class ParseError(ProtocolError):
    """The frame is not valid JSON or msgpack."""

    code = ErrorCode.PARSE_ERROR


class InvalidRequest(ProtocolError):
    """The frame is not a JSON-RPC 2.0 request object."""

    code = ErrorCode.INVALID_REQUEST


class MethodNotFound(ProtocolError):
    """No such method."""

    code = ErrorCode.METHOD_NOT_FOUND


class InvalidParams(ProtocolError):
    """The params do not fit the method."""

    code = ErrorCode.INVALID_PARAMS


class InternalError(ProtocolError):
    """Internal error."""

    code = ErrorCode.INTERNAL_ERROR


class Unauthorized(ProtocolError):
    """No or wrong token for this method's role."""

    code = ErrorCode.UNAUTHORIZED


class NotFound(ProtocolError):
    """The referenced record does not exist."""

    code = ErrorCode.NOT_FOUND


class Conflict(ProtocolError):
    """The state forbids it."""

    code = ErrorCode.CONFLICT


class WrongTransport(ProtocolError):
    """This method needs a /ws connection."""

    code = ErrorCode.WRONG_TRANSPORT


_BY_CODE: dict[int, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        InvalidParams,
        InternalError,
        Unauthorized,
        NotFound,
        Conflict,
        WrongTransport,
    )
}


def error_from_code(code: int, message: str, data: Any = None, request_id: int | str | None = None) -> ProtocolError:
    """The exception subclass for a code read off the wire."""
    cls = _BY_CODE.get(code, ProtocolError)
    return cls(message, code=code, data=data, request_id=request_id)
