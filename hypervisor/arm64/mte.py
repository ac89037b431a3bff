"""Tag initialisation on mapping, KSM's comparison, and per-thread MTE control.

Models arch/arm64/kernel/mte.c: ``mte_sync_tags`` (called from ``set_ptes`` via
``__sync_cache_and_tags`` for tagged, accessible, non-special PTEs),
``memcmp_pages`` (KSM never merges tagged pages), ``set_mte_ctrl`` /
``mte_update_sctlr_user`` (prctl TCF and include mask, with the per-CPU
``mte_tcf_preferred`` resolution) and, from arch/arm64/mm/fault.c,
``tag_clear_highpage`` (__GFP_ZEROTAGS allocations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.arm64.mte_lock import (
    folio_set_hugetlb_mte_tagged,
    folio_try_hugetlb_mte_tagging,
    page_mte_tagged,
    set_page_mte_tagged,
    try_page_mte_tagging,
)
from hypervisor.arm64.tags import mte_clear_page_tags
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import (
    PR_MTE_TAG_MASK,
    PR_MTE_TAG_SHIFT,
    PR_MTE_TCF_ASYNC,
    PR_MTE_TCF_SYNC,
    PR_TAGGED_ADDR_ENABLE,
)

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

MTE_CTRL_TCF_SYNC = 1 << 0
MTE_CTRL_TCF_ASYNC = 1 << 1
MTE_CTRL_TCF_ASYMM = 1 << 2


async def mte_sync_tags(k: Kernel, page: Page, nr_pages: int = 1) -> None:
    """mte_sync_tags(pte, nr_pages) (kernel/mte.c): zero the tags of pages first mapped tagged.

    A hugetlb folio is initialised as a whole (all its subpages) under its head's
    lock; other pages one at a time. Already-tagged pages keep their tags.
    """
    if page.is_hugetlb:
        folio = page.folio
        if await folio_try_hugetlb_mte_tagging(k, folio):
            await k.sched.point("mte_sync_tags:hugetlb_won")  # between the folio tag lock and the clear
            for sub in folio.subpages:
                mte_clear_page_tags(k, sub)
            await k.sched.point("mte_sync_tags:clear")
            folio_set_hugetlb_mte_tagged(k, folio)
        return
    for i in range(nr_pages):
        p = page if i == 0 else k.alloc.frames[page.pfn + i]  # the following pfns of a large folio
        if await try_page_mte_tagging(k, p):
            await k.sched.point("mte_sync_tags:clear")
            mte_clear_page_tags(k, p)
            await k.sched.point("mte_sync_tags:set")
            set_page_mte_tagged(k, p)
    # smp_wmb(): the tags are visible before the PTE is set


async def tag_clear_highpage(k: Kernel, page: Page) -> None:
    """tag_clear_highpage() (mm/fault.c): a __GFP_ZEROTAGS allocation.

    The page is new, so ``try`` must win (WARN_ON_ONCE otherwise). Data and tags
    are zeroed and the page is published as tagged before anyone can map it.
    """
    if not k.mte:
        return
    if k.tag_storage.lacks_storage(page):
        return  # RFC v3: no storage to clear; the page stays untagged (its PTE becomes fault-on-access)
    if not await try_page_mte_tagging(k, page):
        k.warn_once("tag_clear_highpage: new page already tagged")
    await k.sched.point("tag_clear_highpage:clear")
    mte_clear_page_tags(k, page)
    set_page_mte_tagged(k, page)


def memcmp_pages(k: Kernel, a: Page, b: Page) -> int:
    """memcmp_pages() (kernel/mte.c): nonzero ("different") if either page is tagged."""
    same = (a.data or bytes(4096)) == (b.data or bytes(4096))
    if not same:
        return 1
    if page_mte_tagged(k, a) or page_mte_tagged(k, b):
        return int(a is not b)
    return 0


@attrs.define
class MteCtrl:
    """thread.mte_ctrl: requested TCF modes and the GCR exclude mask."""

    tcf: int = 0  # MTE_CTRL_TCF_* bits
    excl: int = 0xFFFF  # GCR_EL1.Exclude (include mask 0 after execve)
    tagged_addr: bool = False


def set_tagged_addr_ctrl(k: Kernel, ctrl: MteCtrl, tcf: str | None, include: int | None) -> None:
    """set_tagged_addr_ctrl() + set_mte_ctrl() (process.c, mte.c): prctl(PR_SET_TAGGED_ADDR_CTRL).

    The scenario form names the TCF mode and the include mask; omitted parts
    keep their current value (the model's sugar over the single prctl word).

    Raises:
        KernelError: EINVAL for MTE bits on a CPU without MTE, or an include
            mask outside 16 bits (bits outside PR_MTE_TAG_MASK).
    """
    from shared.mte import TCF_PRCTL_BITS

    arg = PR_TAGGED_ADDR_ENABLE
    if tcf is not None:
        arg |= TCF_PRCTL_BITS[tcf]
    else:
        arg |= (PR_MTE_TCF_SYNC if ctrl.tcf & MTE_CTRL_TCF_SYNC else 0)
        arg |= (PR_MTE_TCF_ASYNC if ctrl.tcf & MTE_CTRL_TCF_ASYNC else 0)
    if include is not None:
        if not 0 <= include <= 0xFFFF:
            raise KernelError("EINVAL", f"include mask {include:#x} has bits outside PR_MTE_TAG_MASK")
        arg |= include << PR_MTE_TAG_SHIFT
    else:
        arg |= ((~ctrl.excl) & 0xFFFF) << PR_MTE_TAG_SHIFT
    valid = PR_TAGGED_ADDR_ENABLE
    if k.mte:
        valid |= PR_MTE_TCF_SYNC | PR_MTE_TCF_ASYNC | PR_MTE_TAG_MASK
    if arg & ~valid:
        raise KernelError("EINVAL", "PR_SET_TAGGED_ADDR_CTRL: MTE bits requested but the CPU has no MTE")
    # set_mte_ctrl()
    mte = 0
    if arg & PR_MTE_TCF_SYNC:
        mte |= MTE_CTRL_TCF_SYNC
    if arg & PR_MTE_TCF_ASYNC:
        mte |= MTE_CTRL_TCF_ASYNC
    if mte == MTE_CTRL_TCF_SYNC | MTE_CTRL_TCF_ASYNC:  # and the CPU has ARM64_MTE_ASYMM
        mte |= MTE_CTRL_TCF_ASYMM
    ctrl.tcf = mte
    ctrl.excl = (~((arg & PR_MTE_TAG_MASK) >> PR_MTE_TAG_SHIFT)) & 0xFFFF
    ctrl.tagged_addr = True


def get_tagged_addr_ctrl(ctrl: MteCtrl) -> dict:
    """prctl(PR_GET_TAGGED_ADDR_CTRL) in the scenario's form: the *requested* mode."""
    both = MTE_CTRL_TCF_SYNC | MTE_CTRL_TCF_ASYNC
    if ctrl.tcf & both == both:
        tcf = "asymm"
    elif ctrl.tcf & MTE_CTRL_TCF_SYNC:
        tcf = "sync"
    elif ctrl.tcf & MTE_CTRL_TCF_ASYNC:
        tcf = "async"
    else:
        tcf = "none"
    return {"tcf": tcf, "include": (~ctrl.excl) & 0xFFFF}


_PREF_BITS = {"sync": MTE_CTRL_TCF_SYNC, "async": MTE_CTRL_TCF_ASYNC, "asymm": MTE_CTRL_TCF_ASYMM}


def mte_update_sctlr_user(ctrl: MteCtrl, preferred: str) -> str:
    """mte_update_sctlr_user() (mte.c): the TCF mode SCTLR_EL1.TCF0 really gets.

    ``resolved = (mte_ctrl & pref) ? pref : mte_ctrl``, then ASYMM, ASYNC, SYNC
    in that order. With the default preference (async) a request for
    sync|async runs async, as on real hardware.
    """
    pref = _PREF_BITS[preferred]
    resolved = pref if ctrl.tcf & pref else ctrl.tcf
    if resolved & MTE_CTRL_TCF_ASYMM:
        return "asymm"
    if resolved & MTE_CTRL_TCF_ASYNC:
        return "async"
    if resolved & MTE_CTRL_TCF_SYNC:
        return "sync"
    return "none"
