"""Code sync: safe bundle unpacking with an atomic swap, conditional downloads, and real rsync."""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from worker.sync import CodeSync, SyncError, SyncStopped, UnsafeBundle, unpack_bundle, working_path


def make_tar(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                name, data = entry
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_unpack_replaces_the_tree(tmp_path: Path) -> None:
    target = tmp_path / "proj"
    unpack_bundle(write(tmp_path / "a.tgz", make_tar([("x.py", b"1"), ("gone.py", b"2")])), target)
    assert (target / "gone.py").read_bytes() == b"2"
    unpack_bundle(write(tmp_path / "b.tgz", make_tar([("x.py", b"new"), ("pkg/m.py", b"m")])), target)
    assert (target / "x.py").read_bytes() == b"new"
    assert (target / "pkg" / "m.py").read_bytes() == b"m"
    assert not (target / "gone.py").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tgz", "b.tgz", "proj"], "no temporary trees are left"


@pytest.mark.parametrize("name", ["a" * 255, "b" * 201])
def test_unpack_under_the_longest_rsync_names(tmp_path: Path, name: str) -> None:
    """The scratch trees beside the target are named within a file name's 255 bytes."""
    target = tmp_path / name
    for round_ in (b"1", b"2"):
        unpack_bundle(write(tmp_path / "a.tgz", make_tar([("x.py", round_)])), target)
        assert (target / "x.py").read_bytes() == round_
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.tgz", name])


@pytest.mark.parametrize(
    "member",
    [
        ("/etc/evil", b"x"),
        ("../evil", b"x"),
        ("ok/../../evil", b"x"),
        special("link", tarfile.SYMTYPE, "/etc/passwd"),
        special("link", tarfile.SYMTYPE, "../../outside"),
        special("hard", tarfile.LNKTYPE, "/etc/passwd"),
        special("dev", tarfile.CHRTYPE),
        special("blk", tarfile.BLKTYPE),
        special("fifo", tarfile.FIFOTYPE),
    ],
    ids=[
        "absolute",
        "dotdot",
        "nested-dotdot",
        "abs-symlink",
        "escaping-symlink",
        "abs-hardlink",
        "chr",
        "blk",
        "fifo",
    ],
)
def test_malicious_members_are_refused_and_the_old_tree_kept(
    tmp_path: Path, member: tarfile.TarInfo | tuple[str, bytes]
) -> None:
    target = tmp_path / "work" / "proj"
    unpack_bundle(write(tmp_path / "good.tgz", make_tar([("keep.py", b"old")])), target)
    bad = write(tmp_path / "bad.tgz", make_tar([("fine.py", b"f"), member]))
    with pytest.raises(UnsafeBundle):
        unpack_bundle(bad, target)
    assert (target / "keep.py").read_bytes() == b"old"
    assert not (target / "fine.py").exists()
    assert [p.name for p in target.parent.iterdir()] == ["proj"]
    assert not (tmp_path / "evil").exists()
    assert not (tmp_path / "outside").exists()


def test_symlinks_inside_the_tree_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "proj"
    archive = make_tar([("real.py", b"r"), special("alias.py", tarfile.SYMTYPE, "real.py")])
    unpack_bundle(write(tmp_path / "a.tgz", archive), target)
    assert (target / "alias.py").is_symlink()
    assert (target / "alias.py").read_bytes() == b"r"


def test_a_corrupt_bundle_is_a_sync_error(tmp_path: Path) -> None:
    target = tmp_path / "proj"
    with pytest.raises(SyncError):
        unpack_bundle(write(tmp_path / "junk.tgz", b"not a tarball"), target)
    assert not target.exists()


def test_working_path_refuses_names_that_leave_the_work_dir(tmp_path: Path) -> None:
    assert working_path(tmp_path, "my-proj_1.2") == tmp_path / "my-proj_1.2"
    for name in ("..", "../x", "a/b", ".hidden", ""):
        with pytest.raises(SyncError):
            working_path(tmp_path, name)


class BundleServer:
    """A stand-in for the coordinator's bundle endpoint, recording the requests it saw."""

    def __init__(self, bundles: dict[str, bytes], token: str | None = None) -> None:
        self.bundles = bundles
        self.token = token
        self.requests: list[dict[str, str]] = []
        self.etag_override: str | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401)
        body = self.bundles.get(request.match_info["name"])
        if body is None:
            return web.Response(status=404)
        sha = hashlib.sha256(body).hexdigest()
        if request.headers.get("If-None-Match") == f'"{sha}"':
            return web.Response(status=304)
        return web.Response(body=body, headers={"ETag": f'"{self.etag_override or sha}"'})


