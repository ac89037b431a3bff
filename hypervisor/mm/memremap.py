"""Device memory: PFNMAP regions and ZONE_DEVICE dev_pagemaps (mm/memremap.c, include/linux/memremap.h).

A host's ``[host.regions.NAME]`` tables (:class:`shared.physmem.RegionConfig`) become
:class:`Region` objects here, at the pfns the layout of shared/physmem.py gives them (from
pfn ``0x1000000``, each at the next 2 MiB boundary, in declared order). Unnamed regions (an
``mmap`` with ``attr`` and no ``region``, or the core's ``device`` backing) are laid out after
the named ones the same way.

Their frames are created lazily and never come from the page allocator:

- ``pfnmap``: VFIO-style memory with no struct page (``remap_pfn_range``). Its frames have
  ``zone = "pfnmap"``; the model keeps a :class:`~hypervisor.page.Page` for the data, but no
  page flag is ever set on it.
- the ZONE_DEVICE types of ``memremap_pages`` (``private``, ``coherent``, ``fs-dax``,
  ``generic``, ``pci-p2pdma``): struct pages in ZONE_DEVICE, ``zone = "device"``.

No region keeps allocation tags (``tag_capable`` false): a region frame's tags read as zero
and are never written by the model.

``migrate_to_coherent`` is ``migrate-pages to = REGION`` for a ``coherent`` region, as a
driver's ``migrate_vma_setup``/``migrate_vma_pages``/``migrate_vma_finalize`` sequence does.
Deliberate difference: a coherent frame freed by its last unmap is not handed back to the
driver (no ``page_free`` callback): the model never reuses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.arm64.mte_lock import PG_mte_tagged
from hypervisor.mm.memory import _install, put_page
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm_types import MemObject, Pte
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import MTE_GRANULES_PER_PAGE, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM

#: Page.zone values of device memory: ZONE_DEVICE struct pages, and PFNMAP frames (no struct page).
DEVICE_ZONES = ("device", "pfnmap")
#: The first pfn of the regions (64 GiB), and their alignment (2 MiB, in pages).
REGION_BASE_PFN = 0x1000000
REGION_ALIGN_PAGES = (2 << 20) >> PAGE_SHIFT
#: Region types whose frames have struct pages in ZONE_DEVICE (MEMORY_DEVICE_*).
ZONE_DEVICE_TYPES = ("private", "coherent", "fs-dax", "generic", "pci-p2pdma")
_ZERO_TAGS = bytes(MTE_GRANULES_PER_PAGE)


def is_device_page(page: Page) -> bool:
    """The frame is device memory (ZONE_DEVICE or PFNMAP), never RAM of the page allocator."""
    return page.zone in DEVICE_ZONES


def is_zone_device_page(page: Page) -> bool:
    """is_zone_device_page() (include/linux/mm.h): a struct page of a dev_pagemap."""
    return page.zone == "device"


def pfn_is_map_memory(page: Page) -> bool:
    """pfn_is_map_memory() (arch/arm64/mm/init.c): the pfn is in the kernel's linear map (memblock RAM).

    False for PFNMAP frames and for ZONE_DEVICE pages (memremap_pages adds no memblock).
    """
    return not is_device_page(page)


def pfn_to_online_page(page: Page) -> Page | None:
    """pfn_to_online_page() (mm/memory_hotplug.c): None for ZONE_DEVICE and for memory without struct page."""
    return None if is_device_page(page) else page


def _frame(pfn: int, zone: str, node: str) -> Page:
    """A device frame: no allocator, no tags, referenced by its region for ever."""
    return Page(pfn=pfn, tags=bytearray(MTE_GRANULES_PER_PAGE), zone=zone, free=False, refcount=1, node=node,
                tag_capable=False)


@attrs.define(eq=False)
class Region:
    """A device memory region: a PFNMAP BAR or a ZONE_DEVICE dev_pagemap (struct dev_pagemap)."""

    name: str  # "" for an unnamed region
    type: str
    size: int
    attr: str
    allow_any_uncached: bool
    base_pfn: int
    frames: dict = attrs.Factory(dict)  # index -> Page, made on first use
    obj: MemObject | None = None  # what mmap maps (one object per region, shared by every mapping)
    next_free: int = 0  # coherent: frames handed out by migrate_to_coherent

    @property
    def pages(self) -> int:
        """The region's size in pages."""
        return self.size >> PAGE_SHIFT

    @property
    def zone(self) -> str:
        """``pfnmap`` (no struct page) or ``device`` (ZONE_DEVICE)."""
        return "pfnmap" if self.type == "pfnmap" else "device"

    def frame(self, index: int) -> Page:
        """The frame at page ``index`` of the region (made on first use)."""
        page = self.frames.get(index)
        if page is None:
            page = _frame(self.base_pfn + index, self.zone, self.name)
            if self.obj is not None:
                page.mapping, page.index = self.obj, index
            self.frames[index] = page
        return page


