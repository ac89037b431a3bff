"""Reports of a ``mtekvm run``: the human table, the summary line, JSON, JUnit XML and TAP.

Everything here is a pure function of the results (:class:`mtekvm.runner.ScenarioResult`) and of
:class:`Problem` records for the files that did not run to a result (invalid, refused, the
infrastructure failed, interrupted); the CLI decides what to print where. The JSON schema is
documented in ``docs/scenarios.md`` ("JSON report") and versioned by :data:`JSON_SCHEMA`.
"""

from __future__ import annotations

import json
import os
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

import attrs

from mtekvm.runner import ScenarioResult

#: The table, and the lines around it, fit in this many columns (schedules and replay commands
#: excepted: they must stay copyable).
WIDTH = 100
#: Violations printed per invariant in the table (the JSON has all of them).
VIOLATIONS_SHOWN = 5
#: Identifies the JSON report's layout; bumped when a field changes meaning or goes away.
JSON_SCHEMA = "mtekvm-report/1"

#: Exit statuses, each meaning one thing (docs/scenarios.md, "Exit status").
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INFRA, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@attrs.frozen
class Problem:
    """A file that did not run to a result.

    ``kind`` is ``invalid`` (not a valid scenario, or options it cannot run with: exit 2),
    ``infrastructure`` (a host or VMM failed: exit 3), ``interrupted`` (exit 130) or
    ``setup-failed`` (a ``[vms]`` VM could not be built: counted as failed, exit 1).
    """

    path: str
    kind: str
    message: str
    name: str | None = None


def exit_status(results: Iterable[ScenarioResult], problems: Iterable[Problem]) -> int:
    """The one exit status: interrupted > infrastructure > invalid > failed > all held."""
    kinds = {p.kind for p in problems}
    if "interrupted" in kinds:
        return EXIT_INTERRUPTED
    if "infrastructure" in kinds:
        return EXIT_INFRA
    if "invalid" in kinds:
        return EXIT_USAGE
    if "setup-failed" in kinds:
        return EXIT_FAILED
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAILED


def fmt_value(v: Any, limit: int = 40) -> str:
    """A value as the table shows it: big ints in hex, long lists cut, long strings cut."""
    if v is None:
        return ""
    if isinstance(v, dict):
        s = "{" + ", ".join(f"{k}={fmt_value(x, limit)}" for k, x in v.items()) + "}"
    elif isinstance(v, int) and not isinstance(v, bool) and v > 0xFFFF:
        s = hex(v)
    elif isinstance(v, list) and len(v) > 8:
        s = "[" + ", ".join(map(str, v[:8])) + f", ... ({len(v)})]"
    else:
        s = str(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _cut(s: str, width: int) -> str:
    return s if len(s) <= width else s[:max(width - 3, 0)] + "..."


def _wrap(text: str, indent: str, width: int = WIDTH) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "    ",
                         break_long_words=True, break_on_hyphens=False) or [indent]


def table_rows(r: ScenarioResult, width: int = WIDTH) -> list[str]:
    """The step table, every line at most ``width`` columns: step, actor, op, expected, got, ok."""
    rows = [["step", "actor", "op", "expected", "got", ""]]
    for s in r.steps:
        got = s.outcome if s.value is None else f"{s.outcome} {fmt_value(s.value)}"
        rows.append([s.index, s.actor, s.op, fmt_value(s.expect) if s.expect is not None else "-", got,
                     ("ok" if s.passed else "FAIL") + (" *" if s.note else "")])
    widths = [max(len(str(row[i])) for row in rows) for i in range(6)]
    floor = [4, 5, 4, 8, 8, 6]
    # shrink the widest shrinkable column until the line fits: 2 indent + 5 gaps of 2
    while 2 + sum(widths) + 10 > width:
        i = max((1, 2, 3, 4), key=lambda j: widths[j] - floor[j])
        if widths[i] <= floor[i]:
            break
        widths[i] -= 1
    out = []
    for row in rows:
        cells = [_cut(str(c), w).ljust(w) for c, w in zip(row, widths, strict=False)]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out


def result_lines(r: ScenarioResult, width: int = WIDTH) -> list[str]:
    """The human report of one scenario: heading, table, failure reasons, notes, violations."""
    lines = [_cut(f"== {r.name}", width), _cut(f"   {r.path}, scheduler {r.scheduler}", width)]
    lines += table_rows(r, width)
    for s in r.steps:
        if not s.passed and s.message:
            lines += _wrap(f"step {s.index}: {s.message}", "  ", width)
        if s.note:
            lines += _wrap(f"* step {s.index}: {s.note}", "  ", width)
    shown: dict[str, int] = {}
    for v in r.violations:
        n = shown[v["invariant"]] = shown.get(v["invariant"], 0) + 1
        if n <= VIOLATIONS_SHOWN:
            who = f" [{v['actor']}]" if v.get("actor") else ""
            lines += _wrap(f"VIOLATION {v['invariant']}: {v['message']}{who}", "  ", width)
    for inv, n in shown.items():
        if n > VIOLATIONS_SHOWN:
            lines.append(f"  ... and {n - VIOLATIONS_SHOWN} more {inv} (all of them in --json)")
    if r.expect_violations:
        lines += _wrap(f"expected violations: {', '.join(r.expect_violations)}", "  ", width)
    step_failures = {f"step {s.index} " for s in r.steps if not s.passed}
    for f in r.failures:
        if not any(f.startswith(p) for p in step_failures):
            lines += _wrap(f"FAILED: {f}", "  ", width)
    if r.replay_command:
        lines.append(f"  schedule: {r.schedule or '(default order)'}")
        lines.append(f"  replay:   {r.replay_command}")
    return lines


