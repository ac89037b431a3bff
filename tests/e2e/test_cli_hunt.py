"""End to end: ``mtekvm run --scheduler dfs`` and ``--scheduler bounded:N`` (the hunt engine from the command line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RACE = str(ROOT / "scenarios/race-cow-vs-mprotect.toml")


def run_cli(*args) -> subprocess.CompletedProcess:
    """``python -m mtekvm.cli ARGS`` from the repository root."""
    env = dict(os.environ)
    env.pop("MTEKVM_SECRET", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "mtekvm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120, check=False)


def replay_line(stdout: str) -> str:
    """The command after ``replay:`` in a failed scenario's table."""
    return next(ln.split("replay:", 1)[1].strip() for ln in stdout.splitlines() if "replay:" in ln)


class TestExhaustiveSchedulers:
    def test_bounded_finds_the_race_and_its_replay_reproduces(self):
        """--scheduler bounded:2 finds flag-before-init (exit 1), and the printed replay fails the same way."""
        r = run_cli("run", RACE, "--bug", "flag-before-init", "--scheduler", "bounded:2")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "failure at run" in r.stderr and "bounded(2)" in r.stderr
        assert "scheduler bounded(2)" in r.stdout and "NO-PUBLISH-BEFORE-VALID" in r.stdout
        cmd = replay_line(r.stdout)
        args = cmd.split()[2:]  # drop "mtekvm run"
        assert args[0] == "scenarios/race-cow-vs-mprotect.toml" or args[0].endswith("race-cow-vs-mprotect.toml")
        schedule = cmd.split("--schedule ", 1)[1].split(" --bug")[0].strip("'")
        again = run_cli("run", RACE, "--scheduler", "replay", "--schedule", schedule, "--bug", "flag-before-init")
        assert again.returncode == 1 and "NO-PUBLISH-BEFORE-VALID" in again.stdout, again.stdout + again.stderr

    def test_bounded_runs_until_exhausted_on_the_fixed_model(self):
        """bounded:1 without the bug runs every interleaving with one preemption, says so, and exits 0."""
        r = run_cli("run", RACE, "--scheduler", "bounded:1")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(every interleaving with at most 1 preemptions)" in r.stderr and "no failure in" in r.stderr

    def test_dfs_with_a_budget(self):
        """--scheduler dfs --seeds 30 runs 30 interleavings and says the budget, not the space, ended it."""
        r = run_cli("run", RACE, "--scheduler", "dfs", "--seeds", "30")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "no failure in 30 runs (the budget" in r.stderr

    def test_bad_bound_and_host_are_refused(self):
        """A malformed bounded:N, and dfs with --host, exit 2 with one line each."""
        r = run_cli("run", RACE, "--scheduler", "bounded:x")
        assert r.returncode == 2 and "bounded:N" in r.stderr and "Traceback" not in r.stderr
        r = run_cli("run", RACE, "--scheduler", "dfs", "--host", "unix:/nonexistent.sock")
        assert r.returncode == 2 and "--host" in r.stderr and "Traceback" not in r.stderr

    def test_random_hunt_prints_the_shrunk_replay(self):
        """A random --seeds hunt reports the failing seed as before and also a shrunk schedule that replays."""
        r = run_cli("run", RACE, "--bug", "flag-before-init", "--scheduler", "random", "--seeds", "40")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "failure at seed 18 (19 of 40 seeds run)" in r.stderr
        line = next(ln for ln in r.stderr.splitlines() if "shrunk the schedule" in ln)
        found, shrunk = (int(w) for w in line.split("from ", 1)[1].split(" preemptions")[0].split(" to "))
        assert shrunk < found
        schedule = line.split("--schedule ", 1)[1].split(" --bug")[0].strip("'")
        again = run_cli("run", RACE, "--scheduler", "replay", "--schedule", schedule, "--bug", "flag-before-init")
        assert again.returncode == 1 and "NO-PUBLISH-BEFORE-VALID" in again.stdout, again.stdout + again.stderr
