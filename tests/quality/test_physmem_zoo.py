"""Quality: the random scheduler finds the four tag-storage zoo bugs (issue 11); the fixed model is clean.

Each bug is hunted on the scenario that exposes it, a race of two actors, over a budget of
seeds; the same seeds must run clean on the fixed model, and a failure replays.

Measured (random, seeds 0..40): restore-into-unreserved-storage and free-keyed-on-tagged at
every seed; tag-park-gfp-kernel at every seed (fork copies the pinned page under the PTLs);
tag-storage-publish-before-restore 7 of 41 (first at seed 2), when the second racer looks at
the flag inside the window. The fixed model: none.
"""

from __future__ import annotations

import pathlib

import pytest

import mtekvm.hunt
from mtekvm.runner import RunOptions, run_scenario
from mtekvm.scenario import SchedulerSpec, load_scenario

SCENARIOS = pathlib.Path(__file__).resolve().parents[2] / "scenarios"
BUDGET = 40

ZOO = [
    ("restore-into-unreserved-storage", "physmem-b-swap-in-through-untagged-mapping.toml",
     "TAG-STORAGE-NOT-CLOBBERED"),
    ("tag-storage-publish-before-restore", "physmem-b-migrated-page-parks-its-tags.toml",
     "PARKED-RESTORE-BEFORE-PUBLISH"),
    ("tag-park-gfp-kernel", "physmem-b-fork-pinned-page-parked.toml", "NO-SLEEP-IN-ATOMIC"),
    ("free-keyed-on-tagged", "physmem-b-tagged-alloc-frees-its-storage.toml", "TAG-BLOCK-REFCOUNT"),
]


async def hunt(path: str, bugs: tuple[str, ...], seeds: range):
    """Run ``path`` under each seed; the failing (seed, result) pairs, in seed order."""
    scn = load_scenario(SCENARIOS / path)
    res = await mtekvm.hunt.hunt(scn, SchedulerSpec("random", seeds.start), runs=len(seeds),
                                 options=RunOptions(bugs=bugs), collect=True, shrink=False)
    return [(f.seed, f.result) for f in res.failures]


def invariants(result) -> set[str]:
    """The names of the invariants a run broke."""
    return {v["invariant"] for v in result.violations}


@pytest.mark.parametrize("bug, path, invariant", ZOO)
async def test_found_within_budget(bug, path, invariant):
    """The random scheduler finds the bug within the budget, and the run breaks the invariant that names it."""
    failures = await hunt(path, (bug,), range(BUDGET))
    assert failures, f"{bug} not found in {BUDGET} seeds"
    assert any(invariant in invariants(r) for _seed, r in failures), [r.violations for _s, r in failures[:2]]


@pytest.mark.parametrize("bug, path, invariant", ZOO)
async def test_fixed_model_clean(bug, path, invariant):
    """The same seeds run clean on the fixed model."""
    assert await hunt(path, (), range(BUDGET)) == []


async def test_failure_replays():
    """The publish-before-restore race's failing schedule replays to the same invariants."""
    bug, path, invariant = ZOO[1]
    failures = await hunt(path, (bug,), range(BUDGET))
    seed, r = next((s, r) for s, r in failures if invariant in invariants(r))
    scn = load_scenario(SCENARIOS / path)
    again = await run_scenario(scn, RunOptions(bugs=(bug,), scheduler=SchedulerSpec("replay", None, r.schedule)))
    assert invariant in invariants(again) and not again.passed, seed
