"""The client's settings: a flag wins over its TESTFLEET_* variable, which wins over [tool.testfleet]."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from coordinator.cli.config import ALL_OPTIONS, ConfigError, add_options, add_project_dir, default_rsync_name, resolve
from coordinator.cli.run import describe_os_error


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_project_dir(parser)
    add_options(parser, ALL_OPTIONS)
    return parser.parse_args(argv)


def project(tmp_path: Path, table: str = "") -> Path:
    (tmp_path / "pyproject.toml").write_text(f'[project]\nname = "demo-project"\n\n[tool.testfleet]\n{table}')
    return tmp_path


def test_precedence_flag_over_env_over_pyproject(tmp_path: Path) -> None:
    root = project(tmp_path, 'max-trials = 5\nworker_type = "gpu"\nsetup = "make deps"\naverage-multiplier = 3\n')
    env = {"TESTFLEET_MAX_TRIALS": "7", "TESTFLEET_SETUP": "env setup"}
    settings = resolve(parse("--project-dir", str(root), "--max-trials", "9"), env)
    assert settings.max_trials == 9  # flag
    assert settings.setup == "env setup"  # env over pyproject
    assert settings.worker_type == "gpu"  # pyproject over default
    assert settings.average_multiplier == 3.0
    assert settings.least_timeout_sec == 60  # default
    settings = resolve(parse("--project-dir", str(root)), env)
    assert settings.max_trials == 7


def test_defaults_from_the_project_and_user(tmp_path: Path) -> None:
    root = project(tmp_path)
    settings = resolve(parse("--project-dir", str(root)), {"USER": "ci runner"})
    assert settings.taskset_class == "demo-project"
    assert settings.rsync_name == "ci-runner"
    assert settings.coordinator == "http://127.0.0.1:7878"
    assert settings.slave_command == "testfleet slave"
    assert (settings.unknown_spec_timeout_sec, settings.least_timeout_sec) == (600, 60)
    assert (settings.average_multiplier, settings.hard_timeout_margin_sec) == (2.0, 60)
    assert settings.max_workers == 1000
    assert settings.max_trials == 3
    assert settings.project_dir == str(root)


def test_taskset_class_falls_back_to_the_directory_name(tmp_path: Path) -> None:
    root = tmp_path / "my-dir"
    root.mkdir()
    assert resolve(parse("--project-dir", str(root)), {}).taskset_class == "my-dir"


def test_project_dir_from_environment(tmp_path: Path) -> None:
    root = project(tmp_path)
    assert resolve(parse(), {"TESTFLEET_PROJECT_DIR": str(root)}).project_dir == str(root)


def test_rsync_options_split_like_a_shell(tmp_path: Path) -> None:
    root = project(tmp_path, 'rsync_options = ["-z", "--exclude=a b"]\n')
    assert resolve(parse("--project-dir", str(root)), {}).rsync_options == ("-z", "--exclude=a b")
    env = {"TESTFLEET_RSYNC_OPTIONS": "-z '--exclude=c d'"}
    assert resolve(parse("--project-dir", str(root)), env).rsync_options == ("-z", "--exclude=c d")


def test_token_never_from_pyproject(tmp_path: Path) -> None:
    root = project(tmp_path, 'token = "committed-secret"\n')
    with pytest.raises(ConfigError, match="tokens come from --token or TESTFLEET_TOKEN"):
        resolve(parse("--project-dir", str(root)), {})


def test_unknown_keys_and_bad_values_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        resolve(parse("--project-dir", str(project(tmp_path, "max_trails = 3\n"))), {})
    root = project(tmp_path)
    with pytest.raises(ConfigError, match="max_trials must be a int"):
        resolve(parse("--project-dir", str(root)), {"TESTFLEET_MAX_TRIALS": "many"})
    with pytest.raises(ConfigError, match="invalid settings"):
        resolve(parse("--project-dir", str(root), "--max-trials", "0"), {})
    with pytest.raises(ConfigError, match="invalid settings"):
        resolve(parse("--project-dir", str(root), "--rsync-name", "../escape"), {})
    with pytest.raises(ConfigError, match="invalid settings"):
        resolve(parse("--project-dir", str(root), "--progress", "fancy"), {})


def test_default_rsync_name_is_safe() -> None:
    assert default_rsync_name({"USER": "dev1"}) == "dev1"
    assert default_rsync_name({"USER": "../évil user"}) == "vil-user"
    assert default_rsync_name({"USER": ".."}) == "testfleet"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--junit-xml", "."), "is a directory"),
        (("--data-dir", "{root}/pyproject.toml"), "is not a directory"),
        (("--setup", "make \udcff"), "setup is not valid UTF-8"),
    ],
)
def test_settings_that_would_only_fail_later_are_refused_at_once(
    tmp_path: Path, argv: tuple[str, ...], message: str
) -> None:
    root = project(tmp_path)
    argv = tuple(arg.replace("{root}", str(root)) for arg in argv)
    with pytest.raises(ConfigError, match=message):
        resolve(parse("--project-dir", str(root), *argv), {"HOME": str(tmp_path)})


def test_a_failed_file_operation_is_one_line() -> None:
    assert describe_os_error(FileNotFoundError(2, "No such file or directory", "/proc/x")) == (
        "No such file or directory: /proc/x"
    )
    assert describe_os_error(IsADirectoryError(21, "Is a directory", "/a.tmp", None, "/a")) == (
        "Is a directory: /a.tmp -> /a"
    )
    assert describe_os_error(OSError("no file at all")) == "no file at all"
