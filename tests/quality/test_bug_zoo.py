"""Quality: the controlled scheduler finds every bug-zoo race, and the fixed model is clean.

Each bug is hunted with the random scheduler over a stated budget of seeds on
the scenario that exposes it. The same seeds must run clean on the fixed
model, and a failing schedule must replay to the same failure.

Measured detection (200 seeds, this scenario shape): flag-before-init 6/200
(first at seed 18); no-tag-lock 81/200 with a second initialiser, 3/200 with
tags actually lost. PCT (depth 3) on the same scenarios: flag-before-init
5/200 (first at seed 32), no-tag-lock 21/200 (first at seed 6). Budgets below
leave room above the first hit.

KVM paths (random walk, 100 seeds, in-process VMM and guest, about 40 ms a
run): no-tag-lock in its KVM form (sanitise_mte_tags racing the VMM's
set_pte_at) 61/100, 4 of the first 10 losing tags; mte-allowed-outside-lock
44/100 (the VMA read after munmap freed it); copy-tags-during-dirty-log 23/50;
kvm-tags-zero-page is deterministic (every run). The fixed model: 0 of each.

Migration (VMM side, two in-process hosts under one scheduler): each
``scenarios/migration-*.toml`` zoo file names its bug, the invariant it breaks
and a seed that shows it; it is hunted here without them (a failure is the
bug showing), and the fixed VMM must run the same seeds clean. Measured (random,
seeds 0..9): each of the three is found at every seed; the fixed VMM, 0 of 10.
"""

from __future__ import annotations

import pathlib

import attrs
import pytest

import mtekvm.hunt
from mtekvm.runner import RunOptions, run_scenario
from mtekvm.scenario import SchedulerSpec, load_scenario

SCENARIOS = pathlib.Path(__file__).resolve().parents[2] / "scenarios"
BUDGET = 200  # seeds per hunt


async def hunt(path: str, bugs: tuple[str, ...], seeds: range):
    """Run ``path`` under each seed (the hunt engine, collecting); return the failing results, in seed order."""
    scn = load_scenario(SCENARIOS / path)
    res = await mtekvm.hunt.hunt(scn, SchedulerSpec("random", seeds.start), runs=len(seeds),
                                 options=RunOptions(bugs=bugs), collect=True, shrink=False)
    return scn, [(f.seed, f.result) for f in res.failures]


def invariants(result) -> set[str]:
    """The names of the invariants a run broke."""
    return {v["invariant"] for v in result.violations}


class TestFlagBeforeInit:
    """e059853d14ca: PG_mte_tagged published before the tags are cleared."""

    async def test_found_within_budget(self):
        """The random scheduler finds a CoW copying stale tags within the budget of seeds."""
        _, failures = await hunt("race-cow-vs-mprotect.toml", ("flag-before-init",), range(BUDGET))
        assert failures, f"flag-before-init not found in {BUDGET} seeds"
        seed, r = failures[0]
        assert {"NO-PUBLISH-BEFORE-VALID", "LAST-TAG-WRITTEN"} <= invariants(r)
        child_ldg = [s for s in r.steps if s.actor == "child" and s.op == "ldg"][0]
        assert not child_ldg.passed and any(t != 0 for t in child_ldg.value), "the child should see stale tags"

    async def test_fixed_model_clean(self):
        """The same seeds run clean without the bug."""
        _, failures = await hunt("race-cow-vs-mprotect.toml", (), range(BUDGET))
        assert failures == []

    async def test_failure_replays(self):
        """The failing run's schedule, replayed, breaks the same invariants again."""
        scn, failures = await hunt("race-cow-vs-mprotect.toml", ("flag-before-init",), range(BUDGET))
        seed, r = failures[0]
        again = await run_scenario(scn, RunOptions(bugs=("flag-before-init",),
                                                   scheduler=SchedulerSpec("replay", None, r.schedule)))
        assert not again.passed
        assert invariants(again) == invariants(r)
        assert [s.value for s in again.steps] == [s.value for s in r.steps]
        assert "--scheduler replay --schedule" in r.replay_command


