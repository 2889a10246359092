"""Test file discovery by pytest's own rules, read from the project's pytest configuration without importing it.

What is honoured: the configuration file pytest would pick (the same names and order), `python_files`,
`testpaths` (globbed, used when no path is given), `norecursedirs`, `--ignore`/`--ignore-glob` in
`addopts`, virtualenvs and `__pycache__` skipped; doctests as pytest finds them (text files by
`--doctest-glob`, `test*.txt` by default; with `--doctest-modules` in `addopts`, every module whose
text holds `>>>` but a `__main__.py` or a setup.py that uses setuptools or distutils). What needs the
suite imported is not (`collect_ignore` in a conftest, plugins that collect other files); name such
files explicitly or adjust `python_files`.
"""

from __future__ import annotations

import configparser
import fnmatch
import glob
import hashlib
import os
import shlex
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath
from typing import Any, Final, NamedTuple

from coordinator.cli.errors import CliError

DEFAULT_PYTHON_FILES: Final = ("test_*.py", "*_test.py")
DEFAULT_DOCTEST_GLOBS: Final = ("test*.txt",)
DEFAULT_NORECURSEDIRS: Final = ("*.egg", ".*", "_darcs", "build", "CVS", "dist", "node_modules", "venv", "{arch}")
CONFIG_NAMES: Final = (
    "pytest.toml",
    ".pytest.toml",
    "pytest.ini",
    ".pytest.ini",
    "pyproject.toml",
    "tox.ini",
    "setup.cfg",
)


class DiscoveryError(CliError):
    """The paths or the pytest configuration do not name test files."""


class PytestConfig(NamedTuple):
    rootdir: Path
    inifile: Path | None
    values: dict[str, Any]

    def getlist(self, name: str, default: Sequence[str]) -> list[str]:
        """An `args`-type option: a TOML list, or a string split like a shell would."""
        value = self.values.get(name)
        if value is None:
            return list(default)
        if isinstance(value, list):
            return [str(v) for v in value]
        return shlex.split(str(value))


def _ini_section(path: Path, section: str) -> dict[str, Any] | None:
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        raise DiscoveryError(f"{path}: {exc}") from exc
    if not parser.has_section(section):
        return None
    return dict(parser.items(section))


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DiscoveryError(f"{path}: {exc}") from exc


def load_config_file(path: Path) -> dict[str, Any] | None:
    """pytest's options in one file of CONFIG_NAMES, or `None` when the file holds none."""
    name = path.name
    if name in ("pytest.toml", ".pytest.toml"):
        table = _toml(path).get("pytest", {})
        return dict(table) if isinstance(table, dict) else {}
    if name in ("pytest.ini", ".pytest.ini"):
        return _ini_section(path, "pytest") or {}
    if name == "pyproject.toml":
        tool = _toml(path).get("tool", {})
        pytest_table = tool.get("pytest") if isinstance(tool, dict) else None
        if not isinstance(pytest_table, dict):
            return None
        native = {k: v for k, v in pytest_table.items() if k != "ini_options"}
        if native:
            return native
        ini = pytest_table.get("ini_options")
        return dict(ini) if isinstance(ini, dict) else None
    if name == "tox.ini":
        return _ini_section(path, "pytest")
    if name == "setup.cfg":
        return _ini_section(path, "tool:pytest")
    return None


def locate_config(start_dirs: Iterable[Path], invocation_dir: Path) -> PytestConfig:
    """The first configuration file pytest would pick, searching each start directory and its parents."""
    starts = list(start_dirs) or [invocation_dir]
    first_pyproject: Path | None = None
    for start in starts:
        for base in (start, *start.parents):
            for name in CONFIG_NAMES:
                candidate = base / name
                if not candidate.is_file():
                    continue
                if name == "pyproject.toml" and first_pyproject is None:
                    first_pyproject = candidate
                values = load_config_file(candidate)
                if values is not None:
                    return PytestConfig(base, candidate, values)
    if first_pyproject is not None:
        return PytestConfig(first_pyproject.parent, first_pyproject, {})
    return PytestConfig(_common_ancestor(starts, invocation_dir), None, {})


def _common_ancestor(paths: Sequence[Path], fallback: Path) -> Path:
    existing = [p for p in paths if p.exists()]
    if not existing:
        return fallback
    return Path(os.path.commonpath([str(p) for p in existing]))


def fnmatch_ex(pattern: str, path: PurePath) -> bool:
    """pytest's path matching: a pattern without a separator matches the name, one with it the whole path."""
    if os.sep not in pattern:
        return fnmatch.fnmatch(path.name, pattern)
    name = str(path)
    if path.is_absolute() and not os.path.isabs(pattern):
        pattern = f"*{os.sep}{pattern}"
    return fnmatch.fnmatch(name, pattern)


def _in_venv(path: Path) -> bool:
    try:
        return (path / "pyvenv.cfg").is_file() or (path / "conda-meta" / "history").is_file()
    except OSError:
        return False


