"""Memslots and dirty logging (virt/kvm/kvm_main.c, arch/arm64/kvm/mmu.c).

A memslot maps a range of guest physical pages (gfns) onto a range of the
VMM's virtual addresses. ``kvm_set_memory_region`` is the generic ioctl
(create, move, change flags, delete); ``kvm_arch_prepare_memory_region`` is
arm64's veto, where MTE lives (reference section 4.2):

1. ``base_gfn + npages`` beyond the IPA size -> EFAULT.
2. Under ``mmap_read_lock``, every VMA intersecting the slot's range (holes
   skipped): an MTE VM needs VM_MTE_ALLOWED on it, else EINVAL (regular files
   and device PFNMAP regions; anon, anon-shared, memfd, shmem and hugetlb are
   tag-capable); VM_PFNMAP with KVM_MEM_LOG_DIRTY_PAGES -> EINVAL.
   Only VMA flags are checked: the VMM's own mapping need not be PROT_MTE.

Dirty logging follows KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (what QEMU enables):
turning KVM_MEM_LOG_DIRTY_PAGES on write-protects the slot's stage-2 entries;
a stage-2 write fault then marks the page dirty and maps it writable (4 KiB at
a time: logging forces PTE mappings); KVM_GET_DIRTY_LOG reports the bitmap
without clearing it; KVM_CLEAR_DIRTY_LOG clears bits and write-protects those
pages again.

Errors (kvm_main.c ``__kvm_set_memory_region`` / ``check_memory_region_flags``):
    EINVAL: slot id >= 512, unaligned size/ipa/addr, overflow, delete of a slot
        that does not exist, changing addr/size/readonly of an existing slot, and
        the arm64 vetoes above.
    EEXIST: the range overlaps another slot.
    EFAULT: beyond the VM's IPA size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.errors import KernelError
from hypervisor.kvm import Kvm, kvm_has_mte
from hypervisor.vma import VM_MTE_ALLOWED, VM_PFNMAP, flag_names
from shared.mte import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

KVM_USER_MEM_SLOTS = 512
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
FLAG_BITS = {"log-dirty-pages": KVM_MEM_LOG_DIRTY_PAGES, "readonly": KVM_MEM_READONLY}


@attrs.define(eq=False)
class Memslot:
    """struct kvm_memory_slot."""

    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int = 0
    dirty: set = attrs.Factory(set)  # the dirty bitmap, as page indexes in the slot

    @property
    def logging(self) -> bool:
        """kvm_slot_dirty_track_enabled() && !READONLY (memslot_is_logging)."""
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES) and not self.flags & KVM_MEM_READONLY

    @property
    def readonly(self) -> bool:
        """KVM_MEM_READONLY."""
        return bool(self.flags & KVM_MEM_READONLY)

    def hva(self, gfn: int) -> int:
        """__gfn_to_hva_memslot()."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)


def _flags(names) -> int:
    out = 0
    for n in names:
        out |= FLAG_BITS[n]
    return out


async def kvm_arch_prepare_memory_region(k: "Kernel", kvm: Kvm, base_gfn: int, npages: int, hva: int,
                                         flags: int) -> None:
    """kvm_arch_prepare_memory_region() (arch/arm64/kvm/mmu.c, v6.17-era).

    Raises:
        KernelError: EFAULT beyond the IPA size; EINVAL for a VMA an MTE VM cannot
            use, or a PFNMAP VMA with dirty logging.
    """
    if base_gfn + npages > kvm.phys_size >> PAGE_SHIFT:
        raise KernelError("EFAULT", f"memslot ends at IPA {(base_gfn + npages) << PAGE_SHIFT:#x}, beyond the "
                                    f"VM's {kvm.ipa_bits}-bit IPA space")
    mm = kvm.mm
    end = hva + (npages << PAGE_SHIFT)
    async with mm.mmap_lock.read():
        for vma in mm.vmas_in(hva, end):  # holes are skipped
            await k.sched.point("kvm_arch_prepare_memory_region:vma")
            if kvm_has_mte(k, kvm) and not vma.flags & VM_MTE_ALLOWED:
                raise KernelError("EINVAL", f"memslot of an MTE VM over {vma.backing} memory at {vma.start:#x} "
                                            f"({flag_names(vma.flags)}): no VM_MTE_ALLOWED")
            if vma.flags & VM_PFNMAP and flags & KVM_MEM_LOG_DIRTY_PAGES:
                raise KernelError("EINVAL", f"memslot with dirty logging over a VM_PFNMAP region at {vma.start:#x}")


