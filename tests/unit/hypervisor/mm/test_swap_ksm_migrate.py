"""Swap (mteswap.c), KSM (memcmp_pages), page migration (copy_highpage) and the page-flags host op.

Reference sections 3.3, 3.4, 3.6 and invariants 10-12, 14: swap saves tags by
PG_mte_tagged (not VM_MTE) and restores them before the page is mapped again;
saved tags live exactly as long as their swap slot; a failed save keeps the
folio in memory; KSM never merges a tagged page; migration carries tags and
the flag to the new frame.
"""

from __future__ import annotations

import pytest
from support import RW, RWM, Proc, expect_errno, frame_problems, invariants, phases, run_once

from hypervisor.arm64.mte import memcmp_pages
from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged, set_page_mte_tagged, try_page_mte_tagging
from hypervisor.arm64.tags import write_tags
from hypervisor.fork import do_exit
from hypervisor.kernel import Kernel
from hypervisor.syscalls import HOST_OPS, host_ksm_merge, host_migrate_pages, host_swap_out
from shared.abi import validate_args
from shared.mte import HPAGE_SIZE

PAGE = 4096
PATTERN = [(i * 7) % 16 for i in range(256)]  # a distinct tag per granule


async def tag_pattern(p: Proc, addr: int, tags=PATTERN) -> None:
    """STG one tag per granule over a page (through POKEMTETAGS on itself: one call)."""
    assert await p("ptrace-poke-tags", target=p.pid, addr=addr, tags=list(tags)) == len(tags)


async def host(k: Kernel, op: str, **args):
    """A host op through the ABI validation, as a ``host`` connection sends it."""
    return await HOST_OPS[op](k, validate_args(op, args))