class TestNoTagLock:
    """d77e59a8fccd: tag initialisation without PG_mte_lock on a MAP_SHARED page."""

    async def test_second_initialiser_found(self):
        """The random scheduler finds two initialisers of one shared page within the budget."""
        _, failures = await hunt("race-shared-init.toml", ("no-tag-lock",), range(BUDGET))
        assert failures
        assert "EXCLUSIVE-INIT" in invariants(failures[0][1])

    async def test_valid_tags_zeroed_found(self):
        """Within the budget, a late initialiser wipes tags already written (the user-visible loss)."""
        _, failures = await hunt("race-shared-init.toml", ("no-tag-lock",), range(BUDGET))
        lost = [(s, r) for s, r in failures if "PRESERVE-ON-MAP" in invariants(r)]
        assert lost, f"no tag loss in {BUDGET} seeds"
        seed, r = lost[0]
        ldg = [s for s in r.steps if s.op == "ldg" and s.actor == "a"][0]
        assert ldg.value == [0, 0, 0, 0] and not ldg.passed

    async def test_fixed_model_clean(self):
        """The same seeds run clean with the two-bit lock."""
        _, failures = await hunt("race-shared-init.toml", (), range(BUDGET))
        assert failures == []


KVM_BUDGET = 60  # seeds per KVM hunt (each run starts a VMM and a guest in-process)


class TestKvmNoTagLock:
    """d77e59a8fccd, KVM form: sanitise_mte_tags() racing the VMM's set_pte_at() on a MAP_SHARED page."""

    async def test_found_within_budget(self):
        """A second initialiser of a shared guest page is found, and some run loses the VMM's tags."""
        _, failures = await hunt("race-kvm-sanitise-vs-vmm.toml", ("no-tag-lock",), range(KVM_BUDGET))
        assert failures, f"no-tag-lock (KVM) not found in {KVM_BUDGET} seeds"
        assert "EXCLUSIVE-INIT" in invariants(failures[0][1])
        lost = [r for _s, r in failures if "PRESERVE-ON-MAP" in invariants(r)]
        assert lost, "no run lost tags"
        assert any(not s.passed and s.op == "ldg" and s.actor == "guest:vm0" for s in lost[0].steps)
        assert any(v["actor"].startswith("guest:vm0") for v in lost[0].violations
                   if v["invariant"] == "PRESERVE-ON-MAP"), "the guest's sanitise is the late initialiser"

    async def test_fixed_model_clean(self):
        """The same seeds run clean with the two-bit lock."""
        _, failures = await hunt("race-kvm-sanitise-vs-vmm.toml", (), range(KVM_BUDGET))
        assert failures == []


class TestMteAllowedOutsideLock:
    """8c2e8ac8ad4b: user_mem_abort sampled VM_MTE_ALLOWED through a VMA pointer after mmap_read_unlock."""

    async def test_found_within_budget(self):
        """A VMM MAP_FIXED during the fault makes the old code read a freed VMA; the file page is never mapped."""
        _, failures = await hunt("race-memslot-map-fixed.toml", ("mte-allowed-outside-lock",), range(KVM_BUDGET))
        assert failures, f"mte-allowed-outside-lock not found in {KVM_BUDGET} seeds"
        for _s, r in failures:
            assert invariants(r) == {"VMA-USE-AFTER-FREE"}, r.violations  # never MTE-VM-MEMORY-IS-TAG-CAPABLE

    async def test_failure_replays(self):
        """The failing schedule replays to the same use-after-free."""
        scn, failures = await hunt("race-memslot-map-fixed.toml", ("mte-allowed-outside-lock",), range(KVM_BUDGET))
        again = await run_scenario(scn, RunOptions(bugs=("mte-allowed-outside-lock",),
                                                   scheduler=SchedulerSpec("replay", None, failures[0][1].schedule)))
        assert invariants(again) == {"VMA-USE-AFTER-FREE"}

    async def test_fixed_model_clean(self):
        """The same seeds run clean when the flag is sampled under the lock."""
        _, failures = await hunt("race-memslot-map-fixed.toml", (), range(KVM_BUDGET))
        assert failures == []


