"""Quality: the hunt engine finds a bug-zoo race, shrinks its schedule, and the shrunk schedule replays.

``mtekvm.hunt`` is the many-runs loop the CLI uses: seeds for random/pct,
every interleaving for dfs/bounded, then shrinking of the first failure.
"""

from __future__ import annotations

import pytest

from hypervisor.sched import parse_schedule
from mtekvm.hunt import failure_kinds, hunt, scheduler_spec
from mtekvm.runner import ReplayError, RunOptions, run_scenario
from mtekvm.scenario import SchedulerSpec, load_scenario

RACE = "scenarios/race-cow-vs-mprotect.toml"
BUG = RunOptions(bugs=("flag-before-init",))


class TestHunt:
    async def test_random_hunt_finds_and_shrinks_flag_before_init(self):
        """A random hunt finds flag-before-init at the seed the quality budget pins, shrinks it, and it replays."""
        res = await hunt(RACE, "random", runs=60, options=BUG)
        assert not res.passed and res.first is not None
        assert res.first.seed == 18 and res.runs == 19  # the search stops at the first failure
        assert "NO-PUBLISH-BEFORE-VALID" in failure_kinds(res.first.result)
        found, shrunk = res.preemptions
        assert shrunk <= found and shrunk < found  # this one has droppable preemptions (10 found)
        assert res.shrunk is not None and not res.shrunk.passed
        assert failure_kinds(res.shrunk)[0] == failure_kinds(res.first.result)[0]
        assert res.shrunk.schedule == res.schedule and "--scheduler replay" in res.replay_command
        again = await run_scenario(load_scenario(RACE), RunOptions(bugs=BUG.bugs, scheduler=SchedulerSpec(
            "replay", None, res.schedule)))
        assert not again.passed and again.violations == res.shrunk.violations

    async def test_shrinking_is_deterministic(self):
        """The same failure shrinks to the same schedule every time."""
        a = await hunt(RACE, scheduler_spec("random", seed=18), runs=1, options=BUG)
        b = await hunt(RACE, scheduler_spec("random", seed=18), runs=1, options=BUG)
        assert a.found_schedule == b.found_schedule and a.schedule == b.schedule
        assert len(parse_schedule(a.schedule)) <= len(parse_schedule(a.found_schedule))

    async def test_bounded_finds_the_race_with_two_preemptions(self):
        """bounded:2 finds flag-before-init within its space and reports the failing run under its own policy."""
        res = await hunt(RACE, "bounded:2", options=BUG)
        assert not res.passed and not res.exhausted
        assert res.policy == "bounded(2)" and res.first is not None and res.first.seed is None
        assert res.first.result.scheduler == "bounded(2)"
        assert res.shrunk is not None and not res.shrunk.passed

    async def test_bounded_is_exhausted_clean_on_the_fixed_model(self):
        """Without the bug every interleaving with at most one preemption runs clean, and the hunt says it covered
        them."""
        res = await hunt(RACE, "bounded:1")
        assert res.passed and res.exhausted
        zero = await hunt(RACE, "bounded:0")
        assert zero.passed and zero.exhausted and 1 < zero.runs < res.runs

    async def test_dfs_budget(self):
        """dfs with a budget runs exactly that many executions and reports that it did not cover the space."""
        res = await hunt(RACE, "dfs", runs=5)
        assert res.runs == 5 and res.passed and not res.exhausted

    async def test_collect_keeps_every_failure(self):
        """With collect the hunt runs the whole budget and keeps every failing seed, in order."""
        res = await hunt(RACE, "random", runs=40, options=BUG, collect=True, shrink=False)
        seeds = [f.seed for f in res.failures]
        assert res.runs == 40 and seeds and seeds[0] == 18 and seeds == sorted(seeds)
        assert res.schedule == res.found_schedule and res.shrunk is None

    async def test_strict_replay_of_a_broken_schedule_is_refused(self):
        """A hunt replaying a schedule that does not fit raises ReplayError instead of shrinking it."""
        with pytest.raises(ReplayError):
            await hunt(RACE, SchedulerSpec("replay", None, "nobody/1@1>nobody/2"), options=BUG)