class TestSwapRoundTrip:
    """arch_prepare_to_swap / arch_swap_restore / mte_invalidate_tags."""

    async def test_tagged_anon_page_keeps_its_tags(self):
        """A PG_mte_tagged anonymous page swapped out and faulted back has its tags, flag and data."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=PAGE, prot=RWM)
        await p("store", addr=addr, data=b"swapped data")
        await tag_pattern(p, addr)
        old = p.page(addr)
        assert await host(k, "swap-out", pid=p.pid, addr=addr, size=PAGE) == 1
        assert old.free and p.pte(addr).swap is not None
        assert k.page_flags(p.pid, addr) == {"present": False, "tagged": False, "locked": False}
        assert len(k.swap.tags.store) == 1
        assert await p.tags(addr, PAGE) == PATTERN
        assert k.page_flags(p.pid, addr)["tagged"]
        assert (await p("load", addr=addr, size=12)).value == b"swapped data"
        assert k.swap.tags.store == {} and k.swap.slots == {}  # slot freed with its tags
        assert invariants(k) == []

    @pytest.mark.parametrize("first_toucher", ["untagged", "tagged"])
    async def test_shared_page_swapped_through_an_untagged_mapping_keeps_its_tags(self, first_toucher):
        """MAP_SHARED memfd tagged in A, swapped out through B's untagged mapping: the tags come back whoever faults
        first."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)  # one session: they share named objects
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        bm = await b("mmap", size=PAGE, prot=RW, share="shared", backing="memfd", object="m")
        await tag_pattern(a, am)
        await b("store", addr=bm, data=b"from B")
        assert not b.pte(bm).tagged and b.page(bm) is a.page(am)
        assert await host_swap_out(k, b.pid, bm, PAGE) == 1
        assert a.pte(am) is None and b.pte(bm) is None  # both mappings unmapped
        assert len(k.swap.tags.store) == 1  # saved by PG_mte_tagged, not VM_MTE
        if first_toucher == "untagged":
            assert (await b("load", addr=bm, size=6)).value == b"from B"
            assert b.page(bm).flags & PG_mte_tagged  # restored although mapped untagged
        assert await a.tags(am, PAGE) == PATTERN
        assert (await b("load", addr=bm, size=6)).value == b"from B"
        assert k.swap.tags.store == {}
        assert invariants(k) == []

    async def test_untagged_page_comes_back_untagged(self):
        """A page that was not PG_mte_tagged at swap-out saves no tags and comes back untagged, data intact."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=addr, data=b"plain")
        assert await host_swap_out(k, p.pid, addr, PAGE) == 1
        assert k.swap.tags.store == {}
        assert (await p("load", addr=addr, size=5)).value == b"plain"
        assert p.page(addr).flags == 0

    async def test_untagged_shmem_page_is_zeroed_when_later_mapped_tagged(self):
        """An untagged memfd page swapped out and then mapped with PROT_MTE gets zero tags, not stale ones."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)  # one session: they share named objects
        bm = await b("mmap", size=PAGE, prot=RW, share="shared", backing="memfd", object="m")
        await b("store", addr=bm, data=b"b")
        await host_swap_out(k, b.pid, bm, PAGE)
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        assert await a.tags(am, PAGE) == [0] * 256
        assert invariants(k) == []

    async def test_tags_freed_when_a_swapped_range_is_unmapped(self):
        """munmap of swapped-out anonymous pages frees their slots and saved tags."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=3 * PAGE, prot=RWM)
        for i in range(3):
            await p("stg", addr=addr + i * PAGE, tag=i + 1, size=PAGE)
        assert await host_swap_out(k, p.pid, addr, 3 * PAGE) == 3
        assert len(k.swap.tags.store) == 3
        await p("munmap", addr=addr, size=2 * PAGE)
        assert len(k.swap.tags.store) == 1 and len(k.swap.slots) == 1
        await p("madvise", addr=addr + 2 * PAGE, size=PAGE, advice="dontneed")
        assert k.swap.tags.store == {} and k.swap.slots == {}

    async def test_tags_of_a_forked_swap_entry_live_until_the_last_user(self):
        """A swap entry shared by parent and child keeps its tags until both have faulted it back."""
        k = Kernel()
        parent = Proc.new(k, "P")
        addr = await parent("mmap", size=PAGE, prot=RWM)
        await tag_pattern(parent, addr)
        await host_swap_out(k, parent.pid, addr, PAGE)
        child = await parent.fork()
        entry = parent.pte(addr).swap
        assert child.pte(addr).swap == entry and k.swap.count(entry) == 2
        assert await parent.tags(addr, PAGE) == PATTERN
        assert entry in k.swap.tags.store
        assert await child.tags(addr, PAGE) == PATTERN
        assert k.swap.tags.store == {} and k.swap.slots == {}
        assert invariants(k) == []

    async def test_swapped_cow_page_shared_by_fork_comes_back_once(self):
        """A CoW page mapped by parent and child is swapped once and both see its tags again."""
        k = Kernel()
        parent = Proc.new(k, "P")
        addr = await parent("mmap", size=PAGE, prot=RWM)
        await tag_pattern(parent, addr)
        child = await parent.fork()
        assert await host_swap_out(k, parent.pid, addr, PAGE) == 1
        assert parent.pte(addr).swap == child.pte(addr).swap
        assert await child.tags(addr, PAGE) == PATTERN
        assert await parent.tags(addr, PAGE) == PATTERN
        assert parent.page(addr) is child.page(addr)
        assert invariants(k) == []

    async def test_failed_tag_save_keeps_the_page_in_memory(self):
        """SWAP-OUT FAILS CLOSED: when no tag buffer can be allocated, swap-out fails with ENOMEM and nothing moves."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=PAGE, prot=RWM)
        await tag_pattern(p, addr)
        page = p.page(addr)
        k.swap.tags.capacity = 0
        await expect_errno("ENOMEM", host_swap_out(k, p.pid, addr, PAGE))
        assert p.page(addr) is page and not page.free
        assert k.swap.slots == {} and k.swap.tags.store == {}
        assert await p.tags(addr, PAGE) == PATTERN

    async def test_failed_save_puts_back_every_mapping(self):
        """Tags are saved after the unmap: when that fails, both processes' PTEs of a shared page come back intact."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        bm = await b("mmap", size=PAGE, prot=RW, share="shared", backing="memfd", object="m")
        await tag_pattern(a, am)
        await b("store", addr=bm, data=b"both")
        page = a.page(am)
        k.swap.tags.capacity = 0
        await expect_errno("ENOMEM", host_swap_out(k, a.pid, am, PAGE))
        assert a.page(am) is b.page(bm) is page and page.mapcount == 2 and not page.free
        assert a.vma(am).obj.pages[0] is page
        assert k.swap.slots == {} and k.swap.tags.store == {}
        assert frame_problems(k) == [] and invariants(k) == []
        assert await a.tags(am, PAGE) == PATTERN

    async def test_partial_swap_out_stops_at_the_first_failure(self):
        """With room for one tag buffer, swapping two tagged pages swaps the first and keeps the second."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=2 * PAGE, prot=RWM)
        await p("stg", addr=addr, tag=1, size=2 * PAGE)
        k.swap.tags.capacity = 1
        assert await host_swap_out(k, p.pid, addr, 2 * PAGE) == 1
        assert p.pte(addr).swap is not None and p.pte(addr + PAGE).present
        assert len(k.swap.slots) == 1
        assert await p.tags(addr, 2 * PAGE) == [1] * 512

    async def test_swap_full_is_enospc(self):
        """With every swap slot in use, swap-out fails with ENOSPC and the page stays."""
        k = Kernel(swap=PAGE)
        p = Proc.new(k, "A")
        addr = await p("mmap", size=2 * PAGE, prot=RWM)
        await p("stg", addr=addr, tag=2, size=2 * PAGE)
        assert await host_swap_out(k, p.pid, addr, 2 * PAGE) == 1
        await expect_errno("ENOSPC", host_swap_out(k, p.pid, addr + PAGE, PAGE))
        assert p.pte(addr + PAGE).present
        assert await p.tags(addr, 2 * PAGE) == [2] * 512

    async def test_zero_page_is_not_swapped(self):
        """A range mapping only the zero page has nothing to reclaim."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=PAGE, prot=RWM)
        await p("load", addr=addr, size=1)
        assert await host_swap_out(k, p.pid, addr, PAGE) == 0

    async def test_swap_out_range_errors(self):
        """The host swap-out op: unknown pid is ESRCH, an unaligned address EINVAL."""
        k = Kernel()
        p = Proc.new(k, "A")
        await expect_errno("ESRCH", host(k, "swap-out", pid=4242, addr=0, size=PAGE))
        await expect_errno("EINVAL", host(k, "swap-out", pid=p.pid, addr=8, size=PAGE))


class TestKsm:
    """One KSM pass (ksm_merge_range) with arm64's memcmp_pages."""

    async def _three_identical(self, prot):
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=3 * PAGE, prot=prot)
        for i in range(3):
            await p("store", addr=addr + i * PAGE, data=b"same content")
        return k, p, addr

    async def test_identical_untagged_pages_merge(self):
        """Three identical untagged pages in a MADV_MERGEABLE range become one write-protected KSM page."""
        k, p, addr = await self._three_identical(RW)
        await p("madvise", addr=addr, size=3 * PAGE, advice="mergeable")
        assert await host(k, "ksm-merge", pid=p.pid, addr=addr, size=3 * PAGE) == 2
        pages = {p.page(addr + i * PAGE) for i in range(3)}
        assert len(pages) == 1 and next(iter(pages)).ksm
        assert not any(p.pte(addr + i * PAGE).write for i in range(3))
        await p("store", addr=addr + PAGE, data=b"changed")  # CoW away from the KSM page
        assert p.page(addr + PAGE) not in pages
        assert (await p("load", addr=addr, size=12)).value == b"same content"
        assert (await p("load", addr=addr + PAGE, size=7)).value == b"changed"

    async def test_tagged_pages_never_merge(self):
        """Identical PG_mte_tagged pages (PROT_MTE) are never merged."""
        k, p, addr = await self._three_identical(RWM)
        await p("madvise", addr=addr, size=3 * PAGE, advice="mergeable")
        assert await host_ksm_merge(k, p.pid, addr, 3 * PAGE) == 0
        assert len({p.page(addr + i * PAGE) for i in range(3)}) == 3
        assert not any(p.page(addr + i * PAGE).ksm for i in range(3))
        assert invariants(k) == []

    async def test_without_madv_mergeable_nothing_merges(self):
        """Identical untagged pages outside MADV_MERGEABLE ranges are left alone."""
        k, p, addr = await self._three_identical(RW)
        assert await host_ksm_merge(k, p.pid, addr, 3 * PAGE) == 0

    async def test_tagged_page_between_untagged_ones(self):
        """In [untagged, tagged, untagged] identical pages, only the two untagged ones merge."""
        k, p, addr = await self._three_identical(RW)
        await p("mprotect", addr=addr + PAGE, size=PAGE, prot=RWM)
        await p("madvise", addr=addr, size=3 * PAGE, advice="mergeable")
        assert await host_ksm_merge(k, p.pid, addr, 3 * PAGE) == 1
        assert p.page(addr) is p.page(addr + 2 * PAGE)
        assert p.page(addr + PAGE) is not p.page(addr) and p.page(addr + PAGE).flags & PG_mte_tagged
        assert k.oracle.violations == []

    async def test_identical_content_merges_whatever_its_history(self):
        """Two all-zero pages are identical to memcmp whether or not they were ever written nonzero."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=2 * PAGE, prot=RW)
        await p("store", addr=addr, data=b"x")
        await p("store", addr=addr, data=b"\0")  # back to all zeros
        await p("store", addr=addr + PAGE, data=b"\0")
        assert (await p("load", addr=addr, size=PAGE)).value == (await p("load", addr=addr + PAGE, size=PAGE)).value
        await p("madvise", addr=addr, size=2 * PAGE, advice="mergeable")
        assert await host_ksm_merge(k, p.pid, addr, 2 * PAGE) == 1

    async def test_memcmp_pages(self):
        """memcmp_pages: 0 for identical untagged pages; nonzero if contents differ or either page is tagged."""
        k = Kernel()
        a, b = k.alloc.alloc_page(), k.alloc.alloc_page()
        a.write(0, b"q")
        b.write(0, b"q")
        assert memcmp_pages(k, a, b) == 0
        assert await try_page_mte_tagging(k, b)
        set_page_mte_tagged(k, b)
        assert memcmp_pages(k, a, b) != 0 and memcmp_pages(k, b, a) != 0
        c = k.alloc.alloc_page()
        c.write(0, b"r")
        assert memcmp_pages(k, a, c) != 0


class TestMigrate:
    """migrate_pages: folio_copy -> copy_highpage, then the PTEs point at the new frame."""

    async def test_tagged_anon_page_moves_with_tags_and_flag(self):
        """A tagged anonymous page moves to a new frame with its data, tags and PG_mte_tagged; the old frame is
        freed."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=PAGE, prot=RWM)
        await p("store", addr=addr, data=b"move me")
        await tag_pattern(p, addr)
        old = p.page(addr)
        assert await host(k, "migrate-pages", pid=p.pid, addr=addr, size=PAGE) == 1
        new = p.page(addr)
        assert new is not old and old.free
        assert new.flags == PG_mte_lock | PG_mte_tagged
        assert await p.tags(addr, PAGE) == PATTERN
        assert (await p("load", addr=addr, size=7)).value == b"move me"
        assert invariants(k) == []

    async def test_untagged_page_moves_untagged(self):
        """An untagged page moves with its data and stays untagged."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=addr, data=b"plain")
        old = p.page(addr)
        assert await host_migrate_pages(k, p.pid, addr, PAGE) == 1
        assert p.page(addr) is not old and p.page(addr).flags == 0
        assert (await p("load", addr=addr, size=5)).value == b"plain"

    async def test_shared_page_mapped_untagged_keeps_its_tags(self):
        """Migrating a tagged MAP_SHARED page through a mapping without PROT_MTE keeps its tags for everyone."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)  # one session: they share named objects
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        bm = await b("mmap", size=PAGE, prot=RW, share="shared", backing="memfd", object="m")
        await tag_pattern(a, am)
        await b("load", addr=bm, size=1)
        old = a.page(am)
        assert await host_migrate_pages(k, b.pid, bm, PAGE) == 1
        new = a.page(am)
        assert new is not old and b.page(bm) is new and old.free
        assert a.vma(am).obj.pages[0] is new  # the page cache points at the new frame
        assert new.flags & PG_mte_tagged
        assert await a.tags(am, PAGE) == PATTERN
        assert invariants(k) == []

    async def test_cow_shared_page_moves_for_both_processes(self):
        """A page shared copy-on-write by parent and child moves once; both map the new frame with its tags."""
        k = Kernel()
        parent = Proc.new(k, "P")
        addr = await parent("mmap", size=PAGE, prot=RWM)
        await tag_pattern(parent, addr)
        child = await parent.fork()
        assert await host_migrate_pages(k, parent.pid, addr, PAGE) == 1
        assert parent.page(addr) is child.page(addr)
        assert await child.tags(addr, PAGE) == PATTERN
        assert invariants(k) == []

    async def test_hugetlb_folio_moves_once_with_all_tags(self):
        """A tagged hugetlb folio migrates as one folio (counted once); every subpage keeps its tags."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=HPAGE_SIZE, prot=RWM, share="shared", backing="hugetlb")
        await p("stg", addr=addr + 5 * PAGE, tag=5, size=32)
        old_head = p.page(addr).folio
        frames_before = len(k.alloc.frames)
        assert await host_migrate_pages(k, p.pid, addr, HPAGE_SIZE) == 1
        new_head = p.page(addr).folio
        assert new_head is not old_head and new_head.flags & PG_mte_tagged
        assert await p.tags(addr + 5 * PAGE, 48) == [5, 5, 0]
        assert len(k.alloc.frames) == frames_before + 512  # one new folio, not one per subpage
        assert invariants(k) == []


class TestPageFlags:
    """The page-flags host op: present / PG_mte_tagged / PG_mte_lock of the frame at an address."""

    async def test_states(self):
        """Unmapped, zero page, untagged page and tagged page report the right triple."""
        k = Kernel()
        p = Proc.new(k, "A")
        t = await p("mmap", size=2 * PAGE, prot=RWM)
        u = await p("mmap", size=PAGE, prot=RW)

        async def flags(addr):  # the triple; the physical-memory keys are tests/unit/hypervisor/test_physmem_*.py's
            got = await host(k, "page-flags", pid=p.pid, addr=addr)
            return {key: got[key] for key in ("present", "tagged", "locked")}

        assert await flags(t) == {"present": False, "tagged": False, "locked": False}
        await p("load", addr=t, size=1)
        assert await flags(t) == {"present": True, "tagged": False, "locked": False}  # the zero page
        await p("store", addr=t + PAGE, data=b"x")
        assert await flags(t + PAGE) == {"present": True, "tagged": True, "locked": True}
        await p("store", addr=u, data=b"x")
        assert await flags(u) == {"present": True, "tagged": False, "locked": False}

    async def test_locked_state_is_visible(self):
        """A page whose initialiser has taken PG_mte_lock but not yet set PG_mte_tagged reports locked, untagged."""
        k = Kernel()
        p = Proc.new(k, "A")
        u = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=u, data=b"x")
        assert await try_page_mte_tagging(k, p.page(u))
        assert k.page_flags(p.pid, u) == {"present": True, "tagged": False, "locked": True}
        write_tags(k, p.page(u), 0, bytes(256))
        set_page_mte_tagged(k, p.page(u))
        assert k.page_flags(p.pid, u) == {"present": True, "tagged": True, "locked": True}

    async def test_hugetlb_tail_reports_the_head(self):
        """For a hugetlb mapping every address reports the folio head's flags."""
        k = Kernel()
        p = Proc.new(k, "A")
        addr = await p("mmap", size=HPAGE_SIZE, prot=RWM, share="shared", backing="hugetlb")
        await p("load", addr=addr + 100 * PAGE, size=1)
        assert k.page_flags(p.pid, addr + 300 * PAGE) == {"present": True, "tagged": True, "locked": True}
        assert p.page(addr + 300 * PAGE).flags == 0

    async def test_unknown_pid_is_esrch(self):
        """page-flags of a pid that does not exist fails with ESRCH."""
        k = Kernel()
        await expect_errno("ESRCH", host(k, "page-flags", pid=31337, addr=0))