class Memremap:
    """The host's device regions: named ones from the boot configuration, unnamed ones as mmap makes them."""

    def __init__(self, k: Kernel):
        self.regions: dict[str, Region] = {}
        self._next_pfn = REGION_BASE_PFN
        for rc in k.physcfg.regions:
            self.regions[rc.name] = self._place(rc.name, rc.type, rc.size, rc.attr, rc.allow_any_uncached)

    def _place(self, name: str, rtype: str, size: int, attr: str, allow_any_uncached: bool) -> Region:
        base = self._next_pfn
        npages = size >> PAGE_SHIFT
        self._next_pfn = base + -(-npages // REGION_ALIGN_PAGES) * REGION_ALIGN_PAGES
        return Region(name, rtype, size, attr, allow_any_uncached, base)

    def unnamed_pfnmap(self, size: int, attr: str, allow_any_uncached: bool) -> Region:
        """A PFNMAP region of its own for one mapping (``mmap`` with ``attr``, or the core's ``device``)."""
        return self._place("", "pfnmap", size, attr, allow_any_uncached)

    def lookup(self, name: str) -> Region:
        """The named region.

        Raises:
            KernelError: ENOENT when the host has no region of that name.
        """
        r = self.regions.get(name)
        if r is None:
            raise KernelError("ENOENT", f"no region {name!r} on this host (regions: "
                                        f"{', '.join(self.regions) or 'none'})")
        return r

    def region_of(self, page: Page) -> Region | None:
        """The region a device frame belongs to."""
        for r in self.regions.values():
            if r.base_pfn <= page.pfn < r.base_pfn + r.pages:
                return r
        return None


def memremap(k: Kernel) -> Memremap:
    """The host's :class:`Memremap`, built from ``k.physcfg`` on first use."""
    m = getattr(k, "_memremap", None)
    if m is None:
        m = Memremap(k)
        k._memremap = m  # type: ignore[attr-defined]
    return m


def region_names(k: Kernel) -> dict[str, Region]:
    """The host's named regions."""
    return memremap(k).regions


def meminfo_regions(k: Kernel) -> dict:
    """meminfo's ``regions`` table: ``{name: {type, pages}}`` for the named regions (unnamed ones are not listed)."""
    return {name: {"type": r.type, "pages": r.pages} for name, r in memremap(k).regions.items()}


async def migrate_to_coherent(k: Kernel, mm: MM, start: int, end: int, name: str) -> int:
    """migrate_vma_setup() + migrate_vma_pages() + migrate_vma_finalize() into a ``coherent`` region.

    What a device driver does to move anonymous pages into its MEMORY_DEVICE_COHERENT memory
    (mm/migrate_device.c): each present private anonymous page of [start, end) is unmapped
    (its PTEs become migration entries), its data copied (copy_highpage is not used: no tags
    move, the region keeps none), and the new frame mapped where the old one was, in the same
    VMA. A tagged source with tags other than zero loses them: PRESERVE-ON-COPY breaks.
    Pages already in the region, pinned or otherwise busy pages are skipped (not counted).

    Returns:
        The pages moved.

    Raises:
        KernelError: ENOENT for an unknown region; EOPNOTSUPP for a ``private`` region (the
            model has no device to hand its pages to); EINVAL for any other type, for a range
            with a VMA that is not private anonymous memory (hugetlb, shared, file, device:
            migrate_vma_setup's checks), or an address not page aligned; EFAULT for a hole;
            ENOMEM when the region has no free frame left.
    """
    region = memremap(k).lookup(name)
    if region.type == "private":
        raise KernelError("EOPNOTSUPP", f"migrate-pages to {name!r}: MEMORY_DEVICE_PRIVATE pages belong to a device "
                                        "the model does not have")
    if region.type != "coherent":
        raise KernelError("EINVAL", f"migrate-pages to {name!r}: a {region.type} region is no migration target "
                                    "(only coherent regions are)")
    if start & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"migrate-pages: address {start:#x} is not page aligned")
    async with mm.mmap_lock.read():
        if not mm.covered(start, end):
            raise KernelError("EFAULT", f"migrate-pages: [{start:#x}, {end:#x}) is not fully mapped")
        for vma in mm.vmas_in(start, end):
            if not vma.is_anon:
                raise KernelError("EINVAL", f"migrate-pages to {name!r}: {vma.backing} memory at {vma.start:#x} is not "
                                            "private anonymous memory (migrate_vma)")
        moved = 0
        for vpn in mm.vpns_in(start, end):
            pte = mm.pt.get(vpn)
            if pte is None or not pte.present or pte.special or pte.page is None:
                continue
            old = pte.page
            if is_device_page(old) or old.is_hugetlb or old.ksm or old.swap_entry is not None or old.isolated:
                continue
            if old.mapcount != 1 or old.busy(held=0) or old.pins:
                continue  # migrate_vma_check_page(): an extra reference (a pin, a CoW sharer) keeps it
            if region.next_free >= region.pages:
                if moved:
                    break
                raise KernelError("ENOMEM", f"migrate-pages to {name!r}: the region's {region.pages} pages are in use")
            moved += await _migrate_one(k, mm, vpn, pte, old, region)
        return moved


