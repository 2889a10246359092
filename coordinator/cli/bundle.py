"""Code sync from the client: the project's files, a content-addressed deterministic tar.gz of them, or rsync.

What is shipped: in a git work tree, `git ls-files` (tracked) plus untracked files that are not
ignored; elsewhere every file under the project. Never shipped: `.git`, `.testfleet` (the local
coordinator's data), `__pycache__` and virtualenvs (outside git only). The archive holds regular files
and symlinks sorted by path with fixed owner, times and modes (0755 when executable, 0644 otherwise),
so the same tree always gives the same bytes and the same sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Final

from coordinator.cli.errors import CliError

FIXED_MTIME: Final = 315532800  # 1980-01-01T00:00:00Z
ALWAYS_EXCLUDED: Final = frozenset({".git", ".testfleet"})
OUTSIDE_GIT_EXCLUDED: Final = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"})
RSYNC_WILDCARDS: Final = ("*", "?", "[")


class BundleError(CliError):
    """The project's files could not be listed, archived or synced."""


def _git(project_dir: Path, *args: str) -> bytes | None:
    """Output of a git command in the project, `None` when git is missing or this is not a work tree."""
    if shutil.which("git") is None:
        return None
    result = subprocess.run(
        ["git", "-C", str(project_dir), *args], capture_output=True, check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        return None
    return result.stdout


def in_git_work_tree(project_dir: Path) -> bool:
    out = _git(project_dir, "rev-parse", "--is-inside-work-tree")
    return out is not None and out.strip() == b"true"


def _excluded(relative: str) -> bool:
    return any(part in ALWAYS_EXCLUDED for part in relative.split("/"))


def _walk(project_dir: Path, directory: Path, skip_caches: bool) -> Iterable[str]:
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.name in ALWAYS_EXCLUDED or (skip_caches and entry.name in OUTSIDE_GIT_EXCLUDED):
            continue
        if entry.is_dir(follow_symlinks=False):
            if skip_caches and (path / "pyvenv.cfg").is_file():
                continue
            yield from _walk(project_dir, path, skip_caches)
        elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
            if skip_caches and entry.name.endswith((".pyc", ".pyo")):
                continue
            yield path.relative_to(project_dir).as_posix()


def list_files(project_dir: Path) -> list[str]:
    """The project's files to ship, as sorted POSIX paths relative to it."""
    project_dir = project_dir.absolute()
    listed = _git(project_dir, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if listed is None or not in_git_work_tree(project_dir):
        return sorted(_walk(project_dir, project_dir, skip_caches=True))
    files: set[str] = set()
    for raw in listed.split(b"\0"):
        if not raw:
            continue
        relative = os.fsdecode(raw)
        if _excluded(relative):
            continue
        path = project_dir / relative
        if path.is_dir() and not path.is_symlink():
            # A submodule: its files are part of the tree the tests see.
            files.update(_walk(project_dir, path, skip_caches=True))
        elif path.is_symlink() or path.is_file():
            files.add(relative)
        # Else deleted in the work tree but still in the index: the tests will not see it.
    return sorted(files)


def _tarinfo(project_dir: Path, relative: str) -> tuple[tarfile.TarInfo, Path | None]:
    path = project_dir / relative
    info = tarfile.TarInfo(relative)
    info.mtime = FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        info.mode = 0o777
        return info, None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{relative} is not a regular file or a symlink")
    info.type = tarfile.REGTYPE
    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    info.size = st.st_size
    return info, path


def write_bundle(project_dir: Path, files: Sequence[str], out: IO[bytes]) -> str:
    """Write the deterministic tar.gz of `files` to `out`; return its sha256."""
    hasher = _HashingWriter(out)
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=hasher, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for relative in sorted(files):
            try:
                info, path = _tarinfo(project_dir, relative)
            except FileNotFoundError:
                continue  # removed while we listed: not part of the tree any more
            if path is None:
                tar.addfile(info)
                continue
            try:
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            except OSError as exc:
                raise BundleError(f"cannot archive {relative} (did it change meanwhile?): {exc}") from exc
    return hasher.digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.digest = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.out.write(data)
        return len(data)


# -- rsync ----------------------------------------------------------------------------------


def _rsync_pattern(relative: str, is_dir: bool) -> str:
    """An anchored rsync pattern that matches exactly this path."""
    pattern = "/" + relative.rstrip("/")
    if any(c in pattern for c in RSYNC_WILDCARDS):
        for c in ("\\", *RSYNC_WILDCARDS):
            pattern = pattern.replace(c, "\\" + c)
    return pattern + ("/" if is_dir else "")


def rsync_excludes(project_dir: Path) -> list[str]:
    """Anchored patterns of what is not shipped (ignored files, caches, virtualenvs), directories collapsed."""
    patterns = ["/.testfleet/", ".git"]
    if in_git_work_tree(project_dir):
        out = _git(project_dir, "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory")
        for raw in (out or b"").split(b"\0"):
            if raw:
                relative = os.fsdecode(raw)
                patterns.append(_rsync_pattern(relative, relative.endswith("/")))
        return patterns
    patterns += [f"{name}/" for name in sorted(OUTSIDE_GIT_EXCLUDED)] + ["*.pyc", "*.pyo"]
    for root, dirs, _files in os.walk(project_dir):
        for name in list(dirs):
            if (Path(root) / name / "pyvenv.cfg").is_file():
                patterns.append(_rsync_pattern((Path(root) / name).relative_to(project_dir).as_posix(), True))
                dirs.remove(name)
            elif name in ALWAYS_EXCLUDED or name in OUTSIDE_GIT_EXCLUDED:
                dirs.remove(name)
    return patterns


def rsync_command(
    project_dir: Path, remote_path: str, rsync_name: str, options: Sequence[str], exclude_file: Path
) -> list[str]:
    """`rsync -a --delete` of the project into REMOTE/<rsync_name>/, shipping what the bundle would."""
    destination = f"{remote_path.rstrip('/')}/{rsync_name}/"
    return [
        "rsync",
        "-a",
        "--delete",
        "--delete-excluded",
        "--from0",
        f"--exclude-from={exclude_file}",
        *options,
        f"{project_dir}/",
        destination,
    ]
