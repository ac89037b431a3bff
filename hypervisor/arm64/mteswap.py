"""Tags across swap (arch/arm64/mm/mteswap.c).

Tags are saved, packed two per byte, in an xarray keyed by swap entry when the
folio is swapped out, and restored before the page is mapped again. The
condition is PG_mte_tagged, not VM_MTE: a KVM guest page that the VMM maps
untagged is still saved. Entries are freed with their swap slot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.mte_lock import page_mte_tagged, set_page_mte_tagged, try_page_mte_tagging
from hypervisor.arm64.tags import mte_restore_page_tags, mte_save_page_tags
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import unpack_tags

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel


class TagBufFailed(KernelError):
    """mte_save_tags()'s GFP_KERNEL buffer could not be had (``inject-fault site = "tag-buf"``)."""


class MteSwapTags:
    """``static DEFINE_XARRAY(mte_pages)``: saved tags by swap entry."""

    def __init__(self, capacity: int | None = None):
        self.store: dict[int, tuple[bytes, bytes | bytearray | None]] = {}
        self.capacity = capacity  # fault injection: kmalloc fails past this many entries

    def mte_save_tags(self, k: Kernel, page: Page, entry: int) -> None:
        """mte_save_tags(): nothing for an untagged page; -ENOMEM if no buffer.

        Under dynamic tag storage, tags parked for the page (it has no storage) are saved too,
        and ``inject-fault site = "tag-buf"`` fails the buffer.
        """
        ts = k.tag_storage
        parked = ts.enabled and ts.parked(page.pfn)
        if not page_mte_tagged(k, page) and not parked:
            return
        if self.capacity is not None and len(self.store) >= self.capacity:
            raise KernelError("ENOMEM", "mte_save_tags: no memory for the tag buffer")
        if ts.enabled and ts.should_fail("tag-buf"):
            raise TagBufFailed("ENOMEM", "mte_save_tags: no memory for the tag buffer (inject-fault tag-buf)")
        if parked:
            self.store[entry] = ts.tags_by_pfn.pop(page.pfn)
            return
        self.store[entry] = mte_save_page_tags(k, page)

    async def mte_restore_tags(self, k: Kernel, entry: int, page: Page) -> None:
        """mte_restore_tags(): restore and publish saved tags, if any (else the page stays untagged)."""
        saved = self.store.get(entry)
        if saved is None:
            return
        ts = k.tag_storage
        if ts.enabled and ts.lacks_storage(page) and not page_mte_tagged(k, page) \
                and "restore-into-unreserved-storage" not in k.bugs:
            mte_try_transfer_swap_tags(k, page, saved)
            return
        if await try_page_mte_tagging(k, page):
            await k.sched.point("mte_restore_tags:restore")
            mte_restore_page_tags(k, page, saved[0], saved[1])
            k.oracle.check_swap_restore(page, unpack_tags(saved[0]))
            set_page_mte_tagged(k, page)

    def mte_invalidate_tags(self, entry: int) -> None:
        """mte_invalidate_tags(): the slot was freed."""
        self.store.pop(entry, None)


def mte_try_transfer_swap_tags(k: Kernel, page: Page, saved) -> None:
    """mte_try_transfer_swap_tags() (RFC v3 patch 28): park the swap tags of a page without storage.

    Raises:
        KernelError: ENOMEM (VM_FAULT_OOM) when the GFP_KERNEL buffer cannot be had
            (``inject-fault site = "tag-buf"``).
    """
    ts = k.tag_storage
    if ts.parked(page.pfn):
        return  # another faulter parked them already
    if not ts.mte_save_tags_for_pfn(saved[0], saved[1], page.pfn, atomic=False):
        raise KernelError("ENOMEM", "swap-in: no memory to park the tags of a page without tag storage "
                                    "(VM_FAULT_OOM)")


def arch_prepare_to_swap(k: Kernel, page: Page, entry: int) -> None:
    """arch_prepare_to_swap(): save the tags; on failure the folio is not swapped.

    Raises:
        KernelError: ENOMEM when the tag buffer cannot be allocated.
    """
    k.swap.tags.mte_save_tags(k, page, entry)


async def arch_swap_restore(k: Kernel, entry: int, page: Page) -> None:
    """arch_swap_restore(): restore tags before the page is mapped."""
    await k.swap.tags.mte_restore_tags(k, entry, page)
