"""End-to-end: the installed ``mtekvm`` console command on small scenario files."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import trio

from shared.invariants import ALL as INVARIANTS

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
    return [str(MTEKVM)] if MTEKVM.exists() else [sys.executable, "-m", "mtekvm.cli"]


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


FINDING = ROOT / "scenarios/findings/hugetlb-dirty-log-stale-tags.toml"


def finding_without_expectations() -> str:
    """The hugetlb finding's scenario text without any expect-violations line (it then fails)."""
    return "\n".join(ln for ln in FINDING.read_text().splitlines()
                     if not ln.strip().startswith("expect-violations"))


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
        """--json writes scenarios with name, passed, steps (index, actor, op, expect, outcome, value, passed),
        violations."""
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

    def test_many_violations_are_summarised(self, scenario, tmp_path):
        """A run with hundreds of violations prints a few per invariant and says how many more there are."""
        path = scenario(finding_without_expectations(), "finding.toml")
        out = tmp_path / "f.json"
        r = run_cli("run", path, "--json", out)
        assert r.returncode == 1
        counts: dict[str, int] = {}
        for v in json.loads(out.read_text())["scenarios"][0]["violations"]:
            counts[v["invariant"]] = counts.get(v["invariant"], 0) + 1
        inv, n = max(counts.items(), key=lambda kv: kv[1])
        assert n > 5
        assert r.stdout.count(f"VIOLATION {inv}:") == 5
        assert f"and {n - 5} more {inv}" in r.stdout


VM_NOTES = """
name = "per-vCPU MTE, fault addresses, scalar tags"

[vms.vm0]
vcpus = 2
memory = [ { ipa = 0x4000_0000, size = "1MiB", backing = "memfd" } ]

[[steps]]
actor = "guest:vm0:1"
op = "enable-mte"
tcf = "sync"

[[steps]]
actor = "guest:vm0"
op = "map"
va = 0x4000_0000
ipa = 0x4000_0000
size = "64KiB"
attr = "tagged"

[[steps]]
actor = "guest:vm0:0"
op = "stg"
addr = 0x4000_0000
size = 64
tag = 5

[[steps]]
actor = "guest:vm0:1"
op = "ldg"
addr = 0x4000_0000
size = 64
expect = { outcome = "ok", value = 0 }

[[steps]]
actor = "guest:vm0:1"
op = "stg"
addr = 0x4000_0000
size = 4096
tag = 7

[[steps]]
actor = "guest:vm0:1"
op = "store"
addr = 0x4000_0018
tag = 3
data = "00112233445566778899"
expect = { outcome = "tag-check-fault", value = 0x4000_0018 }

[[steps]]
actor = "guest:vm0:0"
op = "store"
addr = 0x4000_0018
tag = 3
data = "00112233445566778899"
expect = "ok"

[[steps]]
actor = "vmm:vm0"
op = "copy-tags"
ipa = 0x4000_0000
length = 4096
direction = "from-guest"
expect = { outcome = "ok", value = { tags = 7 } }

[[steps]]
actor = "guest:vm0:1"
op = "ldg"
addr = 0x4000_0000
size = 1024
expect = { outcome = "ok", value = 7 }

[[steps]]
actor = "guest:vm0:1"
op = "stg"
addr = 0x4000_0410
size = 16
tag = 2

[[steps]]
actor = "guest:vm0:1"
op = "store"
addr = 0x4000_0408
tag = 7
fill = 1
size = 16
expect = { outcome = "tag-check-fault", value = 0x4000_0410 }
"""

