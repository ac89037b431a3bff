"""copy_highpage() (arch/arm64/mm/copypage.c): data and tags of CoW, migration, collapse.

Tags and PG_mte_tagged are copied only from a tagged source; an untagged
source leaves the destination untagged (it is zeroed later by mte_sync_tags if
it becomes visible through a tagged PTE). The ``try`` on the destination is
deliberately ignored: "folio migration can end up reusing the same page
without untagging it". Under ``flag-before-init`` the historical order (flag
set on the destination before its tags are copied) comes back with the rest of
that bug, in mte_lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.mte_lock import (
    folio_set_hugetlb_mte_tagged,
    folio_test_hugetlb_mte_tagged,
    folio_try_hugetlb_mte_tagging,
    page_mte_tagged,
    set_page_mte_tagged,
    try_page_mte_tagging,
)
from hypervisor.arm64.tags import mte_copy_page_tags, mte_restore_page_tags, mte_save_page_tags
from hypervisor.page import Page

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel


async def copy_highpage(k: Kernel, to: Page, frm: Page) -> None:
    """copy_highpage(to, from): copy_page(), then the tags if ``from`` is tagged."""
    to.copy_data_from(frm)
    if not k.mte:
        return
    await k.sched.point("copy_highpage:test")
    if k.tag_storage.enabled and not frm.is_hugetlb and await try_transfer_saved_tags(k, to, frm):
        return
    if frm.is_hugetlb:
        src = frm.folio
        if not folio_test_hugetlb_mte_tagged(k, src) or frm is not src:
            return
        await folio_try_hugetlb_mte_tagging(k, to)  # result ignored
        await k.sched.point("copy_highpage:hugetlb_copy")  # between the folio tag lock and the copy
        for d, s in zip(to.folio.subpages, src.subpages, strict=True):
            mte_copy_page_tags(k, d, s)
        folio_set_hugetlb_mte_tagged(k, to)
    elif page_mte_tagged(k, frm):
        await try_page_mte_tagging(k, to)  # result ignored: migration may reuse a tagged page
        await k.sched.point("copy_highpage:copy")
        mte_copy_page_tags(k, to, frm)
        set_page_mte_tagged(k, to)


async def copy_user_highpage(k: Kernel, to: Page, frm: Page) -> None:
    """copy_user_highpage(): copy_highpage() + flush_dcache_page()."""
    await copy_highpage(k, to, frm)


async def try_transfer_saved_tags(k: Kernel, to: Page, frm: Page) -> bool:
    """copy_highpage()'s dynamic tag storage cases (RFC v3 patch 29); True when it handled the tags.

    A tagged source copied into a page without storage parks its tags under the destination's
    pfn (GFP_ATOMIC: ``tag-buf-atomic``; when that fails, v3's ``WARN_ON(!tags)``: the tags are
    lost and PRESERVE-ON-COPY breaks). A source whose tags are parked hands them on: written at
    once if the destination has storage, parked again otherwise.
    """
    ts = k.tag_storage
    if page_mte_tagged(k, frm):
        if ts.has_storage(to):
            return False  # the ordinary copy
        packed, shadow = mte_save_page_tags(k, frm)
        if not ts.mte_save_tags_for_pfn(packed, shadow, to.pfn, atomic=True):
            k.warn_once("copy_highpage: WARN_ON(!tags): no buffer to park the tags")
            if any(frm.tags):
                k.oracle.report("PRESERVE-ON-COPY", f"the tags of pfn {frm.pfn:#x} were lost copying it to pfn "
                                                    f"{to.pfn:#x}, which has no tag storage (no GFP_ATOMIC buffer)", to)
        return True
    entry = ts.tags_by_pfn.pop(frm.pfn, None)
    if entry is None:
        return False
    if ts.has_storage(to):
        await try_page_mte_tagging(k, to)  # result ignored, as for a tagged source
        await k.sched.point("copy_highpage:restore_parked")
        mte_restore_page_tags(k, to, entry[0], entry[1])
        set_page_mte_tagged(k, to)
    elif not ts.mte_save_tags_for_pfn(entry[0], entry[1], to.pfn, atomic=True):
        k.warn_once("copy_highpage: WARN_ON(!tags): no buffer to park the tags")
        k.oracle.report("PRESERVE-ON-COPY", f"the tags parked for pfn {frm.pfn:#x} were lost copying it to pfn "
                                            f"{to.pfn:#x} (no GFP_ATOMIC buffer)", to)
    return True
