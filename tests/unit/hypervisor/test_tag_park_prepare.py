"""Kernel fix ``tag-park-prepare`` (seed 002's second option): fork's copy of a pinned PROT_MTE page into a
page without tag storage prepares its parking buffer outside the page-table locks.

Without the fix, copy_highpage parks with a GFP_ATOMIC buffer under the locks, and when that fails the
child's tags are silently lost (PRESERVE-ON-COPY). With it, the atomic allocation is never needed, and a
failure of the prepared (GFP_KERNEL) buffer fails fork(2) with ENOMEM, leaving nothing behind.
"""

from __future__ import annotations

import pytest
from support import RWM, Proc, expect_errno, invariants

from hypervisor.kernel import Kernel
from hypervisor.mm.fault_inject import host_inject_fault
from hypervisor.mm.gup import host_pin_pages

PAGE = 4096


async def pinned_tagged(k: Kernel) -> tuple[Proc, int]:
    """A process whose one PROT_MTE page holds tag 5 and is pinned; the next reservation will fail."""
    p = Proc.new(k, "P")
    addr = await p("mmap", size=PAGE, prot=RWM)
    await p("stg", addr=addr, tag=5, size=64)
    assert await host_pin_pages(k, {"pid": p.pid, "addr": addr, "size": PAGE, "on": True}) == 1
    await host_inject_fault(k, {"site": "reserve-tag-storage", "times": 1})
    return p, addr


@pytest.mark.parametrize("fixed", [False, True])
async def test_failed_atomic_buffer(fixed):
    """A failing GFP_ATOMIC park loses the child's tags without the fix, and is never needed with it."""
    k = Kernel(physmem={"tag_storage": "dynamic"}, kernel_fixes=("tag-park-prepare",) if fixed else ())
    p, addr = await pinned_tagged(k)
    await host_inject_fault(k, {"site": "tag-buf-atomic", "times": 1})
    c = await p.fork("C")
    assert await c.tags(addr, 64) == ([5] * 4 if fixed else [0] * 4)
    assert await p.tags(addr, 64) == [5] * 4
    assert invariants(k) == ([] if fixed else ["PRESERVE-ON-COPY"])
    assert k.tag_storage.prepared == set()


async def test_failed_prepare_fails_fork_and_frees_everything():
    """When the prepared buffer cannot be had, fork fails with ENOMEM, the child and its page are gone."""
    k = Kernel(physmem={"tag_storage": "dynamic"}, kernel_fixes=("tag-park-prepare",))
    p, addr = await pinned_tagged(k)
    await host_inject_fault(k, {"site": "tag-buf", "times": 1})
    allocated, tasks = k.alloc.allocated, set(k.tasks)
    await expect_errno("ENOMEM", p("fork", child="C"))
    assert k.alloc.allocated == allocated and set(k.tasks) == tasks
    assert await p.tags(addr, 64) == [5] * 4
    assert invariants(k) == [] and k.tag_storage.tags_by_pfn == {}
