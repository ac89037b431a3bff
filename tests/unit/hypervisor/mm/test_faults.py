"""Page faults, mte_sync_tags on mapping, copy-on-write and copy_highpage (reference sections 3.2, 3.3).

The rules checked: an anonymous write fault under VM_MTE gets a
__GFP_ZEROTAGS page (zero tags, PG_mte_tagged before it is mapped); a read
fault maps the zero page, which is never flagged; mapping a page through a
tagged, accessible PTE zeroes the tags of an untagged page and keeps those of
a tagged one; copies (fork CoW, copy_highpage) carry tags and the flag only
from a tagged source.
"""

from __future__ import annotations

from support import RW, RWM, Proc, invariants

from hypervisor.arm64.copypage import copy_highpage
from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged, set_page_mte_tagged, try_page_mte_tagging
from hypervisor.arm64.tags import ZERO_TAGS, write_tags
from hypervisor.kernel import Kernel

PAGE = 4096


def new(**kw) -> tuple[Kernel, Proc]:
    k = Kernel(**kw)
    return k, Proc.new(k, "A")


class TestAnonymousFaults:
    """do_anonymous_page: the zero page for reads, a zeroed (and, under VM_MTE, zero-tagged) page for writes."""

    async def test_write_fault_under_vm_mte_gives_zero_tags_and_the_flag(self):
        """A write fault in a PROT_MTE mapping maps a PG_mte_tagged page whose tags are all zero."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RWM)
        await p("store", addr=addr, data=b"hello")
        page = p.page(addr)
        assert page.flags & PG_mte_tagged
        assert bytes(page.tags) == ZERO_TAGS
        assert k.page_flags(p.pid, addr) == {"present": True, "tagged": True, "locked": True}
        assert await p.tags(addr, PAGE) == [0] * 256
        assert invariants(k) == []

    async def test_zero_fill_clears_a_reused_frames_stale_tags(self):
        """A frame freed with nonzero tags comes back, under VM_MTE, with zero tags (not its old ones)."""
        k, p = new()
        a = await p("mmap", size=PAGE, prot=RWM)
        await p("stg", addr=a, tag=13, size=PAGE)
        old = p.page(a)
        await p("munmap", addr=a, size=PAGE)
        assert old.free and bytes(old.tags) == bytes([13]) * 256  # tags stay stale in a free frame
        b = await p("mmap", size=PAGE, prot=RWM)
        await p("store", addr=b, data=b"x")
        assert p.page(b) is old
        assert await p.tags(b, PAGE) == [0] * 256

    async def test_write_fault_without_vm_mte_leaves_the_page_untagged(self):
        """A write fault in a mapping without PROT_MTE maps an untagged page whose tag memory is not touched."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=addr, data=b"x")
        page = p.page(addr)
        assert page.flags == 0 and not p.pte(addr).tagged
        assert bytes(page.tags) != ZERO_TAGS  # the boot garbage is still there

    async def test_read_fault_maps_the_zero_page_never_flagged(self):
        """A read fault in a PROT_MTE mapping maps the (special) zero page, which stays unflagged with zero tags."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RWM)
        r = await p("load", addr=addr, size=8)
        assert r.value == bytes(8)
        pte = p.pte(addr)
        assert pte.special and pte.page is k.alloc.zero_page and pte.tagged
        assert k.alloc.zero_page.flags == 0
        assert k.page_flags(p.pid, addr)["tagged"] is False
        assert await p.tags(addr, 64) == [0, 0, 0, 0]
        assert invariants(k) == []

    async def test_write_after_read_replaces_the_zero_page_with_a_tagged_page(self):
        """Writing to a zero-page mapping under VM_MTE allocates a new zero-tagged, PG_mte_tagged page."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RWM)
        await p("load", addr=addr, size=1)
        await p("stg", addr=addr, tag=2, size=16)
        page = p.page(addr)
        assert page is not k.alloc.zero_page and page.flags & PG_mte_tagged
        assert await p.tags(addr, 48) == [2, 0, 0]
        assert k.alloc.zero_page.flags == 0 and bytes(k.alloc.zero_page.tags) == ZERO_TAGS

    async def test_stg_on_zero_page_mapping_does_not_tag_the_zero_page(self):
        """STG is a write: it never writes the zero page's tags, it breaks CoW first."""
        k, p = new()
        addr = await p("mmap", size=2 * PAGE, prot=RWM)
        await p("load", addr=addr, size=1)
        await p("load", addr=addr + PAGE, size=1)
        await p("stg", addr=addr, tag=15, size=PAGE)
        assert bytes(k.alloc.zero_page.tags) == ZERO_TAGS
        assert await p.tags(addr + PAGE, 16) == [0]


