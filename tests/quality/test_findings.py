"""Quality: the findings of docs/findings.md still show, exactly as recorded.

A finding is kernel behaviour the model reproduces faithfully and an oracle
flags. These tests pin each one: if the model stops showing it, either the
model drifted from the kernel or the kernel code it follows changed, and the
findings page must be revisited.
"""

from __future__ import annotations

import pathlib

import attrs

from vmm.runner import RunOptions, run_scenario
from vmm.scenario import SchedulerSpec, load_scenario

FINDINGS = pathlib.Path(__file__).resolve().parents[2] / "scenarios" / "findings"


class TestHugetlbDirtyLogStaleTags:
    """Finding 3: sanitise_mte_tags() flags a whole hugetlb folio after clearing one 4 KiB page."""

    async def test_guest_sees_stale_tags_with_dirty_logging(self):
        """With dirty logging on, the guest's first LDG of the folio's second page returns tags nobody wrote."""
        scn = load_scenario(FINDINGS / "hugetlb-dirty-log-stale-tags.toml")
        r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("random", 0)))
        first, second = [s for s in r.steps if s.op == "ldg"]
        assert first.passed and first.value == [0, 0, 0, 0]
        assert not second.passed and any(second.value)
        names = {v["invariant"] for v in r.violations}
        assert names == {"NO-PUBLISH-BEFORE-VALID", "LAST-TAG-WRITTEN"}
        assert sum(v["invariant"] == "LAST-TAG-WRITTEN" for v in r.violations) == 511  # every page but the first

    async def test_block_mapping_without_dirty_logging_is_clean(self):
        """Without dirty logging stage 2 maps the folio as one 2 MiB block, sanitising all 512 pages."""
        scn = load_scenario(FINDINGS / "hugetlb-dirty-log-stale-tags.toml")
        no_logging = attrs.evolve(scn, steps=tuple(s for s in scn.steps if getattr(s, "op", "") != "dirty-log"))
        r = await run_scenario(no_logging, RunOptions(scheduler=SchedulerSpec("random", 0)))
        assert r.passed, (r.violations[:3], [s for s in r.steps if not s.passed])
