"""The swap device, reclaim and swap-in (mm/swapfile.c, mm/vmscan.c, mm/swap_state.c).

``shrink_folio_list`` reclaims the pages of a range: ``add_to_swap`` takes a
slot, ``arch_prepare_to_swap`` saves the tags (a failure keeps the folio in
memory), ``try_to_unmap`` turns every PTE mapping the page into a swap entry
(anonymous) or removes it (shmem, whose page cache then holds the entry), the
data is written to the slot and the frame freed. The tags are saved only once
no PTE maps the page, with no scheduling point between the unmap and the save,
as Linux saves them after the PTE is cleared: a tag store cannot slip in
between. Swap-in reads the data into a new frame; every faulter, not only the
one that read it, calls ``arch_swap_restore`` before it maps the page.

Hugetlb, zero-page, device and KSM pages are never reclaimed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.arm64.mteswap import MteSwapTags, TagBufFailed, arch_prepare_to_swap, arch_swap_restore
from hypervisor.mm.memory import put_page
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm.page_alloc import alloc_pages
from hypervisor.mm_types import MemObject, Pte
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM

#: Test-only: the old orderings, so tests/unit/hypervisor/test_lost_tag_races.py can show the ghost
#: catches what they lose: tags saved before the unmap with a scheduling point between
#: (``_OLD_ORDERING``), and tags restored only by the context that read the page from swap
#: (``_OLD_SWAPIN``).
_OLD_ORDERING = False
_OLD_SWAPIN = False


@attrs.define
class SwapSlot:
    """One slot of the swap device: the page's data and the swap count."""

    data: bytes | None
    count: int = 0


class SwapDevice:
    """A swap area of ``size`` bytes, its swap cache and the MTE tag store."""

    def __init__(self, size: int):
        self.nr_slots = size // PAGE_SIZE
        self.slots: dict[int, SwapSlot] = {}
        self.cache: dict[int, Page] = {}  # swap cache: entry -> page
        self.tags = MteSwapTags()
        self._next = 1

    def count(self, entry: int) -> int:
        """__swap_count()."""
        slot = self.slots.get(entry)
        return 0 if slot is None else slot.count

    def get_swap_page(self) -> int:
        """folio_alloc_swap(): a free slot.

        Raises:
            KernelError: ENOSPC when the device is full.
        """
        if len(self.slots) >= self.nr_slots:
            raise KernelError("ENOSPC", f"swap is full ({self.nr_slots} slots)")
        while self._next in self.slots:
            self._next += 1
        entry = self._next
        self._next += 1
        self.slots[entry] = SwapSlot(None, 0)
        return entry

    def swap_duplicate(self, entry: int) -> None:
        """swap_duplicate(): another PTE holds the entry (fork)."""
        self.slots[entry].count += 1

    def swap_free(self, k: Kernel, entry: int) -> None:
        """swap_free(): drop one reference; the last frees the slot and its saved tags."""
        slot = self.slots.get(entry)
        if slot is None:
            return
        slot.count -= 1
        if slot.count <= 0:
            del self.slots[entry]
            k.swap.tags.mte_invalidate_tags(entry)  # arch_swap_invalidate_page()
            page = self.cache.pop(entry, None)
            if page is not None:
                page.swap_entry = None
                put_page(k, page)

    async def swapin(self, k: Kernel, entry: int, gfp: str = "movable", node: str | None = None) -> Page:
        """swapin_readahead() for one entry: the swap-cache page, with a reference.

        Tags are restored (``arch_swap_restore``) before the caller maps it; a page without
        tag storage gets them parked (ENOMEM, VM_FAULT_OOM, when that fails).
        """
        page = self.cache.get(entry)
        if page is None:
            page = await alloc_pages(k, gfp, node)
            slot = self.slots[entry]
            if slot.data is not None:
                page.write(0, slot.data)
            page.swap_entry = entry
            self.cache[entry] = page
            page.refcount += 1  # the swap cache's reference
            await k.sched.point("swap_read_folio")
        else:
            page.refcount += 1
            if _OLD_SWAPIN:
                return page
        # do_swap_page() / shmem_swapin_folio(): every faulter restores before it maps (the
        # first wins the tag lock, the others wait for PG_mte_tagged), not only the reader
        try:
            await arch_swap_restore(k, entry, page)
        except KernelError:
            put_page(k, page)
            raise
        return page

    async def shmem_swapin_folio(self, k: Kernel, obj: MemObject, index: int, entry: int,
                                 node: str | None = None) -> Page:
        """shmem_swapin_folio(): bring a shmem page back into its page cache (movable, never tagged)."""
        page = await self.swapin(k, entry, "movable", node)
        if obj.pages.get(index) != entry:  # raced with another swap-in
            put_page(k, page)
            return obj.pages[index]
        page.mapping, page.index = obj, index
        obj.pages[index] = page
        # the page cache takes over the swap-in reference; the slot is no longer needed
        self.swap_free(k, entry)
        return page


