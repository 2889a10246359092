"""Test file discovery follows pytest's own rules: config file choice, python_files, testpaths, norecursedirs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.cli.discover import DiscoveryError, discover, locate_config, sha1_of


def touch(root: Path, *paths: str) -> None:
    for path in paths:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("def test_x():\n    pass\n")


def pytest_collected_files(root: Path, *args: str) -> list[str]:
    """The files plain pytest collects, for comparison."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sorted({line.split("::")[0] for line in out.splitlines() if "::" in line})


def test_default_rules_match_plain_pytest(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    touch(
        tmp_path,
        "test_top.py",
        "pkg/thing_test.py",
        "pkg/helper.py",
        "pkg/sub/test_deep.py",
        "build/test_built.py",
        ".hidden/test_hidden.py",
        "node_modules/test_js.py",
        "env/test_in_venv.py",
        "tests/test_one.py",
    )
    (tmp_path / "env" / "pyvenv.cfg").write_text("home = /usr\n")
    found = discover([], tmp_path)
    assert found == ["pkg/sub/test_deep.py", "pkg/thing_test.py", "test_top.py", "tests/test_one.py"]
    assert found == pytest_collected_files(tmp_path)


def test_python_files_and_testpaths_from_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\npython_files = ["check_*.py"]\ntestpaths = ["suite*"]\n'
    )
    touch(tmp_path, "suite_a/check_one.py", "suite_b/check_two.py", "suite_b/test_not.py", "other/check_three.py")
    found = discover([], tmp_path)
    assert found == ["suite_a/check_one.py", "suite_b/check_two.py"]
    assert found == pytest_collected_files(tmp_path)


def test_native_toml_pytest_section(tmp_path: Path) -> None:
    (tmp_path / "pytest.toml").write_text('[pytest]\npython_files = ["spec_*.py"]\ntestpaths = ["specs"]\n')
    (tmp_path / "pytest.ini").write_text("[pytest]\npython_files = test_*.py\n")
    touch(tmp_path, "specs/spec_a.py", "specs/test_b.py")
    assert discover([], tmp_path) == ["specs/spec_a.py"]


def test_ini_args_are_split_and_norecursedirs_honoured(tmp_path: Path) -> None:
    (tmp_path / "tox.ini").write_text("[pytest]\npython_files = test_*.py check_*.py\nnorecursedirs = skipme\n")
    touch(tmp_path, "test_a.py", "check_b.py", "skipme/test_c.py", ".dot/test_d.py")
    found = discover([], tmp_path)
    assert found == [".dot/test_d.py", "check_b.py", "test_a.py"]
    assert found == pytest_collected_files(tmp_path)


def test_setup_cfg_and_addopts_ignores(tmp_path: Path) -> None:
    (tmp_path / "setup.cfg").write_text("[tool:pytest]\naddopts = --ignore=legacy --ignore-glob=*/test_gen_*\n")
    touch(tmp_path, "test_a.py", "legacy/test_old.py", "pkg/test_gen_b.py", "pkg/test_keep.py")
    found = discover([], tmp_path)
    assert found == ["pkg/test_keep.py", "test_a.py"]
    assert found == pytest_collected_files(tmp_path)


def test_explicit_paths(tmp_path: Path) -> None:
    touch(tmp_path, "tests/test_a.py", "tests/sub/test_b.py", "tests/helper.py", "other/test_c.py")
    # A file named explicitly is taken whatever its name, as pytest does.
    assert discover(["tests/helper.py", "tests/sub"], tmp_path) == ["tests/helper.py", "tests/sub/test_b.py"]
    # testpaths only apply when no path is given.
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = other\n")
    assert discover([], tmp_path) == ["other/test_c.py"]
    assert discover(["tests"], tmp_path) == ["tests/sub/test_b.py", "tests/test_a.py"]


def test_missing_and_outside_paths_are_errors(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    touch(tmp_path, "elsewhere/test_x.py")
    with pytest.raises(DiscoveryError, match="no such file"):
        discover(["nope"], project)
    with pytest.raises(DiscoveryError, match="outside the project"):
        discover(["../elsewhere"], project)


def test_config_found_in_parent_directory(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\npython_files = *_spec.py\n")
    (tmp_path / "sub").mkdir()
    config = locate_config([tmp_path / "sub"], tmp_path / "sub")
    assert config.rootdir == tmp_path
    assert config.getlist("python_files", ()) == ["*_spec.py"]


def test_pyproject_without_pytest_section_sets_rootdir(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    config = locate_config([tmp_path], tmp_path)
    assert config.rootdir == tmp_path
    assert config.values == {}


def test_sha1_of_content(tmp_path: Path) -> None:
    path = tmp_path / "test_a.py"
    path.write_bytes(b"abc")
    assert sha1_of(path) == "a9993e364706816aba3e25717850c26c9cd0d89d"


@pytest.mark.parametrize(
    "addopts",
    ["", "--doctest-modules", "-p no:doctest", "--doctest-glob=*.rst --doctest-modules", "--doctest-glob *.md"],
)
def test_doctests_are_found_as_pytest_finds_them(tmp_path: Path, addopts: str) -> None:
    """Before, only `python_files` were found: a suite's doctests were silently not run."""
    (tmp_path / "pytest.ini").write_text(f"[pytest]\naddopts = {addopts}\n")
    touch(tmp_path, "tests/test_plain.py")
    example = '"""\n>>> 1 + 1\n2\n"""\n'
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "util.py").write_text(f"def add(a, b):\n    {example}    return a + b\n")
    (tmp_path / "pkg" / "plain.py").write_text("VALUE = 1\n")  # no example: nothing for a slave to run
    (tmp_path / "setup.py").write_text(example)  # collected: it names no build tool
    (tmp_path / "pkg" / "__main__.py").write_text(example)  # never collected
    (tmp_path / "build_tool").mkdir()
    (tmp_path / "build_tool" / "setup.py").write_text("import setuptools\n" + example)  # not collected
    for name in ("test_readme.txt", "guide.rst", "notes.md", "other.txt"):
        (tmp_path / name).write_text(">>> 1 + 1\n2\n")
    found = discover([], tmp_path)
    assert found == pytest_collected_files(tmp_path)
    assert ("pkg/util.py" in found) is ("--doctest-modules" in addopts)
