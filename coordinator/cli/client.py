"""The client's HTTP side of the coordinator: JSON-RPC over `POST /rpc`, the read API and the bundle endpoints.

Calls the protocol marks as safe to repeat are retried while the coordinator is unreachable (a
restart, a network blip) up to `retry_for_s`; a call that is not (`create_taskset`) fails at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import aiohttp
import msgspec

from coordinator.cli.errors import CliError
from protocol.codec import CONTENT_TYPES, Codec, Response, decode_frame, decode_result, encode_request, lookup
from protocol.errors import ProtocolError
from protocol.messages import COORDINATOR_METHODS

RETRY_STATUSES: Final = frozenset({502, 503, 504})
_TRANSIENT: Final = (aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError, TimeoutError)


class CoordinatorUnavailable(CliError):
    """The coordinator could not be reached, or kept failing, for longer than the client waits."""


class ApiError(CliError):
    """The read API or a bundle endpoint answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def normalize_url(url: str) -> str:
    """An `http(s)://host[:port][/prefix]` base without a trailing slash; `ws(s)://` and `/ws` are accepted."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"the coordinator URL must look like http://host:port, not {url!r}")
    path = parts.path.rstrip("/").removesuffix("/ws")
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


class Client:
    """One coordinator over HTTP; use as an async context manager."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        retry_for_s: float = 60.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.token = token
        self.retry_for_s = retry_for_s
        self.warn = warn
        """Told once when the coordinator stops answering (the client then retries), and once when it is back."""
        self._unreachable = False
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as an async context manager")
        return self._session

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def _retrying(self, what: str, attempt: Any, *, retry: bool = True) -> Any:
        """Run `attempt()` until it returns, retrying transient failures for up to `retry_for_s`."""
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            try:
                result = await attempt()
            except _TRANSIENT as exc:
                error = f"{what}: {type(exc).__name__}: {exc}"
            except ApiError as exc:
                if exc.status not in RETRY_STATUSES:
                    raise
                error = f"{what}: {exc}"
            else:
                if self._unreachable and self.warn is not None:
                    self.warn(f"the coordinator at {self.url} answers again")
                self._unreachable = False
                return result
            if not retry or time.monotonic() + delay > deadline:
                raise CoordinatorUnavailable(f"{self.url} unreachable ({error})")
            if not self._unreachable and self.warn is not None:
                left = max(0.0, deadline - time.monotonic())
                self.warn(f"cannot reach the coordinator at {self.url} ({error}); trying again for up to {left:.0f} s")
            self._unreachable = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def call(self, method: str, *args: Any) -> Any:
        """A coordinator method over `POST /rpc`; its typed result, or its `ProtocolError`."""
        spec = lookup(COORDINATOR_METHODS, method)
        request_id = next(self._ids)
        body = encode_request(request_id, method, spec.params(*args), Codec.JSON)

        async def attempt() -> Any:
            headers = self.headers({"Content-Type": CONTENT_TYPES[Codec.JSON]})
            async with self.session.post(f"{self.url}/rpc", data=body, headers=headers) as response:
                data = await response.read()
                if response.status in RETRY_STATUSES:
                    raise ApiError(response.status, data.decode(errors="replace")[:200])
                if response.status == 401:
                    raise ApiError(401, "the coordinator refused the token")
            try:
                frame = decode_frame(data, Codec.JSON)
            except ProtocolError as exc:
                raise ApiError(response.status, f"not a JSON-RPC reply: {exc.message}") from exc
            if not isinstance(frame, Response):
                raise ApiError(response.status, "not a JSON-RPC reply")
            if frame.error is not None:
                raise frame.error
            return decode_result(spec, frame.result, Codec.JSON)

        return await self._retrying(method, attempt, retry=spec.resend)

    async def get_json(self, path: str) -> Any:
        """`GET` a read API path (`/api/v1/...`) and decode its JSON."""

        async def attempt() -> Any:
            async with self.session.get(f"{self.url}{path}", headers=self.headers()) as response:
                data = await response.read()
                if response.status != 200:
                    raise ApiError(response.status, _error_text(data))
            return msgspec.json.decode(data)

        return await self._retrying(f"GET {path}", attempt)

    def bundle_url(self, rsync_name: str) -> str:
        return f"{self.url}/api/v1/bundles/{urllib.parse.quote(rsync_name, safe='')}"

    async def bundle_sha256(self, rsync_name: str) -> str | None:
        """The sha256 of the coordinator's bundle for `rsync_name` (its ETag), `None` when it has none."""

        async def attempt() -> str | None:
            async with self.session.head(self.bundle_url(rsync_name), headers=self.headers()) as response:
                if response.status == 404:
                    return None
                if response.status != 200:
                    raise ApiError(response.status, f"HEAD {self.bundle_url(rsync_name)}")
                return response.headers.get("ETag", "").removeprefix("W/").strip('"') or None

        result: str | None = await self._retrying("HEAD bundle", attempt)
        return result

    async def put_bundle(self, rsync_name: str, archive: Path) -> str:
        """Upload a tar.gz as the bundle of `rsync_name`; the sha256 the coordinator computed."""

        async def attempt() -> str:
            headers = self.headers({"Content-Type": "application/gzip"})
            with archive.open("rb") as body:
                async with self.session.put(self.bundle_url(rsync_name), data=body, headers=headers) as response:
                    data = await response.read()
                    if response.status != 200:
                        raise ApiError(response.status, _error_text(data))
            reply = msgspec.json.decode(data)
            return str(reply["sha256"])

        result: str = await self._retrying("PUT bundle", attempt)
        return result


def _error_text(data: bytes) -> str:
    try:
        body = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")[:200]
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return data.decode(errors="replace")[:200]
