"""End-to-end: the installed ``mtekvm`` console command on small scenario files."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MTEKVM = BIN / "mtekvm"
CLI_TIMEOUT = 60

PASSING = """
name = "tags round trip"

[processes.p]

[[steps]]
actor = "p"
op = "prctl"
tcf = "sync"

[[steps]]
actor = "p"
op = "mmap"
addr = 0x1000_0000
size = "64KiB"
prot = ["read", "write", "mte"]
expect = { outcome = "ok", value = 0x1000_0000 }

[[steps]]
actor = "p"
op = "stg"
addr = 0x1000_0000
size = 64
tag = 3

[[steps]]
actor = "p"
op = "ldg"
addr = 0x1000_0000
size = 64
expect = { outcome = "ok", value = [3, 3, 3, 3] }

[[steps]]
actor = "p"
op = "store"
addr = 0x1000_0010
tag = 4
data = "00ff"
expect = { outcome = "tag-check-fault", value = 0x1000_0010 }

[[steps]]
actor = "p"
op = "munmap"
addr = 0x1000_0001
size = 4096
expect = "EINVAL"
"""

FAILING = """
name = "a wrong expectation"

[processes.p]

[[steps]]
actor = "p"
op = "mmap"
addr = 0x1000_0000
size = "4KiB"
prot = ["read", "write", "mte"]

[[steps]]
actor = "p"
op = "stg"
addr = 0x1000_0000
size = 32
tag = 3

[[steps]]
actor = "p"
op = "ldg"
addr = 0x1000_0000
size = 32
expect = { outcome = "ok", value = [9, 9] }
"""

SHARED = """
name = "two processes share a memfd"

[processes.a]
[processes.b]

[[steps]]
actor = "a"
op = "mmap"
size = "8KiB"
prot = ["read", "write", "mte"]
backing = "memfd"
object = "x"

[[steps]]
actor = "b"
op = "mmap"
addr = 0x3000_0000
size = "8KiB"
prot = ["read", "write"]
backing = "memfd"
object = "x"

[[steps]]
actor = "b"
op = "stg"
addr = 0x3000_0000
size = 16
tag = 1

[[steps]]
actor = "b"
op = "mprotect"
addr = 0x3000_0000
size = "8KiB"
prot = ["read", "write", "mte"]

[[steps]]
actor = "b"
op = "stg"
addr = 0x3000_0000
size = 32
tag = 5

[[steps]]
actor = "b"
op = "fork"
child = "c"

[[steps]]
actor = "c"
op = "ldg"
addr = 0x3000_0000
size = 32
expect = { outcome = "ok", value = [5, 5] }
"""

RACE = """
name = "shared memfd first touch race"
{bugs}

[scheduler]
kind = "random"
seed = 0

[processes.a]
[processes.b]

[[steps]]
actor = "a"
op = "mmap"
addr = 0x1000_0000
size = "4KiB"
prot = ["read", "write", "mte"]
backing = "memfd"
object = "shared"

[[steps]]
actor = "b"
op = "mmap"
addr = 0x2000_0000
size = "4KiB"
prot = ["read", "write", "mte"]
backing = "memfd"
object = "shared"

[[steps]]
parallel = [
  {{ actor = "a", op = "stg", addr = 0x1000_0000, size = 64, tag = 5 }},
  {{ actor = "b", op = "ldg", addr = 0x2000_0000, size = 16 }},
]

