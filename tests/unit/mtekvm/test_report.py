"""Unit tests for mtekvm.report and the runner's judging: tables, diffs, exit status, JSON, JUnit, TAP."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from mtekvm import report
from mtekvm.report import Problem
from mtekvm.runner import ScenarioResult, StepResult, check_expect, judge_violations, list_diff, value_mismatch
from mtekvm.scenario import Expect


def step(index="1", actor="p", op="ldg", expect=None, outcome="ok", value=None, passed=True, message="",
         note="") -> StepResult:
    return StepResult(index, actor, op, expect, outcome, value, passed, message, note, 0.01)


def result(name="s", passed=True, steps=(), violations=(), failures=(), path="a.toml") -> ScenarioResult:
    return ScenarioResult(name, path, passed, tuple(steps), tuple(violations), "free",
                          failures=tuple(failures), duration=0.5)


LONG = result("a scenario whose name is long enough to need cutting " * 3, False, [
    step("12.3", "guest:a-virtual-machine-with-a-long-name:7", "ptrace-poke-tags",
         {"outcome": "ok", "value": {"length": 4096, "tags": list(range(16)) * 16}}, "ok",
         {"length": 4096, "tags": [0] * 256}, False, "value.tags: 240 of 256 items differ"),
    step("1", "p", "load", "tag-check-fault", "ok", "ab" * 400, False),
], failures=["step 12.3 (x y): differs"], path="/a/very/long/path/" * 8 + "x.toml")


class TestTable:
    def test_every_line_fits_in_100_columns(self):
        """The table and the lines around it stay within 100 columns even with long names and values."""
        lines = report.result_lines(LONG)
        assert lines and max(len(ln) for ln in lines) <= report.WIDTH, max(lines, key=len)

    def test_table_keeps_the_columns(self):
        """The table shows step, actor, op, expected, got and ok/FAIL for every step."""
        rows = report.table_rows(LONG)
        assert rows[0].split() == ["step", "actor", "op", "expected", "got"]
        assert len(rows) == 3 and rows[1].endswith("FAIL") and "12.3" in rows[1]

    def test_note_is_marked_and_explained(self):
        """A step with a note is marked '*' in the table and its note printed below."""
        r = result(steps=[step(op="stg", note="ignored: SCTLR_EL1.ATA is 0")])
        lines = report.result_lines(r)
        assert any(ln.endswith("ok *") for ln in lines)
        assert any("* step 1: ignored: SCTLR_EL1.ATA is 0" in ln for ln in lines)

    def test_violations_summarised_per_invariant(self):
        """More than five violations of one invariant print five and a count of the rest."""
        vs = [{"invariant": "INIT-ONCE", "message": f"m{i}", "actor": ""} for i in range(8)]
        lines = report.result_lines(result(passed=False, violations=vs))
        assert sum("VIOLATION INIT-ONCE" in ln for ln in lines) == 5
        assert any("3 more INIT-ONCE" in ln for ln in lines)


class TestDiff:
    def test_long_lists_are_diffed_by_runs(self):
        """Two long lists differing in one run and one item show the runs and the count, not the lists."""
        want = [5] * 256
        got = [5] * 4 + [0] * 60 + [5] * 191 + [9]
        d = list_diff(want, got)
        assert "61 of 256 items differ" in d
        assert "[4..63]: expected 5, got 0" in d and "[255]: expected 5, got 9" in d
        assert len(d) < 200

    def test_length_difference_is_said(self):
        """Lists of different lengths say both lengths."""
        assert "expected 20 items, got 16" in list_diff([1] * 20, [1] * 16)

    def test_short_lists_are_shown_whole(self):
        """Short lists are printed in full."""
        assert list_diff([1, 2], [1, 3]) == "expected [1, 2], got [1, 3]"


class TestCompare:
    def test_table_compared_on_listed_keys(self):
        """A table in expect passes when the keys it lists match; other keys of the result are ignored."""
        got = {"present": True, "tagged": True, "locked": False, "new-key": 3}
        assert value_mismatch({"tagged": True}, got) is None
        assert "value.tagged" in value_mismatch({"tagged": False}, got)
        assert "missing" in value_mismatch({"absent": 1}, got)

    def test_nested_tables(self):
        """Nested tables are compared the same way, on the keys listed."""
        got = {"a": {"b": 1, "c": 2}, "d": 3}
        assert value_mismatch({"a": {"b": 1}}, got) is None
        assert value_mismatch({"a": {"c": 9}}, got) == "value.a.c: expected 9, got 2"

    def test_scalar_tag_means_every_granule(self):
        """value = 5 for ldg (and for a copy-tags 'tags' key) means 5 in every granule; other lists are whole."""
        assert check_expect(Expect("ok", 5, True), "ok", [5, 5, 5, 5], "ldg") is None
        assert check_expect(Expect("ok", 5, True), "ok", [5, 5, 0, 5], "ldg") is not None
        assert check_expect(Expect("ok", {"tags": 7}, True), "ok", {"length": 32, "tags": [7, 7]},
                            "copy-tags") is None
        assert check_expect(Expect("ok", 3, True), "ok", [3], "dirty-log") is not None

    def test_lists_compared_whole_and_bools_are_not_ints(self):
        """A shorter expected list fails, and true does not match 1."""
        assert value_mismatch([1, 2], [1, 2, 3]) is not None
        assert value_mismatch(True, 1) is not None
        assert value_mismatch("00FF", "00ff") is None

    def test_outcome_mismatch_message(self):
        """A different outcome is said plainly."""
        assert check_expect(Expect("EINVAL"), "ok", None, "munmap") == "expected outcome EINVAL, got ok"


class TestExpectViolations:
    def test_exact_set_passes(self):
        """The listed invariants broke and nothing else: no failure, whatever the spelling."""
        vs = [{"invariant": "GUEST-VISIBLE=>TAGGED"}, {"invariant": "TAGS-AS-WRITTEN"}]
        assert judge_violations(vs, ("GUEST-VISIBLE-IMPLIES-TAGGED", "TAGS-AS-WRITTEN")) == []

    def test_missing_and_unexpected(self):
        """An expected invariant that did not break, and one that broke unexpectedly, are both failures."""
        out = judge_violations([{"invariant": "INIT-ONCE"}], ("SWAP-ROUND-TRIP",))
        assert any("SWAP-ROUND-TRIP was expected to break" in f for f in out)
        assert any("broke: INIT-ONCE" in f for f in out)

    def test_none_expected_none_broke(self):
        """No violations and none expected: no failure; a violation with none expected is one."""
        assert judge_violations([], ()) == []
        assert judge_violations([{"invariant": "INIT-ONCE"}], ()) != []


class TestExitStatus:
    @pytest.mark.parametrize("passed, kinds, status", [
        ([True], [], 0), ([True, False], [], 1), ([True], ["invalid"], 2), ([False], ["invalid"], 2),
        ([], ["invalid", "infrastructure"], 3), ([False], ["infrastructure", "interrupted"], 130)])
    def test_priority(self, passed, kinds, status):
        """Exit status: interrupted over infrastructure over invalid over failed over all held."""
        results = [result(passed=p) for p in passed]
        problems = [Problem("f", k, "m") for k in kinds]
        assert report.exit_status(results, problems) == status


class TestMachineReadable:
    def test_json_report_fields(self):
        """The JSON report has its schema, a summary, every scenario with path and duration, and the problems."""
        doc = report.json_report([result(), LONG], [Problem("bad.toml", "invalid", "bad.toml: key 'x'")],
                                 version="9.9", argv=["run", "x"], status=2, duration=1.5)
        assert doc["schema"] == report.JSON_SCHEMA and doc["exit_status"] == 2 and doc["mtekvm"] == "9.9"
        assert doc["summary"] == {"scenarios": 2, "passed": 1, "failed": 1, "invalid": 1,
                                  "infrastructure_errors": 0, "interrupted": False, "steps": 2,
                                  "duration": 1.5}
        s = doc["scenarios"][1]
        assert s["path"] == LONG.path and s["duration"] == 0.5 and s["failures"] == list(LONG.failures)
        assert {"index", "actor", "op", "expect", "outcome", "value", "passed", "message", "note",
                "duration"} <= set(s["steps"][0])
        assert doc["problems"] == [{"path": "bad.toml", "kind": "invalid", "message": "bad.toml: key 'x'",
                                    "name": None}]

    def test_junit_counts_and_elements(self):
        """JUnit XML: one testcase per result or problem, failure for a failed scenario, error for a problem."""
        tree = report.junit_xml([result(), LONG], [Problem("bad.toml", "invalid", "nope")], 2.0)
        root = ET.fromstring(ET.tostring(tree.getroot()))
        suite = root.find("testsuite")
        assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
        cases = suite.findall("testcase")
        assert [c.get("classname") for c in cases] == ["a.toml", LONG.path, "bad.toml"]
        assert cases[0].find("failure") is None and cases[1].find("failure") is not None
        assert cases[2].find("error").get("message") == "nope"

    def test_tap_points(self):
        """TAP: 'ok N - name' for a pass; 'not ok N' with '#' diagnostics for a failure or a problem."""
        assert report.tap_lines(1, result("good")) == ["ok 1 - good (a.toml)"]
        bad = report.tap_lines(2, LONG)
        assert bad[0].startswith("not ok 2 - ") and all(ln.startswith("#") for ln in bad[1:])
        prob = report.tap_lines(3, problem=Problem("x.toml", "invalid", "x.toml: broken"))
        assert prob[0].startswith("not ok 3 - x.toml") and prob[1] == "# x.toml: broken"


class TestBootExtras:
    def test_only_non_default_host_settings_are_sent(self):
        """boot gets tcf_preferred, kernel_fixes and fault_replay_limit only when they differ from Linux's defaults."""
        from mtekvm.runner import boot_extras
        from mtekvm.scenario import HostSpec
        assert boot_extras(HostSpec("h")) == {}
        assert boot_extras(HostSpec("h", tcf_preferred="asymm", kernel_fixes=("sanitise-whole-hugetlb-folio",),
                                    fault_replay_limit=5)) == {
            "tcf_preferred": "asymm", "kernel_fixes": ["sanitise-whole-hugetlb-folio"], "fault_replay_limit": 5}
