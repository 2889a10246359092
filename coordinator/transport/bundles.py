"""PUT/GET /api/v1/bundles/{rsync_name}: the built-in code sync, one content-addressed tar.gz per rsync_name."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Final

import structlog
from aiohttp import web

from coordinator.transport import keys
from coordinator.transport.rpc import Tokens, body_bytes, presented_token, too_slow
from protocol.messages import Role, rsync_name_stem

log = structlog.get_logger("testfleet.bundles")

RSYNC_NAME: Final = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._@+-]{0,254}\Z")
MAX_BUNDLE_BYTES: Final = 2 * 1024**3
CHUNK: Final = 256 * 1024


class Bundles:
    """Where bundles live on the coordinator's disk.

    Each upload is kept under its sha256 (`{stem}.d/{sha}.tar.gz`), and `{stem}.sha256` names the current
    one: a reader takes the name, then opens that file, so bytes and ETag always agree, and publishing is
    one atomic rename of the name, made only once the upload is on disk. Publishes of one rsync_name take
    turns; older uploads are removed after (a reader that has one open still reads it to its end).
    """

    def __init__(self, directory: Path, max_bytes: int = MAX_BUNDLE_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._locks: dict[str, threading.Lock] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def _kept(self, rsync_name: str) -> Path:
        return self.directory / f"{rsync_name_stem(rsync_name)}.d"

    def _marker(self, rsync_name: str) -> Path:
        return self.directory / f"{rsync_name_stem(rsync_name)}.sha256"

    def path(self, rsync_name: str, sha: str) -> Path:
        """The file of one upload (or, for an upload kept before uploads were kept by sha, the old file)."""
        kept = self._kept(rsync_name) / f"{sha}.tar.gz"
        legacy = self.directory / f"{rsync_name_stem(rsync_name)}.tar.gz"
        return legacy if not kept.exists() and legacy.exists() else kept

    def lock(self, rsync_name: str) -> threading.Lock:
        """The lock its publishes take (made on the event loop's thread, so there is one a name)."""
        return self._locks.setdefault(rsync_name_stem(rsync_name), threading.Lock())

    def publish(self, rsync_name: str, upload: Path, sha: str, lock: threading.Lock) -> None:
        """(In a thread.) Make an upload, already on disk, the bundle of `rsync_name`: kept under its sha,
        then named current, then the older ones removed."""
        stem = rsync_name_stem(rsync_name)
        with lock:
            kept = self._kept(rsync_name)
            kept.mkdir(exist_ok=True)
            os.replace(upload, kept / f"{sha}.tar.gz")
            _sync_directory(kept)
            fd, marker_tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{stem}.", suffix=".part")
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(sha)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(marker_tmp, self._marker(rsync_name))
            finally:
                _remove(Path(marker_tmp))
            _sync_directory(self.directory)
            for old in kept.iterdir():
                if old.name != f"{sha}.tar.gz":
                    _remove(old)
            _remove(self.directory / f"{stem}.tar.gz")

    def sha256(self, rsync_name: str) -> str | None:
        try:
            return self._marker(rsync_name).read_text().strip() or None
        except FileNotFoundError:
            return None

    def open(self, rsync_name: str) -> tuple[str, BinaryIO] | None:
        """The current upload's sha and its file, open; `None` when there is none.

        A publish (in its thread) between reading the name and opening the file may have removed that file:
        the name is read again.
        """
        for _ in range(3):
            sha = self.sha256(rsync_name)
            if sha is None:
                return None
            try:
                return sha, self.path(rsync_name, sha).open("rb")
            except FileNotFoundError:
                continue
        return None


def _sync_directory(directory: Path) -> None:
    """Make the names in `directory` durable (a rename is not, until its directory is synced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_to_disk(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _name(request: web.Request) -> str | None:
    name = request.match_info["rsync_name"]
    return name if RSYNC_NAME.match(name) and name not in (".", "..") else None


def _allowed(request: web.Request, roles: set[Role]) -> bool:
    tokens: Tokens = request.app[keys.TOKENS]
    return bool(tokens.roles_for(presented_token(request)) & roles)


async def put_bundle(request: web.Request) -> web.StreamResponse:
    """Store the uploaded tar.gz; the reply names its sha256."""
    if not _allowed(request, {Role.CLIENT}):
        return web.json_response({"error": "uploading a bundle needs the client token"}, status=401)
    name = _name(request)
    if name is None:
        return web.json_response({"error": "rsync_name must be a safe single path component"}, status=400)
    bundles: Bundles = request.app[keys.BUNDLES]
    if request.content_length is not None and request.content_length > bundles.max_bytes:
        return web.json_response({"error": f"a bundle may have at most {bundles.max_bytes} bytes"}, status=413)
    digest = hashlib.sha256()
    size = 0
    fd, tmp_name = tempfile.mkstemp(dir=bundles.directory, prefix=f".{rsync_name_stem(name)}.", suffix=".part")
    tmp = Path(tmp_name)
    timeout_s = request.app[keys.COORDINATOR].settings.request_timeout_s
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await body_bytes(request, CHUNK, timeout_s):
                size += len(chunk)
                if size > bundles.max_bytes:
                    return web.json_response(
                        {"error": f"a bundle may have at most {bundles.max_bytes} bytes"}, status=413
                    )
                digest.update(chunk)
                await asyncio.to_thread(out.write, chunk)
            if size == 0:
                return web.json_response({"error": "the bundle is empty"}, status=400)
            # On disk before it is named current: after a crash the name never points at a file cut short.
            await asyncio.to_thread(_flush_to_disk, out)
        sha = digest.hexdigest()
        await asyncio.to_thread(bundles.publish, name, tmp, sha, bundles.lock(name))
        return web.json_response({"rsync_name": name, "sha256": sha, "bytes": size}, headers={"ETag": f'"{sha}"'})
    except TimeoutError:
        return await too_slow(request, f"the upload's bytes stopped coming for {timeout_s:g} s")
    except web.RequestPayloadError:
        return web.json_response({"error": "the upload could not be read: broken framing or encoding"}, status=400)
    except ConnectionResetError:
        # The uploader went away: nothing to answer, nothing kept.
        log.info("bundle_upload_abandoned", rsync_name=name, received=size)
        return web.Response(status=400)
    except OSError as exc:
        # The coordinator's disk (full, say): the bundle it had stays current.
        log.error("bundle_not_stored", rsync_name=name, error=str(exc))
        status = 507 if exc.errno == errno.ENOSPC else 500
        return web.json_response({"error": f"the bundle could not be stored: {exc.strerror or exc}"}, status=status)
    finally:
        _remove(tmp)  # on the loop, so that a cancelled upload leaves no part file behind


async def get_bundle(request: web.Request) -> web.StreamResponse:
    """The bundle, with its sha256 as ETag; 304 when the caller has it already."""
    if not _allowed(request, {Role.CLIENT, Role.WORKER}):
        return web.json_response({"error": "reading a bundle needs the worker or client token"}, status=401)
    name = _name(request)
    if name is None:
        return web.json_response({"error": "rsync_name must be a safe single path component"}, status=400)
    bundles: Bundles = request.app[keys.BUNDLES]
    # Opened and closed on the loop (each takes microseconds): a file handed between threads is lost when
    # the handler is cancelled while a thread opens it, or before a queued close has run.
    found = bundles.open(name)
    if found is None:
        return web.json_response({"error": f"no bundle for {name!r}"}, status=404)
    sha, handle = found
    with handle:
        etag = f'"{sha}"'
        if _matches(request.headers.get("If-None-Match"), sha):
            return web.Response(status=304, headers={"ETag": etag})
        size = os.fstat(handle.fileno()).st_size
        if request.method == "HEAD":
            return web.Response(headers={"ETag": etag, "Content-Length": str(size)})
        response = web.StreamResponse(headers={"ETag": etag, "Content-Type": "application/gzip"})
        response.content_length = size
        await response.prepare(request)
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


def _matches(if_none_match: str | None, sha: str) -> bool:
    """Whether an If-None-Match header names this bundle: `*`, or a list of tags, weak or strong."""
    if if_none_match is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return any(tag in ("*", f'"{sha}"') for tag in tags)


def add_routes(app: web.Application) -> None:
    app.router.add_put("/api/v1/bundles/{rsync_name}", put_bundle)
    app.router.add_get("/api/v1/bundles/{rsync_name}", get_bundle, allow_head=True)
