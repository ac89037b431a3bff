"""KVM's types and their small helpers (include/linux/kvm_host.h, arch/arm64/include/asm/kvm_host.h).

``struct kvm`` (:class:`Kvm`), ``struct kvm_vcpu`` (:class:`Vcpu`), a stage-2
leaf (:class:`S2Entry`), ``struct kvm_memory_slot`` (:class:`Memslot`) with its
flags, ``kvm_has_mte()`` and ``mark_page_dirty()`` (virt/kvm/kvm_main.c): the header every KVM file
includes, so that the ioctls (:mod:`hypervisor.kvm.kvm_main`), stage 2
(:mod:`hypervisor.kvm.mmu`), memslots and vCPU accesses share them without
importing one another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.locks import ModelMutex
from shared.mte import PAGE_SHIFT

if TYPE_CHECKING:
    from collections.abc import Callable

    from hypervisor.kernel import Kernel
    from hypervisor.kvm.mmu import SrcuStruct
    from hypervisor.mm.mmu_notifier import MmuNotifierRange
    from hypervisor.mm_types import MM
    from hypervisor.process import Task

KVM_MAX_VCPUS = 512
#: Smallest and largest IPA sizes arm64 KVM accepts (KVM_VM_TYPE_ARM_IPA_SIZE; 32..52 bits on the model's CPU).
IPA_BITS_MIN, IPA_BITS_MAX = 32, 52
#: Capabilities KVM_CHECK_EXTENSION knows, with the value it returns (others return 0).
CAPS = ("arm-mte", "manual-dirty-log-protect2", "arm-cacheable-pfnmap-supported")
#: KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED (include/uapi/linux/kvm.h, 2025).
KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED = 243
#: Stage-2 memory types: Normal Write-Back (the only one that reaches allocation tags), Normal
#: Non-cacheable (KVM_PGTABLE_PROT_NORMAL_NC) and Device-nGnRE (KVM_PGTABLE_PROT_DEVICE).
S2_MEMTYPES = ("normal", "normal-nc", "device")


@attrs.define(eq=False)
class S2Entry:
    """A stage-2 leaf: the frame mapped at a gfn, its permission, its memory type.

    ``memtype`` is ``normal`` (Normal Write-Back, the only type through which the guest can
    reach allocation tags), ``normal-nc`` (Normal Non-cacheable) or ``device`` (Device-nGnRE).
    """

    page: object
    writable: bool
    memtype: str = "normal"

    @property
    def cacheable(self) -> bool:
        """Normal Write-Back memory."""
        return self.memtype == "normal"


@attrs.define(eq=False)
class Vcpu:
    """struct kvm_vcpu: its index, the token that reaches it, whether VCPU_INIT succeeded."""

    kvm: Kvm
    index: int
    token: str
    aarch32: bool = False
    initialised: bool = True
    attached: object = None  # the guest connection running it


@attrs.define(eq=False)
class Kvm:
    """struct kvm (plus the arm64 ``kvm->arch``)."""

    handle: int
    owner: Task
    ipa_bits: int
    lock: ModelMutex  # kvm->lock
    slots_lock: ModelMutex  # kvm->slots_lock
    mte_enabled: bool = False  # KVM_ARCH_FLAG_MTE_ENABLED
    created_vcpus: int = 0
    vcpus: list = attrs.Factory(list)
    memslots: dict = attrs.Factory(dict)  # slot id -> Memslot
    s2: dict = attrs.Factory(dict)  # gfn -> S2Entry
    mmu_invalidate_seq: int = 0
    nr_memslots_dirty_logging: int = 0
    manual_dirty_log_protect: int = 0  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 args[0]
    destroyed: bool = False
    notifier: Callable[[MmuNotifierRange], None] | None = None
    ghost_written: dict = attrs.Factory(dict)  # slot id -> gfns a KVM path changed since the last clear
    srcu: SrcuStruct | None = None  # kvm->srcu, set by KVM_CREATE_VM (memslot readers vs kvm_swap_active_memslots)
    # ghost for VM-MTE-KVM-FLAG: the VMAs KVM gave VM_MTE_KVM (at CREATE/MOVE or a fault); later ones are exempt
    mte_kvm_vmas: set = attrs.Factory(set)

    @property
    def mm(self) -> MM:
        """The VMM's address space, where guest RAM lives (kvm->mm)."""
        return self.owner.mm

    @property
    def phys_size(self) -> int:
        """kvm_phys_size(): bytes of IPA space."""
        return 1 << self.ipa_bits

    def slot_of(self, gfn: int) -> Memslot | None:
        """gfn_to_memslot()."""
        for slot in self.memslots.values():
            if slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
                return slot
        return None


