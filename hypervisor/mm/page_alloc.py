"""Allocation with arch_alloc_page(), the gfp a VMA's faults use, and the host's alloc-pages/free-pages.

The free lists themselves are :class:`hypervisor.page.PageAllocator` (per node, see
hypervisor/mm/memory_hotplug.py). This module adds what needs the kernel: ``alloc_pages``
(mm/page_alloc.c) runs ``arch_alloc_page`` after a __GFP_TAGGED allocation, which tries to
reserve the page's tag storage, best effort (RFC v3 patch 23: a failure is ignored and the
page simply lacks storage); ``vma_gfp`` is arch_calc_vma_gfp() (VM_MTE or VM_MTE_KVM make a
fault's allocation __GFP_TAGGED).

``alloc-pages`` stands for a kernel user of pages (a driver, I/O buffers): its pages hold a
recognisable pattern, so the TAG-STORAGE-NOT-CLOBBERED check sees any change to their data,
and a claim of their tag block migrates them (keeping the pattern) unless they are pinned.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from hypervisor.mm_types import VM_MTE, VM_MTE_KVM
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import Vma


def vma_gfp(vma: Vma | None) -> str:
    """arch_calc_vma_gfp() (RFC v3): __GFP_TAGGED for VM_MTE and VM_MTE_KVM VMAs, else movable."""
    if vma is not None and vma.flags & (VM_MTE | VM_MTE_KVM):
        return "tagged"
    return "movable"


async def alloc_pages(k: Kernel, gfp: str = "movable", node: str | None = None, from_ts: bool = False) -> Page:
    """alloc_pages(gfp, 0) -> post_alloc_hook() -> arch_alloc_page(): reserve storage for __GFP_TAGGED.

    Raises:
        KernelError: ENOMEM when no node the request may use has a free page.
    """
    page = k.alloc.alloc_page(gfp, node, from_ts)
    if gfp == "tagged" and k.tag_storage.enabled:
        if page.is_tag_storage:  # arch_alloc_cma() refuses __GFP_TAGGED (RFC invariant 4)
            k.oracle.report("TAG-STORAGE-NEVER-TAGGED", f"a __GFP_TAGGED allocation returned tag storage pfn "
                                                        f"{page.pfn:#x} (MIGRATE_CMA)", page)
        await k.tag_storage.reserve_tag_storage(page)  # best effort: a failure is ignored
    return page


async def alloc_hugetlb_folio(k: Kernel, nr: int, gfp: str = "movable", node: str | None = None) -> Page:
    """alloc_hugetlb_folio() + arch_alloc_page() for a tagged VMA's folio."""
    head = k.alloc.alloc_hugetlb_folio(nr, node)
    if gfp == "tagged" and k.tag_storage.enabled:
        await k.tag_storage.reserve_tag_storage(head)
    return head


# ---- the host's alloc-pages / free-pages ------------------------------------------------------

def pattern(name: str, i: int) -> bytes:
    """The data an alloc-pages page holds (what TAG-STORAGE-NOT-CLOBBERED compares it with)."""
    seed = hashlib.blake2b(f"{name}/{i}".encode(), digest_size=16).digest()
    return seed * (PAGE_SIZE // len(seed))


class Handle(list):
    """The pages of one alloc-pages name, in allocation order (a list, so migration can swap a page)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.expected: dict[int, bytes] = {}  # position in the handle -> the data its page holds


def _usable(k: Kernel, gfp: str, node: str | None, from_ts: bool) -> int:
    n = 0
    for nd in k.alloc.zonelist(gfp, node):
        cma = len(nd.cma_free)
        if from_ts:
            n += cma if nd.dynamic else 0
        elif gfp == "movable" and nd.dynamic:
            n += nd.free_pages
        else:
            n += nd.free_pages - cma
    return n


async def host_alloc_pages(k: Kernel, a: dict) -> dict:
    """``alloc-pages``: allocate as a kernel user would; returns ``{pages, tag-storage-pages}``.

    Raises:
        KernelError: EINVAL (``from = "tag-storage"`` without dynamic management or with a gfp
            other than movable; ``gfp = "kernel"`` on a movable node), ENOENT (an unknown node),
            EEXIST (the name is in use), ENOMEM (fewer than ``count`` usable pages are free).
    """
    name, count, gfp, frm, node, pin = a["name"], a["count"], a["gfp"], a["from"], a["node"], a["pin"]
    from_ts = frm == "tag-storage"
    if node is not None and node not in k.alloc.node_by_name:
        raise KernelError("ENOENT", f"alloc-pages: no node {node!r}")
    if from_ts and not k.tag_storage.enabled:
        raise KernelError("EINVAL", "alloc-pages: from = tag-storage needs dynamic tag storage management")
    if from_ts and gfp != "movable":
        raise KernelError("EINVAL", f"alloc-pages: tag storage serves only movable allocations (gfp {gfp})")
    if gfp == "kernel" and node is not None and k.alloc.node_by_name[node].zone == "movable":
        raise KernelError("EINVAL", f"alloc-pages: an unmovable allocation cannot use movable node {node!r}")
    handles = k.page_handles
    if name in handles:
        raise KernelError("EEXIST", f"alloc-pages: {name!r} is in use")
    usable = _usable(k, gfp, node, from_ts)
    want = usable if count == "all" else count
    if want > usable:
        raise KernelError("ENOMEM", f"alloc-pages: {want} pages asked, {usable} usable pages free")
    h = Handle(name)
    handles[name] = h
    ts_pages = 0
    for i in range(want):
        await k.sched.point("alloc-pages")
        try:
            page = await alloc_pages(k, gfp, node, from_ts)
        except KernelError:
            break  # a concurrent user took the rest ("all" is what could be had)
        page.write(0, pattern(name, i))
        page.owner = h
        h.append(page)
        h.expected[i] = pattern(name, i)
        ts_pages += page.is_tag_storage
        if pin:
            page.pins += 1
            page.refcount += 1
    return {"pages": len(h), "tag-storage-pages": ts_pages}


async def host_free_pages(k: Kernel, a: dict) -> int:
    """``free-pages``: free the last ``count`` pages of a name (default all); returns pages freed.

    Raises:
        KernelError: ENOENT for an unknown name.
    """
    from hypervisor.mm.memory import put_page

    h = k.page_handles.get(a["name"])
    if h is None:
        raise KernelError("ENOENT", f"free-pages: no pages named {a['name']!r}")
    n = len(h) if a["count"] is None else min(a["count"], len(h))
    for _ in range(n):
        page = h.pop()
        h.expected.pop(len(h), None)
        page.owner = None
        if page.pins:
            page.refcount -= page.pins
            page.pins = 0
        put_page(k, page)
    if not h:
        del k.page_handles[a["name"]]
    return n


def migrate_handle_page(k: Kernel, old: Page, new: Page) -> None:
    """Move an alloc-pages page to ``new`` (its data kept): the handle now holds ``new``."""
    from hypervisor.mm.memory import put_page

    h = old.owner
    assert isinstance(h, Handle)
    i = h.index(old)
    new.copy_data_from(old)
    new.owner = h
    h[i] = new
    old.owner = None
    put_page(k, old)
