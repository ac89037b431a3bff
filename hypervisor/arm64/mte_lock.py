"""The two-bit tag lock: PG_mte_tagged and PG_mte_lock (arch/arm64/include/asm/mte.h).

Protocol (reference section 2.2): ``try_page_mte_tagging`` test-and-sets
PG_mte_lock; the winner initialises the tags and calls ``set_page_mte_tagged``
(there is no unlock); losers park until PG_mte_tagged is set and return False.
PG_mte_tagged is never cleared while the page is allocated. Hugetlb folios keep
both bits on the head page (``folio_*_hugetlb_*`` variants, v6.13).

Bug zoo: two historical versions of these helpers can be switched back on,
here in the one place they lived:

* ``no-tag-lock`` (before d77e59a8fccd): "try" is ``!page_mte_tagged(page)``
  with no lock bit, so two initialisers can both win.
* ``flag-before-init`` (before e059853d14ca): "try" is
  ``!test_and_set_bit(PG_mte_tagged)``, publishing the flag before the caller
  has written the tags; "set" then has nothing left to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.page import Page
from hypervisor.sched import current_actor

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

PG_mte_tagged = 1 << 0  # PG_arch_2
PG_mte_lock = 1 << 1  # PG_arch_3


def _mark_tagged(k: Kernel, page: Page) -> None:
    page.flags |= PG_mte_tagged  # never cleared while the page is allocated (INIT-ONCE)
    k.sched.wake()  # smp_wmb(); set_bit(): wakes try_* spinners


def page_mte_tagged(k: Kernel, page: Page) -> bool:
    """page_mte_tagged(): test PG_mte_tagged (then smp_rmb)."""
    if page.is_hugetlb:
        k.warn_once("page_mte_tagged() on a hugetlb page")
    return bool(page.flags & PG_mte_tagged)


def set_page_mte_tagged(k: Kernel, page: Page) -> None:
    """set_page_mte_tagged(): smp_wmb(); set_bit(PG_mte_tagged). Publishes the tags."""
    if page.is_hugetlb:
        k.warn_once("set_page_mte_tagged() on a hugetlb page")
    if "flag-before-init" in k.bugs:
        return  # the old code set the flag in try (test_and_set_bit) instead
    _mark_tagged(k, page)


async def try_page_mte_tagging(k: Kernel, page: Page) -> bool:
    """try_page_mte_tagging(): True if the caller now owns tag initialisation.

    Returns:
        True: PG_mte_lock was clear; the caller must write the tags and then
            call :func:`set_page_mte_tagged` on every path.
        False: the page is (or, after waiting, became) tagged.
    """
    if page.is_hugetlb:
        k.warn_once("try_page_mte_tagging() on a hugetlb page")
    return await _try_tagging(k, page, "try_page_mte_tagging")


async def _try_tagging(k: Kernel, page: Page, name: str) -> bool:
    await k.sched.point(f"{name}:test")
    if "flag-before-init" in k.bugs:
        if page.flags & PG_mte_tagged:
            return False
        _mark_tagged(k, page)  # test_and_set_bit(PG_mte_tagged) before the tags exist
        k.oracle.on_init_start(page, current_actor.get())
        return True
    if "no-tag-lock" in k.bugs:
        if page.flags & PG_mte_tagged:
            return False
        k.oracle.on_init_start(page, current_actor.get())
        return True
    if not page.flags & PG_mte_lock:
        page.flags |= PG_mte_lock
        k.oracle.on_init_start(page, current_actor.get())
        return True
    # smp_cond_load_acquire(&page->flags, VAL & BIT(PG_mte_tagged))
    await k.sched.wait_until(lambda: bool(page.flags & PG_mte_tagged), f"{name}:spin")
    return False


def folio_test_hugetlb_mte_tagged(k: Kernel, folio: Page) -> bool:
    """folio_test_hugetlb_mte_tagged(): PG_mte_tagged of the folio head."""
    if not folio.is_hugetlb:
        k.warn_once("folio_test_hugetlb_mte_tagged() on a non-hugetlb folio")
    return bool(folio.folio.flags & PG_mte_tagged)


def folio_set_hugetlb_mte_tagged(k: Kernel, folio: Page) -> None:
    """folio_set_hugetlb_mte_tagged(): publish the whole folio's tags (head flag)."""
    if not folio.is_hugetlb:
        k.warn_once("folio_set_hugetlb_mte_tagged() on a non-hugetlb folio")
    if "flag-before-init" in k.bugs:
        return
    _mark_tagged(k, folio.folio)


async def folio_try_hugetlb_mte_tagging(k: Kernel, folio: Page) -> bool:
    """folio_try_hugetlb_mte_tagging(): the two-bit lock on the folio head."""
    if not folio.is_hugetlb:
        k.warn_once("folio_try_hugetlb_mte_tagging() on a non-hugetlb folio")
    return await _try_tagging(k, folio.folio, "folio_try_hugetlb_mte_tagging")


def tag_state(page: Page) -> str:
    """The (PG_mte_lock, PG_mte_tagged) state name of reference section 2.2."""
    lock, tagged = bool(page.flags & PG_mte_lock), bool(page.flags & PG_mte_tagged)
    return {(False, False): "UNINIT", (True, False): "LOCKED", (True, True): "TAGGED", (False, True): "TAGGED"}[
        (lock, tagged)
    ]