def kvm_has_mte(k: Kernel, kvm: Kvm) -> bool:
    """kvm_has_mte(): system_supports_mte() && KVM_ARCH_FLAG_MTE_ENABLED."""
    return k.mte and kvm.mte_enabled


def kvm_supports_cacheable_pfnmap(k: Kernel) -> bool:
    """kvm_supports_cacheable_pfnmap() (asm/kvm_mmu.h): ARM64_HAS_STAGE2_FWB && ARM64_HAS_CACHE_DIC."""
    return k.physcfg.stage2_fwb and k.physcfg.cache_dic


def kvm_rfc_tag_storage(k: Kernel) -> bool:
    """The host runs the dynamic tag storage RFC's kernel (configured ``tag-storage = "dynamic"``).

    Its KVM has patch 16 ("Don't deny VM_PFNMAP VMAs when kvm_has_mte()") even where the
    storage management ended up disabled.
    """
    return k.physcfg.tag_storage == "dynamic"


def tag_storage_enabled(k: Kernel) -> bool:
    """The RFC's dynamic tag storage management is enabled on this host (tag_storage_enabled())."""
    ts = getattr(k, "tag_storage", None)
    return bool(getattr(ts, "enabled", False))


def kvm_tag_storage_refuse(k: Kernel) -> bool:
    """RFC v2 patch 25: with dynamic tag storage enabled, KVM refuses KVM_CAP_ARM_MTE."""
    return k.physcfg.kvm_tag_storage == "refuse" and tag_storage_enabled(k)


def kvm_tag_storage_reserve(k: Kernel) -> bool:
    """RFC v3 (patches 16, 32, 33): with dynamic tag storage enabled, KVM reserves storage at stage-2 faults."""
    return k.physcfg.kvm_tag_storage == "reserve" and tag_storage_enabled(k)


KVM_USER_MEM_SLOTS = 32767  # KVM_MEM_SLOTS_NUM (SHRT_MAX) - KVM_INTERNAL_MEM_SLOTS (0 on arm64)
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
#: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 options (args[0] of KVM_ENABLE_CAP).
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
KVM_DIRTY_LOG_MANUAL_CAPS = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET


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
    def dirty_tracked(self) -> bool:
        """kvm_slot_dirty_track_enabled(): KVM_MEM_LOG_DIRTY_PAGES, so the slot has a dirty bitmap."""
        return bool(self.flags & KVM_MEM_LOG_DIRTY_PAGES)

    @property
    def readonly(self) -> bool:
        """KVM_MEM_READONLY."""
        return bool(self.flags & KVM_MEM_READONLY)

    def hva(self, gfn: int) -> int:
        """__gfn_to_hva_memslot()."""
        return self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT)


def mark_page_dirty(kvm: Kvm, gfn: int) -> None:
    """mark_page_dirty_in_slot(): set the gfn's bit when its slot logs dirty pages."""
    slot = kvm.slot_of(gfn)
    if slot is not None and slot.dirty_tracked:
        slot.dirty.add(gfn - slot.base_gfn)


def ghost_kvm_write(kvm: Kvm, gfn: int) -> None:
    """Ghost state for the DIRTY-LOG-COMPLETE oracle: a KVM path changed this gfn's data or tags."""
    slot = kvm.slot_of(gfn)
    if slot is not None and slot.id in kvm.ghost_written:
        kvm.ghost_written[slot.id].add(gfn - slot.base_gfn)
