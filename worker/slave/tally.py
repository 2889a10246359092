"""One file's trial in the making: counts and output from pytest's reports, and the trial status they imply."""

from __future__ import annotations

import json
from typing import Final

import pytest

from protocol.messages import CASES_MARKER
from protocol.types import TrialStatus
from worker.slave.output import MAX_OUTPUT_BYTES, bound_text, bound_with_block, encodable
from worker.slave.source import FileResult

# pytest's report categories (the words of its summary line) and the count each one feeds.
COUNT_OF_CATEGORY: Final[dict[str, str]] = {
    "passed": "passed",
    "xpassed": "passed",
    "skipped": "pending",
    "xfailed": "pending",
    "failed": "failed",
    "error": "failed",
}

# The case block (see `FileTally.cases_block`) keeps at most this many records and bytes, so that the
# tail that output truncation keeps always holds it whole.
MAX_CASE_RECORDS: Final = 10_000
MAX_CASES_BYTES: Final = MAX_OUTPUT_BYTES // 4
MAX_MESSAGE_CHARS: Final = 500


def decide_status(*, timed_out: bool, load_error: bool, passed: int, pending: int, failed: int) -> TrialStatus:
    """PROTOCOL.md §7, plus: a file that ran nothing at all is `pending` (not run, not wrong)."""
    if timed_out:
        return TrialStatus.TIMEOUT
    if load_error:
        return TrialStatus.ERROR
    if failed:
        return TrialStatus.FAILED
    if pending or not passed:
        return TrialStatus.PENDING
    return TrialStatus.PASSED


def _header(title: str) -> str:
    return f"{'_' * 20} {title} {'_' * 20}\n"


def _section(title: str, content: str) -> str:
    return f"{'-' * 10} {title} {'-' * 10}\n{_ends_line(content)}"


def _ends_line(text: str) -> str:
    return text if not text or text.endswith("\n") else text + "\n"


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def _crash_line(text: str) -> str:
    """The line that says what went wrong: the last `E` line of a traceback, else its last line."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return errors[-1] if errors else lines[-1] if lines else ""


def report_message(report: pytest.TestReport | pytest.CollectReport, category: str) -> str:
    """The short reason of a report: a skip's or xfail's reason, a failure's crash line; "" for a pass."""
    if category in ("xfailed", "xpassed"):
        return _short(str(getattr(report, "wasxfail", "")))
    longrepr = report.longrepr
    if category == "skipped":
        if isinstance(longrepr, tuple) and len(longrepr) == 3:
            reason = str(longrepr[2])
            return _short(reason.removeprefix("Skipped: "))
        return _short(report.longreprtext)
    if category in ("failed", "error"):
        crash = getattr(longrepr, "reprcrash", None)
        message = getattr(crash, "message", None)
        return _short(message if isinstance(message, str) and message else _crash_line(report.longreprtext))
    return ""