async def _migrate_one(k: Kernel, mm: MM, vpn: int, pte: Pte, old: Page, region: Region) -> int:
    """One page of migrate_to_coherent: migration entry, copy the data, map the device frame."""
    addr = vpn << PAGE_SHIFT
    mmu_notifier_invalidate_range(mm, addr, addr + PAGE_SIZE, "migrate")  # MMU_NOTIFY_MIGRATE
    entry = Pte(page=old, write=pte.write, tagged=pte.tagged, migrating=True)
    mm.pt[vpn] = entry
    old.rmap.discard((mm, vpn))
    old.mapcount -= 1
    old.isolated = True  # migrate_vma_collect(): isolated from the LRU, no other migration takes it
    try:
        await k.sched.point("migrate_vma_pages")
    finally:
        old.isolated = False
        k.sched.wake()
    if mm.pt.get(vpn) is not entry:  # zapped meanwhile (munmap, exit): nothing to map back
        put_page(k, old)
        return 0
    new = region.frame(region.next_free)
    region.next_free += 1
    new.copy_data_from(old)  # copy_highpage is not called: no tags
    if old.folio.flags & PG_mte_tagged and bytes(old.tags) != _ZERO_TAGS:
        k.oracle.report("PRESERVE-ON-COPY", f"pfn {old.pfn:#x}'s tags were lost moving it to coherent region "
                                            f"{region.name!r} (device memory keeps no tags)", old)
    _install(k, mm, vpn, Pte(page=new, write=entry.write, tagged=entry.tagged), 1)  # remove_migration_pte()
    put_page(k, old)  # the mapping's reference: the old page is freed
    k.sched.wake()
    return 1