# ---- concurrent paths on one page (controlled interleavings) ---------------------------------


async def one_page_host(k: Kernel):
    """P: one private PROT_MTE page (data "private", tags 5). Q: a MAP_SHARED memfd page it maps
    untagged (data "shared"); A, in Q's session, maps the same memfd PROT_MTE but has not touched it."""
    p = Proc.new(k, "P")
    q = Proc.new(k, "Q", session=p.task.session)
    a = Proc.new(k, "A", session=p.task.session)
    anon = await p("mmap", size=PAGE, prot=RWM)
    await p("store", addr=anon, tag=0, data=b"private")
    await p("stg", addr=anon, tag=5, size=PAGE)
    qm = await q("mmap", size=PAGE, prot=RW, share="shared", backing="memfd", object="m")
    await q("store", addr=qm, data=b"shared")
    am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
    return {"p": p, "q": q, "a": a, "anon": anon, "qm": qm, "am": am}


def two_contexts(x, y, fork_child: bool = False):
    """A scenario for :func:`run_once`: the one-page host, then contexts ``x`` and ``y``."""

    async def setup(k):
        st = await one_page_host(k)
        if fork_child:
            st["c"] = await st["p"].fork("C")

        async def bx(k, st):
            st["x"] = await x(k, st)

        async def by(k, st):
            st["y"] = await y(k, st)

        return st, {"x": bx, "y": by}

    return setup


