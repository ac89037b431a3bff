"""Stage 2: user_mem_abort, sanitise_mte_tags, the MMU notifier and guest accesses (reference 4.3, 4.6, 4.7).

The rules checked: the first cacheable stage-2 fault of an MTE VM makes the
page PG_mte_tagged with zero tags, unless it already was tagged (the VMM wrote
tags, or swap restored them), in which case the tags are kept (GUEST-VISIBLE
=> TAGGED, PRESERVE ON MAP); a VM without MTE never sanitises; the shared zero
page is mapped read-only and never flagged; a VMA that lost VM_MTE_ALLOWED
after memslot creation makes the fault EFAULT; device memory is mapped
non-cacheable and never sanitised; every change of the VMM's PTEs (munmap,
swap-out, migration, MAP_FIXED, mprotect, fork's CoW, MADV_DONTNEED, KSM)
removes or write-protects the stage-2 entry (STAGE-2 COHERENT), and tagged
guest pages survive those changes (KSM never merges them);
hugetlb memslots are mapped 2 MiB at a time with the tag state on the folio;
guest tag checks follow TCF (sync/async/asymm/none) and only Normal-Tagged
stage-1 over Normal-cacheable stage-2 is checked; accesses outside memslots
exit as MMIO, and mixing RAM with MMIO is EFAULT.
"""

from __future__ import annotations

import pytest
from support import RWM, Vm, expect_errno, invariants

from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.arm64.tags import ZERO_TAGS
from hypervisor.kernel import Kernel
from hypervisor.kvm.mmu import kvm_uninit_mmu_notifier
from hypervisor.syscalls import host_ksm_merge, host_migrate_pages, host_swap_out
from shared.mte import HPAGE_SIZE, PAGES_PER_HPAGE

PAGE = 4096
RAM = 0x4000_0000
GFN = RAM >> 12


async def mte_vm(k: Kernel, size: int = 4 * PAGE, **ram) -> tuple[Vm, int]:
    """An MTE VM with one vCPU and ``size`` bytes of RAM at IPA 1 GiB; returns it and the VMM address."""
    vm = await Vm.create(k)
    return vm, await vm.ram(0, RAM, size, **ram)


