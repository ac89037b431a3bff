"""KVM on a host with dynamic tag storage (the physical-memory contract, part B's KVM bullets).

Checked: ``kvm-tag-storage = "refuse"`` (RFC v2 patch 25) hides and refuses KVM_CAP_ARM_MTE
while management is enabled, and only then; ``"reserve"`` (RFC v3) sets VM_MTE_KVM on a
memslot's VM_MTE_ALLOWED VMAs at CREATE and MOVE, clears it at DELETE, gives it to a VMA
created later at its first stage-2 fault, and makes a stage-2 fault reserve the page's
storage, migrate a tag storage page or a folio whose reservation fails and replay (never an
error; ``livelock`` when it never succeeds); KVM_ARM_MTE_COPY_TAGS is unchanged by the series
(FROM_GUEST of parked tags reads zeros, TO_GUEST into a page without storage writes anyway);
and the VM-MTE-KVM-FLAG invariant.
"""

from __future__ import annotations

import functools

import pytest
from support import Vm, expect_errno, explore_bounded, invariants

from hypervisor.arm64.mte_lock import PG_mte_tagged
from hypervisor.kernel import Kernel
from hypervisor.syscalls import HOST_OPS
from shared.abi import validate_args
from shared.errno import KernelError
from shared.physmem import PhysConfig

PAGE = 4096
RAM = 0x4000_0000


def dynamic(**kw) -> Kernel:
    """A host configured with dynamic tag storage (management enabled unless a key disables it)."""
    return Kernel(physmem=PhysConfig(tag_storage="dynamic", **kw))


async def host_op(k: Kernel, op: str, **a):
    return await HOST_OPS[op](k, validate_args(op, a))


async def vm_with_ram(k: Kernel, pages: int = 4, *, mte: bool = True, touch: bool = True):
    """An MTE VM whose RAM the VMM wrote before registering it (pages allocated without storage)."""
    vm = await Vm.create(k, mte=mte, name="vmm:vm0")
    hva = await vm.map(pages * PAGE)
    if touch:
        for i in range(pages):
            await vm.vmm("store", addr=hva + i * PAGE, data=bytes([i + 1]))
    return vm, hva


def mte_kvm(vm: Vm, addr: int) -> bool:
    return bool(vm.vmm.vma(addr).flags & (1 << 38))


class TestRefuse:
    """RFC v2 patch 25: KVM refuses MTE while dynamic tag storage is enabled."""

    async def test_refused_while_enabled(self):
        """check-extension arm-mte is 0 and enable-cap fails with EINVAL."""
        k = dynamic(kvm_tag_storage="refuse")
        vm = await Vm.create(k, mte=False, vcpu=False)
        assert await vm("kvm-check-extension", cap="arm-mte") == 0
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte"))
        assert not vm.kvm.mte_enabled

    async def test_offered_when_management_is_disabled(self):
        """With management disabled (tag-block-size 0) the host is static to KVM: MTE is offered and enabled."""
        k = dynamic(kvm_tag_storage="refuse", tag_block_size=0)
        assert not k.tag_storage.enabled
        vm = await Vm.create(k, mte=False, vcpu=False)
        assert await vm("kvm-check-extension", cap="arm-mte") == 1
        await vm("kvm-enable-cap", cap="arm-mte")
        assert vm.kvm.mte_enabled

    async def test_reserve_offers_mte(self):
        """Under "reserve" (the default) KVM offers MTE on a dynamic host."""
        k = dynamic()
        vm = await Vm.create(k, mte=False)
        assert await vm("kvm-check-extension", cap="arm-mte") == 1