async def madvise_pageout(k: Kernel, mm: MM, start: int, end: int) -> int:
    """madvise_pageout() (mm/madvise.c): reclaim the folios mapped in [start, end); returns pages swapped out.

    Model note: the host actor's swap-out pass; it collects the range's present,
    non-special pages and hands them to :func:`shrink_folio_list` (reclaim_pages()).
    """
    pages: list[Page] = []
    for vpn in mm.vpns_in(start, end):
        pte = mm.pt.get(vpn)
        if pte is not None and pte.present and not pte.special and pte.page is not None and pte.page not in pages:
            pages.append(pte.page)
    return await shrink_folio_list(k, pages)


async def shrink_folio_list(k: Kernel, pages: list[Page]) -> int:
    """shrink_folio_list(): swap out ``pages``; returns how many went.

    Raises:
        KernelError: ENOSPC (swap full) or ENOMEM (tag storage) if not even
            the first page could be swapped.
    """
    done = 0
    for page in pages:
        try:
            ok = await _swap_out_one(k, page)
        except TagBufFailed:
            continue  # SWAP-OUT FAILS CLOSED: the folio stays, the pass goes on (swap-out skips it)
        except KernelError:
            if done == 0:
                raise
            break
        done += ok
    return done


async def _swap_out_one(k: Kernel, page: Page) -> int:

    if page.free or not page.is_ram or page.is_hugetlb or page.ksm or page.swap_entry is not None \
            or page.isolated or page.pins:
        return 0
    page.isolated = True  # folio_isolate_lru(): one reclaimer or migrator at a time
    page.refcount += 1  # the isolation reference
    try:
        return await _reclaim_isolated(k, page)
    finally:
        page.isolated = False
        put_page(k, page)
        k.sched.wake()  # folio_unlock(): page-cache faults waiting on it go on


async def _reclaim_isolated(k: Kernel, page: Page) -> int:
    await k.sched.point("shrink_folio_list")
    if page.mapcount == 0 and page.mapping is None:
        return 0  # unmapped while we slept: nothing left to reclaim
    entry = k.swap.get_swap_page()
    if _OLD_ORDERING:  # test-only: tags saved before the unmap, a scheduling point between
        try:
            arch_prepare_to_swap(k, page, entry)
        except KernelError:
            del k.swap.slots[entry]
            raise
    await k.sched.point("add_to_swap")
    if page.busy() or (page.mapcount == 0 and page.mapping is None):
        # someone holds a reference (a fault about to map it): keep it (folio_ref_freeze fails)
        del k.swap.slots[entry]
        k.swap.tags.mte_invalidate_tags(entry)
        return 0
    # try_to_unmap(): every mapping now holds the swap entry (anon) or nothing (shmem). No
    # scheduling point from here to pageout: nobody can store data or tags into the page once
    # its PTEs (and, through the MMU notifier, stage 2) are gone.
    obj = page.mapping
    unmapped: list[tuple[MM, int, Pte]] = []
    for mm, vpn in list(page.rmap):
        pte = mm.pt.get(vpn)
        if pte is None or pte.page is not page:
            continue
        mmu_notifier_invalidate_range(mm, vpn << PAGE_SHIFT, (vpn + 1) << PAGE_SHIFT, "swap")
        page.rmap.discard((mm, vpn))
        page.mapcount -= 1
        page.refcount -= 1
        unmapped.append((mm, vpn, pte))
        if obj is None:
            mm.pt[vpn] = Pte(swap=entry, tagged=pte.tagged)
            k.swap.slots[entry].count += 1
        else:
            del mm.pt[vpn]
    if not _OLD_ORDERING:
        # the tags are saved once no PTE maps the page (as arch_unmap_one() does after the PTE is
        # cleared); if that fails, the PTEs come back and the folio stays (SWAP-OUT FAILS CLOSED)
        try:
            arch_prepare_to_swap(k, page, entry)
        except KernelError:
            _remap(k, page, entry, unmapped)
            raise
    k.swap.slots[entry].data = None if (d := page.data_view()) is None else bytes(d)  # pageout()
    if obj is not None:
        obj.pages[page.index] = entry
        k.swap.slots[entry].count += 1
        page.mapping = None
        page.refcount -= 1  # __remove_mapping(): the page cache's reference
    if k.swap.slots[entry].count == 0:  # nobody mapped it after all
        k.swap.swap_free(k, entry)
    k.sched.wake()
    return 1  # the isolation reference, dropped by the caller, frees the frame


def _remap(k: Kernel, page: Page, entry: int, unmapped) -> None:
    """Undo try_to_unmap() after the tags could not be saved: the old PTEs back, the slot freed."""
    for mm, vpn, pte in unmapped:
        mm.pt[vpn] = pte
        page.rmap.add((mm, vpn))
        page.mapcount += 1
        page.refcount += 1
    del k.swap.slots[entry]
    k.sched.wake()
