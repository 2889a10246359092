"""One file's trial in the making: counts and output from pytest's reports, and the trial status they imply."""

from __future__ import annotations

from typing import Final

import pytest

from protocol.types import TrialStatus
from worker.slave.output import bound_text
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

    def add_collect_report(self, report: pytest.CollectReport) -> None:
        """A failed collector errors the file (one failure, as pytest counts one error); a skipped one is pending."""
        if report.failed:
            self.load_error = True
            self.failed += 1
            title = f"ERROR collecting {report.nodeid or self.spec_path}"
            self._stdout.append(_header(title) + _ends_line(report.longreprtext))
            self._add_sections(title, report.sections)
        elif report.skipped:
            self.pending += 1

    def add_test_report(self, report: pytest.TestReport, category: str) -> None:
        """Count `report` by its summary category; a test's output is kept once its teardown report is in."""
        count = COUNT_OF_CATEGORY.get(category)
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

    def add_error(self, title: str, text: str) -> None:
        """A failure outside any test (a teardown at the end of the file): counted as one failure."""
        self.failed += 1
        self._stdout.append(_header(title) + _ends_line(text))

    def add_load_error(self, title: str, text: str) -> None:
        """The file could not be collected, beyond what a collect report said."""
        if not self.load_error:
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
        """The trial's result as it stands."""
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
            stdout=bound_text("".join(self._stdout) + extra_stdout),
            stderr=bound_text("".join(self._stderr)),
        )
