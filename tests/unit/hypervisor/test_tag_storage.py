"""Dynamic tag storage (RFC v3) in the host kernel: fault-on-access, reservation, parking, injection, pins.

Contract part B: a tagged mapping of a page without storage is fault-on-access until an access
reserves it (or migrates the folio); parked tags are written before PG_tag_storage_reserved;
the tag buffer sites fail as the contract says; pinned pages are skipped by migration, reclaim
and KSM and copied at once by fork; a lasting reservation failure ends ``livelock``.
"""

from __future__ import annotations

from support import RW, RWM, Proc, expect_errno, invariants

from hypervisor.kernel import Kernel
from hypervisor.syscalls import HOST_OPS
from shared.abi import validate_args

PAGE = 4096


async def host(k: Kernel, op: str, **args):
    """A host op through the ABI validation, as a ``host`` connection sends it."""
    return await HOST_OPS[op](k, validate_args(op, args))


def dynamic(**kw) -> Kernel:
    """A host with dynamic tag storage management."""
    return Kernel(physmem={"tag_storage": "dynamic"}, **kw)


async def flags(k: Kernel, p: Proc, addr: int) -> dict:
    return await host(k, "page-flags", pid=p.pid, addr=addr)


class TestFaultOnAccess:
    """mte_sync_tags() makes a tagged PTE of a page without storage fault-on-access."""

    async def test_tagged_fault_reserves_storage(self):
        """A PROT_MTE write fault allocates __GFP_TAGGED: the page has storage and is tagged at once."""
        k = dynamic()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM)
        await p("stg", addr=a, tag=3, size=16)
        f = await flags(k, p, a)
        assert (f["tagged"], f["storage-reserved"], f["fault-on-access"]) == (True, True, False)
        assert (await host(k, "meminfo"))["tag-blocks-reserved"] == 2
        assert invariants(k) == []

    async def test_failed_reservation_then_first_access(self):
        """With the fault's reservation failing once, the PTE is made fault-on-access and the access replays: it
        reserves the storage then, and the page ends tagged."""
        k = dynamic()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM)
        await host(k, "inject-fault", site="reserve-tag-storage")
        await p("store", addr=a, data=b"q")
        f = await flags(k, p, a)
        assert (f["tagged"], f["storage-reserved"], f["fault-on-access"]) == (True, True, False)
        assert (await p("load", addr=a, size=1)).value == b"q"
        assert invariants(k) == []

    async def test_mprotect_mte_makes_fault_on_access(self):
        """mprotect(PROT_MTE) of a page allocated untagged leaves it fault-on-access until its first access."""
        k = dynamic()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=a, data=b"data")
        await p("mprotect", addr=a, size=PAGE, prot=RWM)
        f = await flags(k, p, a)
        assert (f["fault-on-access"], f["tagged"], f["storage-reserved"]) == (True, False, False)
        assert invariants(k) == []
        assert (await p("load", addr=a, size=4)).value == b"data"
        f = await flags(k, p, a)
        assert (f["fault-on-access"], f["tagged"], f["storage-reserved"]) == (False, True, True)

    async def test_livelock(self):
        """When every reservation fails, the access is replayed fault-replay-limit times and ends livelock."""
        k = dynamic(fault_replay_limit=4)
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=a, data=b"data")
        await p("mprotect", addr=a, size=PAGE, prot=RWM)
        await host(k, "inject-fault", site="reserve-tag-storage", times=-1)
        r = await p("ldg", addr=a, size=16)
        assert r.fault == {"kind": "livelock", "addr": a}
        assert "FAULT-FORWARD-PROGRESS" in invariants(k)
        await host(k, "inject-fault", site="reserve-tag-storage", times=0)
        assert (await p("ldg", addr=a, size=16)).value == [0]

    async def test_ptrace_eio_when_storage_cannot_be_had(self):
        """PTRACE_PEEKMTETAGS faults a page without storage first; if that fails it returns EIO."""
        k = dynamic()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=a, data=b"d")
        await p("mprotect", addr=a, size=PAGE, prot=RWM)
        await host(k, "inject-fault", site="reserve-tag-storage", times=-1)
        await expect_errno("EIO", p("ptrace-peek-tags", target=p.pid, addr=a, count=1))
        await host(k, "inject-fault", site="reserve-tag-storage", times=0)
        assert list(await p("ptrace-peek-tags", target=p.pid, addr=a, count=1)) == [0]

    async def test_inject_fault_unknown_site(self):
        """inject-fault of an unknown site is EINVAL."""
        await expect_errno("EINVAL", host(dynamic(), "inject-fault", site="nowhere"))


