"""Failures the stress generator found while the physical-memory part was built, as replayed regressions."""

from __future__ import annotations

import tomllib

from mtekvm.runner import RunOptions, run_scenario
from mtekvm.scenario import SchedulerSpec
from mtekvm.scenario.parse import parse_scenario

KSM_TWO_PASSES = '''
name = "two KSM passes over pages shared with a child"
[processes.p0]
[[steps]]
actor = "p0"
op = "mmap"
addr = 0x30000000
size = 8192
prot = ["read", "write"]
[[steps]]
actor = "p0"
op = "store"
addr = 0x30000000
fill = 170
size = 64
[[steps]]
actor = "p0"
op = "store"
addr = 0x30001000
fill = 170
size = 64
[[steps]]
actor = "p0"
op = "madvise"
addr = 0x30000000
size = 8192
advice = "mergeable"
[[steps]]
actor = "p0"
op = "fork"
child = "c0"
[[steps]]
parallel = [
  { actor = "host", op = "ksm-merge", process = "p0", addr = 0x30000000, size = 8192 },
  { actor = "host", op = "ksm-merge", process = "p0", addr = 0x30000000, size = 8192 },
]
'''


async def test_two_ksm_passes_do_not_merge_a_page_twice():
    """stress seed 565: a KSM pass that slept at cmp_and_merge_page merged the page another pass had already
    merged, dropping a reference the child's PTE still held (its page was freed under it: TAGS-AS-WRITTEN);
    the pass now rechecks the PTE after the scheduling point."""
    scn = parse_scenario(tomllib.loads(KSM_TWO_PASSES))
    r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("replay", None,
                                                                   "host/6.1@1>host/6.2,host/6.2@3>host/6.1")))
    assert r.passed, r.violations