HOST_FAULTS = """
name = "fault addresses of host accesses"

[processes.p]

[[steps]]
actor = "p"
op = "prctl"
tcf = "sync"

[[steps]]
actor = "p"
op = "mmap"
size = "4KiB"
prot = ["read", "write", "mte"]

[[steps]]
actor = "p"
op = "stg"
addr = 0x1000_0000
size = 64
tag = 3
expect = "EFAULT"

[[steps]]
actor = "p"
op = "mmap"
addr = 0x1000_0000
size = "4KiB"
prot = ["read", "write", "mte"]
expect = { outcome = "ok", value = 0x1000_0000 }

[[steps]]
actor = "p"
op = "stg"
addr = 0x1000_0000
size = 16
tag = 3

[[steps]]
actor = "p"
op = "store"
addr = 0x1000_0008
tag = 3
fill = 0xaa
size = 16
expect = { outcome = "tag-check-fault", value = 0x1000_0010 }

[[steps]]
actor = "p"
op = "load"
addr = 0x1000_0004
tag = 5
size = 8
expect = { outcome = "tag-check-fault", value = 0x1000_0004 }

[[steps]]
actor = "p"
op = "load"
addr = 0x1000_0000
tag = 3
size = 16
expect = { outcome = "ok", value = "00000000000000000000000000000000" }
"""


def long_scenario(steps: int) -> str:
    """A passing scenario of one process doing ``steps`` tag stores (takes seconds to run)."""
    body = "".join(f'[[steps]]\nactor = "p"\nop = "stg"\naddr = 0x1000_0000\nsize = 16\ntag = {i % 16}\n'
                   for i in range(steps))
    return ('name = "long"\n[processes.p]\n[[steps]]\nactor = "p"\nop = "mmap"\naddr = 0x1000_0000\n'
            'size = 4096\nprot = ["read", "write", "mte"]\n' + body)


class TestVersion:
    def test_version(self):
        """``mtekvm --version`` prints the project's version (pyproject.toml of this tree) and exits 0."""
        with open(ROOT / "pyproject.toml", "rb") as f:
            want = tomllib.load(f)["project"]["version"]
        r = run_cli("--version")
        assert r.returncode == 0 and r.stdout.strip() == f"mtekvm {want}"