class TestParking:
    """tags_by_pfn: migration targets, swap-in through an untagged mapping, the tag buffer sites."""

    async def test_migration_parks_and_first_access_restores(self):
        """A migrated tagged page has its tags parked; the first access writes them and frees the entry."""
        k = dynamic()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM)
        await p("stg", addr=a, tag=6, size=32)
        assert await host(k, "migrate-pages", pid=p.pid, addr=a, size=PAGE) == 1
        f = await flags(k, p, a)
        assert (f["parked"], f["fault-on-access"], f["tagged"]) == (True, True, False)
        assert (await host(k, "meminfo"))["tags-parked"] == 1
        assert invariants(k) == []
        assert await p.tags(a, 32) == [6, 6]
        f = await flags(k, p, a)
        assert (f["parked"], f["tagged"], f["storage-reserved"]) == (False, True, True)
        assert (await host(k, "meminfo"))["tags-parked"] == 0

    async def test_swap_in_tag_buffer_failure_is_enomem(self):
        """Swap-in that must park the tags and cannot get the buffer fails the access with ENOMEM."""
        k = dynamic()
        a_ = Proc.new(k, "a")
        b_ = Proc.new(k, "b", a_.task.session)  # one namespace: the same memfd object
        a = await a_("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="o")
        b = await b_("mmap", size=PAGE, prot=RW, share="shared", backing="memfd", object="o")
        await a_("stg", addr=a, tag=2, size=16)
        assert await host(k, "swap-out", pid=a_.pid, addr=a, size=PAGE) == 1
        await host(k, "inject-fault", site="tag-buf")
        await expect_errno("ENOMEM", b_("load", addr=b, size=1))
        assert (await b_("load", addr=b, size=1)).value == bytes(1)  # the next try parks them
        assert (await host(k, "meminfo"))["tags-parked"] == 1
        assert await a_.tags(a, 16) == [2]
        assert invariants(k) == []

    async def test_swap_out_tag_buffer_failure_keeps_the_page(self):
        """A swap-out that cannot save the tags leaves the page mapped (it is skipped)."""
        k = dynamic()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM)
        await p("stg", addr=a, tag=8, size=16)
        await host(k, "inject-fault", site="tag-buf")
        assert await host(k, "swap-out", pid=p.pid, addr=a, size=PAGE) == 0
        assert p.pte(a).present and await p.tags(a, 16) == [8]


class TestPins:
    """pin-pages: FOLL_PIN without FOLL_LONGTERM."""

    async def test_pins_nest_and_block_migration_swap_ksm(self):
        """A pinned page is skipped by migrate-pages, swap-out and ksm-merge; unpinning too often is EINVAL."""
        k = Kernel()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RW)
        assert await host(k, "pin-pages", pid=p.pid, addr=a, size=PAGE) == 1  # faults it in
        assert await host(k, "pin-pages", pid=p.pid, addr=a, size=PAGE) == 1
        assert p.page(a).pins == 2
        assert await host(k, "migrate-pages", pid=p.pid, addr=a, size=PAGE) == 0
        assert await host(k, "swap-out", pid=p.pid, addr=a, size=PAGE) == 0
        assert await host(k, "pin-pages", pid=p.pid, addr=a, size=PAGE, on=False) == 1
        assert await host(k, "pin-pages", pid=p.pid, addr=a, size=PAGE, on=False) == 1
        await expect_errno("EINVAL", host(k, "pin-pages", pid=p.pid, addr=a, size=PAGE, on=False))
        await expect_errno("EFAULT", host(k, "pin-pages", pid=p.pid, addr=a + 16 * PAGE, size=PAGE))
        assert await host(k, "migrate-pages", pid=p.pid, addr=a, size=PAGE) == 1

    async def test_fork_copies_a_pinned_page_at_once(self):
        """fork copies a pinned private anonymous page for the child (tags too) instead of sharing it CoW."""
        k = Kernel()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM)
        await p("stg", addr=a, tag=5, size=16)
        await host(k, "pin-pages", pid=p.pid, addr=a, size=PAGE)
        c = await p.fork("c")
        assert c.page(a) is not p.page(a) and p.pte(a).write
        assert await c.tags(a, 16) == [5]
        assert invariants(k) == []


class TestAtomicAndParkedChecks:
    """NO-SLEEP-IN-ATOMIC and PARKED-TAGS-CONSUMED-ONCE can fail."""

    async def test_reserve_under_a_spinlock(self):
        """reserve_tag_storage under a page-table lock breaks NO-SLEEP-IN-ATOMIC."""
        from hypervisor.arm64.mte_tag_storage import spin_lock

        k = dynamic()
        page = k.alloc.alloc_page("movable")
        with spin_lock(k, "ptl[test]"):
            await k.tag_storage.reserve_tag_storage(page)
        assert "NO-SLEEP-IN-ATOMIC" in invariants(k)
        assert k.atomic == {}

    async def test_parked_entry_for_a_page_with_storage(self):
        """Tags parked for a page that has storage break PARKED-TAGS-CONSUMED-ONCE; for a freed page too."""
        k = dynamic()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM)
        await p("stg", addr=a, tag=1, size=16)
        k.tag_storage.tags_by_pfn[p.page(a).pfn] = (bytes(128), None)
        assert "PARKED-TAGS-CONSUMED-ONCE" in invariants(k)
        k2 = dynamic()
        k2.tag_storage.tags_by_pfn[0x80005] = (bytes(128), None)
        assert "PARKED-TAGS-CONSUMED-ONCE" in invariants(k2)


async def test_fork_keeps_fault_on_access():
    """fork shares a fault-on-access PTE as it is: the child's first access reserves storage, reads its zero tags."""
    k = dynamic()
    p = Proc.new(k, "p")
    a = await p("mmap", size=PAGE, prot=RW)
    await p("store", addr=a, data=b"d")
    await p("mprotect", addr=a, size=PAGE, prot=RWM)
    c = await p.fork("c")
    assert c.pte(a).fault_on_access and invariants(k) == []
    assert await c.tags(a, 16) == [0]
    assert invariants(k) == []
