"""KVM: VMs, their capabilities and vCPUs (virt/kvm/kvm_main.c, arch/arm64/kvm/arm.c).

The ioctls live here; the types (:class:`Kvm`, :class:`Vcpu`, ``kvm_has_mte``)
are in the header :mod:`hypervisor.kvm.kvm_host`.

A :class:`Kvm` is ``struct kvm``: created by a process (the VMM) with
KVM_CREATE_VM, it belongs to that process and uses its address space (guest RAM
is the VMM's memory, reached through memslots). The VMM enables
``KVM_CAP_ARM_MTE`` before creating vCPUs, registers memslots
(:mod:`hypervisor.kvm.memslot`), and hands each vCPU's token to the guest process,
whose accesses fault stage 2 in (:mod:`hypervisor.kvm.mmu`) and are checked
against the allocation tags (:mod:`hypervisor.access.vcpu`).

Handles: a VM is named by a small integer handle, private to the process that
created it (as a file descriptor is); another process naming it gets EBADF.
A vCPU is reached only through the unguessable token that KVM_CREATE_VCPU
returned to the VMM.

Rules (reference section 4.1):
    * KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) is ``system_supports_mte()``; 0 on a host whose
      dynamic tag storage is enabled with ``kvm-tag-storage = "refuse"`` (RFC v2 patch 25),
      where enabling it fails with EINVAL.
    * KVM_CHECK_EXTENSION(KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED) is
      ``kvm_supports_cacheable_pfnmap()`` (FEAT_S2FWB and CTR_EL0.DIC); it cannot be enabled.
    * KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) is 3
      (KVM_DIRTY_LOG_MANUAL_CAPS); enabling it takes ``args[0]`` in {0, 1, 3}
      (else EINVAL) at any time (see :mod:`hypervisor.kvm.memslot`).
    * KVM_ENABLE_CAP: ``flags != 0`` -> EINVAL; ARM_MTE on a host without MTE,
      or once any vCPU was created (``created_vcpus``) -> EINVAL; enabling
      twice before vCPUs is harmless; there is no way to disable it.
    * KVM_ARM_VCPU_INIT with EL1_32BIT on an MTE VM -> EINVAL
      ("MTE is incompatible with AArch32"). The vCPU was already created (and
      counted) by KVM_CREATE_VCPU; it stays uninitialised and cannot run.
"""

from __future__ import annotations

import itertools
import secrets
from typing import TYPE_CHECKING

from hypervisor.kvm.kvm_host import (
    IPA_BITS_MAX,
    IPA_BITS_MIN,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_MAX_VCPUS,
    Kvm,
    Vcpu,
    kvm_has_mte,
    kvm_supports_cacheable_pfnmap,
    kvm_tag_storage_refuse,
)
from hypervisor.kvm.mmu import SrcuStruct, kvm_init_mmu_notifier, kvm_uninit_mmu_notifier
from hypervisor.locks import ModelMutex
from shared.errno import KernelError

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.process import Task


