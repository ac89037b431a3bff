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


COW_SOURCE_SWAPPED = '''
name = "a CoW fault whose source is swapped out while its copy is allocated"
[host]
kernel-fixes = ["sanitise-whole-hugetlb-folio"]
ram = "64MiB"
tag-storage = "dynamic"
tag-block-size = "16KiB"
[processes.p0]
[processes.p1]
[vms.vm0]
setup = "manual"
[[steps]]
actor = "p0"
op = "mmap"
addr = 0x30000000
size = 16384
prot = ["read", "write"]
[[steps]]
actor = "p0"
op = "mmap"
addr = 0x20000000
size = 8192
prot = ["read", "write", "mte"]
backing = "memfd"
object = "obj"
[[steps]]
actor = "p1"
op = "mmap"
addr = 0x28000000
size = 8192
prot = ["read", "write"]
backing = "memfd"
object = "obj"
[[steps]]
actor = "p0"
op = "store"
addr = 0x30002000
fill = 34
size = 64
[[steps]]
actor = "p0"
op = "store"
addr = 0x30003000
fill = 35
size = 64
[[steps]]
actor = "p0"
op = "stg"
addr = 0x20000000
tag = 9
size = 64
[[steps]]
actor = "p0"
op = "stg"
addr = 0x20001000
tag = 3
size = 64
[[steps]]
actor = "host"
op = "migrate-pages"
process = "p0"
addr = 0x30000000
size = 16384
to = "tag-storage"
[[steps]]
actor = "p0"
op = "mprotect"
addr = 0x30000000
size = 4096
prot = ["read", "write", "mte"]
[[steps]]
actor = "p0"
op = "stg"
addr = 0x30000000
tag = 10
size = 4096
[[steps]]
actor = "host"
op = "alloc-pages"
name = "ts"
from = "tag-storage"
count = 8
[[steps]]
actor = "vmm:vm0"
op = "mmap"
addr = 0x10000000
size = 16384
prot = ["read", "write"]
backing = "anon"
[[steps]]
actor = "vmm:vm0"
op = "enable-cap"
cap = "arm-mte"
[[steps]]
actor = "vmm:vm0"
op = "set-memory-region"
slot = 0
ipa = 0x40000000
size = 16384
addr = 0x10000000
[[steps]]
actor = "vmm:vm0"
op = "create-vcpu"
[[steps]]
actor = "guest:vm0"
op = "enable-mte"
tcf = "async"
[[steps]]
actor = "guest:vm0"
op = "map"
va = 0x40000000
ipa = 0x40000000
size = 16384
attr = "tagged"
[[steps]]
actor = "guest:vm0"
op = "store"
addr = 0x40001000
fill = 17
size = 16
[[steps]]
actor = "p0"
op = "fork"
child = "c0"
[[steps]]
parallel = [
  { actor = "vmm:vm0", op = "madvise", addr = 0x10000000, size = 4096, advice = "dontneed" },
  { actor = "c0", op = "stg", addr = 0x30000000, tag = 8, size = 4096 },
  { actor = "guest:vm0", op = "stg", addr = 0x40000000, tag = 10, size = 64 },
  { actor = "host", op = "swap-out", process = "p0", addr = 0x30000000, size = 4096 },
]
'''

COW_SOURCE_SWAPPED_SCHEDULE = ("p0/19@3>vmm:vm0/20.1,vmm:vm0/20.1@1>guest:vm0/20.3,guest:vm0/20.3@4>c0/20.2,"
                               "c0/20.2@3>host/20.4,c0/20.2@4>vmm:vm0/20.1,vmm:vm0/20.1@3>guest:vm0/20.3")


async def test_a_cow_source_is_not_freed_while_its_copy_is_allocated():
    """stress seed 6468: c0's CoW fault slept allocating its copy (reserving tag storage) with no reference on the
    source; swap-out freed the source, the guest's fault reused the frame for the VMM, and c0's fault then dropped
    the reference it took too late, freeing the VMM's page under its PTE (TAGS-AS-WRITTEN). The fault now holds
    the source from before the allocation (do_wp_page()'s folio_get()), so swap-out finds it busy."""
    scn = parse_scenario(tomllib.loads(COW_SOURCE_SWAPPED))
    r = await run_scenario(scn, RunOptions(scheduler=SchedulerSpec("replay", None, COW_SOURCE_SWAPPED_SCHEDULE)))
    assert r.passed, r.violations
