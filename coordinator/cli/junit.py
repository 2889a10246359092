"""The JUnit XML report: one testsuite per file, pytest's test cases from the deciding attempt, retries recorded.

- When the deciding trial carries case records (`coordinator.cli.cases`), its cases are exactly the
  ones pytest's own JUnit XML lists (same classname and name), each once with its final outcome.
  A case that failed in an earlier attempt of the file gets that failure as `<flakyFailure>` /
  `<flakyError>` (it passed in the end) or `<rerunFailure>` / `<rerunError>` (it failed again).
- Without case records (a non-pytest slave, a killed slave), the file is one test case named after it,
  failed, skipped or passed with the file.
- Each suite's properties carry the file's attempts and counts; a failed file's output goes to its
  suite's `<system-out>` and `<system-err>`.

Text is stripped of the characters XML 1.0 forbids before it is written.
"""

from __future__ import annotations

import collections
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from coordinator.cli.cases import Case, CaseRecord, failure_text, group_cases, mangle, split_output
from coordinator.cli.report import Report, TaskRecord, Trial, earlier_failures, final_trial
from protocol.types import parse_timestamp

_FORBIDDEN: Final = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
MAX_MESSAGE: Final = 1000


def xml_text(text: str) -> str:
    """`text` without the characters XML 1.0 cannot hold (control characters, lone surrogates, U+FFFE/F)."""
    return _FORBIDDEN.sub("", text)


def _el(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k: xml_text(v) for k, v in attrs.items()})
    if text:
        element.text = xml_text(text)
    return element


def _seconds(trial: Trial | None) -> float:
    if trial is None or not trial.started_at or not trial.finished_at:
        return 0.0
    return max(0.0, (parse_timestamp(trial.finished_at) - parse_timestamp(trial.started_at)).total_seconds())


def _records(report: Report, trial: Trial | None) -> tuple[str, list[CaseRecord] | None]:
    full = report.outputs.get(trial.id) if trial is not None else None
    if full is None:
        return "", None
    return split_output(full.stdout or "")


_RESULT_TAG: Final = {"failed": "failure", "error": "error", "skipped": "skipped", "xfailed": "skipped"}


def _result_elements(case: Case, human: str) -> Iterable[tuple[str, str, str, str]]:
    """(tag, message, text, phase) of each non-passing result of a case."""
    for record in case.results:
        tag = _RESULT_TAG.get(record.outcome)
        if tag is None:
            continue
        text = failure_text(human, case.nodeid, record.when) if tag != "skipped" else None
        yield tag, record.message[:MAX_MESSAGE], text or record.message, record.when


def _add_cases(
    suite: ET.Element, cases: list[Case], human: str, history: dict[str, list[tuple[str, str, str, str]]]
) -> None:
    twinned = {nodeid for nodeid, count in collections.Counter(case.nodeid for case in cases).items() if count > 1}
    written: set[str] = set()  # node ids of pairs whose first case is written
    for case in cases:
        element = _el(
            suite, "testcase", classname=case.classname, name=case.name, file=case.file, time=f"{case.time_s:.3f}"
        )
        for tag, message, text, _ in _result_elements(case, human):
            attrs = {"message": message}
            if tag == "skipped":
                attrs["type"] = "pytest.xfail" if any(r.outcome == "xfailed" for r in case.results) else "pytest.skip"
            _el(element, tag, text, **attrs)
        final_failed = case.verdict in ("failure", "error")
        earlier = history.get(case.nodeid, [])
        if case.nodeid in twinned:
            # pytest's pair of cases for a failed call and a teardown error: each takes the earlier failures of
            # its own phases (the teardown case those of the teardown, the other case the rest).
            teardown_case = case.nodeid in written
            written.add(case.nodeid)
            earlier = [entry for entry in earlier if (entry[3] == "teardown") == teardown_case]
        for tag, message, text, _ in earlier:
            kind = "Failure" if tag == "failure" else "Error"
            _el(element, f"{'rerun' if final_failed else 'flaky'}{kind}", text, message=message)