class FileTally:
    """Feeds on the reports of one file's collection and tests; see `result`."""

    def __init__(self, spec_path: str) -> None:
        self.spec_path = spec_path
        self.passed = 0
        self.pending = 0
        self.failed = 0
        self.load_error = False
        self.deselected = 0
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._failing: list[pytest.TestReport] = []
        self._cases: list[str] = []
        self._cases_bytes = 0
        self._cases_left_out = 0

    def add_case(self, nodeid: str, when: str, outcome: str, duration_s: float = 0.0, message: str = "") -> None:
        """One record of the case block; those past its caps are only counted."""
        record: dict[str, object] = {
            "nodeid": nodeid,
            "when": when,
            "outcome": outcome,
            "duration_s": round(max(duration_s, 0.0), 6),
        }
        if message:
            record["message"] = message
        line = json.dumps(record) + "\n"
        if len(self._cases) >= MAX_CASE_RECORDS or self._cases_bytes + len(line) > MAX_CASES_BYTES:
            self._cases_left_out += 1
            return
        self._cases.append(line)
        self._cases_bytes += len(line)

    def cases_block(self) -> str:
        """The marker line and the records (JSON, so ASCII: its length is its size in bytes)."""
        return f"{CASES_MARKER}\n" + "".join(self._cases)

    def add_collect_report(self, report: pytest.CollectReport) -> None:
        """A failed collector errors the file (one failure, as pytest counts one error); a skipped one is pending."""
        nodeid = report.nodeid or self.spec_path
        duration = float(getattr(report, "duration", 0.0) or 0.0)
        if report.failed:
            self.add_case(nodeid, "collect", "error", duration, report_message(report, "error"))
            self.load_error = True
            self.failed += 1
            title = f"ERROR collecting {report.nodeid or self.spec_path}"
            self._stdout.append(_header(title) + _ends_line(report.longreprtext))
            self._add_sections(title, report.sections)
        elif report.skipped:
            self.add_case(nodeid, "collect", "skipped", duration, report_message(report, "skipped"))
            self.pending += 1

    def add_test_report(self, report: pytest.TestReport, category: str) -> None:
        """Count `report` by its summary category; a test's output is kept once its teardown report is in."""
        count = COUNT_OF_CATEGORY.get(category)
        if count is not None:
            self.add_case(report.nodeid, report.when, category, report.duration, report_message(report, category))
        if count == "passed":
            self.passed += 1
        elif count == "pending":
            self.pending += 1
        elif count == "failed":
            self.failed += 1
        if report.failed:
            self._failing.append(report)
        if report.when == "teardown":
            if self._failing:
                for failing in self._failing:
                    title = failing.nodeid if failing.when == "call" else f"ERROR at {failing.when} of {failing.nodeid}"
                    self._stdout.append(_header(title) + _ends_line(failing.longreprtext))
                # Each phase's report repeats the sections of the earlier phases: the last one has them all.
                self._add_sections(report.nodeid, report.sections)
            self._failing = []

    def add_error(self, title: str, text: str, *, when: str = "teardown", message: str = "") -> None:
        """A failure outside any test (a teardown at the end of the file): counted as one failure,
        recorded as an error of the file."""
        self.add_case(self.spec_path, when, "error", message=_short(message or _crash_line(text)))
        self.failed += 1
        self._stdout.append(_header(title) + _ends_line(text))

    def add_load_error(self, title: str, text: str) -> None:
        """The file could not be collected, beyond what a collect report said."""
        if not self.load_error:
            self.add_case(self.spec_path, "collect", "error", message=_short(_crash_line(text)))
            self.failed += 1
        self.load_error = True
        self._stdout.append(_header(title) + _ends_line(text))

    def note(self, text: str) -> None:
        """A line of our own in the trial's stdout."""
        self._stdout.append(f"testfleet: {text}\n")

    def _add_sections(self, title: str, sections: list[tuple[str, str]]) -> None:
        err = [_section(name, content) for name, content in sections if "stderr" in name and content]
        out = [_section(name, content) for name, content in sections if "stderr" not in name and content]
        self._stdout.extend(out)
        if err:
            self._stderr.append(_header(title) + "".join(err))

    def result(self, *, timed_out: bool, extra_stdout: str = "") -> FileResult:
        """The trial's result as it stands; its stdout ends with the case block, whole."""
        if self._cases_left_out:
            self.note(f"{self._cases_left_out} case records left out; the block keeps the first {len(self._cases)}")
            self._cases_left_out = 0
        status = decide_status(
            timed_out=timed_out,
            load_error=self.load_error,
            passed=self.passed,
            pending=self.pending,
            failed=self.failed,
        )
        return FileResult(
            status=status,
            passed=self.passed,
            pending=self.pending,
            failed=self.failed,
            stdout=encodable(bound_with_block("".join(self._stdout) + extra_stdout, self.cases_block())),
            stderr=encodable(bound_text("".join(self._stderr))),
        )
