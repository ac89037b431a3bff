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

A frame's data changes only through :meth:`Page.write`, :meth:`Page.copy_data_from` or an
assignment to ``data`` (never by writing into the ``bytearray`` in place): the ghost's digest of
the data is kept until then, and ghost entries recording "what this frame holds now" are given
the old digest just before (``Page._settle``).

A whole page written into a frame without data from an immutable ``bytes`` buffer (a store's
request, a migration's pages) is kept as a read-only view of that buffer, not copied: the model's
representation, not kernel state. The ``data`` property turns it into the frame's own
``bytearray`` the first time anyone asks for it, and so does a partial write; readers inside the
model that only read use :meth:`Page.data_view`. The buffer stays alive while a frame views it
(a 16 MiB store keeps its 16 MiB until every page of it is rewritten or freed).

Ghost state (``shadow``, ``inits``, the digest) is not kernel state: the oracles use it to
know which tags a correct kernel would hold (see hypervisor/oracles.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from shared.errno import KernelError
from shared.mte import MTE_GRANULES_PER_PAGE, PAGE_SIZE, PAGES_PER_HPAGE
from shared.physmem import PhysConfig

if TYPE_CHECKING:
    from hypervisor.mm.memory_hotplug import Node
    from hypervisor.mm_types import MemObject

_ZERO_PAGE = bytes(PAGE_SIZE)

#: Stale tags a frame holds at boot: nonzero, different per pfn.
_BOOT_PATTERN = bytes((i % 15) + 1 for i in range(MTE_GRANULES_PER_PAGE + 15))


_BOOT_TAGS = [_BOOT_PATTERN[off:off + MTE_GRANULES_PER_PAGE] for off in range(15)]


def boot_tags(pfn: int) -> bytearray:
    """The garbage tags of frame ``pfn`` before anyone initialised them."""
    return bytearray(_BOOT_TAGS[pfn % 15])


_HALF = PAGE_SIZE // 2
#: ``Page._dhash`` when the digest of the page's data is not known.
_UNKNOWN_HASH = -1


def data_hash(data) -> int | None:
    """The ghost's digest of a page's data (None for an all-zero page).

    The CRC-32 of each half of the page, as one 64-bit number: stable across
    processes (``ghost-export`` on one host is compared on another after a
    migration, so Python's per-process salted ``hash()`` will not do), and
    cheaper than hashlib (zlib's CRC runs at several GB/s and reads the
    bytearray without a copy). CRC detects every burst of up to 32 changed
    bits in a half; a larger change goes unseen with odds of about 2^-64.
    """
    if data is None or data == _ZERO_PAGE:
        return None
    if len(data) != PAGE_SIZE:
        return zlib.crc32(data) | (len(data) << 32)
    view = memoryview(data)
    return zlib.crc32(view[_HALF:]) << 32 | zlib.crc32(view[:_HALF])


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
    _data: bytearray | memoryview | None = None  # the ``data`` property (constructor argument ``data``)
    flags: int = 0
    refcount: int = 0
    mapcount: int = 0
    zone: str = "normal"  # "normal", "movable" (RAM), "zero" (ZERO_PAGE), "device"/"pfnmap" (device memory)
    node: str = "node0"  # the node (or device region) the frame belongs to
    tag_capable: bool = True  # the memory keeps allocation tags (false: mte = false, tag storage, "none" nodes)
    is_tag_storage: bool = False  # page_is_tag_storage(): in a dynamic tag storage region (MIGRATE_CMA)
    pins: int = 0  # FOLL_PIN references (GUP_PIN_COUNTING_BIAS in Linux): a pinned page is never migrated
    owner: list | None = None  # the alloc-pages handle holding this page (a kernel user's movable page)
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
    # the ghost's digest of the data, computed when first asked for (_UNKNOWN_HASH: not yet), and the
    # ghost entries (hypervisor/ghost.py Entry) whose recorded data is "what this page holds now"
    _dhash: int | None = _UNKNOWN_HASH
    _lazy: list | None = None

    def __repr__(self) -> str:
        return f"<page pfn={self.pfn:#x} flags={self.flags:#x} ref={self.refcount} map={self.mapcount}>"

    @property
    def is_ram(self) -> bool:
        """Buddy-allocator RAM with a struct page (ZONE_NORMAL or ZONE_MOVABLE; not the zero page or devices)."""
        return self.zone == "normal" or self.zone == "movable"

    @property
    def is_hugetlb(self) -> bool:
        """folio_test_hugetlb(page_folio(page))."""
        return self.head is not None

    @property
    def folio(self) -> Page:
        """page_folio(): the head page for hugetlb, else the page itself."""
        return self.head if self.head is not None else self

    @property
    def data(self) -> bytearray | None:
        """The frame's 4096 bytes (None: all zeros). Assigning it counts as a change of the content."""
        d = self._data
        if d is not None and type(d) is not bytearray:  # a view of a store's buffer: the frame's own copy now
            d = self._data = bytearray(d)  # (same content: the digest and the ghost's entries stand)
        return d

    @data.setter
    def data(self, value: bytearray | None) -> None:
        if self._lazy is not None:
            self._settle()
        self._dhash = _UNKNOWN_HASH
        self._data = value

    def data_view(self) -> bytearray | memoryview | None:
        """The frame's data to read, as it is held (a read-only view of a store's buffer, or the bytearray)."""
        return self._data

    def data_hash(self) -> int | None:
        """:func:`data_hash` of the data, kept until the data changes (ghost state, not kernel state)."""
        h = self._dhash
        if h == _UNKNOWN_HASH:
            d = self._data
            if type(d) is memoryview:  # a view is kept only of a whole page that is not all zeros
                h = self._dhash = zlib.crc32(d[_HALF:]) << 32 | zlib.crc32(d[:_HALF])
            else:
                h = self._dhash = data_hash(d)
        return h

    def lazy_entry(self, entry) -> None:
        """A ghost entry records "what this page holds now": give it the digest before the data changes."""
        if self._lazy is None:
            self._lazy = [entry]
        else:
            self._lazy.append(entry)

    def _settle(self) -> None:
        """The content is about to change: the entries still pointing here get the digest of the old one."""
        todo = [e for e in self._lazy or () if e._src is self]
        self._lazy = None
        if todo:
            h = self.data_hash()
            for e in todo:
                e._data, e._src = h, None

    def read(self, off: int, n: int) -> bytes:
        """Read ``n`` bytes of data at offset ``off`` in the frame."""
        d = self._data
        if d is None:
            return bytes(n)
        return bytes(d[off:off + n])

    def write(self, off: int, data) -> None:
        """Write data (bytes-like) at offset ``off`` in the frame."""
        n = len(data)
        if self._lazy is not None:
            self._settle()
        self._dhash = _UNKNOWN_HASH
        d = self._data
        if d is None:
            # the zero tests compare bytes-like objects (memcmp): a memoryview compared with bytes is
            # compared element by element, 13 us for a page of zeros
            if off == 0 and n == PAGE_SIZE:
                if type(data) is memoryview and type(data.obj) is bytes and data.format == "B" \
                        and data.c_contiguous and data.nbytes == PAGE_SIZE:
                    # a whole page of an immutable buffer: kept as a view (no 4 KiB copy into fresh memory)
                    if (data[0] or data[-1] or data.tobytes() != _ZERO_PAGE):
                        self._data = data
                    return
                new = bytearray(data)
                if new != _ZERO_PAGE:
                    self._data = new
                return
            if bytes(data) == _ZERO_PAGE[:n]:
                return
            d = self._data = bytearray(PAGE_SIZE)
        if type(d) is not bytearray:  # a view: the frame's own copy before it changes
            d = self._data = bytearray(d)
        d[off:off + n] = data

    def busy(self, held: int = 1) -> bool:
        """Someone else holds a reference: more than the mappings, the page/swap cache and ``held`` of ours.

        Reclaim and migration give up on a busy folio (folio_ref_freeze() fails).
        """
        return self.refcount > self.mapcount + (self.mapping is not None) + (self.swap_entry is not None) + held \
            + (self.owner is not None)

    def copy_data_from(self, src: Page) -> None:
        """copy_page(): the data only."""
        self.data = None if src._data is None else bytearray(src._data)
        self._dhash = src._dhash  # same bytes, same digest


class PageAllocator:
    """The buddy allocator, reduced to what the model needs: per-node free lists (mm/page_alloc.c).

    Args:
        ram: bytes of the boot DRAM (node0).
        mte: system_supports_mte().
        physcfg: tag storage mode and hot-plugged nodes (None: mainline's static host).

    ``nr_frames`` is MemTotal in pages (RAM the allocator manages: dynamic tag storage included,
    static carve-outs never); ``allocated`` the pages in use. Allocation kinds (gfp):
    ``"movable"`` (GFP_HIGHUSER_MOVABLE, may use MIGRATE_CMA tag storage), ``"tagged"`` (plus
    __GFP_TAGGED: never CMA) and ``"kernel"`` (GFP_KERNEL: never CMA, never a movable zone).
    """

    def __init__(self, ram: int, mte: bool = True, physcfg: PhysConfig | None = None):
        from hypervisor.mm.memory_hotplug import build_nodes

        self.layout = build_nodes(physcfg or PhysConfig(), mte, ram)
        self.nodes = self.layout.nodes
        self.node_by_name = {n.name: n for n in self.nodes}
        self.mte = mte
        self.nr_frames = sum(n.managed for n in self.nodes)
        self.allocated = 0
        self.frames: dict[int, Page] = {}  # every frame ever handed out, by pfn
        self.zero_page = Page(pfn=0x7FFFF, tags=bytearray(MTE_GRANULES_PER_PAGE), zone="zero", free=False,
                              refcount=1, shadow=bytearray(MTE_GRANULES_PER_PAGE), tag_capable=mte)
        self.carve_out_used: list[int] = []  # pfns of a static carve-out ever made a frame (the oracle reports them)
        #: arch_free_pages_prepare(): set by the tag storage code (a sync callable taking the page)
        self.free_prepare: Callable[[Page], None] | None = None

    # ---- frames -------------------------------------------------------------------

    def _frame(self, node: Node, pfn: int) -> Page:
        page = self.frames.get(pfn)
        if page is None:
            if node.in_tag_storage(pfn) and not node.dynamic and not node.ts_ordinary:
                self.carve_out_used.append(pfn)  # TAG-CARVE-OUT-HIDDEN breaks (never, by construction)
            ts = node.in_tag_storage(pfn) and node.dynamic
            page = Page(pfn=pfn, tags=boot_tags(pfn), node=node.name, zone=node.zone, is_tag_storage=ts,
                        tag_capable=self.mte and node.ts_mode != "none" and not ts)
            self.frames[pfn] = page
        return page

    def _frames(self, node: Node, lo: int, hi: int) -> list[Page]:
        """The frames of never-used pfns [lo, hi) of ``node`` for alloc_pages_bulk(), allocated (one
        reference, no data): :meth:`_frame` of each, then taken, without a call per frame when the range
        holds no tag storage."""
        if not (hi <= node.ts_start or lo >= node.ts_start + node.ts_pages):
            out = [self._frame(node, pfn) for pfn in range(lo, hi)]
            for page in out:
                self._allocated(page)
            return out
        frames = self.frames
        get = frames.get
        name, zone, capable = node.name, node.zone, self.mte and node.ts_mode != "none"
        boot = _BOOT_TAGS
        out = []
        for pfn in range(lo, hi):
            seen = get(pfn)
            if seen is None:  # (as _frame makes it, allocated)
                out.append(Page(pfn, bytearray(boot[pfn % 15]), node=name, zone=zone, tag_capable=capable,
                                free=False, refcount=1))
                frames[pfn] = out[-1]
            else:  # looked up by pfn before (pfn_to_page), never allocated
                self._allocated(seen)
                out.append(seen)
        return out

    def node_of(self, page: Page) -> Node:
        """page_pgdat(page)."""
        return self.node_by_name[page.node]

    def node_of_pfn(self, pfn: int) -> Node | None:
        """The node whose RAM or tag storage holds ``pfn``."""
        for n in self.nodes:
            if n.owns(pfn):
                return n
        return None

    def frame(self, pfn: int) -> Page | None:
        """pfn_to_page() for managed memory (None outside it, or in a static carve-out)."""
        page = self.frames.get(pfn)
        if page is not None:
            return page
        n = self.node_of_pfn(pfn)
        if n is None or (n.in_tag_storage(pfn) and not n.dynamic and not n.ts_ordinary):
            return None
        return self._frame(n, pfn)

    # ---- allocation -----------------------------------------------------------------

    def zonelist(self, gfp: str, node: str | None = None) -> list[Node]:
        """The nodes an allocation may use, in order: the bound node, or node0 then the others as declared.

        Unmovable (``kernel``) allocations never use a movable zone.
        """
        nodes = [self.node_by_name[node]] if node is not None else list(self.nodes)
        if gfp == "kernel":
            nodes = [n for n in nodes if n.zone != "movable"]
        return nodes

    def _take(self, n: Node, cma: bool) -> Page | None:
        if cma:
            if not n.cma_free:
                return None
            pfn, _ = n.cma_free.popitem()
            return self._frame(n, pfn)
        if n.free:
            return n.free.pop()
        while n.ranges:
            r = n.ranges[0]
            if r[0] < r[1]:
                pfn = r[0]
                r[0] += 1
                return self._frame(n, pfn)
            n.ranges.pop(0)
        return None

    def rmqueue(self, n: Node, gfp: str, from_ts: bool = False) -> Page | None:
        """__rmqueue(): a free page of node ``n``, or None.

        Movable allocations without __GFP_TAGGED may use MIGRATE_CMA (tag storage): first when
        its free pages outnumber the zone's other free pages, else when those run out.
        """
        cma_ok = n.dynamic and gfp == "movable"
        if from_ts:
            return self._take(n, True) if cma_ok else None
        if cma_ok and len(n.cma_free) > n.free_pages - len(n.cma_free):
            return self._take(n, True) or self._take(n, False)
        page = self._take(n, False)
        if page is None and cma_ok:
            page = self._take(n, True)
        return page

    def alloc_page(self, gfp: str = "movable", node: str | None = None, from_ts: bool = False) -> Page:
        """alloc_pages(gfp, 0) without arch_alloc_page(): a frame with zeroed data and stale tags.

        Raises:
            KernelError: ENOMEM when no node the request may use has a free page.
        """
        n0 = self.nodes[0]
        if node is None and not from_ts and not n0.dynamic:  # the static host's fast path: node0's free lists
            page = n0.free.pop() if n0.free else self._take(n0, False)
            if page is not None:
                return self._prep(n0, page)
        for n in self.zonelist(gfp, node):
            page = self.rmqueue(n, gfp, from_ts)
            if page is not None:
                return self._prep(n, page)
        where = f"node {node}" if node is not None else "any node"
        raise KernelError("ENOMEM", f"out of memory: no free page on {where} for a {gfp} allocation")

    def alloc_pages_bulk(self, nr: int) -> list[Page]:
        """alloc_pages_bulk_array() (mm/page_alloc.c): up to ``nr`` order-0 movable pages of any node, as many
        as are free (possibly none), each as :meth:`alloc_page` gives it; never raises.

        The static host's node0 hands them out from its free list, then from its
        never-used ranges, in the order ``alloc_page`` would, without a call per page.
        """
        n0 = self.nodes[0]
        if n0.dynamic:
            out: list[Page] = []
            for _ in range(nr):
                try:
                    out.append(self.alloc_page())
                except KernelError:
                    break
            return out
        free = n0.free
        k = min(nr, len(free))
        out = free[len(free) - k:]  # the order pop() would give them
        del free[len(free) - k:]
        out.reverse()
        for page in out:
            self._allocated(page)
        while len(out) < nr and n0.ranges:
            r = n0.ranges[0]
            m = min(nr - len(out), r[1] - r[0])
            if m > 0:
                out += self._frames(n0, r[0], r[0] + m)
                r[0] += m
            if r[0] >= r[1]:
                n0.ranges.pop(0)
        self.allocated += len(out)
        n0.used += len(out)
        while len(out) < nr:  # node0 is out: the other nodes, a page at a time
            try:
                out.append(self.alloc_page())
            except KernelError:
                break
        return out

    def _prep(self, n: Node, page: Page) -> Page:
        self.allocated += 1
        n.used += 1
        page.free = False
        page.refcount = 1
        page.data = None
        return page

    def take_pfn(self, pfn: int) -> bool:
        """Take a free tag storage page off MIGRATE_CMA's free list (alloc_contig_range's isolation)."""
        n = self.node_of_pfn(pfn)
        if n is None or pfn not in n.cma_free:
            return False
        del n.cma_free[pfn]
        n.used += 1
        self.allocated += 1
        return True

    def release_pfn(self, pfn: int) -> None:
        """cma_release() of one page: back on MIGRATE_CMA's free list."""
        n = self.node_of_pfn(pfn)
        assert n is not None and n.dynamic
        n.cma_free[pfn] = None
        n.used -= 1
        self.allocated -= 1

    def alloc_hugetlb_folio(self, nr_pages: int = PAGES_PER_HPAGE, node: str | None = None) -> Page:
        """alloc_hugetlb_folio(): ``nr_pages`` naturally aligned frames (one hstate); returns the head.

        Raises:
            KernelError: ENOMEM when no node can hold another folio of that size.
        """
        for n in self.zonelist("movable", node):
            pages = self._huge_from(n, nr_pages)
            if pages is None:
                continue
            head = pages[0]
            for p in pages:
                p.head = head
                p.free = False
                p.refcount = 1
            head.subpages = pages
            self.allocated += nr_pages
            n.used += nr_pages
            return head
        raise KernelError("ENOMEM", f"out of memory for a {nr_pages * PAGE_SIZE >> 10} KiB hugetlb folio")

    def _huge_from(self, n: Node, nr: int) -> list[Page] | None:
        if n.free_pages - len(n.cma_free) < nr:
            return None
        pool = n.free_huge.get(nr)
        if pool:
            return pool.pop().subpages
        for i, r in enumerate(n.ranges):
            start = (r[0] + nr - 1) & ~(nr - 1)  # aligned to the folio size, as a huge page is
            if start + nr <= r[1]:
                if start > r[0]:
                    n.ranges.insert(i, [r[0], start])  # the skipped frames stay for order-0 pages
                r[0] = start + nr
                return [self._frame(n, pfn) for pfn in range(start, start + nr)]
        return None

    # ---- freeing ----------------------------------------------------------------------

    def free_page(self, page: Page) -> None:
        """__free_pages(): arch_free_pages_prepare(), flags reset, data dropped, tags left stale."""
        if not page.is_ram or page.free:
            return
        n = self.node_of(page)
        if page.is_hugetlb:
            head = page.folio
            if self.free_prepare is not None:
                self.free_prepare(head)
            for p in head.subpages:
                self._reset(p)
            # arch_clear_hugetlb_flags(): PG_mte_tagged and PG_mte_lock cleared on the head
            self.allocated -= len(head.subpages)
            n.used -= len(head.subpages)
            n.free_huge.setdefault(len(head.subpages), []).append(head)
            return
        self._free_order0(n, page)

    def _free_order0(self, n: Node, page: Page) -> None:
        """The end of __free_pages() for an order-0 RAM frame of node ``n``: back on its free list."""
        if self.free_prepare is not None:
            self.free_prepare(page)
        self._reset(page)
        self.allocated -= 1
        n.used -= 1
        if page.is_tag_storage:
            n.cma_free[page.pfn] = None
        else:
            n.free.append(page)

    def free_pages_bulk(self, pages: list[Page]) -> None:
        """release_pages() (mm/swap.c) of order-0 frames whose last reference went: :meth:`free_page` of
        each, in order, with the per-call lookups taken once."""
        node_of = self.node_by_name
        free_order0 = self._free_order0
        for page in pages:
            if page.free or page.head is not None or not (page.zone == "normal" or page.zone == "movable"):
                self.free_page(page)
                continue
            free_order0(node_of[page.node], page)

    @staticmethod
    def _allocated(page: Page) -> None:
        """A frame handed out by alloc_pages_bulk(): one reference, no data (a freed one has none: _reset)."""
        page.free = False
        page.refcount = 1
        if page._data is not None or page._lazy is not None:
            page.data = None

    @staticmethod
    def _reset(p: Page) -> None:
        p.free = True
        p.flags = 0
        p.refcount = 0
        p.mapcount = 0
        if p._lazy is not None:  # (the data setter, inline)
            p._settle()
        p._dhash = _UNKNOWN_HASH
        p._data = None
        p.rmap.clear()
        p.mapping = None
        p.swap_entry = None
        p.ksm = False
        p.isolated = False
        p.pins = 0
        p.owner = None
        p.shadow = None
        p.inits = 0
        p.initialiser = None

    def live_pages(self):
        """Every allocated frame (for the oracles)."""
        return (p for p in self.frames.values() if not p.free)

    def cma_free_pages(self) -> int:
        """CmaFree in pages: free dynamic tag storage pages on every node."""
        return sum(len(n.cma_free) for n in self.nodes)