class TestMprotectSyncsTags:
    """mprotect(PROT_MTE) on present pages: change_protection -> set_pte_at -> mte_sync_tags."""

    async def test_untagged_private_page_gets_zero_tags_and_keeps_data(self):
        """An untagged present page becomes PG_mte_tagged with zero tags; its data is unchanged."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=addr, data=b"payload")
        page = p.page(addr)
        assert bytes(page.tags) != ZERO_TAGS
        await p("mprotect", addr=addr, size=PAGE, prot=RWM)
        assert p.page(addr) is page and page.flags & PG_mte_tagged and p.pte(addr).tagged
        assert bytes(page.tags) == ZERO_TAGS
        assert (await p("load", addr=addr, size=7)).value == b"payload"
        assert invariants(k) == []

    async def test_shared_memfd_keeps_tags_of_tagged_pages_and_zeroes_the_rest(self):
        """MAP_SHARED memfd: B's mprotect(PROT_MTE) keeps the tags A stored and zeroes the untagged page."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)  # one session: they share named objects
        am = await a("mmap", size=2 * PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        bm = await b("mmap", size=2 * PAGE, prot=RW, share="shared", backing="memfd", object="m")
        await a("stg", addr=am, tag=7, size=PAGE)  # page 0: tagged by A
        await b("load", addr=bm, size=1)  # B maps page 0 untagged
        await b("store", addr=bm + PAGE, data=b"b")  # page 1: only B, untagged
        p0, p1 = b.page(bm), b.page(bm + PAGE)
        assert a.page(am) is p0 and not b.pte(bm).tagged
        assert p0.flags & PG_mte_tagged and not p1.flags & PG_mte_tagged
        assert await b.tags(bm, 32) == [0, 0]  # untagged mapping: tags read as zero
        await b("mprotect", addr=bm, size=2 * PAGE, prot=RWM)
        assert await b.tags(bm, PAGE) == [7] * 256
        assert await a.tags(am, PAGE) == [7] * 256
        assert p1.flags & PG_mte_tagged and await b.tags(bm + PAGE, PAGE) == [0] * 256
        assert invariants(k) == []

    async def test_second_tagged_mapping_of_a_tagged_page_keeps_its_tags(self):
        """Mapping an already-tagged MAP_SHARED page tagged in another process keeps its tags (PRESERVE ON MAP)."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)  # one session: they share named objects
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        await a("stg", addr=am, tag=4, size=PAGE)
        bm = await b("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        assert await b.tags(bm, 32) == [4, 4]
        assert invariants(k) == []

    async def test_prot_none_mte_page_is_not_synced(self):
        """mprotect(PROT_MTE) without PROT_READ exposes no tags, so the page is not initialised yet."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=addr, data=b"x")
        await p("mprotect", addr=addr, size=PAGE, prot=["mte"])
        assert not p.page(addr).flags & PG_mte_tagged

    async def test_prot_none_mte_page_is_synced_when_it_becomes_readable(self):
        """A present page mprotect'ed PROT_NONE|PROT_MTE, then PROT_READ|PROT_MTE, gets zero tags and the flag."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=addr, data=b"x")
        await p("mprotect", addr=addr, size=PAGE, prot=["mte"])
        await p("mprotect", addr=addr, size=PAGE, prot=RWM)
        assert p.page(addr).flags & PG_mte_tagged
        assert await p.tags(addr, 64) == [0, 0, 0, 0]
        assert invariants(k) == []

    async def test_mprotect_of_zero_page_mapping_does_not_flag_it(self):
        """mprotect(PROT_MTE) over a zero-page mapping retags the special PTE but never flags the zero page."""
        k, p = new()
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("load", addr=addr, size=1)
        await p("mprotect", addr=addr, size=PAGE, prot=RWM)
        assert p.pte(addr).special and p.pte(addr).tagged
        assert k.alloc.zero_page.flags == 0
        assert invariants(k) == []


class TestForkCopyOnWrite:
    """fork + write fault: wp_page_copy -> copy_user_highpage -> copy_highpage."""

    async def test_cow_copies_tags_and_flag_from_a_tagged_page(self):
        """The child's write after fork gets a new page with the parent's tags and PG_mte_tagged."""
        k, parent = new()
        addr = await parent("mmap", size=PAGE, prot=RWM)
        await parent("stg", addr=addr, tag=3, size=PAGE)
        await parent("stg", addr=addr + 32, tag=8, size=16)
        old = parent.page(addr)
        child = await parent.fork("child")
        assert child.page(addr) is old and not child.pte(addr).write
        await child("store", addr=addr, data=b"child")
        new_page = child.page(addr)
        assert new_page is not old
        assert new_page.flags & PG_mte_tagged and bytes(new_page.tags) == bytes(old.tags)
        assert await child.tags(addr, 64) == [3, 3, 8, 3]
        assert await parent.tags(addr, 64) == [3, 3, 8, 3]
        assert (await parent("load", addr=addr, size=5)).value == bytes(5)
        assert invariants(k) == []

    async def test_cow_after_fork_isolates_later_tag_writes(self):
        """After the CoW break, STG in the child does not change the parent's tags and vice versa."""
        k, parent = new()
        addr = await parent("mmap", size=PAGE, prot=RWM)
        await parent("stg", addr=addr, tag=3, size=PAGE)
        child = await parent.fork()
        await child("stg", addr=addr, tag=9, size=16)
        await parent("stg", addr=addr + 16, tag=1, size=16)
        assert await child.tags(addr, 48) == [9, 3, 3]
        assert await parent.tags(addr, 48) == [3, 1, 3]
        assert invariants(k) == []

    async def test_cow_from_an_untagged_page_leaves_the_copy_untagged(self):
        """The child's CoW copy of an untagged page (no PROT_MTE) is not PG_mte_tagged."""
        k, parent = new()
        addr = await parent("mmap", size=PAGE, prot=RW)
        await parent("store", addr=addr, data=b"p")
        child = await parent.fork()
        await child("store", addr=addr, data=b"c")
        assert child.page(addr) is not parent.page(addr)
        assert not child.page(addr).flags & PG_mte_tagged

    async def test_fork_shares_the_zero_page_mapping(self):
        """A zero-page mapping survives fork as a zero-page mapping; the child's write gets a zero-tagged page."""
        k, parent = new()
        addr = await parent("mmap", size=PAGE, prot=RWM)
        await parent("load", addr=addr, size=1)
        child = await parent.fork()
        assert child.pte(addr).special
        await child("store", addr=addr, data=b"z")
        assert child.page(addr).flags & PG_mte_tagged and await child.tags(addr, 16) == [0]
        assert k.alloc.zero_page.flags == 0

    async def test_child_inherits_mte_ctrl_and_tco(self):
        """fork copies the TCF mode, include mask and PSTATE.TCO to the child."""
        k, parent = new()
        await parent("prctl", tcf="sync", include=0x00F0)
        await parent("tco", on=True)
        child = await parent.fork()
        assert await child("prctl-get") == {"tcf": "sync", "include": 0x00F0}
        assert child.task.tco is True


class TestCopyHighpage:
    """copy_highpage(to, from) called directly (migration and CoW share it)."""

    async def _tagged_page(self, k, tag):
        page = k.alloc.alloc_page()
        assert await try_page_mte_tagging(k, page)
        write_tags(k, page, 0, bytes([tag]) * 256)
        set_page_mte_tagged(k, page)
        page.write(0, b"data")
        return page

    async def test_from_tagged_copies_tags_and_flag(self):
        """A tagged source gives the destination its data, tags and PG_mte_tagged."""
        k = Kernel()
        src = await self._tagged_page(k, 6)
        dst = k.alloc.alloc_page()
        await copy_highpage(k, dst, src)
        assert dst.read(0, 4) == b"data"
        assert bytes(dst.tags) == bytes([6]) * 256 and dst.flags == PG_mte_lock | PG_mte_tagged
        assert invariants(k) == []

    async def test_from_untagged_copies_data_only(self):
        """An untagged source gives the destination its data; tags and flags stay as they were."""
        k = Kernel()
        src = k.alloc.alloc_page()
        src.write(0, b"data")
        dst = k.alloc.alloc_page()
        before = bytes(dst.tags)
        await copy_highpage(k, dst, src)
        assert dst.read(0, 4) == b"data"
        assert dst.flags == 0 and bytes(dst.tags) == before

    async def test_into_an_already_tagged_page_overwrites_its_tags(self):
        """The try on the destination is ignored: a reused tagged destination gets the source's tags."""
        k = Kernel()
        src = await self._tagged_page(k, 6)
        dst = await self._tagged_page(k, 2)
        await copy_highpage(k, dst, src)
        assert bytes(dst.tags) == bytes([6]) * 256 and dst.flags & PG_mte_tagged

    async def test_without_mte_only_data_is_copied(self):
        """On a CPU without MTE, copy_highpage copies the data and nothing else."""
        k = Kernel(mte=False)
        src = k.alloc.alloc_page()
        src.flags = PG_mte_tagged  # cannot happen without MTE; proves the early return
        src.write(0, b"d")
        dst = k.alloc.alloc_page()
        await copy_highpage(k, dst, src)
        assert dst.read(0, 1) == b"d" and dst.flags == 0

    async def test_hugetlb_copy_from_head_covers_every_subpage(self):
        """A tagged hugetlb folio copied from its head gives every destination subpage its source's tags, flag on the
        head."""
        k = Kernel()
        src = k.alloc.alloc_hugetlb_folio()
        for i, sub in enumerate(src.subpages):
            write_tags(k, sub, 0, bytes([i % 16]) * 256)
        src.flags = PG_mte_lock | PG_mte_tagged
        dst = k.alloc.alloc_hugetlb_folio()
        await copy_highpage(k, dst, src)
        assert dst.flags & PG_mte_tagged
        assert all(bytes(d.tags) == bytes(s.tags) for d, s in zip(dst.subpages, src.subpages, strict=True))
        assert all(d.flags == 0 for d in dst.subpages[1:])

    async def test_hugetlb_copy_from_a_tail_does_nothing_to_tags(self):
        """copy_highpage from a tail subpage of a tagged folio copies data only (tags go once, from the head)."""
        k = Kernel()
        src = k.alloc.alloc_hugetlb_folio()
        src.flags = PG_mte_lock | PG_mte_tagged
        dst = k.alloc.alloc_hugetlb_folio()
        before = bytes(dst.subpages[3].tags)
        await copy_highpage(k, dst.subpages[3], src.subpages[3])
        assert dst.flags == 0 and bytes(dst.subpages[3].tags) == before


class TestFileBackedFaults:
    """do_fault on shmem/memfd objects: do_read_fault, do_shared_fault, do_cow_fault."""

    async def test_private_mapping_of_a_tagged_memfd_page_copies_its_tags(self):
        """A MAP_PRIVATE PROT_MTE mapping reads the shared page's tags; its write gets a private copy with them."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        await a("store", addr=am, data=b"orig")
        await a("stg", addr=am, tag=3, size=PAGE)
        bm = await b("mmap", size=PAGE, prot=RWM, share="private", backing="memfd", object="m")
        assert (await b("load", addr=bm, size=4)).value == b"orig"
        assert b.page(bm) is a.page(am) and await b.tags(bm, 32) == [3, 3]
        await b("store", addr=bm, data=b"mine")
        await b("stg", addr=bm, tag=9, size=16)
        assert b.page(bm) is not a.page(am) and b.page(bm).flags & PG_mte_tagged
        assert await b.tags(bm, 48) == [9, 3, 3]
        assert (await a("load", addr=am, size=4)).value == b"orig" and await a.tags(am, 32) == [3, 3]
        assert invariants(k) == []

    async def test_private_tagged_read_of_an_untagged_page_cache_page_initialises_it(self):
        """Mapping an untagged page-cache page through a tagged private PTE zeroes its tags and flags it."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)
        am = await a("mmap", size=PAGE, prot=RW, share="shared", backing="memfd", object="m")
        await a("store", addr=am, data=b"x")
        page = a.page(am)
        assert not page.flags & PG_mte_tagged
        bm = await b("mmap", size=PAGE, prot=RWM, share="private", backing="memfd", object="m")
        assert await b.tags(bm, PAGE) == [0] * 256
        assert b.page(bm) is page and page.flags & PG_mte_tagged and bytes(page.tags) == ZERO_TAGS
        assert invariants(k) == []

    async def test_unnamed_shared_anonymous_memory_is_shared_with_the_child(self):
        """MAP_SHARED|MAP_ANONYMOUS PROT_MTE memory is one page for parent and child after fork, tags included."""
        k, parent = new()
        addr = await parent("mmap", size=PAGE, prot=RWM, share="shared")
        await parent("store", addr=addr, data=b"p")
        child = await parent.fork()
        await child("stg", addr=addr, tag=12, size=16)
        await child("store", addr=addr + 1, data=b"c")
        assert await parent.tags(addr, 16) == [12]
        assert (await parent("load", addr=addr, size=2)).value == b"pc"
        assert parent.page(addr) is child.page(addr)