class TestSanitise:
    """user_mem_abort -> sanitise_mte_tags on the first non-permission fault of a cacheable mapping."""

    async def test_first_guest_write_gives_zero_tags_and_the_flag(self):
        """A guest store to untouched anonymous RAM maps a PG_mte_tagged page with all-zero tags."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM + 8, b"guest")
        page = vm.page(RAM)
        assert page.flags & PG_mte_tagged and bytes(page.tags) == ZERO_TAGS
        assert k.page_flags(vm.vmm.pid, hva) == {"present": True, "tagged": True, "locked": True}
        assert await vm.ldg(RAM, PAGE) == [0] * 256
        assert vm.s2(RAM).cacheable and vm.s2(RAM).writable
        assert invariants(k) == []

    async def test_page_the_vmm_wrote_untagged_gets_zero_tags_and_keeps_its_data(self):
        """A page the VMM filled (untagged, stale tag memory) is zero-tagged on the guest's first fault; data is
        kept."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("store", addr=hva, data=b"firmware")
        page = vm.vmm.page(hva)
        assert not page.flags & PG_mte_tagged and bytes(page.tags) != ZERO_TAGS  # stale boot tags
        assert (await vm.load(RAM, 8)).value == b"firmware"
        assert vm.page(RAM) is page and page.flags & PG_mte_tagged and bytes(page.tags) == ZERO_TAGS
        assert invariants(k) == []

    async def test_memfd_read_fault_sanitises_the_page_cache_page(self):
        """A guest read of memfd RAM maps the real page-cache page (not the zero page) and sanitises it."""
        k = Kernel()
        vm, hva = await mte_vm(k, backing="memfd")
        await vm.load(RAM, 8)
        page = vm.page(RAM)
        assert page is not k.alloc.zero_page and page.mapping is not None
        assert page.flags & PG_mte_tagged and bytes(page.tags) == ZERO_TAGS

    async def test_each_page_is_sanitised_on_its_own_fault(self):
        """Only the faulting page is sanitised: a neighbour the VMM wrote stays untagged until the guest touches it."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("store", addr=hva + PAGE, data=b"n")
        await vm.store(RAM, b"x")
        assert not vm.vmm.page(hva + PAGE).flags & PG_mte_tagged
        assert vm.s2(RAM + PAGE) is None

    async def test_tags_the_vmm_wrote_through_prot_mte_are_kept(self):
        """The VMM STGs a memfd page through its own PROT_MTE mapping; the guest's fault keeps those tags."""
        k = Kernel()
        vm = await Vm.create(k)
        tagged_view = await vm.map(PAGE, backing="memfd", object="ram", prot=RWM)
        await vm.vmm("stg", addr=tagged_view, tag=9, size=PAGE)
        await vm.vmm("stg", addr=tagged_view + 16, tag=3, size=16)
        await vm.ram(0, RAM, PAGE, backing="memfd", object="ram")  # the guest's view: no PROT_MTE
        assert await vm.ldg(RAM, 48) == [9, 3, 9]
        assert (await vm.load(RAM, 16, tag=9, check="sync")).fault is None
        assert invariants(k) == []

    async def test_memslot_over_the_prot_mte_mapping_itself_keeps_tags(self):
        """Guest RAM that is the VMM's PROT_MTE mapping: the VMM's tags survive the guest's first fault."""
        k = Kernel()
        vm, hva = await mte_vm(k, prot=RWM)
        await vm.vmm("stg", addr=hva + PAGE, tag=12, size=32)
        assert await vm.ldg(RAM + PAGE, 48) == [12, 12, 0]
        assert invariants(k) == []

    async def test_guest_tags_survive_host_swap(self):
        """Guest tags survive the host swapping the VMM's page out and the guest faulting it back."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"swap me")
        await vm.stg(RAM, 64, 6)
        old = vm.page(RAM)
        assert await host_swap_out(k, vm.vmm.pid, hva, PAGE) == 1
        assert old.free and vm.s2(RAM) is None
        assert await vm.ldg(RAM, 80) == [6, 6, 6, 6, 0]
        assert (await vm.load(RAM, 7, tag=6, check="sync")).value == b"swap me"
        assert vm.page(RAM).flags & PG_mte_tagged
        assert invariants(k) == []

    async def test_guest_tags_survive_swap_of_shared_memory(self):
        """The same round trip through shmem swap for memfd-backed guest RAM."""
        k = Kernel()
        vm, hva = await mte_vm(k, backing="memfd")
        await vm.stg(RAM + PAGE, PAGE, 13)
        assert await host_swap_out(k, vm.vmm.pid, hva, 4 * PAGE) >= 1
        assert vm.s2(RAM + PAGE) is None
        assert await vm.ldg(RAM + PAGE, PAGE) == [13] * 256
        assert invariants(k) == []

    async def test_plain_vm_never_sanitises(self):
        """A VM without MTE maps pages untagged: no flag, tag memory untouched, LDG reads zero, no tag checks."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        await vm.ram(0, RAM, PAGE)
        await vm.store(RAM, b"x")
        page = vm.page(RAM)
        assert page.flags & (PG_mte_tagged | PG_mte_lock) == 0
        stale = bytes(page.tags)
        assert stale != ZERO_TAGS
        await vm.stg(RAM, 16, 5)
        assert bytes(page.tags) == stale  # STG is RAZ/WI without HCR_EL2.ATA
        assert await vm.ldg(RAM, 32) == [0, 0]
        assert (await vm.load(RAM, 1, tag=7, check="sync")).fault is None
        assert invariants(k) == []

    async def test_permission_fault_does_not_sanitise_again(self):
        """A write after a read-only mapping is a permission fault: the tags the guest stored are not cleared."""
        k = Kernel()
        vm, hva = await mte_vm(k, backing="memfd", flags=["log-dirty-pages"])
        await vm.stg(RAM, 16, 8)
        await vm("kvm-clear-dirty-log", slot=0)  # write-protect again
        assert not vm.s2(RAM).writable
        await vm.store(RAM + 32, b"w")
        assert vm.s2(RAM).writable and await vm.ldg(RAM, 16) == [8]
        assert vm.page(RAM).inits == 1


