"""Quality: ``mtekvm stress`` finds the physical-memory bug-zoo races from its generic ``physmem`` world.

Each campaign draws only the ``physmem`` family (a host with dynamic tag storage) and stops at the
first failure its bug explains. Measured with these settings (one worker, the default seeds):
``restore-into-unreserved-storage`` at run 55, ``tag-park-gfp-kernel`` at run 79,
``free-keyed-on-tagged`` at run 129, ``tag-storage-publish-before-restore`` at run 602 (the last
one only with ``MTEKVM_SLOW=1``; its directed scenario runs by default in test_physmem_zoo.py).
"""

from __future__ import annotations

import os

import pytest
from support import STRESS_SHRINK as SHRINK
from support import until_bug_worker

from mtekvm.stress.campaign import Budget, CampaignConfig, Worker
from mtekvm.stress.gen import GenConfig, parse_ops

SLOW = os.environ.get("MTEKVM_SLOW") == "1"

#: bug -> (run budget, the invariants that show it)
ZOO = {
    "restore-into-unreserved-storage": (150, {"TAG-STORAGE-NOT-CLOBBERED", "TAGGED-IMPLIES-STORAGE"}),
    "tag-park-gfp-kernel": (200, {"NO-SLEEP-IN-ATOMIC"}),
    "free-keyed-on-tagged": (300, {"TAG-BLOCK-REFCOUNT"}),
    "tag-storage-publish-before-restore": (900, {"PARKED-RESTORE-BEFORE-PUBLISH"}),
}
SLOW_ONLY = {"tag-storage-publish-before-restore"}


@pytest.mark.parametrize("bug", [pytest.param(b, marks=pytest.mark.skipif(
    not SLOW, reason="a campaign of 600+ runs: MTEKVM_SLOW=1")) if b in SLOW_ONLY else b for b in sorted(ZOO)])
async def test_physmem_campaign_finds_the_bug(bug, tmp_path):
    """A campaign of generated physmem worlds finds the bug, shrunk, and explained by the bug alone."""
    runs, shows = ZOO[bug]
    cfg = CampaignConfig(bugs=(bug,), budget=Budget(runs=runs), out=str(tmp_path),
                         gen=GenConfig(ops=parse_ops("physmem")), **SHRINK)
    stats, failures = await until_bug_worker()(cfg).run()
    mine = [f for f in failures if f["fails_without_bugs"] is False]
    assert mine, f"{bug}: not found in {stats.runs} runs ({[f['key'] for f in failures]})"
    assert mine[0]["key"]["invariant"] in shows, mine[0]["key"]
    assert mine[0]["steps_shrunk"] <= mine[0]["steps_found"]


async def test_physmem_campaign_fixed_model_clean(tmp_path):
    """The fixed model runs a campaign of physmem worlds (pressure, pins, injected failures, VMs) clean."""
    cfg = CampaignConfig(budget=Budget(runs=120), out=str(tmp_path), gen=GenConfig(ops=parse_ops("physmem")),
                         **SHRINK)
    stats, failures = await Worker(cfg).run()
    assert stats.runs == 120 and stats.errors == 0
    assert failures == [], [f["key"] for f in failures]
