"""KVM_ARM_MTE_COPY_TAGS (arch/arm64/kvm/guest.c ``kvm_vm_ioctl_mte_copy_tags``, v6.13+).

Linux has no copy_tags.c: the ioctl is in guest.c and dispatched from arm.c; the model keeps
it in a file named after what it does.

The VMM's way to read (FROM_GUEST) or write (TO_GUEST) a guest's allocation
tags, one tag per byte, without mapping guest RAM PROT_MTE itself: the tool of
live migration (reference sections 4.4 and 5). Checks, in the kernel's order:

1. the VM has no MTE -> EINVAL;
2. ``reserved[0] || reserved[1]`` -> EINVAL;
3. ``flags`` other than 0 (TO_GUEST) or 1 (FROM_GUEST) -> EINVAL;
4. ``guest_ipa`` or ``length`` not page aligned -> EINVAL;
5. ``length > INT_MAX`` -> EINVAL;
6. under ``slots_lock``: TO_GUEST while any memslot logs dirty pages -> EBUSY
   (the ioctl does not call mark_page_dirty, so the tags would escape the log).

Then per page: GUP in the VMM's mm (FOLL_WRITE for TO_GUEST). A gfn outside
every memslot, a read-only slot for TO_GUEST, a GUP failure or ZONE_DEVICE
memory ends the copy with EFAULT. FROM_GUEST reads the tags of a tagged page
and zeros for an untagged one, changing nothing. TO_GUEST takes the tag lock
(result ignored), copies, zeroes the page's tags if the user buffer ran short,
and always sets PG_mte_tagged (for a hugetlb page, on the whole folio: the
folio's other pages keep whatever tags they had, finding 3 of
docs/findings.md, unless the host applies ``sanitise-whole-hugetlb-folio``,
which clears them when the lock is won). The return is the guest bytes done when at least
one page was, else the error: partial success wins over the error.

Model notes: the user buffer is the request's ``tags`` (TO_GUEST); a shorter
buffer faults where it ends. Replies larger than :data:`shared.abi.MAX_IO`
tags get E2BIG after the kernel's own checks (the transport's limit: split the
dump, as the VMM does).
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
from hypervisor.arm64.tags import mte_clear_page_tags, read_tags, write_tags
from hypervisor.ghost import loc_of_ipa
from hypervisor.kvm.kvm_host import Kvm, ghost_kvm_write, kvm_has_mte
from hypervisor.mm.memory import get_page, handle_mm_fault, put_page
from hypervisor.page import Page
from shared.abi import MAX_IO
from shared.errno import KernelError
from shared.mte import MTE_GRANULES_PER_PAGE, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1
INT_MAX = (1 << 31) - 1
ZERO_TAGS = bytes(MTE_GRANULES_PER_PAGE)


async def __gfn_to_page(k: Kernel, kvm: Kvm, gfn: int, write: bool) -> Page | None:
    """__gfn_to_page(): GUP the VMM page behind ``gfn`` (with a reference), or None."""
    slot = kvm.slot_of(gfn)
    if slot is None or (write and slot.readonly):
        return None
    try:
        pte = await handle_mm_fault(k, kvm.mm, slot.hva(gfn), write)
    except KernelError:
        return None
    assert pte.page is not None  # handle_mm_fault returns a present entry
    if not pte.special:
        get_page(pte.page)
    return pte.page


def _release(k: Kernel, page: Page) -> None:
    if page.zone == "normal":
        put_page(k, page)


def _is_tagged(k: Kernel, page: Page) -> bool:
    if page.is_hugetlb:
        return folio_test_hugetlb_mte_tagged(k, page.folio)
    return page_mte_tagged(k, page)


async def kvm_vm_ioctl_mte_copy_tags(k: Kernel, kvm: Kvm, guest_ipa: int, length: int, flags: int,
                                     reserved: tuple, tags: bytes) -> dict:
    """kvm_vm_ioctl_mte_copy_tags() (arch/arm64/kvm/guest.c).

    Returns:
        ``{"length": guest bytes done, "tags": bytes}`` (tags empty for TO_GUEST).

    Raises:
        KernelError: EINVAL, EBUSY, EFAULT as in the module docstring (only when
            no page was done); E2BIG when the dump would not fit one reply.
    """
    write = not flags & KVM_ARM_TAGS_FROM_GUEST
    if not kvm_has_mte(k, kvm):
        raise KernelError("EINVAL", "KVM_ARM_MTE_COPY_TAGS: the VM does not have KVM_CAP_ARM_MTE enabled")
    if reserved[0] or reserved[1]:
        raise KernelError("EINVAL", "KVM_ARM_MTE_COPY_TAGS: reserved fields must be 0")
    if flags & ~KVM_ARM_TAGS_FROM_GUEST:
        raise KernelError("EINVAL", f"KVM_ARM_MTE_COPY_TAGS: unknown flags {flags:#x}")
    if length & (PAGE_SIZE - 1) or guest_ipa & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"KVM_ARM_MTE_COPY_TAGS: guest_ipa {guest_ipa:#x} and length {length:#x} "
                                    "must be page aligned")
    if length > INT_MAX:
        raise KernelError("EINVAL", f"KVM_ARM_MTE_COPY_TAGS: length {length:#x} exceeds INT_MAX")
    if not write and length // 16 > MAX_IO:
        raise KernelError("E2BIG", f"KVM_ARM_MTE_COPY_TAGS: {length // 16} tags exceed the {MAX_IO} one reply "
                                   "may carry; split the dump")
    out = bytearray()
    gfn = guest_ipa >> PAGE_SHIFT
    remaining = length
    pos = 0
    err: KernelError | None = None
    async with kvm.slots_lock.held():
        if write and kvm.nr_memslots_dirty_logging and "copy-tags-during-dirty-log" not in k.bugs:
            err = KernelError("EBUSY", f"KVM_ARM_MTE_COPY_TAGS TO_GUEST while {kvm.nr_memslots_dirty_logging} "
                                       "memslot(s) log dirty pages")
        while err is None and remaining > 0:
            await k.sched.point("kvm_vm_ioctl_mte_copy_tags:page")
            page = await __gfn_to_page(k, kvm, gfn, write)
            if page is None:
                err = KernelError("EFAULT", f"KVM_ARM_MTE_COPY_TAGS: no page at IPA {gfn << PAGE_SHIFT:#x}")
                break
            if page.zone == "device":  # !pfn_to_online_page()
                err = KernelError("EFAULT", f"KVM_ARM_MTE_COPY_TAGS: IPA {gfn << PAGE_SHIFT:#x} is device memory")
                break
            try:
                if not write:
                    before = page.folio.flags
                    if _is_tagged(k, page):
                        got = read_tags(k, page, 0, MTE_GRANULES_PER_PAGE, "KVM_ARM_MTE_COPY_TAGS FROM_GUEST")
                    else:
                        got = ZERO_TAGS  # clear_user(): untagged pages read as zeros
                    k.oracle.ghost.check_read_tags(loc_of_ipa(kvm, gfn), page, 0, got,
                                                   "KVM_ARM_MTE_COPY_TAGS FROM_GUEST")
                    out += got
                    num = MTE_GRANULES_PER_PAGE
                    k.oracle.check_copy_tags_read(page, before)
                else:
                    hugetlb = page.is_hugetlb
                    if hugetlb:
                        won = await folio_try_hugetlb_mte_tagging(k, page.folio)
                        if won and "sanitise-whole-hugetlb-folio" in k.fixes:
                            # the proposed fix: the folio is about to be flagged whole, so no page of it
                            # may keep stale tags (docs/findings.md, finding 3)
                            for sub in page.folio.subpages:
                                if sub is not page:
                                    mte_clear_page_tags(k, sub)
                    else:
                        await try_page_mte_tagging(k, page)  # the result is ignored, as in the kernel
                    chunk = tags[pos:pos + MTE_GRANULES_PER_PAGE]
                    num = len(chunk)
                    await k.sched.point("kvm_vm_ioctl_mte_copy_tags:copy")
                    if num == MTE_GRANULES_PER_PAGE:
                        written = bytes(b & 0xF for b in chunk)  # mte_copy_tags_from_user()
                    else:
                        written = ZERO_TAGS  # mte_clear_page_tags(): no stale or partial tags
                    write_tags(k, page, 0, written)
                    k.oracle.ghost.tags_written(loc_of_ipa(kvm, gfn), page, 0, written)
                    if hugetlb:
                        folio_set_hugetlb_mte_tagged(k, page.folio)
                    else:
                        set_page_mte_tagged(k, page)
                    ghost_kvm_write(kvm, gfn)  # no mark_page_dirty(): why TO_GUEST is EBUSY while logging
                    k.oracle.check_copy_tags_write(page)
            finally:
                _release(k, page)
            if num != MTE_GRANULES_PER_PAGE:
                err = KernelError("EFAULT", f"KVM_ARM_MTE_COPY_TAGS: the tag buffer ends at page "
                                            f"{(length - remaining) >> PAGE_SHIFT}")
                break
            gfn += 1
            pos += num
            remaining -= PAGE_SIZE
    if remaining != length:
        return {"length": length - remaining, "tags": bytes(out)}
    if err is not None:
        raise err
    return {"length": length, "tags": bytes(out)}