class TestOneLineMistakes:
    """Every listed mistake ends with one ``mtekvm:`` line on stderr, exit 2 and no traceback."""

    @pytest.mark.parametrize("extra, needle", [
        (["--host", "unix:/nonexistent.sock", "--secret-file", "{tmp}/no-such-secret"], "--secret-file"),
        (["--json", "{tmp}/no-such-dir/r.json"], "--json"),
        (["--junit", "{tmp}"], "--junit"),
        (["--schedule", "a/1@1>b/2"], "--schedule"),
        (["--scheduler", "random", "--depth", "3"], "--depth"),
        (["--seeds", "0"], "--seeds"),
        (["--scheduler", "free", "--seeds", "5"], "--seeds"),
        (["--seed", "4"], "--seed"),
        (["--secret-file", "{tmp}/s"], "--secret-file"),
        (["--scheduler", "replay"], "--schedule"),
        (["--scheduler", "replay", "--schedule", "not a schedule"], "--schedule"),
        (["--bug", "no-such-bug"], "--bug"),
        (["--frobnicate"], "--frobnicate"),
    ])
    def test_option_mistakes_exit_2(self, scenario, tmp_path, extra, needle):
        """Options that do not apply, clash, or name unusable paths are refused before anything runs."""
        (tmp_path / "s").write_text("secret\n")
        out = tmp_path / "report.json"
        args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
        if "--json" not in extra:
            args += ["--json", str(out)]
        r = run_cli("run", scenario(PASSING), *args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert needle in assert_one_line(r)
        assert "passed" not in r.stdout  # refused up front: nothing ran
        assert not out.exists()

    def test_no_file_and_unknown_command(self):
        """``mtekvm run`` without files and an unknown command are one-line usage errors."""
        for args in (["run"], ["frob"], []):
            r = run_cli(*args)
            assert r.returncode == 2, args
            assert_one_line(r)


class TestBatch:
    def test_invalid_file_in_a_batch(self, scenario, tmp_path):
        """An invalid file among valid ones: the others still run, the summary and JSON are written, exit 2."""
        bad = scenario(PASSING.replace("tag = 3", "tag = 99", 1), "bad.toml")
        out = tmp_path / "r.json"
        r = run_cli("run", scenario(PASSING, "a.toml"), bad, scenario(FAILING, "b.toml"), "--json", out)
        assert r.returncode == 2, r.stdout + r.stderr
        assert str(bad) in assert_one_line(r)
        assert "1 passed, 1 failed, 1 invalid (2 scenarios" in r.stdout
        doc = json.loads(out.read_text())
        assert [s["name"] for s in doc["scenarios"]] == ["tags round trip", "a wrong expectation"]
        assert doc["summary"]["invalid"] == 1 and doc["exit_status"] == 2
        assert doc["problems"][0]["path"] == str(bad) and doc["problems"][0]["kind"] == "invalid"

    def test_infrastructure_failure_exit_3_and_others_reported(self, scenario, tmp_path):
        """When the host cannot be reached, every file says so in one line and the run exits 3 with a summary."""
        out = tmp_path / "r.json"
        r = run_cli("run", scenario(PASSING, "a.toml"), scenario(FAILING, "b.toml"),
                    "--host", f"unix:{tmp_path / 'none.sock'}", "--json", out)
        assert r.returncode == 3
        assert "Traceback" not in r.stderr and r.stderr.count("mtekvm: ") == 2
        doc = json.loads(out.read_text())
        assert doc["summary"]["infrastructure_errors"] == 2 and doc["exit_status"] == 3

    async def test_busy_host_exit_3(self, hypervisor, scenario, tmp_path):
        """A running host with another client's process attached refuses the reboot: infrastructure, exit 3."""
        secret = tmp_path / "secret"
        secret.write_text(hypervisor.secret)
        async with hypervisor.client("process"):
            r = await trio.to_thread.run_sync(lambda: run_cli(
                "run", scenario(PASSING), "--host", hypervisor.address, "--secret-file", secret))
        assert r.returncode == 3, r.stdout + r.stderr
        assert "busy" in assert_one_line(r)


class TestReports:
    def test_json_schema_fields(self, scenario, tmp_path):
        """The JSON report carries its schema, a summary, file paths, durations and failure messages."""
        out = tmp_path / "r.json"
        p, f = scenario(PASSING, "p.toml"), scenario(FAILING, "f.toml")
        r = run_cli("run", p, f, "--json", out)
        assert r.returncode == 1
        doc = json.loads(out.read_text())
        assert doc["schema"] == "mtekvm-report/1" and doc["exit_status"] == 1
        assert {"scenarios": 2, "passed": 1, "failed": 1, "steps": 9}.items() <= doc["summary"].items()
        ok, bad = doc["scenarios"]
        assert (ok["path"], bad["path"]) == (str(p), str(f))
        assert ok["duration"] > 0 and all(st["duration"] >= 0 for st in ok["steps"])
        assert ok["failures"] == [] and len(bad["failures"]) == 1 and "step 3" in bad["failures"][0]
        assert bad["steps"][2]["message"] == "value: expected [9, 9], got [3, 3]"

    def test_junit_xml(self, scenario, tmp_path):
        """--junit writes JUnit XML that xml.etree parses: a testcase per scenario, a failure for the failed one."""
        out = tmp_path / "junit.xml"
        r = run_cli("run", scenario(PASSING, "p.toml"), scenario(FAILING, "f.toml"), "--junit", out)
        assert r.returncode == 1
        root = ET.parse(out).getroot()
        assert root.tag == "testsuites" and root.get("tests") == "2" and root.get("failures") == "1"
        cases = root.iter("testcase")
        by_name = {c.get("name"): c for c in cases}
        assert by_name["tags round trip"].find("failure") is None
        fail = by_name["a wrong expectation"].find("failure")
        assert fail is not None and "step 3" in fail.get("message")

    def test_tap(self, scenario):
        """--tap prints TAP version 13: the plan 1..N, then ok / not ok per file, diagnostics as '#' lines."""
        bad = scenario("name = \n", "broken.toml")
        r = run_cli("run", scenario(PASSING, "p.toml"), scenario(FAILING, "f.toml"), bad, "--tap")
        assert r.returncode == 2
        lines = r.stdout.splitlines()
        assert lines[:2] == ["TAP version 13", "1..3"]
        points = [ln for ln in lines if re.match(r"(ok|not ok) \d+ ", ln)]
        assert [ln.split(" - ")[0] for ln in points] == ["not ok 1", "ok 2", "not ok 3"]
        assert "broken.toml" in points[0] and "tags round trip" in points[1]
        assert all(ln.startswith("#") for ln in lines[2:] if ln not in points)

    def test_table_within_100_columns(self, scenario):
        """Every line of the human output (tables, messages, notes) fits in 100 columns."""
        r = run_cli("run", scenario(VM_NOTES, "notes.toml"), scenario(FAILING, "f.toml"),
                    scenario(PASSING, "p.toml"))
        assert r.returncode == 1
        assert max(len(ln) for ln in r.stdout.splitlines()) <= 100


class TestNotesAndRules:
    def test_vm_rules(self, scenario, tmp_path):
        """enable-mte is per vCPU, an ignored tag store is noted, fault addresses and scalar tags hold."""
        out = tmp_path / "n.json"
        r = run_cli("run", scenario(VM_NOTES, "notes.toml"), "--json", out)
        assert r.returncode == 0, r.stdout + r.stderr
        steps = json.loads(out.read_text())["scenarios"][0]["steps"]
        assert "SCTLR_EL1.ATA is 0" in steps[2]["note"] and steps[4]["note"] == ""
        assert "* step 3: ignored" in r.stdout

    def test_host_fault_addresses_and_mmap_without_addr(self, scenario, tmp_path):
        """A host tag check fault reports the first byte touched in the first mismatching granule, tag
        bits cleared; mmap without addr returns an address the kernel picked (not the one used later)."""
        out = tmp_path / "h.json"
        r = run_cli("run", scenario(HOST_FAULTS, "faults.toml"), "--json", out)
        assert r.returncode == 0, r.stdout + r.stderr
        picked = json.loads(out.read_text())["scenarios"][0]["steps"][1]["value"]
        assert isinstance(picked, int) and picked % 4096 == 0 and picked != 0x1000_0000

    def test_long_list_difference_is_readable(self, scenario, tmp_path):
        """A long expected tag list that differs is reported as the differing runs, not two 64-item lists."""
        text = VM_NOTES.replace("value = 7 }", "value = [7, 5] }")
        r = run_cli("run", scenario(text, "diff.toml"))
        assert r.returncode == 1
        assert "expected 2 items, got 64" in r.stdout
        want = ["7"] * 10 + ["5"] * 10 + ["7"] * 43 + ["5"]
        text = VM_NOTES.replace("value = 7 }", "value = [" + ", ".join(want) + "] }")
        r = run_cli("run", scenario(text, "diff.toml"))
        assert r.returncode == 1
        assert "11 of 64 items differ; [10..19]: expected 5, got 7; [63]: expected 5, got 7" in r.stdout
        assert "[7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 5" not in r.stdout


class TestExpectViolations:
    def test_finding_passes_with_exactly_its_violations(self, scenario, tmp_path):
        """A scenario listing exactly the invariants it breaks passes; one too few or one too many fails."""
        base = finding_without_expectations()
        out = tmp_path / "v.json"
        r = run_cli("run", scenario(base, "f0.toml"), "--json", out)
        assert r.returncode == 1
        broke = sorted({v["invariant"] for v in json.loads(out.read_text())["scenarios"][0]["violations"]})
        assert broke

        def with_names(names):
            return f"expect-violations = {json.dumps(names)}\n" + base

        r = run_cli("run", scenario(with_names(broke), "f1.toml"))
        assert r.returncode == 0, r.stdout + r.stderr
        extra = sorted(INVARIANTS - set(broke))[0]
        r = run_cli("run", scenario(with_names(broke + [extra]), "f2.toml"))
        assert r.returncode == 1 and f"{extra} was expected to break but did not" in r.stdout
        if len(broke) > 1:
            r = run_cli("run", scenario(with_names(broke[1:]), "f3.toml"))
            assert r.returncode == 1 and f"broke: {broke[0]}" in r.stdout

    def test_unknown_invariant_is_invalid(self, scenario):
        """An expect-violations name the model does not check makes the file invalid: exit 2, one line."""
        r = run_cli("run", scenario('expect-violations = ["NO-SUCH-THING"]\n' + PASSING))
        assert r.returncode == 2 and "expect-violations" in assert_one_line(r)


class TestStrictReplay:
    RECORD = ("run", str(ROOT / "scenarios/race-cow-vs-mprotect.toml"), "--bug", "flag-before-init",
              "--scheduler", "random", "--seed", "18")

    def _schedule(self) -> str:
        r = run_cli(*self.RECORD)
        assert r.returncode == 1, r.stdout + r.stderr
        return re.search(r"^\s*schedule:\s+(\S+)$", r.stdout, re.M).group(1)

    def test_replay_without_its_bug_and_unreached_entry(self):
        """Replaying without the recording's --bug, or with an entry never reached, is one line and exit 2."""
        schedule = self._schedule()
        path = str(ROOT / "scenarios/race-cow-vs-mprotect.toml")
        r = run_cli("run", path, "--scheduler", "replay", "--schedule", schedule)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "--bug" in assert_one_line(r) and "EDEADLK" not in r.stdout
        r = run_cli("run", path, "--scheduler", "replay", "--schedule", schedule + ",nobody/1@1>nobody/2",
                    "--bug", "flag-before-init")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "never reached" in assert_one_line(r)
        r = run_cli("run", path, "--scheduler", "replay", "--schedule", schedule, "--bug", "flag-before-init")
        assert r.returncode == 1 and "Traceback" not in r.stderr


class TestInterrupt:
    def test_sigint_exits_130_with_partial_summary(self, scenario, tmp_path):
        """SIGINT during the second scenario: exit 130, the first one summarised and in the JSON, no traceback."""
        out = tmp_path / "r.json"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        p = subprocess.Popen([*mtekvm_cmd(), "run", str(scenario(PASSING, "a.toml")),
                              str(scenario(long_scenario(20000), "long.toml")), "--json", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        try:
            seen = b""  # read the pipe unbuffered, so that select() sees every byte that arrived
            deadline = time.monotonic() + CLI_TIMEOUT
            while b"tags round trip" not in seen and time.monotonic() < deadline:
                ready, _, _ = select.select([p.stdout], [], [], 1)
                if ready:
                    chunk = os.read(p.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    seen += chunk
            assert b"tags round trip" in seen, seen
            p.send_signal(signal.SIGINT)
            rest, err = (b.decode() for b in p.communicate(timeout=CLI_TIMEOUT))
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 130, seen.decode() + rest + err
        assert "Traceback" not in err and "interrupted" in err
        assert "1 passed, 0 failed, interrupted (1 scenarios" in rest
        doc = json.loads(out.read_text())
        assert doc["summary"]["interrupted"] is True and doc["exit_status"] == 130
        assert [s["name"] for s in doc["scenarios"]] == ["tags round trip"]


def test_listen_tcp_runs_a_migration_between_hosts_on_tcp(tmp_path):
    """`mtekvm run --listen tcp` starts both hosts on TCP loopback and the migration scenario passes over it."""
    out = tmp_path / "r.json"
    r = run_cli("run", "--listen", "tcp", ROOT / "scenarios" / "migration-retag-while-migrating.toml", "--json", out)
    assert r.returncode == 0, r.stdout + r.stderr
    (scn,) = json.loads(out.read_text())["scenarios"]
    migrate = [s for s in scn["steps"] if s["op"] == "migrate"]
    assert migrate and all(s["outcome"] == "ok" for s in migrate), migrate


def test_listen_tcp_with_a_running_host_is_a_usage_error():
    """`--listen tcp` with `--host` is refused with exit 2 and one line naming both options."""
    r = run_cli("run", "--listen", "tcp", "--host", "unix:/nonexistent", ROOT / "scenarios" / "ksm-and-swap.toml")
    assert r.returncode == 2
    assert "--listen tcp" in r.stderr and "--host" in r.stderr
