"""Physical memory: struct page, hugetlb folios, and the page allocator.

Each :class:`Page` is a 4 KiB frame with its data (allocated lazily: ``None``
reads as zeros, so a 1 GiB guest that touches 10 MiB costs about 10 MiB), one
allocation tag per 16-byte granule (a 256-byte ``bytearray``), page flags,
refcount/mapcount and a reverse map of the PTEs that map it.

Tag memory is never cleared by the allocator: a freshly allocated frame holds
whatever tags its previous owner left (at boot, a fixed nonzero pattern), which
is what makes stale-tag bugs observable. Hugetlb folios are 16 (64 KiB), 512
(2 MiB), 8192 (32 MiB) or 262144 (1 GiB) naturally aligned frames whose tag
state lives in the head page's flags (asm/mte.h ``folio_*_hugetlb_*``); each
size has its own pool (hstate).

Ghost state (``shadow``, ``inits``) is not kernel state: the oracles use it to
know which tags a correct kernel would hold (see hypervisor/oracles.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from shared.errno import KernelError
from shared.mte import MTE_GRANULES_PER_PAGE, PAGE_SIZE, PAGES_PER_HPAGE

if TYPE_CHECKING:
    from hypervisor.mm_types import MemObject

_ZERO_PAGE = bytes(PAGE_SIZE)

#: Stale tags a frame holds at boot: nonzero, different per pfn.
_BOOT_PATTERN = bytes((i % 15) + 1 for i in range(MTE_GRANULES_PER_PAGE + 15))


def boot_tags(pfn: int) -> bytearray:
    """The garbage tags of frame ``pfn`` before anyone initialised them."""
    off = pfn % 15
    return bytearray(_BOOT_PATTERN[off:off + MTE_GRANULES_PER_PAGE])


class Rmap(dict):
    """The PTEs mapping a frame, as ``(mm, vpn)`` keys in the order they were made.

    A dict rather than a set: walks over it must not depend on object
    addresses, or a recorded schedule would not replay.
    """

    def add(self, key) -> None:
        """Record a mapping."""
        self[key] = None

    def discard(self, key) -> None:
        """Forget a mapping (absent is fine)."""
        self.pop(key, None)


@attrs.define(eq=False, repr=False)
class Page:
    """struct page: one 4 KiB frame (or one subpage of a hugetlb folio)."""

    pfn: int
    tags: bytearray
    data: bytearray | None = None
    flags: int = 0
    refcount: int = 0
    mapcount: int = 0
    zone: str = "normal"  # "normal", "zero" (ZERO_PAGE) or "device" (PFNMAP, no struct page in Linux)
    head: Page | None = None  # hugetlb: the folio's head page (itself for the head)
    subpages: list[Page] = attrs.Factory(list)  # hugetlb head only: the folio's frames (empty otherwise)
    rmap: Rmap = attrs.Factory(Rmap)  # (mm, vpn) of the PTEs mapping this frame
    mapping: MemObject | None = None  # page-cache owner (a shmem/file object) or None for anon
    index: int = 0
    swap_entry: int | None = None  # set while the page is in the swap cache
    free: bool = True
    ksm: bool = False  # a KSM stable page (never reused in place by CoW)
    isolated: bool = False  # taken off the LRU by reclaim or migration (folio_isolate_lru)
    # ghost state for the oracles
    shadow: bytes | bytearray | None = None  # bytes while shared with ZERO_TAGS or a copy (write_tags copies)
    inits: int = 0
    initialiser: str | None = None

    def __repr__(self) -> str:
        return f"<page pfn={self.pfn:#x} flags={self.flags:#x} ref={self.refcount} map={self.mapcount}>"

    @property
    def is_hugetlb(self) -> bool:
        """folio_test_hugetlb(page_folio(page))."""
        return self.head is not None

    @property
    def folio(self) -> Page:
        """page_folio(): the head page for hugetlb, else the page itself."""
        return self.head if self.head is not None else self

    def read(self, off: int, n: int) -> bytes:
        """Read ``n`` bytes of data at offset ``off`` in the frame."""
        if self.data is None:
            return bytes(n)
        return bytes(self.data[off:off + n])

    def write(self, off: int, data) -> None:
        """Write data (bytes-like) at offset ``off`` in the frame."""
        n = len(data)
        if self.data is None:
            # the zero tests compare bytes-like objects (memcmp): a memoryview compared with bytes is
            # compared element by element, 13 us for a page of zeros
            if off == 0 and n == PAGE_SIZE:
                new = bytearray(data)
                if new != _ZERO_PAGE:
                    self.data = new
                return
            if bytes(data) == _ZERO_PAGE[:n]:
                return
            self.data = bytearray(PAGE_SIZE)
        self.data[off:off + n] = data

    def busy(self, held: int = 1) -> bool:
        """Someone else holds a reference: more than the mappings, the page/swap cache and ``held`` of ours.

        Reclaim and migration give up on a busy folio (folio_ref_freeze() fails).
        """
        return self.refcount > self.mapcount + (self.mapping is not None) + (self.swap_entry is not None) + held

    def copy_data_from(self, src: Page) -> None:
        """copy_page(): the data only."""
        self.data = None if src.data is None else bytearray(src.data)


class PageAllocator:
    """The buddy allocator, reduced to what the model needs.

    Args:
        ram: bytes of RAM (frames beyond it cannot be allocated: ENOMEM).
    """

    def __init__(self, ram: int):
        self.nr_frames = ram // PAGE_SIZE
        self._free: list[Page] = []
        self._free_huge: dict[int, list[Page]] = {}  # freed hugetlb folio heads, per folio size (hstate pools)
        self._next_pfn = 0x80000  # DRAM starts at 2 GiB on the model's board
        self.allocated = 0
        self.frames: dict[int, Page] = {}  # every frame ever handed out, by pfn
        self.zero_page = Page(pfn=0x7FFFF, tags=bytearray(MTE_GRANULES_PER_PAGE), zone="zero", free=False,
                              refcount=1, shadow=bytearray(MTE_GRANULES_PER_PAGE))

    def _new_frame(self) -> Page:
        pfn = self._next_pfn
        self._next_pfn += 1
        page = Page(pfn=pfn, tags=boot_tags(pfn))
        self.frames[pfn] = page
        return page

    def alloc_page(self) -> Page:
        """alloc_page(): a frame with zeroed data and stale tags.

        Raises:
            KernelError: ENOMEM when every frame of RAM is in use.
        """
        if self._free:
            page = self._free.pop()
        elif self.allocated < self.nr_frames:
            page = self._new_frame()
        else:
            raise KernelError("ENOMEM", f"out of memory: all {self.nr_frames} frames in use")
        self.allocated += 1
        page.free = False
        page.refcount = 1
        page.data = None
        return page

    def alloc_hugetlb_folio(self, nr_pages: int = PAGES_PER_HPAGE) -> Page:
        """alloc_hugetlb_folio(): ``nr_pages`` naturally aligned frames (one hstate); returns the head.

        Raises:
            KernelError: ENOMEM when RAM cannot hold another folio of that size.
        """
        if self.allocated + nr_pages > self.nr_frames:
            raise KernelError("ENOMEM", f"out of memory for a {nr_pages * PAGE_SIZE >> 10} KiB hugetlb folio")
        pool = self._free_huge.get(nr_pages)
        if pool:
            pages = pool.pop().subpages
        else:
            # align the head to the folio size, as a huge page is
            self._next_pfn = (self._next_pfn + nr_pages - 1) & ~(nr_pages - 1)
            pages = [self._new_frame() for _ in range(nr_pages)]
        head = pages[0]
        for p in pages:
            p.head = head
            p.free = False
            p.refcount = 1
        head.subpages = pages
        self.allocated += nr_pages
        return head

    def free_page(self, page: Page) -> None:
        """__free_pages(): flags reset, data dropped, tags left stale."""
        if page.zone != "normal" or page.free:
            return
        if page.is_hugetlb:
            head = page.folio
            for p in head.subpages:
                self._reset(p)
            # arch_clear_hugetlb_flags(): PG_mte_tagged and PG_mte_lock cleared on the head
            self.allocated -= len(head.subpages)
            self._free_huge.setdefault(len(head.subpages), []).append(head)
            return
        self._reset(page)
        self.allocated -= 1
        self._free.append(page)

    @staticmethod
    def _reset(p: Page) -> None:
        p.free = True
        p.flags = 0
        p.refcount = 0
        p.mapcount = 0
        p.data = None
        p.rmap.clear()
        p.mapping = None
        p.swap_entry = None
        p.ksm = False
        p.isolated = False
        p.shadow = None
        p.inits = 0
        p.initialiser = None

    def live_pages(self):
        """Every allocated frame (for the oracles)."""
        return (p for p in self.frames.values() if not p.free)