class TestCopyTagsDuringDirtyLog:
    """The v6.13 EBUSY check: TO_GUEST tag writes escape the dirty log."""

    async def test_found_within_budget(self):
        """A restore that lands after logging started is missing from the dirty log."""
        _, failures = await hunt("race-copy-tags-vs-dirty-log.toml", ("copy-tags-during-dirty-log",),
                                 range(KVM_BUDGET))
        assert failures, f"copy-tags-during-dirty-log not found in {KVM_BUDGET} seeds"
        assert invariants(failures[0][1]) == {"DIRTY-LOG-COMPLETE"}

    async def test_fixed_model_clean(self):
        """The same seeds run clean: the restore is refused with EBUSY or runs before logging."""
        scn, failures = await hunt("race-copy-tags-vs-dirty-log.toml", (), range(KVM_BUDGET))
        assert failures == []
        outcomes = set()
        for seed in range(KVM_BUDGET):
            r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("random", seed)))
            outcomes.add(next(s.outcome for s in r.steps if s.op == "copy-tags"))
        assert outcomes == {"ok", "EBUSY"}, "both orders should occur"


class TestKvmTagsZeroPage:
    """2986a6257400: sanitise_mte_tags() flagged the shared zero page mapped by a stage-2 read fault."""

    async def test_found(self):
        """A guest read of untouched anonymous RAM flags ZERO_PAGE under the old code."""
        _, failures = await hunt("vm-guest-reads-untouched-memory.toml", ("kvm-tags-zero-page",), range(1))
        assert failures and invariants(failures[0][1]) == {"ZERO-PAGE-NEVER-FLAGGED"}

    async def test_fixed_model_clean(self):
        """The fixed code leaves the zero page untagged."""
        _, failures = await hunt("vm-guest-reads-untouched-memory.toml", (), range(3))
        assert failures == []


MIGRATION_BUDGET = 8  # seeds per migration hunt (two in-process hosts, two VMMs, a guest: 0.1-0.3 s a run)


def as_hunted(path: str, bug: bool):
    """A migration zoo file without its own bugs and ``expect-violations``, so that a run shows the bug as a
    failure (``bug``: with the file's bugs given as options, as ``--bug`` does)."""
    scn = load_scenario(SCENARIOS / path)
    return attrs.evolve(scn, bugs=(), expect_violations=()), (scn.bugs if bug else ())


async def migration_hunt(path: str, bug: bool, seeds: range):
    """Hunt a migration zoo file with or without its bug; the failing (seed, result) pairs, in seed order."""
    scn, bugs = as_hunted(path, bug)
    res = await mtekvm.hunt.hunt(scn, SchedulerSpec("random", seeds.start), runs=len(seeds),
                                 options=RunOptions(bugs=bugs), collect=True, shrink=False)
    return [(f.seed, f.result) for f in res.failures]


MIGRATION_ZOO = ["migration-zero-page-drops-tags.toml", "migration-tags-before-final-sync.toml",
                 "migration-resume-before-tags.toml"]


