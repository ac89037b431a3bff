"""The migration's hypervisor fast paths stay exact: lazy ghost digests (hypervisor/ghost.py Entry, page.py
Page.data_hash), the bulk page allocator (alloc_pages_bulk) and COPY_TAGS FROM_GUEST's inline comparison."""

from __future__ import annotations

from support import RWM, Proc, Vm, invariants

from hypervisor.ghost import data_hash
from hypervisor.kernel import Kernel
from hypervisor.page import PageAllocator
from hypervisor.syscalls import host_migrate_pages, host_swap_out

PAGE = 4096
IPA = 0x4000_0000


async def stored(k: Kernel, npages: int = 4, data: bytes = b"lazy digest"):
    """A process with ``npages`` private PROT_MTE pages, each written with ``data`` (and its index)."""
    p = Proc.new(k, "P")
    addr = await p("mmap", size=npages * PAGE, prot=RWM)
    for i in range(npages):
        await p("store", addr=addr + i * PAGE, data=data + bytes([i]))
    return p, addr


def entry(k: Kernel, p: Proc, addr: int):
    """The ghost entry of ``p``'s private page at ``addr``."""
    return k.oracle.ghost.spaces[p.task.mm][addr >> 12]


class TestLazyDigests:
    async def test_a_store_records_no_digest_until_asked(self):
        """After a store the entry points at the page and no CRC was taken; asking gives the page's digest."""
        k = Kernel()
        p, addr = await stored(k, 1)
        e, page = entry(k, p, addr), p.page(addr)
        assert e._src is page and page._dhash == -1
        assert e.data == data_hash(page.data) and e._src is None

    async def test_a_frame_changed_behind_the_ghost_keeps_the_old_digest(self):
        """A frame whose data changes without a recorded store gives its pending entries the digest of the old
        data first, so the state check reports the change."""
        k = Kernel()
        p, addr = await stored(k, 1)
        page = p.page(addr)
        want = data_hash(page.data)
        page.write(0, b"changed behind the ghost's back")
        assert entry(k, p, addr).data == want
        assert invariants(k) == ["TAGS-AS-WRITTEN"]

    async def test_a_frame_replaced_wholesale_keeps_the_old_digest(self):
        """Assigning a frame's data (as a buggy copy would) also settles the pending digest first."""
        k = Kernel()
        p, addr = await stored(k, 1)
        page = p.page(addr)
        want = data_hash(page.data)
        page.data = None
        assert entry(k, p, addr).data == want
        assert invariants(k) == ["TAGS-AS-WRITTEN"]

    async def test_rewrites_swap_and_migration_stay_clean(self):
        """A page stored again (small stores), swapped out, migrated and loaded: the digests follow the content
        and nothing is reported; the load of a moved page compares real digests."""
        k = Kernel()
        p, addr = await stored(k, 3)
        await p("store", addr=addr + 8, data=b"second")
        await p("store", addr=addr + PAGE + 100, data=bytes(50))
        assert await host_swap_out(k, p.pid, addr, PAGE) == 1
        assert await host_migrate_pages(k, p.pid, addr + PAGE, 2 * PAGE) == 2
        got = (await p("load", addr=addr, tag=0, size=3 * PAGE)).value
        assert got[8:14] == b"second" and got[PAGE + 100:PAGE + 150] == bytes(50)
        assert invariants(k) == []

    async def test_a_load_of_lost_data_is_reported(self):
        """A load of a page whose data was lost since its store (a frame changed behind the ghost) reports."""
        k = Kernel()
        p, addr = await stored(k, 2)
        p.page(addr + PAGE).write(0, b"lost")
        await p("load", addr=addr, tag=0, size=2 * PAGE)
        assert [m for m, *_ in k.oracle._ghost_pending] == [m for m, *_ in k.oracle._ghost_pending if "load by" in m]
        assert len(k.oracle._ghost_pending) == 1  # the load saw it (reported at the next state check)

    async def test_a_digest_is_kept_until_the_data_changes(self):
        """Page.data_hash is computed once and recomputed after a write."""
        k = Kernel()
        p, addr = await stored(k, 1)
        page = p.page(addr)
        h = page.data_hash()
        assert page._dhash == h
        page.write(0, b"x")
        assert page._dhash == -1 and page.data_hash() == data_hash(page.data) != h


class TestBulkAllocator:
    def test_bulk_gives_the_pages_alloc_page_gives_in_order(self):
        """alloc_pages_bulk hands out the same frames, in the same order and state, as alloc_page one by one,
        freed pages first."""
        one, bulk = PageAllocator(64 << 20), PageAllocator(64 << 20)
        for a in (one, bulk):
            pages = [a.alloc_page() for _ in range(10)]
            for pg in pages[2:7]:
                a.free_page(pg)
        want = [one.alloc_page() for _ in range(20)]
        got = bulk.alloc_pages_bulk(20)
        assert [pg.pfn for pg in got] == [pg.pfn for pg in want]
        assert all(pg.refcount == 1 and not pg.free and pg.data is None for pg in got)
        assert bulk.allocated == one.allocated and bulk.nodes[0].used == one.nodes[0].used

    def test_bulk_stops_when_memory_runs_out(self):
        """alloc_pages_bulk returns what is free, then nothing (it never raises)."""
        a = PageAllocator(1 << 20)
        got = a.alloc_pages_bulk(a.nr_frames + 5)
        assert len(got) == a.nr_frames == a.allocated
        assert a.alloc_pages_bulk(3) == []


class TestCopyTagsFromGuest:
    async def test_a_tag_lost_behind_the_ghost_is_reported_by_a_dump(self):
        """A free-scheduler dump of pages whose tags (and shadow) changed without a recorded write reports
        TAGS-AS-WRITTEN; an untouched dump reports nothing."""
        k = Kernel()
        vm = await Vm.create(k, name="vmm:dump")
        hva = await vm.ram(0, IPA, 8 * PAGE, prot=RWM)
        await vm.copy_tags(IPA, 8 * PAGE, from_guest=False, tags=bytes([3]) * (8 * 256))
        await vm.copy_tags(IPA, 8 * PAGE, from_guest=True)
        assert invariants(k) == []
        page = vm.vmm.page(hva + 5 * PAGE)
        page.tags[:] = bytes([9]) * 256
        page.shadow = bytes([9]) * 256  # LAST-TAG-WRITTEN's record moved with it: only the ghost can tell
        r = await vm.copy_tags(IPA, 8 * PAGE, from_guest=True)
        assert r["tags"][5 * 256] == 9
        assert len(k.oracle._ghost_pending) == 1 and "FROM_GUEST read tags" in k.oracle._ghost_pending[0][0]