def _history(report: Report, task: TaskRecord) -> dict[str, list[tuple[str, str, str, str]]]:
    """Failures of each case in the file's earlier failed attempts, by node id: (tag, message, text, phase)."""
    found: dict[str, list[tuple[str, str, str, str]]] = {}
    for trial in earlier_failures(task):
        human, records = _records(report, trial)
        for case in group_cases(records or []):
            for element in _result_elements(case, human):
                if element[0] in ("failure", "error"):
                    found.setdefault(case.nodeid, []).append(element)
    return found


def _file_case(suite: ET.Element, task: TaskRecord, trial: Trial | None, human: str) -> Case:
    classname, _ = mangle(task.spec_path)
    case = Case(task.spec_path, classname, os.path.basename(task.spec_path), task.spec_path, _seconds(trial))
    element = _el(
        suite, "testcase", classname=classname, name=case.name, file=task.spec_path, time=f"{case.time_s:.3f}"
    )
    status = trial.status if trial is not None else None
    if task.status == "failed":
        tag = "failure" if status == "failed" else "error"
        _el(element, tag, human, message=f"the file {status or 'did not finish'}")
        case.results.append(CaseRecord(task.spec_path, "failed" if tag == "failure" else "error"))
    elif task.status == "pending":
        _el(element, "skipped", message="no test passed or failed", type="pytest.skip")
        case.results.append(CaseRecord(task.spec_path, "skipped"))
    elif task.status is None:
        _el(element, "skipped", message="not run: the taskset ended first", type="testfleet.not_run")
        case.results.append(CaseRecord(task.spec_path, "skipped"))
    return case


def build_xml(report: Report) -> ET.ElementTree[ET.Element]:
    ts = report.taskset
    root = ET.Element("testsuites", {"name": xml_text(f"testfleet {ts.taskset_class}".strip())})
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    total_time = 0.0
    for task in report.tasks:
        trial = final_trial(task)
        human, records = _records(report, trial)
        suite = _el(root, "testsuite", name=task.spec_path)
        properties = _el(suite, "properties")
        _el(properties, "property", name="testfleet.task_id", value=str(task.id))
        _el(properties, "property", name="testfleet.status", value=task.status or "not run")
        _el(
            properties, "property", name="testfleet.attempts", value=str(sum(t.status is not None for t in task.trials))
        )
        for number, attempt in enumerate(sorted(task.trials, key=lambda t: t.id), 1):
            tally = f"{attempt.passed or 0} passed, {attempt.pending or 0} pending, {attempt.failed or 0} failed"
            _el(
                properties,
                "property",
                name=f"testfleet.attempt.{number}",
                value=f"{attempt.status or 'running'} ({tally})",
            )
        if records is not None and (records or task.status != "failed"):
            cases = group_cases(records)
            _add_cases(suite, cases, human, _history(report, task))
            if task.status == "failed" and not any(c.verdict in ("failure", "error") for c in cases):
                # The file failed outside any test (killed, timed out between tests): say so once.
                cases.append(_file_case(suite, task, trial, human))
        else:
            cases = [_file_case(suite, task, trial, human)]
        counts = {
            "tests": len(cases),
            "failures": sum(c.verdict == "failure" for c in cases),
            "errors": sum(c.verdict == "error" for c in cases),
            "skipped": sum(c.verdict == "skipped" for c in cases),
        }
        seconds = _seconds(trial)
        total_time += seconds
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
        suite.set("time", f"{seconds:.3f}")
        if trial is not None and trial.started_at:
            suite.set("timestamp", trial.started_at)
        if task.status == "failed" and trial is not None:
            full = report.outputs.get(trial.id)
            if human.strip():
                _el(suite, "system-out", human)
            if full is not None and (full.stderr or "").strip():
                _el(suite, "system-err", full.stderr or "")
    for key, value in totals.items():
        root.set(key, str(value))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(report: Report, path: Path) -> None:
    """Write the report atomically (a temporary file renamed over `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    build_xml(report).write(tmp, encoding="utf-8", xml_declaration=True)
    os.replace(tmp, path)
