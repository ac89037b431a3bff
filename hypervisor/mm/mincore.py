"""mincore(2) (mm/mincore.c): which pages of a range are resident.

One byte per 4 KiB page, 1 where the page is resident:

* a present PTE (the zero page counts, as in Linux, and so does a device
  PFNMAP page the model maps up front);
* a migration entry (``non_swap_entry``: "always uptodate" in mincore_pte_range);
* no PTE, but the VMA maps an object whose page cache holds the page
  (``mincore_page`` through ``__mincore_unmapped_range``), even when this
  process never faulted it; for hugetlbfs, the huge page holding it;
* deliberate difference: a swap entry (a swapped-out anonymous page, or an
  object page in swap) counts as resident. Linux reports it only while the page
  sits in the swap cache; the model counts it so that a migrating VMM, which
  uses mincore to skip guest memory nobody touched, never skips memory that
  holds data.

The walk costs O(resident pages) plus one pass over the output, with no
scheduling point per page: a VMM calls it on a whole 1 GiB guest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errno import KernelError
from shared.mte import PAGE_SHIFT, PAGE_SIZE, page_align_up

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM


async def do_mincore(k: Kernel, mm: MM, addr: int, size: int) -> bytes:
    """do_mincore() (mm/mincore.c) under mmap_read_lock, for the whole range at once.

    Raises:
        KernelError: EINVAL for an address not page aligned; ENOMEM when part of
            [addr, addr + size) is not mapped (mincore(2)).
    """
    if addr & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"mincore: address {addr:#x} is not page aligned")
    end = addr + page_align_up(size)
    if end == addr:
        return b""
    async with mm.mmap_lock.read():
        if not mm.covered(addr, end):
            raise KernelError("ENOMEM", f"mincore: [{addr:#x}, {end:#x}) is not fully mapped")
        lo, hi = addr >> PAGE_SHIFT, end >> PAGE_SHIFT
        vec = bytearray(hi - lo)
        # every PTE: present, migration or swap entry (all count; see the module doc)
        for vpn in mm.vpns_in(addr, end):
            vec[vpn - lo] = 1
        # pages of a mapped object's page cache (or its swap) that this mm has no PTE for
        for vma in mm.vmas_in(addr, end):
            obj = vma.obj
            if obj is None or obj.is_device_memory or not obj.pages:
                continue
            v0, v1 = max(vma.start, addr) >> PAGE_SHIFT, min(vma.end, end) >> PAGE_SHIFT
            i0 = vma.index_of(v0 << PAGE_SHIFT)  # object page index of vpn v0
            nr = obj.hpage_pages if obj.kind == "hugetlbfs" else 1
            for key in obj.pages:
                first = key * nr - i0 + v0  # vpn of the object page (or the huge page's first one)
                for vpn in range(max(first, v0), min(first + nr, v1)):
                    vec[vpn - lo] = 1
        return bytes(vec)
