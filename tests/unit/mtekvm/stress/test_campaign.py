"""Stress campaigns: budgets, deterministic seed slices, finding, shrinking and deduplicating a zoo race."""

from __future__ import annotations

import itertools

import pytest

from mtekvm.runner import RunOptions, run_scenario
from mtekvm.scenario import SchedulerSpec
from mtekvm.stress.campaign import Budget, CampaignConfig, Worker, parse_budget, parse_shard, seeds
from mtekvm.stress.gen import GenConfig, load


def test_parse_budget():
    """Times and run counts are budgets; anything else is an error."""
    assert parse_budget("60s") == Budget(seconds=60)
    assert parse_budget("2m") == Budget(seconds=120)
    assert parse_budget("90") == Budget(seconds=90)
    assert parse_budget("5000runs") == Budget(runs=5000)
    for bad in ("0s", "runs", "-1s", "abc", "0runs", "1x"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_parse_shard():
    """I/N with 0 <= I < N is a shard; anything else is an error."""
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_shards_and_jobs_partition_the_seeds():
    """Shards and the workers inside them take disjoint slices that together cover every seed."""
    taken: list[int] = []
    for i in range(3):
        for w in range(2):
            cfg = CampaignConfig(shard=(i, 3), jobs=2, first_seed=10)
            taken += list(itertools.islice(seeds(cfg, w), 20))
    assert len(taken) == len(set(taken))
    assert set(range(10, 10 + 100)) <= set(taken)


def test_shard_is_deterministic():
    """The same shard gives the same seeds every time."""
    cfg = CampaignConfig(shard=(1, 4))
    assert list(itertools.islice(seeds(cfg, 0), 5)) == [1, 5, 9, 13, 17]


async def test_run_budget_is_kept():
    """A run budget of N runs exactly N runs on the fixed model and finds nothing."""
    w = Worker(CampaignConfig(budget=Budget(runs=12), gen=GenConfig(ops=("fault", "tags", "vma"))))
    stats, failures = await w.run()
    assert stats.runs == 12
    assert failures == []
    assert stats.errors == 0


async def test_finds_shrinks_and_replays_no_tag_lock(tmp_path):
    """With no-tag-lock on, a campaign finds a second tag initialiser, shrinks it, and the files replay it."""
    cfg = CampaignConfig(bugs=("no-tag-lock",), budget=Budget(runs=200), max_failures=1, out=str(tmp_path),
                         gen=GenConfig(ops=("fault", "tags", "vma")))
    stats, failures = await Worker(cfg).run()
    assert failures, f"no failure in {stats.runs} runs"
    f = failures[0]
    assert f["key"]["invariant"] in ("EXCLUSIVE-INIT", "PRESERVE-ON-MAP", "INIT-ONCE")
    assert f["steps_shrunk"] <= f["steps_found"] and f["steps_shrunk"] <= 6
    assert f["preemptions_shrunk"] <= f["preemptions_found"]
    assert f["fails_without_bugs"] is False
    path = tmp_path / f"{f['name']}.toml"
    path.write_text(f["scenario_toml"])
    from mtekvm.scenario import load_scenario
    scn = load_scenario(str(path))
    again = await run_scenario(scn, RunOptions(bugs=("no-tag-lock",),
                                               scheduler=SchedulerSpec("replay", None, f["schedule"])))
    assert not again.passed and f["key"]["invariant"] in {v["invariant"] for v in again.violations}
    assert str(path) in f["replay"]


async def test_same_bug_reported_once():
    """A campaign that hits the same failure on many seeds reports it once per oracle and kernel path."""
    cfg = CampaignConfig(bugs=("kvm-tags-zero-page",), budget=Budget(runs=40), shrink=False,
                         gen=GenConfig(ops=("guest",), hugetlb=False))
    stats, failures = await Worker(cfg).run()
    assert stats.failing_runs > len(failures) >= 1
    keys = [(f["key"]["invariant"], tuple(f["key"]["path"])) for f in failures]
    assert len(keys) == len(set(keys))


async def test_scenario_shrinking_keeps_the_failure():
    """The shrunk scenario of a deterministic zoo bug is small and still fails with the same invariant."""
    cfg = CampaignConfig(bugs=("kvm-tags-zero-page",), budget=Budget(runs=30), max_failures=1,
                         gen=GenConfig(ops=("guest",), hugetlb=False))
    _, failures = await Worker(cfg).run()
    f = failures[0]
    assert f["key"]["invariant"] == "ZERO-PAGE-NEVER-FLAGGED"
    assert f["steps_shrunk"] < f["steps_found"]
    scn_text = f["scenario_toml"]
    assert 'op = "ldg"' in scn_text or 'op = "load"' in scn_text


def test_generated_load_uses_the_given_path():
    """A loaded generated scenario carries the path the replay command will name."""
    from mtekvm.stress.gen import generate
    assert load(generate(3), "out/x.toml").path == "out/x.toml"


async def test_pct_learns_its_step_bound():
    """A PCT campaign replaces the first-execution bound of 40 with the contended decisions it saw."""
    cfg = CampaignConfig(policy="pct", budget=Budget(runs=6), gen=GenConfig(ops=("fault", "tags")))
    w = Worker(cfg)
    stats, _ = await w.run()
    assert stats.pct_bound != 40 and stats.pct_bound >= 1
    assert w._policy(99).steps == stats.pct_bound


async def test_coverage_campaign_accumulates_pairs():
    """A coverage campaign keeps one policy object, whose covered pairs grow over the runs."""
    cfg = CampaignConfig(policy="coverage", budget=Budget(runs=6), gen=GenConfig(ops=("fault", "tags")))
    w = Worker(cfg)
    stats, _ = await w.run()
    assert w._policy(1) is w._policy(2)
    assert stats.coverage_pairs == len(w.coverage.covered) > 5