[[steps]]
actor = "a"
op = "ldg"
addr = 0x1000_0000
size = 64
expect = {{ outcome = "ok", value = [5, 5, 5, 5] }}
"""


def mtekvm_cmd() -> list[str]:
    """The installed console command, or the module if the script is missing."""
    return [str(MTEKVM)] if MTEKVM.exists() else [sys.executable, "-m", "vmm.cli"]


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MTEKVM_SECRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([*mtekvm_cmd(), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=CLI_TIMEOUT)


@pytest.fixture
def scenario(tmp_path):
    """``scenario(text, name)``: write a scenario file and return its path."""
    def write(text: str, name: str = "scn.toml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p
    return write


def assert_one_line(r: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one ``mtekvm:`` line on stderr and no traceback anywhere; returns it."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mtekvm: "), r.stderr
    return lines[0]


def untimed(steps: list[dict]) -> list[dict]:
    """JSON steps without their durations (which differ from run to run)."""
    return [{k: v for k, v in st.items() if k != "duration"} for st in steps]


def replay_line(out: str) -> str:
    m = re.search(r"^\s*replay:\s+(.*)$", out, re.M)
    assert m, f"no replay line in:\n{out}"
    return m.group(1).strip()


class TestExitStatus:
    def test_all_expectations_hold_exit_0(self, scenario):
        """A scenario whose expectations all hold exits 0 and prints its table and summary."""
        r = run_cli("run", scenario(PASSING))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "tags round trip" in r.stdout
        assert "1 passed, 0 failed" in r.stdout
        assert "tag-check-fault" in r.stdout and "FAIL" not in r.stdout

    def test_failed_expectation_exit_1(self, scenario):
        """A scenario with one expectation that does not hold exits 1 and marks the step FAIL."""
        r = run_cli("run", scenario(FAILING))
        assert r.returncode == 1, r.stdout + r.stderr
        assert "FAIL" in r.stdout and "0 passed, 1 failed" in r.stdout

    def test_one_failing_file_among_several_exit_1(self, scenario):
        """Running a passing and a failing file together exits 1 and reports both."""
        r = run_cli("run", scenario(PASSING, "a.toml"), scenario(FAILING, "b.toml"))
        assert r.returncode == 1
        assert "1 passed, 1 failed (2 scenarios" in r.stdout

    def test_two_processes_and_fork_scenario(self, scenario):
        """A scenario with two processes sharing a memfd, mprotect(PROT_MTE) and a forked child passes."""
        r = run_cli("run", scenario(SHARED))
        assert r.returncode == 0, r.stdout + r.stderr

    @pytest.mark.parametrize("change, step, key", [
        (("tag = 3", "tag = 99"), 3, "tag"),
        (('tcf = "sync"', 'tcf = "sometimes"'), 1, "tcf"),
        (("size = 64\ntag = 3", "size = 64\ntag = 3\nbogus = 1"), 3, "bogus"),
        (('op = "ldg"', 'op = "getpid"'), 4, "op"),
    ])
    def test_invalid_scenario_exit_2_names_file_step_key(self, scenario, change, step, key):
        """A file that is not a valid scenario exits 2 with a message naming the file, the step and the key."""
        text = PASSING.replace(*change, 1)
        assert text != PASSING
        path = scenario(text, "invalid.toml")
        r = run_cli("run", path)
        assert r.returncode == 2, r.stdout + r.stderr
        assert str(path) in r.stderr
        assert f"step {step}" in r.stderr
        assert f"'{key}'" in r.stderr

    def test_invalid_toml_and_missing_file_exit_2(self, scenario, tmp_path):
        """A file that is not TOML, or does not exist, exits 2 naming the file."""
        bad = scenario("name = \n", "broken.toml")
        r = run_cli("run", bad)
        assert r.returncode == 2 and str(bad) in r.stderr
        missing = tmp_path / "absent.toml"
        r = run_cli("run", missing)
        assert r.returncode == 2 and str(missing) in r.stderr


class TestJson:
    def test_json_report_shape(self, scenario, tmp_path):
        """--json writes scenarios with name, passed, steps (index, actor, op, expect, outcome, value, passed), violations."""
        out = tmp_path / "report.json"
        r = run_cli("run", scenario(PASSING, "p.toml"), scenario(FAILING, "f.toml"), "--json", out)
        assert r.returncode == 1
        doc = json.loads(out.read_text())
        assert [s["name"] for s in doc["scenarios"]] == ["tags round trip", "a wrong expectation"]
        ok, bad = doc["scenarios"]
        for s in doc["scenarios"]:
            assert {"name", "passed", "steps", "violations"} <= set(s)
            assert isinstance(s["violations"], list)
            for st in s["steps"]:
                assert {"index", "actor", "op", "expect", "outcome", "value", "passed"} <= set(st)
        assert ok["passed"] is True and all(st["passed"] for st in ok["steps"])
        assert [st["op"] for st in ok["steps"]] == ["prctl", "mmap", "stg", "ldg", "store", "munmap"]
        assert ok["steps"][1]["value"] == 0x1000_0000
        assert ok["steps"][3] == {**ok["steps"][3], "index": "4", "actor": "p", "outcome": "ok",
                                  "value": [3, 3, 3, 3], "expect": {"outcome": "ok", "value": [3, 3, 3, 3]}}
        assert ok["steps"][4]["outcome"] == "tag-check-fault" and ok["steps"][4]["value"] == 0x1000_0010
        assert ok["steps"][5]["outcome"] == "EINVAL" and ok["steps"][5]["expect"] == "EINVAL"
        assert bad["passed"] is False
        assert bad["steps"][-1]["passed"] is False and bad["steps"][-1]["value"] == [3, 3]

    def test_json_for_a_parallel_step(self, scenario, tmp_path):
        """Sub-steps of a parallel step appear in --json with indexes N.1, N.2."""
        out = tmp_path / "race.json"
        r = run_cli("run", scenario(RACE.format(bugs=""), "race.toml"), "--json", out)
        assert r.returncode == 0, r.stdout + r.stderr
        steps = json.loads(out.read_text())["scenarios"][0]["steps"]
        assert [s["index"] for s in steps] == ["1", "2", "3.1", "3.2", "4"]


class TestRunningHost:
    def test_host_and_secret_file(self, hypervisor, scenario, tmp_path):
        """--host unix:PATH --secret-file F runs the scenario on that running hypervisor and exits 0."""
        secret = tmp_path / "secret"
        secret.write_text(hypervisor.secret + "\n")
        r = run_cli("run", scenario(PASSING), "--host", hypervisor.address, "--secret-file", secret)
        assert r.returncode == 0, r.stdout + r.stderr
        r = run_cli("run", scenario(SHARED, "shared.toml"), "--host", hypervisor.address, "--secret-file", secret)
        assert r.returncode == 0, r.stdout + r.stderr
        assert hypervisor.alive()

    def test_wrong_secret_is_refused(self, hypervisor, scenario, tmp_path):
        """With a wrong secret the running hypervisor refuses the run (exit 2, EPERM)."""
        secret = tmp_path / "secret"
        secret.write_text("not the secret\n")
        r = run_cli("run", scenario(PASSING), "--host", hypervisor.address, "--secret-file", secret)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "EPERM" in r.stderr
        assert hypervisor.alive()

    def test_unreachable_host_exit_3(self, scenario, tmp_path):
        """--host naming a socket nobody listens on is an infrastructure failure: exit 3, one line saying so."""
        r = run_cli("run", scenario(PASSING), "--host", f"unix:{tmp_path / 'nobody.sock'}")
        assert r.returncode == 3, r.stdout + r.stderr
        assert "cannot reach" in r.stderr
        assert_one_line(r)

    def test_host_with_controlled_scheduler_exit_2(self, hypervisor, scenario, tmp_path):
        """--host with a controlled scheduler is an option clash: exit 2 with a message."""
        secret = tmp_path / "secret"
        secret.write_text(hypervisor.secret)
        r = run_cli("run", scenario(PASSING), "--host", hypervisor.address, "--secret-file", secret,
                    "--scheduler", "random", "--seed", "1")
        assert r.returncode == 2
        assert "--host" in r.stderr


class TestSchedulers:
    def test_random_scheduler_with_seed(self, scenario):
        """--scheduler random --seed 1 runs the scenario under random(seed=1) and passes."""
        r = run_cli("run", scenario(PASSING), "--scheduler", "random", "--seed", "1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "random(seed=1)" in r.stdout

    def test_fixed_model_survives_many_seeds(self, scenario):
        """Without the bug the first-touch race scenario passes under 40 random seeds."""
        r = run_cli("run", scenario(RACE.format(bugs="")), "--seeds", "40")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no failure in 40 seeds" in r.stderr

    def test_replay_without_schedule_exit_2(self, scenario):
        """--scheduler replay without --schedule exits 2."""
        r = run_cli("run", scenario(PASSING), "--scheduler", "replay")
        assert r.returncode == 2


class TestReplay:
    def _replay(self, cmd: str, tmp_path, json_out: Path) -> subprocess.CompletedProcess:
        """Run the printed command exactly, through a shell whose PATH finds the installed mtekvm."""
        if not MTEKVM.exists():
            pytest.skip("the mtekvm console script is not installed")
        assert shlex.split(cmd)[0] == "mtekvm"
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        return subprocess.run(f"{cmd} --json {shlex.quote(str(json_out))}", shell=True, capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=CLI_TIMEOUT)

    def test_failing_controlled_run_prints_a_replay_that_reproduces(self, scenario, tmp_path):
        """A failing random-scheduler run prints "replay:" and that exact command fails the same way."""
        path = scenario(FAILING)
        first = tmp_path / "first.json"
        r = run_cli("run", path, "--scheduler", "random", "--seed", "1", "--json", first)
        assert r.returncode == 1
        cmd = replay_line(r.stdout)
        assert "--scheduler replay" in cmd and str(path) in cmd
        again = tmp_path / "again.json"
        r2 = self._replay(cmd, tmp_path, again)
        assert r2.returncode == 1, r2.stdout + r2.stderr
        a, b = (json.loads(p.read_text())["scenarios"][0] for p in (first, again))
        assert untimed(a["steps"]) == untimed(b["steps"]) and a["violations"] == b["violations"]
        assert b["passed"] is False

    def test_bug_zoo_race_found_and_replayed(self, scenario, tmp_path):
        """With bugs = ["no-tag-lock"] some seed fails; its replay command reproduces the same violations."""
        path = scenario(RACE.format(bugs='bugs = ["no-tag-lock"]'), "race.toml")
        first = tmp_path / "first.json"
        r = run_cli("run", path, "--seeds", "40", "--json", first)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "failure at seed" in r.stderr
        doc = json.loads(first.read_text())["scenarios"][0]
        assert doc["passed"] is False and doc["violations"], doc
        cmd = replay_line(r.stdout)
        again = tmp_path / "again.json"
        r2 = self._replay(cmd, tmp_path, again)
        assert r2.returncode == 1, r2.stdout + r2.stderr
        redo = json.loads(again.read_text())["scenarios"][0]
        assert untimed(redo["steps"]) == untimed(doc["steps"])
        assert [(v["invariant"], v["message"]) for v in redo["violations"]] == \
               [(v["invariant"], v["message"]) for v in doc["violations"]]
        assert redo["schedule"] == doc["schedule"]


class TestHunt:
    """``--seeds N``: try seeds until one fails, with progress on stderr."""

    def test_hunt_stops_at_the_first_failing_seed(self):
        """A hunt for flag-before-init stops at seed 18, says so, and exits 1 with a replay command."""
        r = run_cli("run", str(ROOT / "scenarios/race-cow-vs-mprotect.toml"), "--bug", "flag-before-init",
                    "--scheduler", "random", "--seeds", "40")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "failure at seed 18 (19 of 40 seeds run)" in r.stderr
        assert "16/40 seeds clean" in r.stderr  # progress: a line per tenth (4 seeds) off a terminal
        assert "replay:" in r.stdout

    def test_clean_hunt_reports_every_seed(self):
        """On the fixed model the hunt runs every seed, reports progress to the end, and exits 0."""
        r = run_cli("run", str(ROOT / "scenarios/race-cow-vs-mprotect.toml"), "--scheduler", "random",
                    "--seeds", "20")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "20/20 seeds clean" in r.stderr and "no failure in 20 seeds" in r.stderr

    def test_pct_hunt_finds_and_prints_a_replay(self):
        """``--scheduler pct`` hunts like random: it finds flag-before-init and prints a replay command."""
        r = run_cli("run", str(ROOT / "scenarios/race-cow-vs-mprotect.toml"), "--bug", "flag-before-init",
                    "--scheduler", "pct", "--depth", "3", "--seeds", "60")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "failure at seed 32" in r.stderr and "scheduler pct(seed=32, depth=3)" in r.stdout
        assert "replay:" in r.stdout


class TestBugsCommand:
    def test_lists_every_bug_with_its_fix(self):
        """``mtekvm bugs`` names every bug-zoo entry, where it lives, and the commit that fixed it."""
        r = run_cli("bugs")
        assert r.returncode == 0
        for name, fix in [("flag-before-init", "e059853d14ca"), ("no-tag-lock", "d77e59a8fccd"),
                          ("mte-allowed-outside-lock", "8c2e8ac8ad4b"), ("kvm-tags-zero-page", "2986a6257400")]:
            line = next(ln for ln in r.stdout.splitlines() if ln.startswith(name))
            assert fix in line
        assert "host mm" in next(ln for ln in r.stdout.splitlines() if ln.startswith("no-tag-lock"))
        assert "KVM" in next(ln for ln in r.stdout.splitlines() if ln.startswith("copy-tags-during"))

    def test_kvm_bug_is_switched_on(self):
        """A KVM bug named with --bug is switched on and found by the hunt (exit 1, a replay command)."""
        r = run_cli("run", str(ROOT / "scenarios/race-memslot-map-fixed.toml"), "--bug", "mte-allowed-outside-lock",
                    "--scheduler", "random", "--seeds", "20")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "VMA-USE-AFTER-FREE" in r.stdout and "replay:" in r.stdout

    def test_many_violations_are_summarised(self):
        """A run with hundreds of violations prints a few per invariant and says how many more there are."""
        r = run_cli("run", str(ROOT / "scenarios/findings/hugetlb-dirty-log-stale-tags.toml"))
        assert r.returncode == 1
        assert r.stdout.count("VIOLATION LAST-TAG-WRITTEN") == 5
        assert "more LAST-TAG-WRITTEN" in r.stdout
