"""The per-test records a pytest slave may append to a trial's stdout, and pytest's rules for turning them into cases.

The block, at the very end of the trial's stdout (so that output truncation, which keeps the head and
the tail, leaves it whole):

    [testfleet:cases]
    {"nodeid": "tests/t.py::test_ok", "when": "call", "outcome": "passed", "duration_s": 0.01}
    {"nodeid": "tests/t.py::test_no", "when": "call", "outcome": "failed", "duration_s": 0.2, "message": "assert 0"}

One line per report pytest counts in its summary, in the order pytest made them: `outcome` is the
report's summary category (passed, failed, skipped, xfailed, xpassed, error); `when` is collect,
setup, call or teardown; `message` is the short reason (a skip's or xfail's reason, a failure's
crash line). So the lines of each outcome add up to the trial's passed / pending / failed counts,
and the cases built from them (`group_cases`) are the test cases pytest's own JUnit XML lists.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Final

import msgspec

from protocol.messages import CASES_MARKER, split_cases_block

MARKER: Final = CASES_MARKER
OUTCOMES: Final = frozenset({"passed", "failed", "skipped", "xfailed", "xpassed", "error"})
_HEADER: Final = re.compile(r"^_{5,} (?P<title>.+?) _{5,}$", re.MULTILINE)


class CaseRecord(msgspec.Struct, frozen=True):
    nodeid: str
    outcome: str
    when: str = "call"
    duration_s: float = 0.0
    message: str = ""


_DECODER: Final = msgspec.json.Decoder(CaseRecord)


def split_output(stdout: str) -> tuple[str, list[CaseRecord] | None]:
    """The human part of a trial's stdout, and its case records (`None` when the slave wrote none)."""
    human, block = split_cases_block(stdout)
    if not block:
        return stdout, None
    block = block[len(MARKER) + 1 :]
    records: list[CaseRecord] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        try:
            record = _DECODER.decode(line)
        except msgspec.ValidationError:
            continue
        except msgspec.DecodeError:
            # msgspec refuses lone surrogates (`\ud800`), which text cut from a test's output may hold.
            try:
                record = msgspec.convert(json.loads(line), CaseRecord)
            except (ValueError, msgspec.ValidationError):
                continue
        if record.outcome in OUTCOMES:
            records.append(record)
    return human, records


@dataclass
class Case:
    """One JUnit test case: pytest's classname and name, and what happened to it."""

    nodeid: str
    classname: str
    name: str
    file: str
    time_s: float = 0.0
    results: list[CaseRecord] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """failure, error, skipped or passed, the worst of its results."""
        outcomes = {r.outcome for r in self.results}
        if "error" in outcomes:
            return "error"
        if "failed" in outcomes:
            return "failure"
        if outcomes & {"skipped", "xfailed"}:
            return "skipped"
        return "passed"


def mangle(nodeid: str) -> tuple[str, str]:
    """pytest's JUnit classname and name of a node id (`tests/test_a.py::TestX::test_y[1]`)."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def group_cases(records: list[CaseRecord]) -> list[Case]:
    """Cases in pytest's JUnit order: one per node, and a second one when a failed call is followed by a
    teardown error (pytest reports that pair as two cases)."""
    cases: list[Case] = []
    open_cases: dict[str, Case] = {}
    for record in records:
        case = open_cases.get(record.nodeid)
        if (
            case is not None
            and record.when == "teardown"
            and record.outcome == "error"
            and any(r.outcome == "failed" and r.when == "call" for r in case.results)
        ):
            case = None
        if case is None:
            classname, name = mangle(record.nodeid)
            case = Case(record.nodeid, classname, name, record.nodeid.split("::", 1)[0])
            cases.append(case)
            open_cases[record.nodeid] = case
        case.results.append(record)
        case.time_s += max(0.0, record.duration_s)
    return cases


def failure_text(human_output: str, nodeid: str, when: str) -> str | None:
    """The slave's report of one failure, found by its section title in the trial's output."""
    titles = {nodeid} if when == "call" else {f"ERROR at {when} of {nodeid}", f"ERROR collecting {nodeid}"}
    if when == "collect":
        titles.add(f"ERROR collecting {nodeid}")
    headers = list(_HEADER.finditer(human_output))
    for index, match in enumerate(headers):
        if match.group("title") in titles:
            end = headers[index + 1].start() if index + 1 < len(headers) else len(human_output)
            return human_output[match.end() + 1 : end].rstrip("\n")
    return None