def _addopts_values(words: Sequence[str], flag: str) -> list[str]:
    """The values of `flag` in `addopts` words, given as `flag value` or `flag=value`."""
    values: list[str] = []
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            values.append(words[index + 1])
        elif word.startswith(flag + "="):
            values.append(word[len(flag) + 1 :])
    return values


def _plugin_disabled(words: Sequence[str], name: str) -> bool:
    """Whether `addopts` blocks a plugin (`-p no:name`, `-pno:name`)."""
    blocked = f"no:{name}"
    return any(
        word == f"-p{blocked}" or (word == "-p" and index + 1 < len(words) and words[index + 1] == blocked)
        for index, word in enumerate(words)
    )


def _has_examples(path: Path) -> bool:
    """Whether pytest would look for doctests in a module that may hold some: a module without `>>>` has
    none, and would only be a file of no tests in the run; a setup.py that names its build tool is left
    out by pytest itself."""
    try:
        text = path.read_bytes()
    except OSError:
        return False
    if path.name == "setup.py" and (b"setuptools" in text or b"distutils" in text):
        return False
    return b">>>" in text


class Discovery:
    """The walk over directories with pytest's recursion and file rules."""

    def __init__(self, config: PytestConfig) -> None:
        self.python_files = config.getlist("python_files", DEFAULT_PYTHON_FILES)
        self.norecursedirs = config.getlist("norecursedirs", DEFAULT_NORECURSEDIRS)
        addopts = config.getlist("addopts", ())
        self.ignores = [(config.rootdir / v).absolute() for v in _addopts_values(addopts, "--ignore")]
        self.ignore_globs = [str((config.rootdir / v).absolute()) for v in _addopts_values(addopts, "--ignore-glob")]
        # pytest's doctest plugin collects text files by `--doctest-glob` (test*.txt unless given), and with
        # `--doctest-modules` the docstrings of every module but setup.py and __main__.py.
        doctests = not _plugin_disabled(addopts, "doctest")
        globs = _addopts_values(addopts, "--doctest-glob") or list(DEFAULT_DOCTEST_GLOBS)
        self.doctest_globs = globs if doctests else []
        self.doctest_modules = doctests and "--doctest-modules" in addopts

    def ignored(self, path: Path) -> bool:
        if path.name == "__pycache__" or path in self.ignores:
            return True
        return any(fnmatch.fnmatch(str(path), pattern) for pattern in self.ignore_globs)

    def matches(self, path: Path) -> bool:
        if path.suffix == ".py":
            if any(fnmatch_ex(pattern, path) for pattern in self.python_files):
                return True
            return self.doctest_modules and path.name != "__main__.py" and _has_examples(path)
        return any(fnmatch_ex(pattern, path) for pattern in self.doctest_globs)

    def walk(self, directory: Path) -> list[Path]:
        found: list[Path] = []
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise DiscoveryError(f"cannot list {directory}: {exc}") from exc
        for entry in entries:
            path = Path(entry.path)
            if self.ignored(path):
                continue
            if entry.is_dir():
                if _in_venv(path) or any(fnmatch_ex(p, path) for p in self.norecursedirs):
                    continue
                found.extend(self.walk(path))
            elif entry.is_file() and self.matches(path):
                found.append(path)
        return found


def discover(paths: Sequence[str], project_dir: Path) -> list[str]:
    """Test files under `paths` (or pytest's `testpaths`, or the project) as sorted POSIX paths relative to it.

    A file named explicitly is taken whatever its name, as pytest does; every file must lie inside the
    project, because only the project is shipped to the workers.
    """
    project_dir = project_dir.absolute()
    given = [(project_dir / p).absolute() for p in paths]
    for path in given:
        if not path.exists():
            raise DiscoveryError(f"no such file or directory: {path}")
    starts = [p if p.is_dir() else p.parent for p in given]
    config = locate_config(starts, project_dir)
    if not given:
        testpaths = config.getlist("testpaths", ())
        if testpaths and config.rootdir == project_dir:
            for pattern in testpaths:
                given.extend(Path(p).absolute() for p in sorted(glob.iglob(str(project_dir / pattern), recursive=True)))
        if not given:
            given = [project_dir]
    discovery = Discovery(config)
    files: set[Path] = set()
    for path in given:
        if path.is_dir():
            files.update(discovery.walk(path))
        else:
            files.add(path)
    result: list[str] = []
    for path in files:
        try:
            relative = Path(os.path.normpath(path)).relative_to(project_dir)
        except ValueError:
            raise DiscoveryError(
                f"{path} is outside the project {project_dir}; run from a directory above it"
            ) from None
        result.append(relative.as_posix())
    return sorted(result)


def sha1_of(path: Path) -> str:
    """The spec_sha1 of a file: the SHA-1 of its bytes, the key of its history."""
    digest = hashlib.sha1(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
