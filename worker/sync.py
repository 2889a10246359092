"""Code sync into `WORK/<rsync_name>`: real rsync when a remote path is set, else the coordinator's bundle."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Final, TypeVar

import aiohttp
import structlog

from protocol.messages import rsync_name_stem
from worker.slaves import LineSink, run_command

RSYNC_NAME: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@+-]*$")
DOWNLOAD_CHUNK: Final = 256 * 1024
DOWNLOAD_ATTEMPTS: Final = 3

T = TypeVar("T")


class SyncError(Exception):
    """The code could not be synced."""


class UnsafeBundle(SyncError):
    """The bundle holds a member that would land outside its directory, or a device."""


class SyncStopped(SyncError):
    """The sync was stopped before it ended."""


def working_path(work_dir: Path, rsync_name: str) -> Path:
    """`WORK/<rsync_name>`, refusing names that could leave the work directory."""
    if not RSYNC_NAME.match(rsync_name) or len(rsync_name) > 255:
        raise SyncError(f"refusing rsync_name {rsync_name!r}")
    return work_dir / rsync_name


# -- rsync ----------------------------------------------------------------------------


async def rsync_tree(
    remote_path: str,
    options: Sequence[str],
    rsync_name: str,
    target: Path,
    *,
    on_line: LineSink,
    stop: asyncio.Event,
    grace_s: float,
) -> None:
    """`rsync -a --delete [options] REMOTE/<rsync_name>/ TARGET/`; `SyncError` when it fails."""
    _make_dir(target)
    source = f"{remote_path.rstrip('/')}/{rsync_name}/"
    argv = ["rsync", "-a", "--delete", *options, source, f"{target}/"]
    on_line("$ " + " ".join(argv))
    code = await run_command(argv, cwd=target.parent, env=os.environ, on_line=on_line, stop=stop, grace_s=grace_s)
    if code is None:
        raise SyncStopped("rsync stopped")
    if code != 0:
        raise SyncError(f"rsync exited with {code}")


# -- bundles --------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _is_dir(path: Path) -> bool:
    return path.is_dir()


def _check_member(member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith("\\") or ".." in path.parts:
        raise UnsafeBundle(f"refusing bundle member {member.name!r}: outside the tree")
    if member.isdev():
        raise UnsafeBundle(f"refusing bundle member {member.name!r}: a device")
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        if link.is_absolute():
            raise UnsafeBundle(f"refusing bundle member {member.name!r}: a link to an absolute path")


def _clear_leftovers(target: Path, stem: str) -> None:
    for stale in target.parent.glob(f".{stem}.*-*"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def unpack_bundle(archive: Path, target: Path) -> None:
    """Unpack a tar.gz beside `target`, then swap it in with renames; the old tree is removed after the swap.

    Members with absolute paths or `..`, links leaving the tree and devices are refused (tarfile's `data`
    filter backs up the explicit checks); on any error `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    stem = rsync_name_stem(target.name)  # the scratch trees beside it have names a file system takes
    _clear_leftovers(target, stem)
    fresh = Path(tempfile.mkdtemp(prefix=f".{stem}.new-", dir=target.parent))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            tar.extractall(fresh, members=members, filter="data")
        fresh.chmod(0o755)
        old = target.parent / f".{stem}.old-{secrets.token_hex(4)}"
        if target.exists() or target.is_symlink():
            target.rename(old)
        fresh.rename(target)
        _remove(old)
    except tarfile.FilterError as exc:
        raise UnsafeBundle(f"refusing bundle: {exc}") from exc
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise SyncError(f"cannot unpack the bundle: {exc}") from exc
    finally:
        _remove(fresh)


def _unpack_and_remove(archive: Path, target: Path) -> None:
    try:
        unpack_bundle(archive, target)
    finally:
        archive.unlink(missing_ok=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def download_bundle(
    session: aiohttp.ClientSession,
    url: str,
    *,
    token: str | None,
    known_sha: str | None,
    into: Path,
) -> tuple[Path, str] | None:
    """Fetch a bundle into a temporary file in `into`: `(file, sha256)`, or `None` when `known_sha` is current."""
    headers = {"Accept": "application/gzip"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if known_sha:
        headers["If-None-Match"] = f'"{known_sha}"'
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    async with session.get(url, headers=headers, timeout=timeout) as response:
        if response.status == 304:
            return None
        if response.status == 404:
            raise SyncError(f"the coordinator has no bundle at {url}")
        if response.status in (401, 403):
            raise SyncError(f"the coordinator refused the worker token for {url} ({response.status})")
        if response.status != 200:
            raise SyncError(f"GET {url} answered {response.status}")
        fd, name = tempfile.mkstemp(prefix=".bundle-", suffix=".tar.gz", dir=into)
        digest = hashlib.sha256()
        write: asyncio.Future[None] | None = None
        try:
            async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                digest.update(chunk)
                write = asyncio.ensure_future(asyncio.to_thread(_write_all, fd, chunk))
                await asyncio.shield(write)
        except BaseException:
            if write is not None and not write.done():
                # The thread may be writing to fd: closing it now could hand its number to another file.
                await asyncio.wait({write})
            os.close(fd)
            os.unlink(name)
            raise
        os.close(fd)
        sha = digest.hexdigest()
        etag = response.headers.get("ETag", "").strip().removeprefix("W/").strip('"')
        if etag and etag != sha:
            os.unlink(name)
            raise SyncError(f"the bundle's sha256 {sha} does not match its ETag {etag}")
        return Path(name), sha


async def _until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T:
    task = asyncio.ensure_future(work)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise SyncStopped("sync stopped")
    return task.result()


class CodeSync:
    """Syncs code trees into the work directory, remembering each bundle's sha to skip unchanged downloads."""

    def __init__(
        self,
        work_dir: Path,
        *,
        bundle_url: Callable[[str], str],
        token: str | None,
        rsync_remote_path: str | None = None,
        rsync_options: Sequence[str] = (),
        grace_s: float = 5.0,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.work_dir = work_dir
        self._bundle_url = bundle_url
        self._token = token
        self._rsync_remote_path = rsync_remote_path
        self._rsync_options = tuple(rsync_options)
        self._grace_s = grace_s
        self._log: structlog.typing.FilteringBoundLogger = log or structlog.get_logger()
        self.bundle_shas: dict[str, str] = {}

    async def sync(
        self, session: aiohttp.ClientSession, rsync_name: str, *, on_line: LineSink, stop: asyncio.Event
    ) -> Path:
        """Bring `WORK/<rsync_name>` up to date and return it; `SyncError` (or `SyncStopped`) otherwise."""
        target = working_path(self.work_dir, rsync_name)
        _make_dir(self.work_dir)
        if self._rsync_remote_path:
            await rsync_tree(
                self._rsync_remote_path,
                self._rsync_options,
                rsync_name,
                target,
                on_line=on_line,
                stop=stop,
                grace_s=self._grace_s,
            )
            return target
        return await _until_stopped(self._sync_bundle(session, rsync_name, target, on_line), stop)

    async def _sync_bundle(
        self, session: aiohttp.ClientSession, rsync_name: str, target: Path, on_line: LineSink
    ) -> Path:
        url = self._bundle_url(rsync_name)
        known = self.bundle_shas.get(rsync_name) if _is_dir(target) else None
        fetched: tuple[Path, str] | None = None
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                fetched = await download_bundle(session, url, token=self._token, known_sha=known, into=self.work_dir)
                break
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise SyncError(f"cannot download {url}: {exc!r}") from exc
                on_line(f"download of {url} failed ({exc!r}); trying again")
                await asyncio.sleep(attempt)
        if fetched is None:
            on_line(f"bundle {known} unchanged; keeping {target}")
            return target
        archive, sha = fetched
        self.bundle_shas.pop(rsync_name, None)
        # The unpack runs to its end even when the sync is stopped, so no half-swapped tree is left behind
        # for the next taskset of this rsync_name.
        unpack = asyncio.create_task(asyncio.to_thread(_unpack_and_remove, archive, target))
        try:
            await asyncio.shield(unpack)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await unpack
            raise
        self.bundle_shas[rsync_name] = sha
        on_line(f"unpacked bundle {sha} into {target}")
        self._log.info("bundle_unpacked", rsync_name=rsync_name, sha256=sha)
        return target