@asynccontextmanager
async def serving(server: BundleServer) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/api/v1/bundles/{name}", server.handle)
    async with TestServer(app, host="127.0.0.1") as test_server:
        yield str(test_server.make_url("")).rstrip("/")


def code_sync(base: str, work: Path, token: str | None = None) -> CodeSync:
    return CodeSync(work, bundle_url=lambda name: f"{base}/api/v1/bundles/{name}", token=token)


async def test_download_then_304_keeps_the_tree(tmp_path: Path) -> None:
    server = BundleServer({"proj": make_tar([("a.py", b"v1")])}, token="t0k")
    lines: list[str] = []
    async with serving(server) as base, aiohttp.ClientSession() as session:
        sync = code_sync(base, tmp_path, token="t0k")
        path = await sync.sync(session, "proj", on_line=lines.append, stop=asyncio.Event())
        assert (path / "a.py").read_bytes() == b"v1"
        assert "If-None-Match" not in server.requests[0]
        assert server.requests[0]["Authorization"] == "Bearer t0k"
        (path / "built.txt").write_text("made by setup")

        await sync.sync(session, "proj", on_line=lines.append, stop=asyncio.Event())
        sha = hashlib.sha256(server.bundles["proj"]).hexdigest()
        assert server.requests[1]["If-None-Match"] == f'"{sha}"'
        assert (path / "built.txt").exists(), "a 304 leaves the tree alone"

        server.bundles["proj"] = make_tar([("a.py", b"v2")])
        await sync.sync(session, "proj", on_line=lines.append, stop=asyncio.Event())
        assert (path / "a.py").read_bytes() == b"v2"
        assert not (path / "built.txt").exists()
        assert sync.bundle_shas["proj"] == hashlib.sha256(server.bundles["proj"]).hexdigest()

        shutil.rmtree(path)
        await sync.sync(session, "proj", on_line=lines.append, stop=asyncio.Event())
        assert "If-None-Match" not in server.requests[-1], "a missing tree is downloaded again"
        assert (path / "a.py").read_bytes() == b"v2"
    assert any("unchanged" in line for line in lines)


async def test_download_errors(tmp_path: Path) -> None:
    server = BundleServer({"proj": make_tar([("a.py", b"v1")])}, token="right")
    async with serving(server) as base, aiohttp.ClientSession() as session:
        with pytest.raises(SyncError, match="token"):
            await code_sync(base, tmp_path, token="wrong").sync(session, "proj", on_line=print, stop=asyncio.Event())
        with pytest.raises(SyncError, match="no bundle"):
            await code_sync(base, tmp_path, token="right").sync(session, "other", on_line=print, stop=asyncio.Event())
        server.etag_override = "0" * 64
        with pytest.raises(SyncError, match="does not match"):
            await code_sync(base, tmp_path, token="right").sync(session, "proj", on_line=print, stop=asyncio.Event())
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "failed downloads leave nothing behind"


async def test_stopped_download(tmp_path: Path) -> None:
    stop = asyncio.Event()
    stop.set()
    async with serving(BundleServer({"proj": make_tar([])})) as base, aiohttp.ClientSession() as session:
        with pytest.raises(SyncStopped):
            await code_sync(base, tmp_path).sync(session, "proj", on_line=print, stop=stop)


async def test_rsync_from_a_local_remote_path(tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    remote = tmp_path / "remote"
    (remote / "proj" / "pkg").mkdir(parents=True)
    (remote / "proj" / "pkg" / "a.py").write_text("a")
    (remote / "proj" / "skip.log").write_text("no")
    work = tmp_path / "work"
    lines: list[str] = []
    sync = CodeSync(
        work,
        bundle_url=lambda name: "http://unused",
        token=None,
        rsync_remote_path=str(remote) + "/",
        rsync_options=["--exclude=*.log"],
    )
    async with aiohttp.ClientSession() as session:
        path = await sync.sync(session, "proj", on_line=lines.append, stop=asyncio.Event())
        assert path == work / "proj"
        assert (path / "pkg" / "a.py").read_text() == "a"
        assert not (path / "skip.log").exists()
        assert any(line.startswith("$ rsync -a --delete --exclude=*.log") for line in lines)

        (remote / "proj" / "pkg" / "a.py").unlink()
        (remote / "proj" / "b.py").write_text("b")
        await sync.sync(session, "proj", on_line=lines.append, stop=asyncio.Event())
        assert not (path / "pkg" / "a.py").exists(), "--delete removes what the remote no longer has"
        assert (path / "b.py").read_text() == "b"

        with pytest.raises(SyncError, match="rsync exited"):
            await sync.sync(session, "missing", on_line=lines.append, stop=asyncio.Event())
