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
from hypervisor.arm64.tags import mte_copy_page_tags
from hypervisor.page import Page

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel


async def copy_highpage(k: Kernel, to: Page, frm: Page) -> None:
    """copy_highpage(to, from): copy_page(), then the tags if ``from`` is tagged."""
    to.copy_data_from(frm)
    if not k.mte:
        return
    await k.sched.point("copy_highpage:test")
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