class TestZeroPage:
    """A read fault on untouched anonymous memory maps the shared zero page, which is never flagged."""

    async def test_read_fault_maps_the_zero_page_untagged(self):
        """The guest's first read of anonymous RAM maps ZERO_PAGE read-only and leaves it unflagged."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        r = await vm.load(RAM, 16, tag=0, check="sync")
        assert r.value == bytes(16) and r.fault is None
        e = vm.s2(RAM)
        assert e.page is k.alloc.zero_page and not e.writable and e.cacheable
        assert k.alloc.zero_page.flags == 0 and bytes(k.alloc.zero_page.tags) == ZERO_TAGS
        assert await vm.ldg(RAM, 32) == [0, 0]
        assert invariants(k) == []

    async def test_zero_page_mismatch_is_a_tag_check_fault(self):
        """The zero page's tags are zero, so a non-zero pointer tag faults there under sync checking."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        r = await vm.load(RAM, 8, tag=4, check="sync")
        assert r.fault == {"kind": "tag-check-fault", "offset": 0, "pointer_tag": 4, "memory_tag": 0}

    async def test_write_after_read_gets_a_sanitised_private_page(self):
        """A write after the zero-page read replaces it with a new zero-tagged, flagged page; the zero page stays
        clean."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await vm.load(RAM, 1)
        await vm.stg(RAM, 16, 2)
        page = vm.page(RAM)
        assert page is not k.alloc.zero_page and page.flags & PG_mte_tagged and vm.s2(RAM).writable
        assert await vm.ldg(RAM, 32) == [2, 0]
        assert k.alloc.zero_page.flags == 0 and bytes(k.alloc.zero_page.tags) == ZERO_TAGS
        assert invariants(k) == []

    async def test_bug_kvm_tags_zero_page_is_caught(self):
        """With bug ``kvm-tags-zero-page`` the read fault flags ZERO_PAGE, and ZERO-PAGE-NEVER-FLAGGED fires."""
        k = Kernel(bugs=["kvm-tags-zero-page"])
        vm, _ = await mte_vm(k)
        await vm.load(RAM, 8)
        assert vm.s2(RAM).page is k.alloc.zero_page
        assert k.alloc.zero_page.flags & PG_mte_tagged
        assert "ZERO-PAGE-NEVER-FLAGGED" in [v.invariant for v in k.oracle.check_state()]


class TestVmmChangesGuestRam:
    """MMU notifiers and the fault-time VM_MTE_ALLOWED re-check (invariant 7)."""

    async def test_map_fixed_file_over_guest_ram_makes_the_fault_efault(self):
        """After the VMM maps a file over guest RAM, the guest's access there fails with EFAULT (KVM_RUN)."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM + 2 * PAGE, b"before")
        await vm.map(PAGE, backing="file", addr=hva + 2 * PAGE)
        assert vm.s2(RAM + 2 * PAGE) is None  # the notifier dropped the old entry
        await expect_errno("EFAULT", vm.load(RAM + 2 * PAGE, 8))
        await expect_errno("EFAULT", vm.store(RAM + 2 * PAGE, b"x"))
        assert vm.s2(RAM + 2 * PAGE) is None
        await vm.store(RAM, b"other pages still work")
        assert invariants(k) == []

    async def test_file_slot_registered_before_the_cap_faults_efault(self):
        """A file memslot made while the VM had no MTE is caught at fault time once MTE is on (before any vCPU)."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, vcpu=False)
        await vm.ram(0, RAM, PAGE, backing="file")
        await vm.ram(1, RAM + PAGE, PAGE)
        await vm("kvm-enable-cap", cap="arm-mte")
        await vm.add_vcpu()
        await expect_errno("EFAULT", vm.load(RAM, 8))
        assert vm.s2(RAM) is None
        await vm.store(RAM + PAGE, b"anon is fine")
        assert invariants(k) == []

    async def test_map_fixed_file_is_fine_for_a_plain_vm(self):
        """Without MTE the same file page is simply mapped and the guest reads the file's data."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        hva = await vm.ram(0, RAM, 2 * PAGE)
        await vm.map(PAGE, backing="file", addr=hva + PAGE, object="f")
        await vm.vmm("store", addr=hva + PAGE, data=b"file data")
        assert (await vm.load(RAM + PAGE, 9)).value == b"file data"
        assert vm.page(RAM + PAGE).mapping is not None
        assert invariants(k) == []

    async def test_map_fixed_device_is_mapped_non_cacheable_without_sanitising(self):
        """A device region mapped over an MTE VM's RAM is mapped non-cacheable: no sanitise, no tags, no checks."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.map(PAGE, backing="device", addr=hva + PAGE)
        r = await vm.load(RAM + PAGE, 8, tag=3, check="sync")
        assert r.fault is None
        e = vm.s2(RAM + PAGE)
        assert e.page.zone == "pfnmap" and e.memtype == "device" and e.page.flags == 0
        await vm.stg(RAM + PAGE, 16, 7)
        assert await vm.ldg(RAM + PAGE, 16) == [0] and bytes(e.page.tags[:1]) == b"\0"
        assert invariants(k) == []

    async def test_munmap_unmaps_stage2(self):
        """munmap of guest RAM removes its stage-2 entries; the guest then faults EFAULT; the oracle is clean."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"a")
        await vm.store(RAM + PAGE, b"b")
        await vm.vmm("munmap", addr=hva, size=PAGE)
        assert vm.s2(RAM) is None and vm.s2(RAM + PAGE) is not None
        assert invariants(k) == []
        await expect_errno("EFAULT", vm.load(RAM, 1))

    async def test_swap_out_unmaps_stage2(self):
        """Reclaiming the VMM's page removes the stage-2 entry that mapped it."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"a")
        await host_swap_out(k, vm.vmm.pid, hva, PAGE)
        assert vm.s2(RAM) is None
        assert invariants(k) == []

    async def test_migrate_unmaps_stage2_and_the_guest_finds_its_tags_in_the_new_frame(self):
        """Migration of the VMM's page drops the stage-2 entry; the next guest fault maps the new frame, same tags."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"mig")
        await vm.stg(RAM, 32, 10)
        old = vm.page(RAM)
        assert await host_migrate_pages(k, vm.vmm.pid, hva, PAGE) == 1
        assert vm.s2(RAM) is None
        assert invariants(k) == []
        assert await vm.ldg(RAM, 48) == [10, 10, 0]
        assert vm.page(RAM) is not old and vm.page(RAM).flags & PG_mte_tagged
        assert (await vm.load(RAM, 3)).value == b"mig"
        assert invariants(k) == []

    async def test_madvise_dontneed_unmaps_stage2(self):
        """MADV_DONTNEED on guest RAM drops the stage-2 entry; the guest then sees a fresh zero page."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"gone")
        await vm.stg(RAM, 16, 3)
        await vm.vmm("madvise", addr=hva, size=PAGE, advice="dontneed")
        assert vm.s2(RAM) is None
        assert (await vm.load(RAM, 4)).value == bytes(4) and await vm.ldg(RAM, 16) == [0]

    async def test_vmm_mprotect_drops_stage2_and_keeps_the_guests_tags(self):
        """mprotect(PROT_READ) unmaps stage 2 (guest writes then EFAULT); mprotect(PROT_MTE) later keeps the tags."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.stg(RAM, 32, 7)
        await vm.vmm("mprotect", addr=hva, size=4 * PAGE, prot=["read"])
        assert vm.s2(RAM) is None
        assert await vm.ldg(RAM, 48) == [7, 7, 0] and not vm.s2(RAM).writable
        await expect_errno("EFAULT", vm.store(RAM, b"x"))
        await vm.vmm("mprotect", addr=hva, size=4 * PAGE, prot=RWM)  # mte_sync_tags sees PG_mte_tagged
        assert await vm.vmm.tags(hva, 48) == [7, 7, 0]
        assert (await vm.store(RAM, b"x", tag=7, check="sync")).fault is None
        assert invariants(k) == []

    async def test_read_only_vmm_mapping_makes_guest_writes_efault(self):
        """Over a PROT_READ mapping the guest can read, but its write fault finds no writable page: EFAULT."""
        k = Kernel()
        vm, hva = await mte_vm(k, prot=["read"])
        assert (await vm.load(RAM, 4)).value == bytes(4)
        await expect_errno("EFAULT", vm.store(RAM + PAGE, b"x"))
        await expect_errno("EFAULT", vm.stg(RAM + PAGE, 16, 1))
        assert vm.s2(RAM + PAGE) is None

    async def test_vmm_fork_copy_on_write_keeps_the_guests_tags(self):
        """fork() write-protects the VMM's private RAM (stage 2 unmapped); the guest's next write gets a CoW copy
        carrying its tags, and the child keeps the old frame."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"before fork")
        await vm.stg(RAM, 32, 7)
        old = vm.page(RAM)
        child = await vm.vmm.fork("child")
        assert vm.s2(RAM) is None
        assert (await vm.store(RAM + 16, b"after", tag=7, check="sync")).fault is None
        new = vm.page(RAM)
        assert new is not old and child.page(hva) is old
        assert new.flags & PG_mte_tagged and bytes(new.tags) == bytes(old.tags)
        assert await vm.ldg(RAM, 48) == [7, 7, 0]
        assert (await child("load", addr=hva, size=11)).value == b"before fork"
        assert invariants(k) == []

    async def test_ksm_never_merges_mte_guest_pages(self):
        """Two identical guest pages of an MTE VM are PG_mte_tagged, so KSM merges neither and stage 2 is intact."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"same")
        await vm.store(RAM + PAGE, b"same")
        await vm.vmm("madvise", addr=hva, size=4 * PAGE, advice="mergeable")
        assert await host_ksm_merge(k, vm.vmm.pid, hva, 4 * PAGE) == 0
        assert vm.page(RAM) is not vm.page(RAM + PAGE) and vm.s2(RAM).writable
        assert invariants(k) == []

    async def test_ksm_merge_of_a_plain_vms_page_unmaps_stage2(self):
        """KSM replacing a guest page of a plain VM (replace_page) invalidates stage 2: no entry keeps the freed
        frame."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        hva = await vm.ram(0, RAM, 2 * PAGE)
        await vm.store(RAM, b"same")
        await vm.store(RAM + PAGE, b"same")
        replaced = vm.page(RAM + PAGE)
        await vm.vmm("madvise", addr=hva, size=2 * PAGE, advice="mergeable")
        assert await host_ksm_merge(k, vm.vmm.pid, hva, 2 * PAGE) == 1
        assert replaced.free
        e = vm.s2(RAM + PAGE)
        assert e is None or e.page is vm.vmm.page(hva + PAGE), "stage 2 still maps the frame KSM freed"
        assert (await vm.load(RAM + PAGE, 4)).value == b"same"
        assert "STAGE-2-COHERENT" not in invariants(k)

    async def test_ksm_write_protect_reaches_stage2(self):
        """When KSM write-protects a guest page to share it (write_protect_page), stage 2 loses write access too,
        so the guest's next store breaks CoW instead of changing the page another mapping now shares."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        hva = await vm.ram(0, RAM, PAGE)
        other = await vm.map(PAGE)  # VMM memory outside guest RAM
        await vm.store(RAM, b"same")
        await vm.vmm("store", addr=other, data=b"same")
        await vm.vmm("madvise", addr=hva, size=PAGE, advice="mergeable")
        await vm.vmm("madvise", addr=other, size=PAGE, advice="mergeable")
        assert await host_ksm_merge(k, vm.vmm.pid, hva, PAGE) == 0  # the guest page becomes the stable page
        assert await host_ksm_merge(k, vm.vmm.pid, other, PAGE) == 1  # the VMM's page is merged into it
        e = vm.s2(RAM)
        assert e is None or not e.writable, "stage 2 still maps the KSM page writable"
        await vm.store(RAM, b"evil")
        assert (await vm.vmm("load", addr=other, size=4)).value == b"same"
        assert (await vm.load(RAM, 4)).value == b"evil"

    async def test_without_the_notifier_the_oracle_sees_a_stale_stage2(self):
        """STAGE-2-COHERENT catches a stage 2 that outlives the VMM's PTE (if the notifier were missing)."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.store(RAM, b"a")
        kvm_uninit_mmu_notifier(k, vm.kvm)
        await vm.vmm("munmap", addr=hva, size=PAGE)
        assert vm.s2(RAM) is not None
        assert "STAGE-2-COHERENT" in invariants(k)

    async def test_oracle_catches_an_untagged_guest_visible_page(self):
        """GUEST-VISIBLE-IMPLIES-TAGGED catches a Normal-cacheable stage-2 page of an MTE VM without PG_mte_tagged."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await vm.store(RAM, b"a")
        vm.page(RAM).flags &= ~PG_mte_tagged  # what a skipped sanitise_mte_tags would leave
        assert "GUEST-VISIBLE-IMPLIES-TAGGED" in invariants(k)