def migrate_p(k, st):
    return host_migrate_pages(k, st["p"].pid, st["anon"], PAGE)


def migrate_q(k, st):
    return host_migrate_pages(k, st["q"].pid, st["qm"], PAGE)


def swap_p(k, st):
    return host_swap_out(k, st["p"].pid, st["anon"], PAGE)


def swap_q(k, st):
    return host_swap_out(k, st["q"].pid, st["qm"], PAGE)


def assert_host_consistent(run) -> None:
    """The interleaving finished, broke no invariant, and left the frames' bookkeeping sound."""
    assert run.failure is None, run.failure
    assert invariants(run.k) == []
    assert frame_problems(run.k) == []


async def assert_private_page_intact(st) -> None:
    """P still reads its data and tags 5."""
    p, anon = st["p"], st["anon"]
    assert (await p("load", addr=anon, tag=5, size=7)).value == b"private"
    assert await p.tags(anon, PAGE) == [5] * 256


async def assert_shared_page_coherent(st) -> None:
    """A and Q see one MAP_SHARED page: its data, and each other's later stores."""
    a, q = st["a"], st["q"]
    assert (await a("load", addr=st["am"], size=6)).value == b"shared"
    await a("store", addr=st["am"] + 6, data=b"+A")
    assert (await q("load", addr=st["qm"], size=8)).value == b"shared+A"
    assert a.page(st["am"]) is q.page(st["qm"]) is a.vma(st["am"]).obj.pages[0]


