"""The code bundle: what is shipped, and the same tree always giving the same bytes."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from coordinator.cli.bundle import list_files, rsync_command, rsync_excludes, write_bundle


def make_tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (root / "test_a.py").write_text("def test_a():\n    pass\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (root / "link.py").symlink_to("pkg/mod.py")
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (root / ".testfleet").mkdir()
    (root / ".testfleet" / "state").write_text("local data")


def git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def bundle_bytes(root: Path) -> tuple[bytes, str]:
    out = io.BytesIO()
    sha = write_bundle(root, list_files(root), out)
    return out.getvalue(), sha


def test_directory_listing_skips_caches_and_local_data(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / "pyvenv.cfg").write_text("")
    (tmp_path / "venv" / "lib.py").write_text("")
    assert list_files(tmp_path) == ["link.py", "pkg/__init__.py", "pkg/mod.py", "run.sh", "test_a.py"]


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_listing_is_tracked_plus_untracked_not_ignored(tmp_path: Path) -> None:
    make_tree(tmp_path)
    (tmp_path / ".gitignore").write_text("__pycache__/\nignored.txt\n")
    (tmp_path / "ignored.txt").write_text("secret")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "pkg", "test_a.py", ".gitignore")
    (tmp_path / "untracked.py").write_text("x = 1\n")
    (tmp_path / "gone.py").write_text("")
    git(tmp_path, "add", "gone.py")
    (tmp_path / "gone.py").unlink()
    assert list_files(tmp_path) == [
        ".gitignore",
        "link.py",
        "pkg/__init__.py",
        "pkg/mod.py",
        "run.sh",
        "test_a.py",
        "untracked.py",
    ]


def test_same_tree_same_bytes_whatever_the_times_and_owners(tmp_path: Path) -> None:
    first, second = tmp_path / "one", tmp_path / "two"
    make_tree(first)
    make_tree(second)
    for path in second.rglob("*"):
        if not path.is_symlink():
            os.utime(path, (1_000_000, 1_000_000))
    data_one, sha_one = bundle_bytes(first)
    data_two, sha_two = bundle_bytes(second)
    assert data_one == data_two
    assert sha_one == sha_two
    (second / "test_a.py").write_text("def test_a():\n    assert 1\n")
    assert bundle_bytes(second)[1] != sha_one


def test_archive_members_are_normalised(tmp_path: Path) -> None:
    make_tree(tmp_path)
    data, sha = bundle_bytes(tmp_path)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == ["link.py", "pkg/__init__.py", "pkg/mod.py", "run.sh", "test_a.py"]
    assert members["run.sh"].mode == 0o755
    assert members["test_a.py"].mode == 0o644
    assert members["link.py"].issym() and members["link.py"].linkname == "pkg/mod.py"
    assert {m.uid for m in members.values()} == {0}
    assert {m.uname for m in members.values()} == {""}
    assert len({m.mtime for m in members.values()}) == 1
    assert len(sha) == 64


def test_rsync_mirrors_what_the_bundle_ships(tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    project = tmp_path / "project"
    make_tree(project)
    (project / "pkg" / "mod.pyc").write_bytes(b"\0")
    remote = tmp_path / "remote"
    (remote / "dev1").mkdir(parents=True)
    (remote / "dev1" / "stale.py").write_text("removed upstream")
    exclude = tmp_path / "exclude"
    exclude.write_bytes(b"".join(p.encode() + b"\0" for p in rsync_excludes(project)))
    subprocess.run(rsync_command(project, str(remote), "dev1", (), exclude), check=True)
    shipped = sorted(p.relative_to(remote / "dev1").as_posix() for p in (remote / "dev1").rglob("*") if not p.is_dir())
    assert shipped == list_files(project)