class TestHugetlb:
    """Hugetlb memslots: 2 MiB stage-2 blocks, tag state on the folio head."""

    async def test_one_fault_maps_512_gfns_and_tags_the_folio(self):
        """A guest fault in hugetlb RAM maps the whole 2 MiB block and clears all 512 pages' tags under the head
        flag."""
        k = Kernel()
        vm, hva = await mte_vm(k, HPAGE_SIZE, backing="hugetlb")
        await vm.store(RAM + 5 * PAGE + 8, b"huge")
        gfns = sorted(g for g in vm.kvm.s2 if GFN <= g < GFN + PAGES_PER_HPAGE)
        assert gfns == list(range(GFN, GFN + PAGES_PER_HPAGE))
        head = vm.page(RAM)
        assert head.is_hugetlb and head.folio is head
        assert [vm.page(RAM + i * PAGE) for i in range(PAGES_PER_HPAGE)] == head.subpages
        assert head.flags & PG_mte_tagged
        assert all(p.flags == 0 for p in head.subpages[1:])
        assert all(bytes(p.tags) == ZERO_TAGS for p in head.subpages)
        assert await vm.ldg(RAM + 511 * PAGE, 32) == [0, 0]
        assert invariants(k) == []

    async def test_hugetlb_tags_are_per_page(self):
        """STG in one 4 KiB page of the block changes only that page's tags."""
        k = Kernel()
        vm, _ = await mte_vm(k, HPAGE_SIZE, backing="hugetlb")
        await vm.stg(RAM + 7 * PAGE, 32, 14)
        assert await vm.ldg(RAM + 7 * PAGE, 48) == [14, 14, 0]
        assert await vm.ldg(RAM + 6 * PAGE, 16) == [0]
        assert invariants(k) == []

    async def test_tags_written_through_a_prot_mte_hugetlb_mapping_are_kept(self):
        """The VMM tags a hugetlb folio through PROT_MTE first; the guest's 2 MiB fault keeps every tag."""
        k = Kernel()
        vm = await Vm.create(k)
        view = await vm.map(HPAGE_SIZE, backing="hugetlb", object="huge", prot=RWM)
        await vm.vmm("stg", addr=view + 300 * PAGE, tag=5, size=16)
        await vm.ram(0, RAM, HPAGE_SIZE, backing="hugetlb", object="huge")
        assert await vm.ldg(RAM + 300 * PAGE, 32) == [5, 0]
        assert invariants(k) == []


