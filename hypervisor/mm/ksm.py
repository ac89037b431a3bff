"""KSM: one merge pass over a range (mm/ksm.c, with arm64's memcmp_pages).

Only private anonymous pages in VM_MERGEABLE VMAs are candidates, as with
madvise(MADV_MERGEABLE). Identical pages are merged into one write-protected
KSM page unless ``memcmp_pages`` says they differ, which it always does when
either page is PG_mte_tagged (NO KSM MERGE OF TAGGED PAGES).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.mte import memcmp_pages
from hypervisor.arm64.mte_lock import page_mte_tagged
from hypervisor.mm.memory import get_page, put_page
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm_types import VM_MERGEABLE
from shared.mte import PAGE_SHIFT

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM


def page_content_key(page) -> bytes:
    """The stable tree's key: the page's bytes (an all-zero page, however it got there, is b"")."""
    data = page.data_view()
    if data is None or not any(data):
        return b""
    return bytes(data)


async def ksm_merge_range(k: Kernel, mm: MM, start: int, end: int) -> int:
    """ksm_do_scan() over [start, end) of ``mm``; returns the pages merged away."""
    merged = 0
    async with mm.mmap_lock.read():
        for vma in mm.vmas_in(start, end):
            if not vma.is_anon or not vma.flags & VM_MERGEABLE:
                continue
            for vpn in mm.vpns_in(max(start, vma.start), min(end, vma.end)):
                pte = mm.pt.get(vpn)
                if pte is None or not pte.present or pte.special or pte.fault_on_access:
                    continue  # (a fault-on-access PTE waits for tag storage: its page's tags may be parked)
                page = pte.page
                if page is None or not page.is_ram:
                    continue
                if page.ksm or page.is_hugetlb or page.isolated or page.pins or k.tag_storage.parked(page.pfn):
                    continue
                await k.sched.point("ksm:cmp_and_merge_page")
                # the PTE may have changed while we slept (another pass merged it, a fault replaced it):
                # cmp_and_merge_page() works under the page lock and replace_page() checks pte_same()
                if mm.pt.get(vpn) is not pte or pte.page is not page or page.ksm or page.free:
                    continue
                key = page_content_key(page)
                stable = k.ksm_stable.get(key)
                if stable is not None and not stable.free and stable is not page \
                        and memcmp_pages(k, page, stable) == 0:
                    # replace_page(): map the stable page read-only instead (secondary MMUs drop theirs)
                    mmu_notifier_invalidate_range(mm, vpn << PAGE_SHIFT, (vpn + 1) << PAGE_SHIFT, "clear")
                    page.rmap.discard((mm, vpn))
                    page.mapcount -= 1
                    pte.page = stable
                    pte.write = False
                    stable.rmap.add((mm, vpn))
                    stable.mapcount += 1
                    get_page(stable)
                    put_page(k, page)
                    merged += 1
                    k.oracle.check_ksm_merge(stable)
                elif stable is None or stable.free:
                    if not page_mte_tagged(k, page) and page.mapping is None:
                        # becomes a stable-tree page: write_protect_page() everywhere, stage 2 included
                        page.ksm = True
                        for m2, v2 in page.rmap:
                            mmu_notifier_invalidate_range(m2, v2 << PAGE_SHIFT, (v2 + 1) << PAGE_SHIFT, "clear")
                            m2.pt[v2].write = False
                        k.ksm_stable[key] = page
    return merged