class TestVmMteKvmFlag:
    """VM_MTE_KVM on the memslots' VMAs (RFC v3 patch 32, invariant 18)."""

    async def test_create_move_delete(self):
        """CREATE sets VM_MTE_KVM on the slot's VM_MTE_ALLOWED VMAs, MOVE keeps it, DELETE clears it."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        assert not mte_kvm(vm, hva)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        assert mte_kvm(vm, hva)
        await vm.slot(0, RAM + (1 << 20), 4 * PAGE, hva)
        assert mte_kvm(vm, hva)
        assert invariants(k) == []
        await vm.slot(0, RAM, 0, hva)
        assert not mte_kvm(vm, hva)
        assert invariants(k) == []

    @pytest.mark.parametrize("physmem, mte", [({"tag_storage": "static"}, True), ({}, False),
                                              ({"kvm_tag_storage": "refuse", "tag_block_size": 0}, True)])
    async def test_not_set(self, physmem, mte):
        """A static host, a VM without MTE, and a host whose management is disabled set no VM_MTE_KVM."""
        k = Kernel(physmem=PhysConfig(**{"tag_storage": "dynamic", **physmem}))
        vm, hva = await vm_with_ram(k, mte=mte)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        await vm.load(RAM, 1)
        assert not mte_kvm(vm, hva)

    async def test_later_vma_gets_it_at_first_fault(self):
        """A VMA mapped over the slot after CREATE lacks the flag (no violation) until its first stage-2 fault."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        await vm.vmm("mmap", addr=hva + PAGE, size=PAGE, prot=["read", "write"], share="private", backing="anon",
                     object=None)
        assert not mte_kvm(vm, hva + PAGE) and invariants(k) == []
        await vm.load(RAM + PAGE, 1)
        assert mte_kvm(vm, hva + PAGE)
        assert invariants(k) == []

    async def test_flag_lost_is_reported(self):
        """A slot's VMA that lost VM_MTE_KVM after CREATE breaks VM-MTE-KVM-FLAG."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        vm.vmm.vma(hva).flags &= ~(1 << 38)
        assert "VM-MTE-KVM-FLAG" in invariants(k)


class TestStage2Reserve:
    """A stage-2 fault of an MTE VM reserves storage, or migrates and replays."""

    async def test_fault_reserves_storage(self):
        """A page the VMM wrote before the memslot gets its tag storage at the guest's first access."""
        k = dynamic()
        ts = k.tag_storage
        vm, hva = await vm_with_ram(k)
        assert not ts.has_storage(vm.vmm.page(hva))
        await vm.slot(0, RAM, 4 * PAGE, hva)
        assert (await vm.load(RAM, 1)).value == b"\x01"
        page = vm.page(RAM)
        assert ts.has_storage(page) and page.flags & PG_mte_tagged
        await vm.stg(RAM, 16, 6)
        assert await vm.ldg(RAM, 16) == [6]
        assert invariants(k) == []

    async def test_tag_storage_page_is_migrated(self):
        """A guest page living in tag storage is migrated out at its stage-2 fault; KVM_RUN succeeds."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        assert await host_op(k, "migrate-pages", pid=vm.vmm.pid, addr=hva + PAGE, size=PAGE, to="tag-storage") == 1
        assert vm.vmm.page(hva + PAGE).is_tag_storage
        await vm.slot(0, RAM, 4 * PAGE, hva)
        assert (await vm.load(RAM + PAGE, 1)).value == b"\x02"
        page = vm.page(RAM + PAGE)
        assert not page.is_tag_storage and k.tag_storage.has_storage(page)
        assert invariants(k) == []

    async def test_failed_reservation_migrates(self):
        """A reservation that fails once makes the fault migrate the folio to a tagged page and replay."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        old = vm.vmm.page(hva + 2 * PAGE)
        await host_op(k, "inject-fault", site="reserve-tag-storage", times=1)
        assert (await vm.load(RAM + 2 * PAGE, 1)).value == b"\x03"
        new = vm.page(RAM + 2 * PAGE)
        assert new is not old and k.tag_storage.has_storage(new)
        assert invariants(k) == []

    async def test_lasting_failure_is_livelock(self):
        """When every reservation fails, the guest access ends livelock and FAULT-FORWARD-PROGRESS breaks."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        await host_op(k, "inject-fault", site="reserve-tag-storage", times=-1)
        r = await vm.load(RAM + 3 * PAGE, 1)
        assert r.value is None and r.fault == {"kind": "livelock", "offset": 0}
        assert vm.s2(RAM + 3 * PAGE) is None
        assert "FAULT-FORWARD-PROGRESS" in invariants(k)

    async def test_vm_without_mte_reserves_nothing(self):
        """A VM without MTE maps a page without storage as it is (no reservation, no violation)."""
        k = dynamic()
        vm, hva = await vm_with_ram(k, mte=False)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        await vm.load(RAM, 1)
        assert not k.tag_storage.has_storage(vm.page(RAM))
        assert invariants(k) == []


class TestCopyTagsUnchanged:
    """KVM_ARM_MTE_COPY_TAGS is not touched by the series."""

    async def test_to_guest_into_a_page_without_storage(self):
        """TO_GUEST into a page without storage writes its tags and flags it tagged: TAGGED-IMPLIES-STORAGE breaks."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        page = vm.vmm.page(hva)
        assert not k.tag_storage.has_storage(page)
        r = await vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes([5]) * 256)
        assert r["length"] == PAGE and page.flags & PG_mte_tagged and page.tags[0] == 5
        assert "TAGGED-IMPLIES-STORAGE" in invariants(k)

    async def test_from_guest_of_parked_tags_reads_zeros(self):
        """FROM_GUEST of a page whose tags are parked (a migration target without storage) returns zeros."""
        k = dynamic()
        vm, hva = await vm_with_ram(k)
        await vm.slot(0, RAM, 4 * PAGE, hva)
        await vm.stg(RAM, 16, 9)
        assert await host_op(k, "migrate-pages", pid=vm.vmm.pid, addr=hva, size=PAGE) == 1
        page = vm.vmm.page(hva)
        assert k.tag_storage.parked(page.pfn)  # a migration target never has storage: its tags wait
        r = await vm.copy_tags(RAM, PAGE, from_guest=True)
        assert r["tags"] == bytes(256)


