"""The JUnit XML report: valid XML whatever the output, pytest's own test cases, retries recorded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from coordinator.cli.cases import MARKER, CaseRecord, group_cases, mangle, split_output
from coordinator.cli.junit import build_xml, write_junit, xml_text
from coordinator.cli.report import Report, TaskRecord, TasksetRecord, Trial, final_trial

SUITES = Path(__file__).resolve().parents[1] / "fixtures" / "suites"

# What the slave is asked to append to a trial's stdout, made here by a plugin of plain pytest.
RECORDER = textwrap.dedent(
    """
    import json, os

    LINES = []

    def pytest_collectreport(report):
        if report.failed:
            LINES.append({"nodeid": report.nodeid, "when": "collect", "outcome": "error"})
        elif report.skipped:
            LINES.append({"nodeid": report.nodeid, "when": "collect", "outcome": "skipped"})

    def pytest_runtest_logreport(report):
        category = report_category(report)
        if category in ("passed", "failed", "skipped", "xfailed", "xpassed", "error"):
            LINES.append({"nodeid": report.nodeid, "when": report.when, "outcome": category,
                          "duration_s": report.duration})

    def report_category(report):
        global CONFIG
        return CONFIG.hook.pytest_report_teststatus(report=report, config=CONFIG)[0]

    def pytest_configure(config):
        global CONFIG
        CONFIG = config

    def pytest_unconfigure(config):
        with open(os.environ["RECORDS_FILE"], "w") as out:
            out.write("[testfleet:cases]\\n" + "".join(json.dumps(line) + "\\n" for line in LINES))
    """
)


def record_suite(tmp_path: Path, suite: str) -> tuple[str, ET.Element]:
    """Run plain pytest on a fixture suite: the case records of the run, and pytest's own JUnit XML."""
    project = tmp_path / suite
    shutil.copytree(SUITES / suite, project)
    (tmp_path / "recorder.py").write_text(RECORDER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "RECORDS_FILE": str(tmp_path / "records.txt")}
    subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "recorder", "-p", "no:cacheprovider"),
            *("--continue-on-collection-errors", f"--junit-xml={tmp_path / 'pytest.xml'}", "-q"),
        ],
        cwd=project,
        env=env,
        capture_output=True,
        check=False,
    )
    return (tmp_path / "records.txt").read_text(), ET.parse(tmp_path / "pytest.xml").getroot()


def pytest_cases(root: ET.Element) -> list[tuple[str, str, str]]:
    cases = []
    for case in root.iter("testcase"):
        tags = {child.tag for child in case} & {"failure", "error", "skipped"}
        verdict = "error" if "error" in tags else "failure" if "failure" in tags else "skipped" if tags else "passed"
        cases.append((case.get("classname") or "", case.get("name") or "", verdict))
    return cases


def test_cases_from_records_are_pytests_own(tmp_path: Path) -> None:
    stdout, pytest_xml = record_suite(tmp_path, "every_outcome")
    _, records = split_output(stdout)
    assert records is not None
    ours = [(case.classname, case.name, case.verdict) for case in group_cases(records)]
    assert sorted(ours) == sorted(pytest_cases(pytest_xml))


def test_mangle_matches_pytest() -> None:
    assert mangle("tests/test_a.py::TestX::test_y[1-a::b]") == ("tests.test_a.TestX", "test_y[1-a::b]")
    assert mangle("test_import_error.py") == ("", "test_import_error")


def test_split_output_keeps_the_human_part() -> None:
    stdout = f"some output\n{MARKER}\n" + '{"nodeid": "t.py::a", "outcome": "passed"}\nnot json\n'
    human, records = split_output(stdout)
    assert human == "some output\n"
    assert records == [CaseRecord("t.py::a", "passed")]
    assert split_output("plain\n") == ("plain\n", None)


def trial(trial_id: int, status: str, counts: tuple[int, int, int], stdout: str = "", minute: int = 0) -> Trial:
    return Trial(
        trial_id,
        status,
        started_at=f"2026-01-01T00:{minute:02d}:00.000000Z",
        finished_at=f"2026-01-01T00:{minute:02d}:01.500000Z",
        passed=counts[0],
        pending=counts[1],
        failed=counts[2],
        stdout=stdout,
        stderr="",
    )


def records(*lines: dict[str, object]) -> str:
    return f"\n{MARKER}\n" + "".join(json.dumps(line) + "\n" for line in lines)


