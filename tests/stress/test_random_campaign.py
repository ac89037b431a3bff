"""Stress: random parallel host-op scenarios under random schedules keep every invariant.

Each generated scenario has three processes sharing a memfd object (one maps
it PROT_MTE, one untagged, one forked child with private tagged memory) and
runs groups of concurrent ops on a few pages: tagging, stores, mprotect to
PROT_MTE, swap-out, migration, KSM, dontneed. Outcomes are not predicted;
the oracles judge. The default run is small; ``MTEKVM_SLOW=1`` runs the long
campaign (opt-in, minutes).
"""

from __future__ import annotations

import os
import random

import pytest

from mtekvm.runner import RunOptions, run_scenario
from mtekvm.scenario import SchedulerSpec, parse_scenario

SLOW = os.environ.get("MTEKVM_SLOW") == "1"
SCENARIOS, SEEDS = (300, 20) if SLOW else (12, 4)

SHARED_A, SHARED_B, PRIV = 0x2000_0000, 0x3000_0000, 0x4000_0000
PAGES = 3


def _op(rng: random.Random, actor: str) -> dict:
    page = rng.randrange(PAGES) * 4096
    base = {"a": SHARED_A, "b": SHARED_B, "c": PRIV}[actor]
    addr = base + page
    choice = rng.choice(["stg", "stg", "store", "ldg", "mprotect", "swap", "migrate", "dontneed", "ksm", "load"])
    tag = rng.randrange(16)
    if choice == "stg":
        return {"actor": actor, "op": "stg", "addr": addr, "tag": tag, "size": 4096}
    if choice == "store":
        return {"actor": actor, "op": "store", "addr": addr + 16 * rng.randrange(4), "fill": tag, "size": 16,
                "tag": tag}
    if choice == "load":
        return {"actor": actor, "op": "load", "addr": addr, "size": 32, "tag": tag}
    if choice == "ldg":
        return {"actor": actor, "op": "ldg", "addr": addr, "size": 64}
    if choice == "mprotect":
        return {"actor": actor, "op": "mprotect", "addr": base, "size": PAGES * 4096,
                "prot": ["read", "write", "mte"]}
    if choice == "swap":
        return {"actor": "host", "op": "swap-out", "process": actor, "addr": addr, "size": 4096}
    if choice == "migrate":
        return {"actor": "host", "op": "migrate-pages", "process": actor, "addr": addr, "size": 4096}
    if choice == "ksm":
        return {"actor": "host", "op": "ksm-merge", "process": actor, "addr": base, "size": PAGES * 4096}
    if actor == "c":
        return {"actor": actor, "op": "madvise", "addr": addr, "size": 4096, "advice": "dontneed"}
    return {"actor": actor, "op": "ldg", "addr": addr, "size": 16}


def generate(seed: int) -> dict:
    """A random scenario table (as TOML would decode it)."""
    rng = random.Random(seed)
    steps = [
        {"actor": "a", "op": "mmap", "addr": SHARED_A, "size": PAGES * 4096, "prot": ["read", "write", "mte"],
         "backing": "memfd", "object": "shm"},
        {"actor": "b", "op": "mmap", "addr": SHARED_B, "size": PAGES * 4096, "prot": ["read", "write"],
         "backing": "memfd", "object": "shm"},
        {"actor": "b", "op": "store", "addr": SHARED_B, "fill": 1, "size": 64},
        {"actor": "a", "op": "mmap", "addr": PRIV, "size": PAGES * 4096, "prot": ["read", "write"]},
        {"actor": "a", "op": "madvise", "addr": PRIV, "size": PAGES * 4096, "advice": "mergeable"},
        {"actor": "a", "op": "store", "addr": PRIV, "fill": 2, "size": 64},
        {"actor": "a", "op": "fork", "child": "c"},
    ]
    for _ in range(rng.randrange(2, 5)):
        actors = rng.sample(["a", "b", "c"], rng.randrange(2, 4))
        steps.append({"parallel": [_op(rng, x) for x in actors]})
    steps.append({"actor": "c", "op": "mprotect", "addr": PRIV, "size": PAGES * 4096, "prot": ["read", "write", "mte"]})
    steps.append({"actor": "c", "op": "ldg", "addr": PRIV, "size": PAGES * 4096})
    return {"name": f"campaign-{seed}", "processes": {"a": {}, "b": {}}, "steps": steps}


@pytest.mark.parametrize("index", range(SCENARIOS))
async def test_campaign(index):
    """A generated scenario breaks no invariant under any of its random schedules."""
    scn = parse_scenario(generate(index), path=f"<campaign {index}>")
    for seed in range(SEEDS):
        r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("random", seed)))
        assert not r.violations, (index, seed, r.schedule, r.violations)