class TestRaces:
    """The stage-2 reserve path under controlled interleavings (every schedule with at most two preemptions)."""

    @pytest.fixture(autouse=True)
    def dynamic_host(self, monkeypatch):
        """support.run_once boots its Kernel with dynamic tag storage."""
        import support

        monkeypatch.setattr(support, "Kernel", functools.partial(Kernel, physmem=PhysConfig(tag_storage="dynamic")))

    @staticmethod
    async def _setup(k):
        vm, hva = await vm_with_ram(k, 1)
        await vm.slot(0, RAM, PAGE, hva)
        return vm, hva

    async def test_fault_vs_compaction_into_tag_storage(self):
        """A guest fault racing with the page's move into tag storage never maps a page without storage Normal."""
        async def setup(k):
            vm, hva = await self._setup(k)
            st: dict = {"vm": vm}

            async def guest(k, st):
                st["load"] = (await vm.load(RAM, 1)).value

            async def compaction(k, st):
                st["moved"] = await host_op(k, "migrate-pages", pid=vm.vmm.pid, addr=hva, size=PAGE, to="tag-storage")

            return st, {"guest": guest, "host": compaction}

        runs = await explore_bounded(setup, preemptions=2)
        assert len(runs) > 10
        for run in runs:
            assert run.failure is None, run.failure
            assert run.state["load"] == b"\x01"
            e = run.state["vm"].s2(RAM)
            if e is not None:
                assert not e.page.is_tag_storage and run.k.tag_storage.has_storage(e.page)
            assert invariants(run.k) == []
        # not vacuous: the move came after the guest's mapping (stage 2 zapped) in some runs, before it in others
        assert {r.state["vm"].s2(RAM) is None for r in runs} == {True, False}

    async def test_fault_vs_memslot_delete(self):
        """A guest fault racing with the memslot's DELETE never leaves VM_MTE_KVM on the VMA (VM-MTE-KVM-FLAG)."""
        async def setup(k):
            vm, hva = await self._setup(k)
            st: dict = {"vm": vm, "hva": hva}

            async def guest(k, st):
                try:
                    st["load"] = (await vm.load(RAM, 1)).value
                except KernelError as exc:  # the slot went away under the fault (vcpu.py: "mixes RAM and MMIO")
                    st["load"] = exc.name

            async def vmm(k, st):
                await vm.slot(0, RAM, 0, hva)

            return st, {"guest": guest, "vmm": vmm}

        runs = await explore_bounded(setup, preemptions=2)
        assert len(runs) > 10
        for run in runs:
            assert run.failure is None, run.failure
            assert not mte_kvm(run.state["vm"], run.state["hva"])
            assert invariants(run.k) == []
        loads = [r.state["load"] for r in runs]
        assert b"\x01" in loads and any(isinstance(v, dict) and v.get("exit") == "mmio" for v in loads)