def make_report() -> Report:
    nasty = "bad \x00 bytes \x1b[31m and \ud800 here \ufffe"
    flaky_fail = trial(
        1,
        "failed",
        (0, 0, 1),
        "____________________ t_flaky.py::test_f ____________________\nassert 0, 'first run'\n"
        + records({"nodeid": "t_flaky.py::test_f", "when": "call", "outcome": "failed", "message": "first run"}),
        minute=1,
    )
    flaky_pass = trial(
        2,
        "passed",
        (1, 0, 0),
        records({"nodeid": "t_flaky.py::test_f", "when": "call", "outcome": "passed", "duration_s": 0.5}),
        minute=2,
    )
    failing = trial(
        3,
        "failed",
        (1, 1, 1),
        f"____________________ t_fail.py::test_bad ____________________\n{nasty}\n"
        + records(
            {"nodeid": "t_fail.py::test_ok", "when": "call", "outcome": "passed"},
            {"nodeid": "t_fail.py::test_skip", "when": "setup", "outcome": "skipped", "message": "why"},
            {"nodeid": "t_fail.py::test_bad", "when": "call", "outcome": "failed", "message": nasty},
        ),
    )
    killed = trial(4, "timeout", (0, 0, 0), "[testfleet: the worker killed the slave]\n")
    tasks = [
        TaskRecord(1, "t_flaky.py", "passed", 2, [flaky_fail, flaky_pass]),
        TaskRecord(2, "t_fail.py", "failed", 1, [failing]),
        TaskRecord(3, "t_killed.py", "failed", 1, [killed]),
        TaskRecord(4, "t_never.py", None, 0, []),
    ]
    report = Report(TasksetRecord(9, "failed", taskset_class="demo"), tasks)
    report.outputs = {t.id: t for t in (flaky_fail, flaky_pass, failing, killed)}
    return report


def test_report_is_valid_xml_with_forbidden_characters_stripped(tmp_path: Path) -> None:
    path = tmp_path / "out" / "junit.xml"
    write_junit(make_report(), path)
    root = ET.parse(path).getroot()  # a parse error would fail here
    text = path.read_text(encoding="utf-8")
    assert "\x00" not in text and "\x1b" not in text and "\ufffe" not in text
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors"), root.get("skipped")) == ("6", "1", "1", "2")


def test_cases_retries_and_fallbacks() -> None:
    root = build_xml(make_report()).getroot()
    suites = {suite.get("name"): suite for suite in root.iter("testsuite")}
    flaky = suites["t_flaky.py"]
    (case,) = flaky.iter("testcase")
    assert (case.get("classname"), case.get("name")) == ("t_flaky", "test_f")
    assert [child.tag for child in case] == ["flakyFailure"]
    assert "first run" in (case[0].text or "")
    props = {p.get("name"): p.get("value") for p in flaky.iter("property")}
    assert props["testfleet.attempts"] == "2"
    assert props["testfleet.attempt.1"].startswith("failed")

    failing = suites["t_fail.py"]
    verdicts = {c.get("name"): [child.tag for child in c] for c in failing.iter("testcase")}
    assert verdicts == {"test_ok": [], "test_skip": ["skipped"], "test_bad": ["failure"]}
    bad = next(c for c in failing.iter("testcase") if c.get("name") == "test_bad")
    assert "bad" in (bad[0].text or "")
    assert failing.find("system-out") is not None

    killed = suites["t_killed.py"]
    (case,) = killed.iter("testcase")
    assert case.get("name") == "t_killed.py"
    assert [child.tag for child in case] == ["error"]

    never = suites["t_never.py"]
    (case,) = never.iter("testcase")
    assert case[0].tag == "skipped"


def test_final_trial_and_counts() -> None:
    report = make_report()
    assert final_trial(report.tasks[0]) is not None and final_trial(report.tasks[0]).id == 2  # type: ignore[union-attr]
    assert report.test_counts() == {"passed": 2, "pending": 1, "failed": 1}
    assert [t.spec_path for t in report.flaky_tasks] == ["t_flaky.py"]


def test_xml_text() -> None:
    assert xml_text("a\x00b\x08c\td\ne\rf\U0001f600") == "abc\td\ne\rf\U0001f600"


def test_a_failed_call_and_teardown_error_pair_takes_each_its_own_earlier_failures() -> None:
    """pytest lists a failed call followed by a teardown error as two cases of one node id: each case carries
    the earlier attempts' failures of its own phase (both carried both before)."""
    pair = (
        {"nodeid": "t_pair.py::test_p", "when": "call", "outcome": "failed", "message": "call broke"},
        {"nodeid": "t_pair.py::test_p", "when": "teardown", "outcome": "error", "message": "teardown broke"},
    )
    first = trial(1, "failed", (0, 0, 2), records(*pair), minute=0)
    second = trial(2, "failed", (0, 0, 2), records(*pair), minute=1)
    only_call = trial(3, "failed", (0, 0, 1), records(pair[0]), minute=2)
    for final, expected in (
        (second, [["failure", "rerunFailure"], ["error", "rerunError"]]),
        # The last attempt failed its call only: its one case carries both phases of the earlier pair.
        (only_call, [["failure", "rerunFailure", "rerunError"]]),
    ):
        report = Report(
            TasksetRecord(9, "failed", taskset_class="demo"), [TaskRecord(1, "t_pair.py", "failed", 2, [first, final])]
        )
        report.outputs = {t.id: t for t in (first, final)}
        root = build_xml(report).getroot()
        cases = list(root.iter("testcase"))
        assert [[child.tag for child in case] for case in cases] == expected
        messages = [[child.get("message") for child in case if child.tag.startswith("rerun")] for case in cases]
        if len(cases) == 2:
            assert messages == [["call broke"], ["teardown broke"]]