class KvmState:
    """The host's KVM module state: VMs by handle, vCPUs by token."""

    def __init__(self, k: Kernel):
        self.k = k
        self.vms: dict[int, Kvm] = {}
        self.tokens: dict[str, Vcpu] = {}
        self._handles = itertools.count(3)  # fds 0-2 are taken, as in a process

    def vm(self, task: Task, handle: int) -> Kvm:
        """The VM ``handle`` names for ``task`` (fdget()).

        Raises:
            KernelError: EBADF when the task has no VM by that handle.
        """
        kvm = self.vms.get(handle)
        if kvm is None or kvm.owner is not task or kvm.destroyed:
            raise KernelError("EBADF", f"no VM with handle {handle} in pid {task.pid}")
        return kvm

    def kvm_dev_ioctl_create_vm(self, task: Task, ipa_bits: int) -> Kvm:
        """KVM_CREATE_VM (kvm_dev_ioctl_create_vm + kvm_arm_setup_stage2).

        Raises:
            KernelError: EINVAL for an IPA size outside 32..52 bits.
        """
        if not IPA_BITS_MIN <= ipa_bits <= IPA_BITS_MAX:
            raise KernelError("EINVAL", f"KVM_CREATE_VM: IPA size {ipa_bits} bits is outside "
                                        f"{IPA_BITS_MIN}..{IPA_BITS_MAX}")
        h = next(self._handles)
        sched = self.k.sched
        kvm = Kvm(h, task, ipa_bits, ModelMutex(sched, f"kvm{h}.lock"), ModelMutex(sched, f"kvm{h}.slots_lock"),
                  srcu=SrcuStruct(f"kvm{h}.srcu"))  # init_srcu_struct(&kvm->srcu) in kvm_create_vm()
        self.vms[h] = kvm
        kvm_init_mmu_notifier(self.k, kvm)
        return kvm

    def kvm_vm_ioctl_check_extension(self, kvm: Kvm | None, cap: str) -> int:
        """KVM_CHECK_EXTENSION: 1/0 for a capability (0 for unknown ones, as KVM does)."""
        if cap == "arm-mte":
            # system_supports_mte(); RFC v2 patch 25: && !tag_storage_enabled()
            return int(self.k.mte and not kvm_tag_storage_refuse(self.k))
        if cap == "manual-dirty-log-protect2":
            return KVM_DIRTY_LOG_MANUAL_CAPS  # ENABLE | INITIALLY_SET = 3
        if cap == "arm-cacheable-pfnmap-supported":
            return int(kvm_supports_cacheable_pfnmap(self.k))
        return 0

    async def kvm_vm_ioctl_enable_cap(self, kvm: Kvm, cap: str, flags: int, args=(0,)) -> None:
        """KVM_ENABLE_CAP: kvm_vm_ioctl_enable_cap_generic() (virt/kvm/kvm_main.c), then arch/arm64/kvm/arm.c.

        ``manual-dirty-log-protect2`` takes ``args[0]`` in {0, ENABLE, ENABLE |
        INITIALLY_SET} and may be changed at any time; ``arm-mte`` ignores args.

        Raises:
            KernelError: EINVAL for non-zero flags, an unknown capability, other
                MANUAL_DIRTY_LOG_PROTECT2 options, ARM_MTE on a host without MTE, with
                dynamic tag storage under "refuse", or after a vCPU was created;
                ARM_CACHEABLE_PFNMAP_SUPPORTED (a capability to check, not to enable).
        """
        if flags:
            raise KernelError("EINVAL", f"KVM_ENABLE_CAP: flags must be 0 (got {flags:#x})")
        if cap == "manual-dirty-log-protect2":
            arg0 = args[0] if args else 0
            allowed = KVM_DIRTY_LOG_MANUAL_CAPS if arg0 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE \
                else KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if arg0 & ~allowed:
                raise KernelError("EINVAL", f"KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): args[0] {arg0:#x} "
                                            "is not 0, ENABLE (1) or ENABLE|INITIALLY_SET (3)")
            kvm.manual_dirty_log_protect = arg0
            return
        if cap != "arm-mte":
            raise KernelError("EINVAL", f"KVM_ENABLE_CAP: capability {cap!r} cannot be enabled")
        async with kvm.lock.held():
            await self.k.sched.point("kvm_vm_ioctl_enable_cap:check")
            if not self.k.mte:
                raise KernelError("EINVAL", "KVM_ENABLE_CAP(KVM_CAP_ARM_MTE): the host CPUs lack MTE")
            if kvm_tag_storage_refuse(self.k):
                raise KernelError("EINVAL", "KVM_ENABLE_CAP(KVM_CAP_ARM_MTE): refused while dynamic tag storage is "
                                            "enabled (RFC v2 patch 25, kvm-tag-storage = \"refuse\")")
            if kvm.created_vcpus:
                raise KernelError("EINVAL", f"KVM_ENABLE_CAP(KVM_CAP_ARM_MTE): {kvm.created_vcpus} vCPU(s) already "
                                            "created; enable it before KVM_CREATE_VCPU")
            kvm.mte_enabled = True

    async def kvm_vm_ioctl_create_vcpu(self, kvm: Kvm, aarch32: bool) -> Vcpu:
        """KVM_CREATE_VCPU, then KVM_ARM_VCPU_INIT (kvm_vcpu_init_check_features).

        Raises:
            KernelError: EINVAL past KVM_MAX_VCPUS, or for an AArch32 vCPU on an
                MTE VM (the vCPU stays created but uninitialised).
        """
        async with kvm.lock.held():
            await self.k.sched.point("kvm_vm_ioctl_create_vcpu")
            if kvm.created_vcpus >= KVM_MAX_VCPUS:
                raise KernelError("EINVAL", f"KVM_CREATE_VCPU: {KVM_MAX_VCPUS} vCPUs already")
            kvm.created_vcpus += 1
        vcpu = Vcpu(kvm, len(kvm.vcpus), secrets.token_hex(16), aarch32)
        kvm.vcpus.append(vcpu)
        if aarch32 and kvm_has_mte(self.k, kvm):
            vcpu.initialised = False
            raise KernelError("EINVAL", "KVM_ARM_VCPU_INIT: MTE is incompatible with AArch32 "
                                        "(KVM_ARM_VCPU_EL1_32BIT on an MTE VM)")
        self.tokens[vcpu.token] = vcpu
        return vcpu

    def vcpu_by_token(self, token: str) -> Vcpu:
        """The vCPU a guest's token names.

        Raises:
            KernelError: ESRCH for an unknown token or a VM that is gone.
        """
        vcpu = self.tokens.get(token)
        if vcpu is None or vcpu.kvm.destroyed:
            raise KernelError("ESRCH", "no vCPU holds that token (wrong token, or its VM was destroyed)")
        return vcpu

    async def kvm_destroy_vm(self, kvm: Kvm) -> None:
        """kvm_destroy_vm(): unmap stage 2, drop memslots and vCPUs, unregister the notifier."""
        if kvm.destroyed:
            return
        kvm.destroyed = True
        kvm_uninit_mmu_notifier(self.k, kvm)
        kvm.s2.clear()
        kvm.memslots.clear()
        kvm.nr_memslots_dirty_logging = 0
        for v in kvm.vcpus:
            self.tokens.pop(v.token, None)
        self.vms.pop(kvm.handle, None)
        self.k.sched.wake()

    async def release_task(self, task: Task) -> None:
        """The process exited: its VM fds close, its VMs are destroyed."""
        for kvm in [v for v in self.vms.values() if v.owner is task]:
            await self.kvm_destroy_vm(kvm)
