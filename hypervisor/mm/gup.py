"""pin_user_pages() (mm/gup.c): FOLL_PIN without FOLL_LONGTERM, as O_DIRECT uses (``pin-pages``).

A pin faults the page in (writable: FOLL_WRITE) and holds a reference that migration, reclaim,
KSM and a tag block claim respect: they skip the page, or the claim fails. Pins nest. The
model counts them in ``Page.pins`` (Linux: GUP_PIN_COUNTING_BIAS in the refcount) and also
holds one page reference per pin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.mm.memory import handle_mm_fault, put_page
from hypervisor.mm_types import VM_WRITE
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT, PAGE_SIZE, page_align_up

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel


async def pin_user_pages(k: Kernel, mm, start: int, end: int) -> int:
    """pin_user_pages(): fault each page of [start, end) in (for write where writable) and pin it.

    Returns the pages pinned.

    Raises:
        KernelError: EFAULT where there is no VMA (nothing stays pinned then).
    """
    done = []
    try:
        async with mm.mmap_lock.read():
            for addr in range(start, end, PAGE_SIZE):
                vma = mm.find_vma(addr)
                if vma is None:
                    raise KernelError("EFAULT", f"pin-pages: no VMA at {addr:#x}")
                # FOLL_WRITE where the VMA is writable (a read into the buffer), else a read pin
                pte = await handle_mm_fault(k, mm, addr, bool(vma.flags & VM_WRITE), locked=True)
                page = pte.page
                assert page is not None
                if pte.special or not page.is_ram:
                    continue  # FOLL_PIN of the zero page or of device memory: nothing to hold
                page.pins += 1
                page.refcount += 1
                done.append(page)
    except KernelError:
        for page in done:
            page.pins -= 1
            put_page(k, page)
        raise
    return len(done)


def unpin_user_pages(k: Kernel, mm, start: int, end: int) -> int:
    """unpin_user_pages() of the pages mapped in [start, end); returns pages unpinned.

    Raises:
        KernelError: EINVAL for a page that holds no pin (nothing is unpinned then), EFAULT
            where there is no VMA.
    """
    pages: list = []
    for addr in range(start, end, PAGE_SIZE):
        if mm.find_vma(addr) is None:
            raise KernelError("EFAULT", f"pin-pages: no VMA at {addr:#x}")
        pte = mm.pt.get(addr >> PAGE_SHIFT)
        page = None if pte is None else pte.page
        if page is None or pte.special or not page.is_ram:
            continue
        if page.pins - sum(p is page for p in pages) <= 0:
            raise KernelError("EINVAL", f"pin-pages: the page at {addr:#x} holds no pin")
        pages.append(page)
    for page in pages:
        page.pins -= 1
        put_page(k, page)
    return len(pages)


async def host_pin_pages(k: Kernel, a: dict) -> int:
    """``pin-pages``: pin (``on``) or unpin a range of a process; returns pages pinned or unpinned."""
    task = k.task(a["pid"])
    addr = a["addr"] & ~(PAGE_SIZE - 1)
    end = page_align_up(a["addr"] + a["size"])
    if a.get("on", True):
        return await pin_user_pages(k, task.mm, addr, end)
    return unpin_user_pages(k, task.mm, addr, end)