class TestMigrationZoo:
    """The VMM-side bugs of live migration: each file names its bug and the invariant it breaks."""

    @pytest.mark.parametrize("path", MIGRATION_ZOO)
    async def test_file_shows_its_bug(self, path):
        """Run as written (its bug, its seed), the file passes: the invariants it expects break, nothing else."""
        scn = load_scenario(SCENARIOS / path)
        assert scn.bugs and scn.expect_violations and scn.scheduler.kind == "random"
        r = await run_scenario(scn)
        assert r.passed, (r.failures, r.violations)

    @pytest.mark.parametrize("path", MIGRATION_ZOO)
    async def test_found_within_budget(self, path):
        """The random scheduler finds the bug within a few seeds, breaking the invariant the file expects."""
        failures = await migration_hunt(path, True, range(MIGRATION_BUDGET))
        assert failures, f"{path}: not found in {MIGRATION_BUDGET} seeds"
        expected = set(load_scenario(SCENARIOS / path).expect_violations)
        assert expected <= invariants(failures[0][1]), failures[0][1].violations

    @pytest.mark.parametrize("path", MIGRATION_ZOO)
    async def test_fixed_vmm_clean(self, path):
        """The same seeds run clean on the fixed VMM."""
        assert await migration_hunt(path, False, range(MIGRATION_BUDGET)) == []

    async def test_zero_page_loses_the_tags_of_zero_data(self):
        """With migration-zero-page-drops-tags the destination reads zero tags where the guest tagged a page
        that holds no data; the page with data keeps its tags."""
        failures = await migration_hunt("migration-zero-page-drops-tags.toml", True, range(1))
        r = failures[0][1]
        zero, data = [s for s in r.steps if s.op == "ldg"]
        assert zero.value == [0, 0, 0, 0] and data.value == [6, 6, 6, 6]

    async def test_failure_replays(self):
        """A migration race's failing schedule (two hosts, one scheduler) replays to the same failure."""
        path = "migration-tags-before-final-sync.toml"
        failures = await migration_hunt(path, True, range(MIGRATION_BUDGET))
        scn, bugs = as_hunted(path, True)
        r = failures[0][1]
        again = await run_scenario(scn, RunOptions(bugs=bugs, scheduler=SchedulerSpec("replay", None, r.schedule)))
        assert not again.passed and invariants(again) == invariants(r)
        assert [(s.outcome, s.value) for s in again.steps] == [(s.outcome, s.value) for s in r.steps]


class TestPct:
    """The PCT scheduler finds the same races, and its runs replay."""

    @pytest.mark.parametrize("path, bug", [("race-cow-vs-mprotect.toml", "flag-before-init"),
                                           ("race-shared-init.toml", "no-tag-lock")])
    async def test_found_and_replayed(self, path, bug):
        """PCT with depth 3 finds the race within the budget, the fixed model is clean, the failure replays."""
        scn = load_scenario(SCENARIOS / path)
        failing = None
        for seed in range(BUDGET):
            r = await run_scenario(scn, RunOptions(bugs=(bug,), scheduler=SchedulerSpec("pct", seed, None, 3)))
            if not r.passed:
                failing = r
                break
        assert failing is not None, f"pct did not find {bug} in {BUDGET} seeds"
        assert failing.scheduler.startswith("pct(")
        again = await run_scenario(scn, RunOptions(bugs=(bug,), scheduler=SchedulerSpec("replay", None,
                                                                                      failing.schedule)))
        assert invariants(again) == invariants(failing) and not again.passed
        for seed in range(40):
            r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("pct", seed, None, 3)))
            assert r.passed, (seed, r.violations)


class TestScenariosPassUnderRandomSchedules:
    """Every example scenario passes on the fixed model under a few random schedules."""

    @pytest.mark.parametrize("path", sorted(p.name for p in SCENARIOS.glob("*.toml")))
    async def test_example_clean(self, path):
        """The example (a zoo file without its bug) holds its expectations and breaks no invariant under seeds
        0..9."""
        scn = load_scenario(SCENARIOS / path)
        if path in MIGRATION_ZOO:  # a zoo file shows its bug as written; the fixed model must run it clean
            scn = attrs.evolve(scn, bugs=(), expect_violations=())
        assert not scn.bugs, "examples run the fixed model; bugs are switched on by --bug"
        for seed in range(10):
            r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("random", seed)))
            assert r.passed, (seed, [s for s in r.steps if not s.passed], r.violations)
