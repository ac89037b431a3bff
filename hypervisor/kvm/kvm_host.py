"""KVM's types and their small helpers (include/linux/kvm_host.h, arch/arm64/include/asm/kvm_host.h).

``struct kvm`` (:class:`Kvm`), ``struct kvm_vcpu`` (:class:`Vcpu`), a stage-2
leaf (:class:`S2Entry`) and ``kvm_has_mte()``: the header every KVM file
includes, so that the ioctls (:mod:`hypervisor.kvm.kvm_main`), stage 2
(:mod:`hypervisor.kvm.mmu`), memslots and vCPU accesses share them without
importing one another.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.locks import ModelMutex

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.kvm.memslot import Memslot
    from hypervisor.mm_types import MM
    from hypervisor.process import Task

KVM_MAX_VCPUS = 512
#: Smallest and largest IPA sizes arm64 KVM accepts (KVM_VM_TYPE_ARM_IPA_SIZE; 32..52 bits on the model's CPU).
IPA_BITS_MIN, IPA_BITS_MAX = 32, 52
#: Capabilities KVM_CHECK_EXTENSION knows, with the value it returns (others return 0).
CAPS = ("arm-mte", "manual-dirty-log-protect2")


@attrs.define(eq=False)
class S2Entry:
    """A stage-2 leaf: the frame mapped at a gfn, its permission, its memory type.

    ``cacheable`` is Normal (Write-Back) memory, the only type through which the
    guest can reach allocation tags; device memory is Device-nGnRE.
    """

    page: object
    writable: bool
    cacheable: bool


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
    notifier: object = None
    ghost_written: dict = attrs.Factory(dict)  # slot id -> gfns a KVM path changed since the last clear

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