class TestTagChecks:
    """The guest's tag check: pointer tag vs allocation tag, per SCTLR_EL1.TCF, Normal-Tagged only."""

    async def setup(self) -> Vm:
        k = Kernel()
        vm, _ = await mte_vm(k)
        await vm.store(RAM, b"\xaa" * 64)
        await vm.stg(RAM, 16, 5)
        await vm.stg(RAM + 16, 16, 6)
        return vm

    async def test_matching_tag_is_not_a_fault(self):
        """A load and a store through the matching pointer tag succeed under sync checking."""
        vm = await self.setup()
        r = await vm.load(RAM, 16, tag=5, check="sync")
        assert r.value == b"\xaa" * 16 and r.fault is None
        assert (await vm.store(RAM, b"ok", tag=5, check="sync")).fault is None

    async def test_sync_mismatch_suppresses_the_access(self):
        """sync: a mismatching store is not performed and reports the offset, pointer tag and memory tag."""
        vm = await self.setup()
        r = await vm.store(RAM + 8, b"\x11" * 16, tag=5, check="sync")
        assert r.fault == {"kind": "tag-check-fault", "offset": 8, "pointer_tag": 5, "memory_tag": 6}
        assert (await vm.load(RAM, 32)).value == b"\xaa" * 32
        r = await vm.load(RAM, 4, tag=1, check="sync")
        assert r.value is None and r.fault["kind"] == "tag-check-fault" and r.fault["memory_tag"] == 5

    async def test_async_mismatch_performs_the_access(self):
        """async: the mismatching store is performed and an async tag check fault is reported beside it."""
        vm = await self.setup()
        r = await vm.store(RAM, b"\x22" * 4, tag=9, check="async")
        assert r.fault["kind"] == "async-tag-check-fault" and r.fault["memory_tag"] == 5
        assert (await vm.load(RAM, 4)).value == b"\x22" * 4
        r = await vm.load(RAM, 4, tag=9, check="async")
        assert r.value == b"\x22" * 4 and r.fault["kind"] == "async-tag-check-fault"

    async def test_asymm_reads_are_sync_writes_are_async(self):
        """asymm: a mismatching load is suppressed (sync), a mismatching store is performed (async)."""
        vm = await self.setup()
        r = await vm.load(RAM, 4, tag=9, check="asymm")
        assert r.value is None and r.fault["kind"] == "tag-check-fault"
        r = await vm.store(RAM, b"\x33", tag=9, check="asymm")
        assert r.fault["kind"] == "async-tag-check-fault"
        assert (await vm.load(RAM, 1)).value == b"\x33"

    async def test_none_checks_nothing(self):
        """TCF none (or TCO): a mismatching access is performed with no fault."""
        vm = await self.setup()
        r = await vm.store(RAM, b"\x44", tag=9, check="none")
        assert r.fault is None and (await vm.load(RAM, 1, tag=9)).value == b"\x44"

    async def test_offset_is_the_first_byte_of_the_first_bad_granule(self):
        """An access spanning granules 5,6 with pointer tag 5 faults at the first byte of granule 1."""
        vm = await self.setup()
        r = await vm.load(RAM + 4, 24, tag=5, check="sync")
        assert r.fault["offset"] == 12 and r.fault["memory_tag"] == 6

    async def test_access_across_two_pages_checks_both(self):
        """A load crossing into the next page is checked there too; the offset counts from the access start."""
        vm = await self.setup()
        await vm.stg(RAM + PAGE - 16, 16, 6)
        await vm.stg(RAM + PAGE, 16, 6)  # first fault of page 1: zero tags, then 6
        await vm.stg(RAM + PAGE + 16, 16, 2)
        r = await vm.load(RAM + PAGE - 16, 48, tag=6, check="sync")
        assert r.fault == {"kind": "tag-check-fault", "offset": 32, "pointer_tag": 6, "memory_tag": 2}

    @pytest.mark.parametrize("attr", ["normal", "device"])
    async def test_untagged_stage1_is_not_checked(self, attr):
        """Through Normal (untagged) or Device stage-1 attributes nothing is checked, even under sync."""
        vm = await self.setup()
        r = await vm.load(RAM, 16, tag=9, check="sync", attr=attr)
        assert r.value == b"\xaa" * 16 and r.fault is None
        assert (await vm.store(RAM, b"\x55", tag=9, check="sync", attr=attr)).fault is None
        assert (await vm.load(RAM, 1)).value == b"\x55"

    @pytest.mark.parametrize("attr", ["normal", "device"])
    async def test_stg_and_ldg_through_untagged_stage1_are_raz_wi(self, attr):
        """STG through a Normal or Device stage-1 mapping is ignored and LDG there reads zeros."""
        vm = await self.setup()
        await vm.stg(RAM, 16, 12, attr=attr)
        assert await vm.ldg(RAM, 16, attr=attr) == [0]
        assert await vm.ldg(RAM, 16) == [5]

    async def test_without_sctlr_ata_stg_and_ldg_are_raz_wi(self):
        """With SCTLR_EL1.ATA clear, STG is ignored and LDG reads zeros even through Normal-Tagged memory."""
        vm = await self.setup()
        await vm.stg(RAM, 16, 12, ata=False)
        assert await vm.ldg(RAM, 16, ata=False) == [0]
        assert await vm.ldg(RAM, 16) == [5]


