"""KVM_CAP_ARM_MTE, vCPU creation and VM handles (reference section 4.1, invariant 17, section 7).

The rules checked: KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) is the host's MTE
support; KVM_ENABLE_CAP refuses non-zero flags, unknown capabilities, a host
without MTE and any VM that already created a vCPU (``created_vcpus`` counts
creations, including the AArch32 one whose VCPU_INIT failed), is harmless
twice and cannot be undone; an MTE VM never gets an AArch32 vCPU; a VM handle
is private to the process that created it, as a file descriptor is.
"""

from __future__ import annotations

import pytest
from support import Proc, Vm, expect_errno, invariants

from hypervisor.fork import do_exit
from hypervisor.kernel import Kernel
from hypervisor.kvm.kvm_host import kvm_has_mte
from shared.errno import KernelError

RAM = 0x4000_0000


class TestCheckExtension:
    """KVM_CHECK_EXTENSION(KVM_CAP_ARM_MTE) = system_supports_mte()."""

    @pytest.mark.parametrize("host_mte", [True, False])
    async def test_arm_mte_is_the_hosts_mte(self, host_mte):
        """On /dev/kvm and on a VM, the ARM_MTE extension reads 1 with host MTE and 0 without."""
        k = Kernel(mte=host_mte)
        vm = await Vm.create(k, mte=False, vcpu=False)
        assert await vm.vmm("kvm-check-extension", cap="arm-mte") == int(host_mte)
        assert await vm("kvm-check-extension", cap="arm-mte") == int(host_mte)

    async def test_extension_does_not_depend_on_the_vm_enabling_it(self):
        """A VM that has not enabled the capability (or has) still reports what the host supports."""
        k = Kernel()
        plain = await Vm.create(k, mte=False, vcpu=False)
        mte = await Vm.create(k, mte=True, vcpu=True, name="vmm2")
        assert await plain("kvm-check-extension", cap="arm-mte") == 1
        assert await mte("kvm-check-extension", cap="arm-mte") == 1

    async def test_unknown_extension_reads_zero(self):
        """An extension KVM does not know reads 0 (not an error), as KVM_CHECK_EXTENSION does."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        assert await vm("kvm-check-extension", cap="arm-no-such-cap") == 0


class TestEnableCap:
    """kvm_vm_ioctl_enable_cap(KVM_CAP_ARM_MTE): the EINVAL cases, idempotence, no way back."""

    async def test_enable_sets_kvm_has_mte(self):
        """Enabling ARM_MTE before any vCPU succeeds (returns nothing) and the VM then has MTE."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        assert not kvm_has_mte(k, vm.kvm)
        assert await vm("kvm-enable-cap", cap="arm-mte") is None
        assert vm.kvm.mte_enabled and kvm_has_mte(k, vm.kvm)

    @pytest.mark.parametrize("flags", [1, 0x80, 1 << 63])
    async def test_non_zero_flags_are_einval(self, flags):
        """cap->flags != 0 is EINVAL and leaves MTE off."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte", flags=flags))
        assert not vm.kvm.mte_enabled

    async def test_non_zero_flags_are_einval_for_any_capability(self):
        """The flags check comes first: it fails the same way for a capability that does not exist."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        exc = await expect_errno("EINVAL", vm("kvm-enable-cap", cap="bogus", flags=2))
        assert "flags" in exc.message

    async def test_host_without_mte_is_einval(self):
        """On a host whose CPUs lack MTE the capability cannot be enabled: EINVAL, and the VM has no MTE."""
        k = Kernel(mte=False)
        vm = await Vm.create(k, mte=False, vcpu=False)
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte"))
        assert not vm.kvm.mte_enabled and not kvm_has_mte(k, vm.kvm)

    async def test_after_a_vcpu_is_einval(self):
        """Once a vCPU was created the capability is refused with EINVAL and MTE stays off."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=True)
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte"))
        assert not vm.kvm.mte_enabled
        assert await vm("kvm-check-extension", cap="arm-mte") == 1  # the host still supports it

    async def test_twice_before_vcpus_is_harmless(self):
        """A second enable before any vCPU returns success again and MTE stays on."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        await vm("kvm-enable-cap", cap="arm-mte")
        assert await vm("kvm-enable-cap", cap="arm-mte") is None
        assert kvm_has_mte(k, vm.kvm)
        await vm.add_vcpu()
        assert kvm_has_mte(k, vm.kvm)

    async def test_enable_after_vcpus_on_an_mte_vm_is_einval_but_mte_stays(self):
        """Re-enabling on an MTE VM that has vCPUs is EINVAL, and the capability is not lost (it cannot be disabled)."""
        k = Kernel()
        vm = await Vm.create(k, mte=True, vcpu=True)
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte"))
        assert kvm_has_mte(k, vm.kvm)

    @pytest.mark.parametrize("cap", ["bogus", "arm-mte-perm", ""])
    async def test_unknown_or_unsettable_capability_is_einval(self, cap):
        """A capability KVM_ENABLE_CAP does not handle is EINVAL and changes nothing."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap=cap))
        assert not vm.kvm.mte_enabled

    async def test_cap_is_per_vm(self):
        """Enabling MTE on one VM does not give it to another VM of the same process."""
        k = Kernel()
        a = await Vm.create(k, mte=True, vcpu=False)
        b = Vm(a.vmm, await a.vmm("kvm-create-vm"))
        assert kvm_has_mte(k, a.kvm) and not kvm_has_mte(k, b.kvm)


class TestVcpuInit:
    """KVM_CREATE_VCPU + KVM_ARM_VCPU_INIT: AArch32 is incompatible with MTE."""

    async def test_aarch64_vcpus_get_distinct_indexes_and_tokens(self):
        """Each vCPU gets the next index and its own token."""
        k = Kernel()
        vm = await Vm.create(k, mte=True, vcpu=False)
        r0 = await vm("kvm-create-vcpu")
        r1 = await vm("kvm-create-vcpu")
        assert (r0["index"], r1["index"]) == (0, 1)
        assert r0["token"] != r1["token"] and len(r0["token"]) >= 32
        assert vm.kvm.created_vcpus == 2

    async def test_aarch32_on_an_mte_vm_is_einval(self):
        """An AArch32 vCPU on an MTE VM fails VCPU_INIT with EINVAL; its token is never handed out."""
        k = Kernel()
        vm = await Vm.create(k, mte=True, vcpu=False)
        tokens = dict(k.kvm.tokens)
        await expect_errno("EINVAL", vm("kvm-create-vcpu", aarch32=True))
        assert k.kvm.tokens == tokens  # no guest can run it
        assert not any(v.aarch32 and v.initialised for v in vm.kvm.vcpus)
        assert invariants(k) == []

    async def test_failed_aarch32_vcpu_still_counts_for_enable_cap(self):
        """The failed AArch32 vCPU was created (created_vcpus == 1), so enabling the capability is EINVAL after it."""
        k = Kernel()
        vm = await Vm.create(k, mte=True, vcpu=False)
        await expect_errno("EINVAL", vm("kvm-create-vcpu", aarch32=True))
        assert vm.kvm.created_vcpus == 1
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte"))
        assert kvm_has_mte(k, vm.kvm)

    async def test_aarch64_vcpu_after_a_refused_aarch32_one_works(self):
        """After the refused AArch32 vCPU, an AArch64 vCPU is created and initialised (index 1)."""
        k = Kernel()
        vm = await Vm.create(k, mte=True, vcpu=False)
        await expect_errno("EINVAL", vm("kvm-create-vcpu", aarch32=True))
        r = await vm("kvm-create-vcpu")
        assert r["index"] == 1 and k.kvm.vcpu_by_token(r["token"]).initialised

    async def test_aarch32_on_a_plain_vm_is_fine(self):
        """Without MTE an AArch32 vCPU is created and initialised, and the capability can no longer be enabled."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        r = await vm("kvm-create-vcpu", aarch32=True)
        vcpu = k.kvm.vcpu_by_token(r["token"])
        assert vcpu.aarch32 and vcpu.initialised and r["index"] == 0
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte"))
        assert not kvm_has_mte(k, vm.kvm)
        assert invariants(k) == []

    async def test_aarch32_on_a_host_without_mte_is_fine(self):
        """On a host without MTE no VM can have MTE, so AArch32 vCPUs are always accepted."""
        k = Kernel(mte=False)
        vm = await Vm.create(k, mte=False, vcpu=False)
        assert (await vm("kvm-create-vcpu", aarch32=True))["index"] == 0

    async def test_oracle_reports_aarch32_in_an_mte_vm(self):
        """CAP-BEFORE-VCPUS: the oracle catches an initialised AArch32 vCPU in an MTE VM (if the EINVAL were
        missing)."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        await vm("kvm-create-vcpu", aarch32=True)
        vm.kvm.mte_enabled = True  # what a missing created_vcpus check would allow
        assert "CAP-BEFORE-VCPUS" in invariants(k)


class TestVmHandles:
    """A VM handle is private to the process that created it (fdget fails elsewhere: EBADF)."""

    @pytest.mark.parametrize("op,args", [
        ("kvm-enable-cap", {"cap": "arm-mte"}),
        ("kvm-create-vcpu", {}),
        ("kvm-set-memory-region", {"slot": 0, "ipa": RAM, "size": 4096, "addr": 0x1000_0000}),
        ("kvm-copy-tags", {"guest_ipa": RAM, "length": 4096, "flags": 1}),
        ("kvm-get-dirty-log", {"slot": 0}),
        ("kvm-clear-dirty-log", {"slot": 0}),
        ("kvm-check-extension", {"cap": "arm-mte"}),
        ("kvm-destroy-vm", {}),
    ])
    async def test_another_process_gets_ebadf(self, op, args):
        """Every VM ioctl naming another process's VM handle fails with EBADF and leaves the VM untouched."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        other = Proc.new(k, "intruder", session=vm.vmm.task.session)
        await expect_errno("EBADF", other(op, vm=vm.handle, **args))
        assert vm.handle in k.kvm.vms and not vm.kvm.destroyed
        assert not vm.kvm.mte_enabled and vm.kvm.created_vcpus == 0 and vm.kvm.memslots == {}

    async def test_two_processes_have_separate_vms(self):
        """Each process only reaches its own VM; the same ioctl on its own handle works."""
        k = Kernel()
        a = await Vm.create(k, mte=False, vcpu=False, name="a")
        b = await Vm.create(k, mte=False, vcpu=False, name="b")
        assert a.handle != b.handle
        await expect_errno("EBADF", a.vmm("kvm-enable-cap", vm=b.handle, cap="arm-mte"))
        await b("kvm-enable-cap", cap="arm-mte")
        assert b.kvm.mte_enabled and not a.kvm.mte_enabled

    async def test_unknown_handle_is_ebadf(self):
        """A handle nobody created is EBADF."""
        k = Kernel()
        p = Proc.new(k, "vmm")
        await expect_errno("EBADF", p("kvm-enable-cap", vm=12345, cap="arm-mte"))

    async def test_destroyed_vm_handle_is_ebadf_and_its_tokens_die(self):
        """After KVM destroys the VM its handle is EBADF and its vCPU tokens reach nothing (ESRCH)."""
        k = Kernel()
        vm = await Vm.create(k)
        token = vm.vcpus[0].token
        await vm("kvm-destroy-vm")
        await expect_errno("EBADF", vm("kvm-create-vcpu"))
        with pytest.raises(KernelError) as ei:
            k.kvm.vcpu_by_token(token)
        assert ei.value.name == "ESRCH"

    async def test_exit_of_the_vmm_destroys_its_vms(self):
        """When the VMM process exits its VMs are destroyed (the fd closes)."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, 4096)
        await vm.store(RAM, b"x")
        kvm = vm.kvm
        await do_exit(k, vm.vmm.task)
        assert kvm.destroyed and k.kvm.vms == {} and kvm.s2 == {}

    @pytest.mark.parametrize("bits", [31, 53, 0])
    async def test_ipa_size_outside_32_to_52_bits_is_einval(self, bits):
        """KVM_CREATE_VM with an IPA size outside 32..52 bits is EINVAL and creates nothing."""
        k = Kernel()
        p = Proc.new(k, "vmm")
        await expect_errno("EINVAL", p("kvm-create-vm", ipa_bits=bits))
        assert k.kvm.vms == {}


class TestHostSettings:
    """The host's boot settings: mte_tcf_preferred and the proposed kernel fixes (``boot`` op)."""

    def test_boot_takes_tcf_preferred_and_kernel_fixes(self):
        """The boot op carries tcf_preferred (async by default) and kernel_fixes (none by default)."""
        from shared.abi import validate_args

        assert validate_args("boot", {})["tcf_preferred"] == "async"
        assert validate_args("boot", {})["kernel_fixes"] == ()
        a = validate_args("boot", {"tcf_preferred": "asymm", "kernel_fixes": ["sanitise-whole-hugetlb-folio"]})
        k = Kernel(tcf_preferred=a["tcf_preferred"], kernel_fixes=a["kernel_fixes"])
        assert k.tcf_preferred == "asymm" and k.fixes == {"sanitise-whole-hugetlb-folio"}
        assert Kernel().fixes == frozenset()

    @pytest.mark.parametrize("kw", [{"kernel_fixes": ["no-such-fix"]}, {"tcf_preferred": "none"}])
    def test_unknown_settings_are_refused(self, kw):
        """An unknown kernel fix or a preference other than sync/async/asymm cannot boot (EINVAL at the boot op)."""
        with pytest.raises(ValueError):
            Kernel(**kw)
