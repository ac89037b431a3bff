"""Dynamic tag storage (RFC "arm64: Add support for dynamic tag storage reuse", v3, never merged).

arch/arm64/kernel/mte_tag_storage.c as posted (v2 for the file, v3 for the changes): the tag
storage of every *dynamic node* (node0 and DRAM nodes without their own ``tag-storage``) is a
MIGRATE_CMA region the allocator hands out to movable, untagged allocations. A page of a dynamic
node has tags only once the blocks of tag storage that hold them are reserved
(``reserve_tag_storage``): claimed with ``cma_alloc_range`` (the block's data migrated away) and
refcounted in ``tag_blocks_reserved`` (RFC invariant 5). PG_tag_storage_reserved (PG_arch_4)
says a page has its storage. Tags that must go to a page without storage are parked by pfn in
``tags_by_pfn`` and written when its storage is reserved, before the flag is set.

Everything here is a no-op on a static host (``TagStorage.enabled`` False): no per-page work.

Deliberate differences: a block claim migrates the block's pages one by one through
:func:`hypervisor.mm.migrate.migrate_folio` (no pageblock isolation); ``tags_by_pfn`` entries
hold the tags one per byte (the RFC's buffers are packed); GFP_ATOMIC parking (Alexandru
Elisei's first option in seed 002) with v3's ``WARN_ON(!tags)`` when it fails.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from hypervisor.arm64.mte_lock import PG_mte_tagged, set_page_mte_tagged, try_page_mte_tagging
from hypervisor.arm64.tags import mte_restore_page_tags
from hypervisor.locks import ModelMutex
from hypervisor.page import Page
from hypervisor.sched import current_actor

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm.memory_hotplug import Node
    from hypervisor.mm_types import Pte

PG_tag_storage_reserved = 1 << 4  # PG_arch_4

#: The allocation sites ``inject-fault`` may make fail.
FAULT_SITES = ("reserve-tag-storage", "tag-buf", "tag-buf-atomic")


class Livelock(Exception):  # noqa: N818 - an outcome, not an error
    """An access whose fault was replayed ``fault_replay_limit`` times (the outcome ``livelock``)."""

    def __init__(self, addr: int):
        super().__init__(f"fault at {addr:#x} replayed without progress")
        self.addr = addr


class TagStorage:
    """The RFC's global state: ``tag_blocks_reserved``, ``tags_by_pfn``, ``tag_blocks_lock``.

    Ghost state for the oracles: ``holders`` (which folio holds how many references on which
    block) and ``restoring`` (pfns between PG_tag_storage_reserved and the end of their restore).
    """

    def __init__(self, k: Kernel):
        self.k = k
        layout = k.alloc.layout
        self.enabled = layout.mode == "dynamic"
        self.configured = layout.configured_dynamic  # the RFC's kernel (KVM patch 16), even if disabled
        self.block_size_pages = layout.block_size_pages
        self.blocks: dict[int, int] = {}  # tag_blocks_reserved: block's first pfn -> refcount
        self.holders: dict[int, dict[int, int]] = {}  # ghost: block -> {folio pfn: references it holds}
        self.tags_by_pfn: dict[int, tuple[bytes, bytes | bytearray | None]] = {}  # pfn -> (packed tags, shadow)
        self.restoring: set[int] = set()
        self.prepared: set[int] = set()  # pfns with a tag buffer prepared outside the locks (tag-park-prepare)
        self.lock = ModelMutex(k.sched, "tag_blocks_lock")
        self.inject: dict[str, int] = {}
        if self.enabled:
            k.alloc.free_prepare = self.arch_free_pages_prepare
            self._reserve_zero_page()

    # ---- geometry -------------------------------------------------------------------

    def node_needs_storage(self, page: Page) -> Node | None:
        """The page's node if it is dynamic (its pages need storage reserved), else None."""
        if not self.enabled or not page.is_ram:
            return None
        n = self.k.alloc.node_of(page)
        return n if n.dynamic else None

    def blocks_of(self, folio: Page) -> tuple[list[int], int]:
        """The blocks a folio's tags live in, and the references each reservation takes on them.

        ``block = tag_range.start + rounddown((pfn - mem_range.start) / 32, block_size_pages)``;
        ``DIV_ROUND_UP(max(2^order / 32, 1), block_size_pages)`` blocks, each ``min(2^order,
        32 * block_size_pages)`` references. The zero page lives in node0's last block.
        """
        bsp = self.block_size_pages
        nr = len(folio.subpages) or 1
        if folio is self.k.alloc.zero_page:  # in node0, at its end (the pages allocated last)
            n = self.k.alloc.nodes[0]
            first = n.ts_start + n.ts_pages - bsp
        else:
            n = self.k.alloc.node_of(folio)
            first = n.ts_start + ((folio.pfn - n.start) // 32) // bsp * bsp
        count = -(-max(nr // 32, 1) // bsp)
        return [first + i * bsp for i in range(count)], min(nr, 32 * bsp)

    # ---- queries --------------------------------------------------------------------------

    def page_tag_storage_reserved(self, page: Page) -> bool:
        """page_tag_storage_reserved(): PG_tag_storage_reserved on the folio."""
        return bool(page.folio.flags & PG_tag_storage_reserved)

    def has_storage(self, page: Page) -> bool:
        """The page's tags have somewhere to live: true off dynamic nodes, false for tag storage itself."""
        if self.node_needs_storage(page) is None:
            return True
        if page.is_tag_storage:
            return False
        if not self.page_tag_storage_reserved(page):
            return False
        self._check_published(page.folio)
        return True

    def _check_published(self, folio: Page) -> None:
        """PARKED-RESTORE-BEFORE-PUBLISH: whoever sees PG_tag_storage_reserved may use the tags, so none
        of the folio's pages may still have tags parked (RFC invariant 8, race R6)."""
        for p in folio.subpages or [folio]:
            if p.pfn in self.tags_by_pfn:
                self.k.oracle.report("PARKED-RESTORE-BEFORE-PUBLISH",
                                     f"{current_actor.get()} sees pfn {p.pfn:#x} PG_tag_storage_reserved while its "
                                     "parked tags are not written yet", p)

    def lacks_storage(self, page: Page) -> bool:
        """A tagged mapping of this page must be fault-on-access (mte_sync_tags' test)."""
        return self.enabled and not self.has_storage(page)

    def parked(self, pfn: int) -> bool:
        """tags_by_pfn holds tags for ``pfn``."""
        return pfn in self.tags_by_pfn

    # ---- fault injection ---------------------------------------------------------------------

    def should_fail(self, site: str) -> bool:
        """Whether this call of ``site`` fails (``inject-fault``)."""
        left = self.inject.get(site, 0)
        if left == 0:
            return False
        if left > 0:
            self.inject[site] = left - 1
        return True

    # ---- boot ------------------------------------------------------------------------------

    def _reserve_zero_page(self) -> None:
        """mte_tag_storage_init(): reserve_tag_storage(ZERO_PAGE(0)) (v3 patch 25); its blocks are free at boot."""
        zp = self.k.alloc.zero_page
        blocks, refs = self.blocks_of(zp)
        for b in blocks:
            for pfn in range(b, b + self.block_size_pages):
                self.k.alloc.take_pfn(pfn)
            self.blocks[b] = 1 + refs
            self.holders.setdefault(b, {})[zp.pfn] = refs
        zp.flags |= PG_tag_storage_reserved

    # ---- reservation -------------------------------------------------------------------------

    async def reserve_tag_storage(self, page: Page, gfp: str = "tagged") -> bool:
        """reserve_tag_storage() (mte_tag_storage.c): True once the folio has its storage.

        Takes a reference on every block already reserved, claims the others with
        cma_alloc_range(), writes the folio's parked tags, then sets PG_tag_storage_reserved
        (restore before publish, RFC invariant 8; ``tag-storage-publish-before-restore``
        reverses it). Fails (after a full rollback) when a claim fails or ``inject-fault
        site = "reserve-tag-storage"`` says so. May sleep: NO-SLEEP-IN-ATOMIC is checked.
        """
        k = self.k
        folio = page.folio
        if self.node_needs_storage(folio) is None:
            return True
        if folio.is_tag_storage:
            return False  # tag storage has no storage of its own: the caller migrates it
        might_sleep(k, "reserve_tag_storage")
        if self.page_tag_storage_reserved(folio):
            self._check_published(folio)
            return True
        await self.lock.lock()
        try:
            if self.page_tag_storage_reserved(folio):
                return True
            if folio.free:
                return False
            if self.should_fail("reserve-tag-storage"):
                return False
            blocks, refs = self.blocks_of(folio)
            taken: list[int] = []
            for b in blocks:  # xa_lock_irqsave: a reference on each block already reserved
                if b in self.blocks:
                    self._get_block(b, folio, refs)
                    taken.append(b)
            for b in blocks:
                if b in taken:
                    continue
                claimed = await self.cma_alloc_range(b)
                if not claimed or folio.free:
                    if claimed:  # the folio went away while we slept: give the block back to CMA
                        for pfn in range(b, b + self.block_size_pages):
                            k.alloc.release_pfn(pfn)
                    if b in self.blocks and folio.pfn in self.holders.get(b, {}):
                        taken.append(b)
                    for t in taken:
                        self._put_block(t, folio)
                    return False
                self.blocks[b] = 1  # dcache_inval_poc(); xa_store()
                self._get_block(b, folio, refs)
                taken.append(b)
            if "tag-storage-publish-before-restore" in k.bugs:
                self._publish(folio)
                self.restoring.add(folio.pfn)
                try:
                    await k.sched.point("reserve_tag_storage:published")
                    await self.mte_restore_tags_for_pfn(folio)
                finally:
                    self.restoring.discard(folio.pfn)
            else:
                await self.mte_restore_tags_for_pfn(folio)
                self._publish(folio)
            return True
        finally:
            self.lock.unlock()

    def _publish(self, folio: Page) -> None:
        for p in folio.subpages or [folio]:
            p.flags |= PG_tag_storage_reserved
        self.k.sched.wake()

    def _get_block(self, b: int, folio: Page, refs: int) -> None:
        self.blocks[b] += refs
        h = self.holders.setdefault(b, {})
        h[folio.pfn] = h.get(folio.pfn, 0) + refs

    def _put_block(self, b: int, folio: Page) -> None:
        refs = self.holders.get(b, {}).pop(folio.pfn, 0)
        if b not in self.blocks:
            self.k.warn_once(f"free_tag_storage: block {b:#x} is not reserved")
            return
        self.blocks[b] -= refs
        if self.blocks[b] <= 1:  # back at 1: cma_release()
            del self.blocks[b]
            self.holders.pop(b, None)
            for pfn in range(b, b + self.block_size_pages):
                self.k.alloc.release_pfn(pfn)

    async def cma_alloc_range(self, block: int) -> bool:
        """cma_alloc_range(cma, block, block_size_pages): alloc_contig_range() of one block.

        Free pages are taken off the CMA free list; a page in use as data is migrated away
        (its data kept); a pinned page, or one that cannot be migrated now, makes the claim
        fail (-EBUSY) and the pages already taken are released.
        """
        from hypervisor.mm.migrate import migrate_away

        k = self.k
        alloc = k.alloc
        got: list[int] = []
        ok = True
        for pfn in range(block, block + self.block_size_pages):
            await k.sched.point("cma_alloc_range")
            if alloc.take_pfn(pfn):
                got.append(pfn)
                continue
            page = alloc.frames.get(pfn)
            if page is None or page.free or page.pins or page.is_hugetlb or not await migrate_away(k, page) \
                    or not alloc.take_pfn(pfn):
                ok = False
                break
            got.append(pfn)
        if not ok:
            for pfn in got:
                alloc.release_pfn(pfn)
        return ok

    async def mte_restore_tags_for_pfn(self, folio: Page) -> None:
        """mte_restore_tags_for_pfn(): write the tags parked for the folio's pages, and tag them."""
        k = self.k
        for p in folio.subpages or [folio]:
            entry = self.tags_by_pfn.pop(p.pfn, None)
            if entry is None:
                continue
            if await try_page_mte_tagging(k, p):
                mte_restore_page_tags(k, p, entry[0], entry[1])
                set_page_mte_tagged(k, p)

    # ---- freeing ----------------------------------------------------------------------------------

    def arch_free_pages_prepare(self, page: Page) -> None:
        """arch_free_pages_prepare() -> free_tag_storage(): drop the block references (keyed on
        PG_tag_storage_reserved, v3 patch 32; ``free-keyed-on-tagged`` keys them on PG_mte_tagged),
        and erase the page's parked tags. Runs under xa_lock_irqsave: never sleeps."""
        folio = page.folio
        for p in folio.subpages or [folio]:
            self.tags_by_pfn.pop(p.pfn, None)  # mte_erase_tags_for_pfn()
        if self.node_needs_storage(folio) is None:
            return
        key = PG_mte_tagged if "free-keyed-on-tagged" in self.k.bugs else PG_tag_storage_reserved
        if not folio.flags & key or not folio.flags & PG_tag_storage_reserved:
            return
        blocks, _refs = self.blocks_of(folio)
        for b in blocks:
            self._put_block(b, folio)

    # ---- parking ---------------------------------------------------------------------------------

    def mte_save_tags_for_pfn(self, packed: bytes, shadow, pfn: int, *, atomic: bool) -> bool:
        """mte_save_tags_for_pfn(): park ``packed`` tags under ``pfn``; False when no buffer can be had.

        ``atomic``: copy_highpage's GFP_ATOMIC buffer and xarray store (``tag-buf-atomic``; under
        ``tag-park-gfp-kernel``, xa_reserve(GFP_KERNEL) and a GFP_KERNEL buffer, which may sleep);
        otherwise swap-in's GFP_KERNEL buffer (``tag-buf``).
        """
        if atomic and pfn in self.prepared:  # copy_highpage_prepare() allocated it: nothing to allocate now
            self.prepared.discard(pfn)
        elif atomic:
            if "tag-park-gfp-kernel" in self.k.bugs:
                might_sleep(self.k, "xa_reserve(GFP_KERNEL) in copy_highpage")
                might_sleep(self.k, "kmalloc(GFP_KERNEL) in copy_highpage")
            if self.should_fail("tag-buf-atomic"):
                return False
        else:
            might_sleep(self.k, "kmalloc(GFP_KERNEL) for parked tags")
            if self.should_fail("tag-buf"):
                return False
        self.tags_by_pfn[pfn] = (packed, shadow)
        return True


    def copy_highpage_prepare(self, to: Page, frm: Page) -> bool:
        """Seed 002's second option (kernel fix ``tag-park-prepare``): before a copy that will run under
        spinlocks, allocate the buffer copy_highpage may park ``frm``'s tags in (GFP_KERNEL, so
        ``tag-buf`` can fail it). True when none is needed or it is ready; the copy consumes it."""
        if to.pfn in self.prepared or not self.lacks_storage(to):
            return True
        if not (frm.folio.flags & PG_mte_tagged or self.parked(frm.pfn)):
            return True
        might_sleep(self.k, "kmalloc(GFP_KERNEL) in copy_highpage_prepare")
        if self.should_fail("tag-buf"):
            return False
        self.prepared.add(to.pfn)
        return True


# ---- atomic context (NO-SLEEP-IN-ATOMIC) -------------------------------------------------------

@contextmanager
def spin_lock(k: Kernel, name: str):
    """spin_lock() .. spin_unlock() of a spinlock the model tracks (page-table lock, xa_lock, mmu_lock).

    The model does not exclude on it (its holders take no scheduling point that matters); it
    records that the context is atomic, so a sleeping call inside is reported.
    """
    actor = current_actor.get()
    held = k.atomic.setdefault(actor, [])
    held.append(name)
    try:
        yield
    finally:
        held.remove(name)
        if not held:
            k.atomic.pop(actor, None)


def might_sleep(k: Kernel, what: str) -> None:
    """might_sleep(): report NO-SLEEP-IN-ATOMIC if the current context holds a spinlock."""
    held = k.atomic.get(current_actor.get())
    if held:
        k.oracle.report("NO-SLEEP-IN-ATOMIC", f"{what} may sleep but runs under {', '.join(held)} "
                                              f"({current_actor.get()})")


# ---- the fault path ---------------------------------------------------------------------------

async def handle_folio_missing_tag_storage(k: Kernel, mm, vma, vpn: int, pte: Pte) -> None:
    """handle_pte_protnone() -> handle_folio_missing_tag_storage() (mm/memory.c, RFC v3 patches 26-27).

    A tag storage page is migrated away. Otherwise the kernel reserves storage; if that fails,
    once more (VM_FAULT_RETRY), then the folio is migrated to a __GFP_TAGGED page
    (replace_folio_with_tagged). When the folio has storage, the PTE is remade as the VMA
    wants it (set_pte_at -> mte_sync_tags); either way the caller replays the access.
    """
    from hypervisor.mm.memory import get_page, put_page, set_pte_at
    from hypervisor.mm.migrate import replace_folio_with_tagged
    from hypervisor.mm_types import Pte as _Pte

    ts = k.tag_storage
    page = pte.page
    assert page is not None
    folio = page.folio
    await k.sched.point("handle_folio_missing_tag_storage")
    if mm.pt.get(vpn) is not pte:
        return  # someone else handled it: replay
    if not folio.is_tag_storage:
        get_page(folio)  # folio_get(): the folio stays ours (not freed) while reserve sleeps
        try:
            ok = await ts.reserve_tag_storage(folio) or await ts.reserve_tag_storage(folio)
        finally:
            put_page(k, folio)
        if ok:
            if mm.pt.get(vpn) is pte:
                await set_pte_at(k, mm, vpn, _Pte(page=page, write=pte.write, tagged=pte.tagged), expect=pte)
            return
    await replace_folio_with_tagged(k, folio)


async def fault_in_tag_storage(k: Kernel, page: Page) -> bool:
    """The ptrace/GUP form (RFC v3 patch 30): give a page without storage its storage, or fail."""
    ts = k.tag_storage
    if ts.has_storage(page):
        return True
    return await ts.reserve_tag_storage(page)


def page_flags_physmem(k: Kernel, page: Page | None, pte: Pte | None) -> dict:
    """The physical-memory keys of ``page-flags`` for a mapped page (or nothing mapped: None)."""
    if page is None:
        return {"pfn": 0, "node": "none", "zone": "none", "tag-capable": False, "storage-reserved": False,
                "is-tag-storage": False, "parked": False, "fault-on-access": False}
    ts = k.tag_storage
    pfnmap = page.zone == "pfnmap"
    zone = "none" if pfnmap else page.zone
    if page.zone == "zero":
        zone = "normal"
    if ts.node_needs_storage(page) is not None:
        reserved = ts.page_tag_storage_reserved(page)
    else:
        reserved = not pfnmap
    return {"pfn": page.pfn, "node": page.node, "zone": zone, "tag-capable": page.tag_capable and not pfnmap,
            "storage-reserved": reserved, "is-tag-storage": page.is_tag_storage, "parked": ts.parked(page.pfn),
            "fault-on-access": bool(pte is not None and pte.fault_on_access)}


def meminfo_physmem(k: Kernel) -> dict:
    """The physical-memory keys of ``meminfo`` (``regions`` from hypervisor/mm/memremap.py)."""
    from hypervisor.mm.memremap import memremap

    alloc = k.alloc
    ts = k.tag_storage
    mode = alloc.layout.mode
    return {"tag-storage": mode,
            "tag-storage-pages": 0 if mode == "none" else sum(n.ts_pages for n in alloc.nodes
                                                               if n.ts_mode != "none"),
            "tag-storage-free-pages": alloc.cma_free_pages(),
            "tag-blocks-reserved": len(ts.blocks), "tags-parked": len(ts.tags_by_pfn),
            "nodes": {n.name: n.to_meminfo() for n in alloc.nodes},
            "regions": {r.name: {"type": r.type, "pages": r.pages} for r in memremap(k).regions.values()}}


__all__ = ["FAULT_SITES", "PG_tag_storage_reserved", "Livelock", "TagStorage",
           "fault_in_tag_storage", "handle_folio_missing_tag_storage", "meminfo_physmem", "might_sleep",
           "page_flags_physmem", "spin_lock"]