def summary_line(results: list[ScenarioResult], problems: list[Problem], duration: float) -> str:
    """``P passed, F failed[, I invalid, E infrastructure errors][, interrupted] (N scenarios, S steps, T s)``."""
    passed = sum(r.passed for r in results)
    setup_failed = sum(p.kind == "setup-failed" for p in problems)
    parts = [f"{passed} passed", f"{len(results) - passed + setup_failed} failed"]
    for kind, label in (("invalid", "invalid"), ("infrastructure", "infrastructure errors")):
        n = sum(p.kind == kind for p in problems)
        if n:
            parts.append(f"{n} {label}")
    if any(p.kind == "interrupted" for p in problems):
        parts.append("interrupted")
    steps = sum(len(r.steps) for r in results)
    return f"{', '.join(parts)} ({len(results)} scenarios, {steps} steps, {duration:.1f}s)"


def _json_default(o):
    if isinstance(o, (bytes, bytearray)):
        return o.hex()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    return repr(o)


def json_report(results: list[ScenarioResult], problems: list[Problem], *, version: str, argv: list[str],
                status: int, duration: float) -> dict:
    """The ``--json`` document (schema :data:`JSON_SCHEMA`, documented in docs/scenarios.md)."""
    passed = sum(r.passed for r in results)
    return {
        "schema": JSON_SCHEMA,
        "mtekvm": version,
        "argv": list(argv),
        "exit_status": status,
        "summary": {
            "scenarios": len(results), "passed": passed,
            "failed": len(results) - passed + sum(p.kind == "setup-failed" for p in problems),
            "invalid": sum(p.kind == "invalid" for p in problems),
            "infrastructure_errors": sum(p.kind == "infrastructure" for p in problems),
            "interrupted": any(p.kind == "interrupted" for p in problems),
            "steps": sum(len(r.steps) for r in results), "duration": round(duration, 6),
        },
        "scenarios": [r.to_json() for r in results],
        "problems": [{"path": p.path, "kind": p.kind, "message": p.message, "name": p.name} for p in problems],
    }


def dump_json(doc: dict, f) -> None:
    """Write a report document (bytes as hex, tuples as lists)."""
    json.dump(doc, f, indent=2, default=_json_default)
    f.write("\n")


def junit_xml(results: list[ScenarioResult], problems: list[Problem], duration: float) -> ET.ElementTree:
    """JUnit XML as CI servers read it: one ``<testcase>`` per scenario run or file that did not run;
    a failed scenario has ``<failure>``, a file that did not run ``<error>``."""
    failures = sum(not r.passed for r in results)
    errors = len(problems)
    suites = ET.Element("testsuites", name="mtekvm", tests=str(len(results) + errors),
                        failures=str(failures), errors=str(errors), time=f"{duration:.3f}")
    suite = ET.SubElement(suites, "testsuite", name="mtekvm run", tests=str(len(results) + errors),
                          failures=str(failures), errors=str(errors), skipped="0", time=f"{duration:.3f}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=r.path, name=r.name, time=f"{r.duration:.3f}")
        if not r.passed:
            first = r.failures[0] if r.failures else "failed"
            fail = ET.SubElement(case, "failure", message=first, type="expectation")
            fail.text = "\n".join(result_lines(r))
        out = ET.SubElement(case, "system-out")
        out.text = "\n".join(table_rows(r))
    for p in problems:
        case = ET.SubElement(suite, "testcase", classname=p.path, name=p.name or p.path, time="0")
        err = ET.SubElement(case, "error", message=p.message, type=p.kind)
        err.text = p.message
    ET.indent(suites)
    return ET.ElementTree(suites)


def tap_lines(number: int, result: ScenarioResult | None = None, problem: Problem | None = None) -> list[str]:
    """One TAP test point (``ok N - ...`` / ``not ok N - ...``) and its ``#`` diagnostics."""
    if result is not None:
        head = f"{'ok' if result.passed else 'not ok'} {number} - {result.name} ({result.path})"
        if result.passed:
            return [head]
        return [head] + [f"# {line}" if line else "#" for line in result_lines(result)]
    assert problem is not None
    return [f"not ok {number} - {problem.name or problem.path} ({problem.path}): {problem.kind}",
            f"# {problem.message}"]


def check_writable(opt: str, path: str, error: type[Exception]) -> None:
    """Can ``path`` be written? Tried up front, so that a bad path is not found after a long run.

    Raises:
        error: with a one-line reason (``OPT PATH: is a directory`` / ``cannot write: ...``).
    """
    existed = os.path.exists(path)
    if os.path.isdir(path):
        raise error(f"{opt} {path}: is a directory")
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise error(f"{opt} {path}: cannot write: {exc.strerror or exc}") from None
    if not existed:
        os.unlink(path)