class TestMmioAndErrors:
    """IPA outside every memslot, read-only slots, and accesses that straddle the two."""

    async def test_load_outside_memslots_exits_as_mmio(self):
        """A load at an IPA no memslot covers exits to the VMM as KVM_EXIT_MMIO and maps nothing."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        r = await vm.load(0x0900_0000, 4, attr="device")
        assert r.value == {"exit": "mmio", "ipa": 0x0900_0000, "size": 4, "write": False, "data": b""}
        assert vm.kvm.s2 == {}

    async def test_store_outside_memslots_exits_with_its_data(self):
        """A store outside memslots exits as MMIO carrying the bytes written."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        r = await vm.store(0x0900_0010, b"\x01\x02", attr="device")
        assert r.value == {"exit": "mmio", "ipa": 0x0900_0010, "size": 2, "write": True, "data": b"\x01\x02"}

    async def test_access_without_a_valid_syndrome_outside_memslots_is_enosys(self):
        """Outside every memslot, LDG/STG and loads/stores that are not one 1/2/4/8-byte access have no valid
        syndrome: KVM_RUN fails with ENOSYS (no KVM_CAP_ARM_NISV_TO_USER) and nothing is mapped."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await expect_errno("ENOSYS", vm.stg(0x0900_0000, 16, 3))
        await expect_errno("ENOSYS", vm.ldg(0x0900_0000, 16))
        await expect_errno("ENOSYS", vm.load(0x0900_0000, 16, attr="device"))
        await expect_errno("ENOSYS", vm.store(0x0900_0000, b"abc", attr="device"))
        assert (await vm.load(0x0900_0000, 8, attr="device")).value["exit"] == "mmio"
        assert vm.kvm.s2 == {}

    async def test_write_to_readonly_slot_exits_as_mmio_and_reads_work(self):
        """A read-only slot is readable RAM (mapped read-only); a write there exits as MMIO and changes nothing."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE, backing="memfd", flags=["readonly"])
        await vm.vmm("store", addr=hva, data=b"rom")
        assert (await vm.load(RAM, 3)).value == b"rom"
        assert not vm.s2(RAM).writable and vm.page(RAM).flags & PG_mte_tagged
        r = await vm.store(RAM, b"XYZW")
        assert r.value["exit"] == "mmio" and r.value["write"] and r.value["data"] == b"XYZW"
        assert (await vm.load(RAM, 3)).value == b"rom"

    async def test_access_mixing_ram_and_mmio_is_efault(self):
        """One access crossing from the last RAM page into an IPA without a slot fails with EFAULT."""
        k = Kernel()
        vm, _ = await mte_vm(k, PAGE)
        await expect_errno("EFAULT", vm.load(RAM + PAGE - 8, 16))
        await expect_errno("EFAULT", vm.store(RAM + PAGE - 8, b"x" * 16))

    async def test_write_mixing_rw_and_readonly_slots_is_efault(self):
        """A store crossing from a writable slot into a read-only one mixes RAM and MMIO: EFAULT, nothing written."""
        k = Kernel()
        vm, _ = await mte_vm(k, PAGE)
        await vm.ram(1, RAM + PAGE, PAGE, flags=["readonly"])
        await expect_errno("EFAULT", vm.store(RAM + PAGE - 4, b"12345678"))
        assert (await vm.load(RAM + PAGE - 4, 4)).value == bytes(4)

    async def test_no_vma_behind_the_slot_is_efault(self):
        """A memslot whose VMM range was unmapped before any fault makes the guest access EFAULT."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("munmap", addr=hva, size=4 * PAGE)
        await expect_errno("EFAULT", vm.load(RAM, 1))
        assert vm.kvm.s2 == {}