class TestConcurrentMigrationAndReclaim:
    """Migration and swap-out racing faults, mprotect, munmap and each other, one interleaving each.

    Each interleaving is forced with a phase policy (run one context to a named
    scheduling point, then another), so it does not depend on the scheduler's
    seed. In Linux these paths exclude each other through the folio lock, LRU
    isolation, the folio reference a fault holds, and the page-table lock with
    pte_same() re-checks.
    """

    @pytest.mark.parametrize("host_op", [swap_q, migrate_q], ids=["swap-out", "migrate"])
    async def test_shmem_fault_holds_its_page(self, host_op):
        """A's fault found the page-cache page; reclaim/migration then runs; A must not map a freed or replaced
        frame."""

        def fault(k, st):
            return st["a"]("load", addr=st["am"], size=6)

        run, _ = await run_once(two_contexts(fault, host_op),
                                policy=phases(("x", "try_page_mte_tagging:test"), ("y", None), ("x", None)))
        assert run.state["x"].value == b"shared"
        assert_host_consistent(run)
        await assert_shared_page_coherent(run.state)

    @pytest.mark.parametrize("host_op", [swap_q, migrate_q], ids=["swap-out", "migrate"])
    async def test_mprotect_holds_its_page(self, host_op):
        """Q's mprotect(PROT_MTE) re-installing a PTE races reclaim/migration of that page; no freed or leaked frame."""

        def mprotect(k, st):
            return st["q"]("mprotect", addr=st["qm"], size=PAGE, prot=RWM)

        run, _ = await run_once(two_contexts(mprotect, host_op),
                                policy=phases(("x", "try_page_mte_tagging:test"), ("y", None), ("x", None)))
        assert_host_consistent(run)
        await assert_shared_page_coherent(run.state)

    @pytest.mark.parametrize("op", ["munmap", "dontneed", "exit"])
    async def test_zap_during_migration_is_not_undone(self, op):
        """munmap/MADV_DONTNEED/exit while the page is under migration: no PTE comes back, no frame leaks."""

        def zap(k, st):
            if op == "munmap":
                return st["p"]("munmap", addr=st["anon"], size=PAGE)
            if op == "exit":
                return do_exit(k, st["p"].task)
            return st["p"]("madvise", addr=st["anon"], size=PAGE, advice="dontneed")

        run, _ = await run_once(two_contexts(zap, migrate_p),
                                policy=phases(("y", "migrate:copied"), ("x", None), ("y", None)))
        assert_host_consistent(run)
        assert run.state["p"].pte(run.state["anon"]) is None
        if op == "exit":  # nothing of P's is left
            assert not any(page.rmap for page in run.k.alloc.live_pages() if page.zone == "normal"
                           and any(mm is run.state["p"].task.mm for mm, _ in page.rmap))
        if op == "dontneed":  # the range reads as a fresh zero page again
            assert (await run.state["p"]("load", addr=run.state["anon"], size=7)).value == bytes(7)

    async def test_cow_fault_during_migration(self):
        """The child's CoW write fault replacing a PTE that migration unmapped meanwhile: no stale rmap, no leak."""

        def cow(k, st):
            return st["c"]("store", addr=st["anon"], tag=5, data=b"child!!")

        run, _ = await run_once(two_contexts(cow, migrate_p, fork_child=True),
                                policy=phases(("x", "wp_page_copy:map"), ("y", "migrate:copied"), ("x", None),
                                              ("y", None)))
        assert_host_consistent(run)
        st = run.state
        assert (await st["c"]("load", addr=st["anon"], tag=5, size=7)).value == b"child!!"
        await assert_private_page_intact(st)

    async def test_two_migrations_of_one_page(self):
        """Two migrations that both picked the page: it ends on one frame with its data and tags."""
        run, _ = await run_once(two_contexts(migrate_p, migrate_p),
                                policy=phases(("x", "migrate:unmap"), ("y", "migrate:unmap"),
                                              ("x", "copy_highpage:test"), ("y", None), ("x", None)))
        assert_host_consistent(run)
        await assert_private_page_intact(run.state)

    async def test_swap_out_during_migration(self):
        """Swap-out that picked the page before migration unmapped it: data and tags survive, nothing leaks."""
        run, _ = await run_once(two_contexts(migrate_p, swap_p),
                                policy=phases(("y", "add_to_swap"), ("x", "copy_highpage:test"),
                                              ("y", None), ("x", None)))
        assert_host_consistent(run)
        await assert_private_page_intact(run.state)

    async def test_sequential_controls(self):
        """Control: the same operations one after another leave everything consistent."""
        for x, y in ((swap_q, migrate_q), (migrate_p, swap_p), (migrate_p, migrate_p)):
            run, _ = await run_once(two_contexts(x, y), policy=phases(("x", None), ("y", None)))
            assert_host_consistent(run)
            await assert_private_page_intact(run.state)
            await assert_shared_page_coherent(run.state)


class TestReplayIsDeterministic:
    """A recorded schedule, replayed, must reproduce the run (DESIGN.md, the concurrency model)."""

    async def test_migration_of_a_page_mapped_twice_replays_identically(self):
        """Migrating a page mapped by two processes while one of them faults on it replays to the same trace every
        time."""

        async def setup(k):
            st = await one_page_host(k)
            await st["a"]("load", addr=st["am"], size=1)  # the page now has two mappings (A and Q)

            async def reader(k, st):
                await k.sched.point("reader:start")
                st["read"] = (await st["a"]("load", addr=st["am"], size=6)).value

            return st, {"a": reader, "h": lambda k, st: migrate_q(k, st)}

        first, _ = await run_once(setup, policy=phases(("h", "migrate:copied"), ("a", None), ("h", None)))
        assert first.failure is None and first.state["read"] == b"shared"
        runs = [first]
        for _ in range(12):  # keep every run alive, so no two kernels share object addresses
            again, _ = await run_once(setup, schedule=first.schedule)
            runs.append(again)
            assert again.failure is None, again.failure
            assert again.trace == first.trace