async def kvm_set_memory_region(k: "Kernel", kvm: Kvm, slot_id: int, ipa: int, size: int, hva: int,
                                flag_names_: tuple) -> None:
    """KVM_SET_USER_MEMORY_REGION: __kvm_set_memory_region() under slots_lock.

    Raises:
        KernelError: see the module docstring.
    """
    from hypervisor.kvm_mmu import kvm_arch_flush_shadow_memslot, kvm_mmu_wp_memory_region

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
            _set_logging(kvm, old, False)
            kvm_arch_flush_shadow_memslot(k, kvm, old)
            del kvm.memslots[slot_id]
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
        await kvm_arch_prepare_memory_region(k, kvm, base_gfn, npages, hva, flags)
        if change == "create":
            slot = Memslot(slot_id, base_gfn, npages, hva, flags)
            kvm.memslots[slot_id] = slot
            _set_logging(kvm, slot, slot.logging)
            return
        if change == "move":
            _set_logging(kvm, old, False)
            kvm_arch_flush_shadow_memslot(k, kvm, old)
            old.base_gfn = base_gfn
            old.flags = flags
            _set_logging(kvm, old, old.logging)
            return
        # KVM_MR_FLAGS_ONLY: kvm_arch_commit_memory_region -> kvm_mmu_wp_memory_region when logging starts
        was = old.logging
        old.flags = flags
        _set_logging(kvm, old, old.logging)
        if old.logging and not was:
            kvm_mmu_wp_memory_region(k, kvm, old)


def _set_logging(kvm: Kvm, slot: Memslot, on: bool) -> None:
    """kvm_{create,destroy}_dirty_bitmap + nr_memslots_dirty_logging accounting."""
    active = slot.id in kvm.ghost_written
    if on and not active:
        kvm.nr_memslots_dirty_logging += 1
        slot.dirty = set()
        kvm.ghost_written[slot.id] = set()
    elif not on and active:
        kvm.nr_memslots_dirty_logging -= 1
        slot.dirty = set()
        del kvm.ghost_written[slot.id]


def mark_page_dirty(kvm: Kvm, gfn: int) -> None:
    """mark_page_dirty_in_slot(): set the gfn's bit when its slot logs dirty pages."""
    slot = kvm.slot_of(gfn)
    if slot is not None and slot.logging:
        slot.dirty.add(gfn - slot.base_gfn)


def ghost_kvm_write(kvm: Kvm, gfn: int) -> None:
    """Ghost state for the DIRTY-LOG-COMPLETE oracle: a KVM path changed this gfn's data or tags."""
    slot = kvm.slot_of(gfn)
    if slot is not None and slot.id in kvm.ghost_written:
        kvm.ghost_written[slot.id].add(gfn - slot.base_gfn)


def _logging_slot(kvm: Kvm, slot_id: int, ioctl: str) -> Memslot:
    """The memslot a dirty-log ioctl names: EINVAL if it does not exist, ENOENT if it does not log."""
    slot = kvm.memslots.get(slot_id)
    if slot is None:
        raise KernelError("EINVAL", f"{ioctl}: no memslot {slot_id}")
    if not slot.logging:
        raise KernelError("ENOENT", f"{ioctl}: memslot {slot_id} does not log dirty pages")
    return slot


async def kvm_vm_ioctl_get_dirty_log(k: "Kernel", kvm: Kvm, slot_id: int) -> list[int]:
    """KVM_GET_DIRTY_LOG with manual protect: the slot's dirty page indexes (not cleared).

    Raises:
        KernelError: EINVAL for an unknown slot, ENOENT when the slot does not log.
    """
    async with kvm.slots_lock.held():
        slot = _logging_slot(kvm, slot_id, "KVM_GET_DIRTY_LOG")
        k.oracle.check_dirty_log(kvm, slot)
        return sorted(slot.dirty)


async def kvm_vm_ioctl_clear_dirty_log(k: "Kernel", kvm: Kvm, slot_id: int, first: int, num: int | None) -> None:
    """KVM_CLEAR_DIRTY_LOG: clear pages [first, first+num) and write-protect them again.

    Raises:
        KernelError: EINVAL for an unknown slot or a range outside it, ENOENT when
            the slot does not log.
    """
    from hypervisor.kvm_mmu import kvm_arch_mmu_enable_log_dirty_pt_masked

    async with kvm.slots_lock.held():
        slot = _logging_slot(kvm, slot_id, "KVM_CLEAR_DIRTY_LOG")
        num = slot.npages - first if num is None else num
        if first > slot.npages or first + num > slot.npages:
            raise KernelError("EINVAL", f"KVM_CLEAR_DIRTY_LOG: pages {first}..{first + num} exceed the slot's "
                                        f"{slot.npages}")
        await k.sched.point("kvm_clear_dirty_log")
        k.oracle.check_dirty_log(kvm, slot)
        cleared = [i for i in slot.dirty if first <= i < first + num]
        for i in cleared:
            slot.dirty.discard(i)
        ghost = kvm.ghost_written.get(slot.id)
        if ghost is not None:
            ghost.difference_update(range(first, first + num))
        kvm_arch_mmu_enable_log_dirty_pt_masked(k, kvm, slot, cleared)
