"""Memslots and dirty logging (virt/kvm/kvm_main.c, arch/arm64/kvm/mmu.c).

A memslot maps a range of guest physical pages (gfns) onto a range of the
VMM's virtual addresses. ``kvm_set_memory_region`` is the generic ioctl
(create, move, change flags, delete); ``kvm_arch_prepare_memory_region`` is
arm64's veto, where MTE lives (reference section 4.2):

1. ``base_gfn + npages`` beyond the IPA size -> EFAULT.
2. Under ``mmap_read_lock``, every VMA intersecting the slot's range (holes
   skipped), the first failure winning: an MTE VM needs VM_MTE_ALLOWED on it, else
   EINVAL (regular files, dax, p2pmem and device PFNMAP regions; anon, anon-shared,
   memfd, shmem and hugetlb are tag-capable, on any node); a host configured for
   dynamic tag storage runs RFC v3 patch 16, which lets VM_PFNMAP VMAs through. Then
   VM_PFNMAP with KVM_MEM_LOG_DIRTY_PAGES -> EINVAL, and a cacheable VM_PFNMAP
   (``kvm_vma_is_cacheable``) without FEAT_S2FWB and CTR_EL0.DIC -> EINVAL.
   Only VMA flags are checked: the VMM's own mapping need not be PROT_MTE.
   This runs at CREATE, MOVE and FLAGS_ONLY (so enabling dirty logging is checked).

Dynamic tag storage under ``kvm-tag-storage = "reserve"`` (RFC v3): a CREATE or MOVE
of an MTE VM's slot sets VM_MTE_KVM on every VM_MTE_ALLOWED VMA in it, a DELETE
clears it (``kvm_mte_kvm_flags``); a VMA created later gets it at its first
stage-2 fault (:mod:`hypervisor.kvm.mmu`).

Dirty logging (kvm_main.c): a slot with KVM_MEM_LOG_DIRTY_PAGES has a dirty
bitmap and counts in ``nr_memslots_dirty_logging`` whatever KVM_MEM_READONLY
says (``kvm_commit_memory_region`` counts the flag alone), although stage 2
treats only a writable logging slot as logging (``memslot_is_logging``: 4 KiB
mappings). Turning logging on write-protects the slot's stage-2 entries
(unless KVM_DIRTY_LOG_INITIALLY_SET: then the bitmap starts all ones and
KVM_CLEAR_DIRTY_LOG write-protects lazily); a stage-2 write fault marks the page
dirty and maps it writable. Moving a logging slot keeps its bitmap.
KVM_GET_DIRTY_LOG without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 returns the bitmap,
clears it and write-protects those pages again (``kvm_get_dirty_log_protect``);
with it, GET only reports and KVM_CLEAR_DIRTY_LOG clears and write-protects.

Errors (kvm_main.c ``__kvm_set_memory_region`` / ``check_memory_region_flags``):
    EINVAL: slot id >= KVM_USER_MEM_SLOTS (32767, KVM_MEM_SLOTS_NUM = SHRT_MAX
        since v5.13), unaligned size/ipa/addr, overflow, delete of a slot that
        does not exist, changing addr/size/readonly of an existing slot, and
        the arm64 vetoes above.
    EEXIST: the range overlaps another slot.
    EFAULT: beyond the VM's IPA size.
GET/CLEAR_DIRTY_LOG: EINVAL for a slot id >= KVM_USER_MEM_SLOTS, a CLEAR whose
``first_page`` is not a multiple of 64, a range past the slot, or a
``num_pages`` not a multiple of 64 that stops short of the slot's end; ENOENT
for a slot that does not exist or has no dirty bitmap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.kvm.kvm_host import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    Kvm,
    Memslot,
    kvm_has_mte,
    kvm_rfc_tag_storage,
    kvm_supports_cacheable_pfnmap,
    kvm_tag_storage_reserve,
)
from hypervisor.kvm.mmu import (
    KVM_MEMSLOT_INVALID,
    kvm_arch_flush_shadow_memslot,
    kvm_arch_mmu_enable_log_dirty_pt_masked,
    kvm_mmu_wp_memory_region,
    synchronize_srcu_expedited,
)
from hypervisor.mm_types import VM_MTE_ALLOWED, VM_MTE_KVM, VM_PFNMAP, flag_names, kvm_vma_is_cacheable
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

FLAG_BITS = {"log-dirty-pages": KVM_MEM_LOG_DIRTY_PAGES, "readonly": KVM_MEM_READONLY}


def _flags(names) -> int:
    out = 0
    for n in names:
        out |= FLAG_BITS[n]
    return out


async def kvm_arch_prepare_memory_region(k: Kernel, kvm: Kvm, base_gfn: int, npages: int, hva: int,
                                         flags: int) -> None:
    """kvm_arch_prepare_memory_region() (arch/arm64/kvm/mmu.c, v6.17-era; RFC v3 patch 16 on a dynamic host).

    Raises:
        KernelError: EFAULT beyond the IPA size; EINVAL for a VMA an MTE VM cannot
            use, a PFNMAP VMA with dirty logging, or a cacheable PFNMAP VMA without
            FEAT_S2FWB and CTR_EL0.DIC.
    """
    if base_gfn + npages > kvm.phys_size >> PAGE_SHIFT:
        raise KernelError("EFAULT", f"memslot ends at IPA {(base_gfn + npages) << PAGE_SHIFT:#x}, beyond the "
                                    f"VM's {kvm.ipa_bits}-bit IPA space")
    mm = kvm.mm
    end = hva + (npages << PAGE_SHIFT)
    async with mm.mmap_lock.read():
        for vma in mm.vmas_in(hva, end):  # holes are skipped
            await k.sched.point("kvm_arch_prepare_memory_region:vma")
            # RFC v3 patch 16: "Don't deny VM_PFNMAP VMAs when kvm_has_mte()"
            pfnmap_ok = kvm_rfc_tag_storage(k) and vma.flags & VM_PFNMAP
            if kvm_has_mte(k, kvm) and not vma.flags & VM_MTE_ALLOWED and not pfnmap_ok:
                raise KernelError("EINVAL", f"memslot of an MTE VM over {vma.backing} memory at {vma.start:#x} "
                                            f"({flag_names(vma.flags)}): no VM_MTE_ALLOWED")
            if vma.flags & VM_PFNMAP:
                if flags & KVM_MEM_LOG_DIRTY_PAGES:  # IO region dirty page logging not allowed
                    raise KernelError("EINVAL", f"memslot with dirty logging over a VM_PFNMAP region at "
                                                f"{vma.start:#x}")
                if kvm_vma_is_cacheable(vma) and not kvm_supports_cacheable_pfnmap(k):
                    raise KernelError("EINVAL", f"memslot over a cacheable VM_PFNMAP region at {vma.start:#x}, "
                                                "and the CPUs lack FEAT_S2FWB or CTR_EL0.DIC")


async def kvm_mte_kvm_flags(k: Kernel, kvm: Kvm, slot: Memslot, on: bool) -> None:
    """RFC v3: set (CREATE, MOVE) or clear (DELETE) VM_MTE_KVM on the slot's VM_MTE_ALLOWED VMAs.

    Only under ``kvm-tag-storage = "reserve"`` with dynamic tag storage enabled, and for an
    MTE VM. The flag makes the VMA's faults allocate ``__GFP_TAGGED`` pages. The VMAs are
    changed under ``mmap_write_lock`` (vm_flags_set()).
    """
    if not kvm_tag_storage_reserve(k) or not kvm_has_mte(k, kvm):
        return
    mm = kvm.mm
    start = slot.userspace_addr
    end = start + (slot.npages << PAGE_SHIFT)
    async with mm.mmap_lock.write():
        await k.sched.point("kvm_mte_kvm_flags")
        for vma in mm.vmas_in(start, end):
            if on and vma.flags & VM_MTE_ALLOWED:
                vma.flags |= VM_MTE_KVM
                kvm.mte_kvm_vmas.add(vma)
            elif not on:
                vma.flags &= ~VM_MTE_KVM


async def kvm_set_memory_region(k: Kernel, kvm: Kvm, slot_id: int, ipa: int, size: int, hva: int,
                                flag_names_: tuple) -> None:
    """KVM_SET_USER_MEMORY_REGION: __kvm_set_memory_region() under slots_lock.

    Raises:
        KernelError: see the module docstring.
    """
    flags = _flags(flag_names_)
    if slot_id >= KVM_USER_MEM_SLOTS:
        raise KernelError("EINVAL", f"memslot id {slot_id} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
    for what, v in (("memory_size", size), ("guest_phys_addr", ipa), ("userspace_addr", hva)):
        if v & (PAGE_SIZE - 1):
            raise KernelError("EINVAL", f"memslot {what} {v:#x} is not page aligned")
    if ipa + size > 1 << 64 or hva + size > 1 << 64:
        raise KernelError("EINVAL", "memslot range wraps around")
    base_gfn, npages = ipa >> PAGE_SHIFT, size >> PAGE_SHIFT
    async with kvm.slots_lock.held():
        await k.sched.point("kvm_set_memory_region")
        old = kvm.memslots.get(slot_id)
        if npages == 0:  # KVM_MR_DELETE
            if old is None:
                raise KernelError("EINVAL", f"delete of memslot {slot_id}, which does not exist")
            await kvm_invalidate_memslot(k, kvm, old)
            del kvm.memslots[slot_id]  # kvm_delete_memslot()
            _set_logging(kvm, old, False)  # kvm_commit_memory_region(): the dirty bitmap goes
            await kvm_mte_kvm_flags(k, kvm, old, False)
            return
        if old is None:
            change = "create"
        else:
            if hva != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & KVM_MEM_READONLY:
                raise KernelError("EINVAL", f"memslot {slot_id} exists: only its IPA (move) or dirty logging can "
                                            "change; delete it first to change its address, size or readonly")
            if base_gfn != old.base_gfn:
                change = "move"
            elif flags != old.flags:
                change = "flags"
            else:
                return
        if change in ("create", "move"):
            for other in kvm.memslots.values():
                if other.id != slot_id and base_gfn < other.base_gfn + other.npages \
                        and other.base_gfn < base_gfn + npages:
                    raise KernelError("EEXIST", f"memslot {slot_id} overlaps memslot {other.id}")
        if change == "move":
            assert old is not None
            await kvm_invalidate_memslot(k, kvm, old)
            try:
                await kvm_arch_prepare_memory_region(k, kvm, base_gfn, npages, hva, flags)
            except KernelError:
                old.flags &= ~KVM_MEMSLOT_INVALID  # kvm_activate_memslot(kvm, invalid_slot, old): back as it was
                raise
        else:
            await kvm_arch_prepare_memory_region(k, kvm, base_gfn, npages, hva, flags)
        if change == "create":
            slot = Memslot(slot_id, base_gfn, npages, hva, flags)
            kvm.memslots[slot_id] = slot
            _set_logging(kvm, slot, slot.dirty_tracked)
            await kvm_mte_kvm_flags(k, kvm, slot, True)
            return
        assert old is not None  # a move or a flags change is of an existing slot
        if change == "move":
            # kvm_prepare_memory_region(): a slot that keeps logging keeps old->dirty_bitmap;
            # kvm_move_memslot() publishes it valid at its new IPA
            old.base_gfn = base_gfn
            old.flags = flags
            _set_logging(kvm, old, old.dirty_tracked)
            await kvm_mte_kvm_flags(k, kvm, old, True)
            return
        # KVM_MR_FLAGS_ONLY: kvm_arch_prepare_memory_region checks it too (dirty logging over VM_PFNMAP);
        # kvm_arch_commit_memory_region -> kvm_mmu_wp_memory_region when logging starts
        await kvm_arch_prepare_memory_region(k, kvm, base_gfn, npages, hva, flags)
        was = old.dirty_tracked
        old.flags = flags
        _set_logging(kvm, old, old.dirty_tracked)
        if old.dirty_tracked and not was and not kvm_dirty_log_manual_protect_and_init_set(kvm):
            kvm_mmu_wp_memory_region(k, kvm, old)


async def kvm_invalidate_memslot(k: Kernel, kvm: Kvm, old: Memslot) -> None:
    """kvm_invalidate_memslot() (virt/kvm/kvm_main.c), for KVM_MR_DELETE and KVM_MR_MOVE.

    Marks the slot KVM_MEMSLOT_INVALID and publishes it (``kvm_swap_active_memslots``,
    which waits out every SRCU reader with ``synchronize_srcu_expedited``): a stage-2
    fault that found the slot valid has finished, one that starts now finds no hva.
    Only then ``kvm_arch_flush_shadow_memslot`` zaps its stage-2 entries, so no fault
    can map the slot's gfns afterwards. The model keeps the one slot object with
    a flag where Linux swaps in a copy.
    """
    old.flags |= KVM_MEMSLOT_INVALID
    await kvm_swap_active_memslots(k, kvm)
    kvm_arch_flush_shadow_memslot(k, kvm, old)


async def kvm_swap_active_memslots(k: Kernel, kvm: Kvm) -> None:
    """kvm_swap_active_memslots() (virt/kvm/kvm_main.c): publish the memslots, then synchronize_srcu_expedited.

    The model's memslots are published as they change; what remains is the wait
    for the readers of the old ones (``kvm_handle_guest_abort``).
    """
    assert kvm.srcu is not None  # set by KVM_CREATE_VM
    await synchronize_srcu_expedited(k, kvm.srcu)


def kvm_dirty_log_manual_protect_and_init_set(kvm: Kvm) -> bool:
    """kvm_dirty_log_manual_protect_and_init_set(): KVM_DIRTY_LOG_INITIALLY_SET was enabled."""
    return bool(kvm.manual_dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET)


def _set_logging(kvm: Kvm, slot: Memslot, on: bool) -> None:
    """kvm_{create,destroy}_dirty_bitmap + nr_memslots_dirty_logging accounting (kvm_commit_memory_region)."""
    active = slot.id in kvm.ghost_written
    if on and not active:
        kvm.nr_memslots_dirty_logging += 1
        # kvm_prepare_memory_region(): INITIALLY_SET starts the new bitmap all ones
        slot.dirty = set(range(slot.npages)) if kvm_dirty_log_manual_protect_and_init_set(kvm) else set()
        kvm.ghost_written[slot.id] = set()
    elif not on and active:
        kvm.nr_memslots_dirty_logging -= 1
        slot.dirty = set()
        del kvm.ghost_written[slot.id]


def _logging_slot(kvm: Kvm, slot_id: int, ioctl: str) -> Memslot:
    """The memslot a dirty-log ioctl names: EINVAL past KVM_USER_MEM_SLOTS, ENOENT if missing or not logging."""
    if slot_id >= KVM_USER_MEM_SLOTS:
        raise KernelError("EINVAL", f"{ioctl}: slot id {slot_id} >= KVM_USER_MEM_SLOTS ({KVM_USER_MEM_SLOTS})")
    slot = kvm.memslots.get(slot_id)
    if slot is None:
        raise KernelError("ENOENT", f"{ioctl}: no memslot {slot_id}")
    if not slot.dirty_tracked:
        raise KernelError("ENOENT", f"{ioctl}: memslot {slot_id} does not log dirty pages (no dirty bitmap)")
    return slot


async def kvm_vm_ioctl_get_dirty_log(k: Kernel, kvm: Kvm, slot_id: int) -> list[int]:
    """KVM_GET_DIRTY_LOG: kvm_get_dirty_log_protect() (virt/kvm/kvm_main.c).

    Without manual protect the bitmap is returned, cleared and its pages
    write-protected again (``xchg`` per word); with it, only returned.

    Raises:
        KernelError: EINVAL for a slot id past KVM_USER_MEM_SLOTS; ENOENT when
            the slot does not exist or has no dirty bitmap.
    """
    async with kvm.slots_lock.held():
        slot = _logging_slot(kvm, slot_id, "KVM_GET_DIRTY_LOG")
        k.oracle.check_dirty_log(kvm, slot)
        out = sorted(slot.dirty)
        if not kvm.manual_dirty_log_protect:
            slot.dirty = set()
            ghost = kvm.ghost_written.get(slot.id)
            if ghost is not None:
                ghost.clear()
            kvm_arch_mmu_enable_log_dirty_pt_masked(k, kvm, slot, out)
        return out


async def kvm_vm_ioctl_clear_dirty_log(k: Kernel, kvm: Kvm, slot_id: int, first: int, num: int | None) -> None:
    """KVM_CLEAR_DIRTY_LOG: kvm_clear_dirty_log_protect(): clear pages [first, first+num), write-protect them.

    ``num`` None stands for "to the slot's end" (the scenario's default).

    Raises:
        KernelError: EINVAL for a slot id past KVM_USER_MEM_SLOTS, ``first`` not a
            multiple of 64, a range outside the slot, or ``num`` not a multiple
            of 64 short of the slot's end; ENOENT when the slot does not exist
            or has no dirty bitmap.
    """
    async with kvm.slots_lock.held():
        if slot_id >= KVM_USER_MEM_SLOTS:
            raise KernelError("EINVAL", f"KVM_CLEAR_DIRTY_LOG: slot id {slot_id} >= KVM_USER_MEM_SLOTS")
        if first & 63:
            raise KernelError("EINVAL", f"KVM_CLEAR_DIRTY_LOG: first_page {first} is not a multiple of 64")
        slot = _logging_slot(kvm, slot_id, "KVM_CLEAR_DIRTY_LOG")
        if first > slot.npages:
            raise KernelError("EINVAL", f"KVM_CLEAR_DIRTY_LOG: first_page {first} is past the slot's "
                                        f"{slot.npages} pages")
        num = slot.npages - first if num is None else num
        if num > slot.npages - first:
            raise KernelError("EINVAL", f"KVM_CLEAR_DIRTY_LOG: pages {first}..{first + num} exceed the slot's "
                                        f"{slot.npages}")
        if num < slot.npages - first and num & 63:
            raise KernelError("EINVAL", f"KVM_CLEAR_DIRTY_LOG: num_pages {num} is not a multiple of 64 and stops "
                                        "short of the slot's end")
        await k.sched.point("kvm_clear_dirty_log")
        k.oracle.check_dirty_log(kvm, slot)
        cleared = [i for i in slot.dirty if first <= i < first + num]
        for i in cleared:
            slot.dirty.discard(i)
        ghost = kvm.ghost_written.get(slot.id)
        if ghost is not None:
            ghost.difference_update(range(first, first + num))
        kvm_arch_mmu_enable_log_dirty_pt_masked(k, kvm, slot, cleared)
