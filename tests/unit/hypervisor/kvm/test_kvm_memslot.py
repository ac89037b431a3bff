"""KVM_SET_USER_MEMORY_REGION: kvm_arch_prepare_memory_region and the generic checks (reference 4.2, section 7).

The rules checked: for an MTE VM every VMA intersecting the slot must have
VM_MTE_ALLOWED (anonymous, MAP_SHARED anonymous, memfd, shmem and hugetlb do;
regular files and device PFNMAP regions do not: EINVAL), holes are skipped,
the VMM's own mapping needs no PROT_MTE; a slot beyond the IPA size is EFAULT;
a PFNMAP VMA with dirty logging is EINVAL for every VM; the checks run again
when only the flags change (KVM_MR_FLAGS_ONLY); plus the generic alignment,
overlap (EEXIST), delete and move rules.
"""

from __future__ import annotations

import pytest
from support import RW, Vm, expect_errno, invariants

from hypervisor.kernel import Kernel
from hypervisor.mm_types import VM_MTE, VM_MTE_ALLOWED
from shared.mte import HPAGE_SIZE

PAGE = 4096
RAM = 0x4000_0000
TAG_CAPABLE = ["anon", "anon-shared", "memfd", "shmem", "hugetlb"]
NOT_TAG_CAPABLE = ["file", "device"]


def size_for(backing: str) -> int:
    return HPAGE_SIZE if backing == "hugetlb" else 4 * PAGE


class TestMteVmBackings:
    """An MTE VM accepts exactly the tag-capable (VM_MTE_ALLOWED) backings."""

    @pytest.mark.parametrize("backing", TAG_CAPABLE)
    async def test_tag_capable_backing_is_accepted(self, backing):
        """A memslot over anon, anon-shared, memfd, shmem or hugetlb memory is registered for an MTE VM."""
        k = Kernel()
        vm = await Vm.create(k)
        size = size_for(backing)
        hva = await vm.ram(0, RAM, size, backing=backing)
        slot = vm.kvm.memslots[0]
        assert (slot.base_gfn, slot.npages, slot.userspace_addr) == (RAM >> 12, size >> 12, hva)
        assert vm.vmm.vma(hva).flags & VM_MTE_ALLOWED

    @pytest.mark.parametrize("backing", TAG_CAPABLE)
    async def test_guest_reaches_tags_through_each_tag_capable_backing(self, backing):
        """In each accepted backing the guest's STG sticks and LDG reads it back."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, size_for(backing), backing=backing)
        await vm.stg(RAM + 32, 16, 11)
        assert await vm.ldg(RAM, 64) == [0, 0, 11, 0]
        assert invariants(k) == []

    @pytest.mark.parametrize("backing", NOT_TAG_CAPABLE)
    async def test_untaggable_backing_is_einval(self, backing):
        """A memslot over a regular file or a device (PFNMAP) region is EINVAL for an MTE VM, and no slot exists."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.map(4 * PAGE, backing=backing)
        assert not vm.vmm.vma(hva).flags & VM_MTE_ALLOWED
        await expect_errno("EINVAL", vm.slot(0, RAM, 4 * PAGE, hva))
        assert vm.kvm.memslots == {}

    @pytest.mark.parametrize("share", ["private", "shared"])
    async def test_file_is_refused_private_or_shared(self, share):
        """A MAP_PRIVATE file mapping is no more tag-capable than a MAP_SHARED one: EINVAL both ways."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.map(PAGE, backing="file", share=share)
        await expect_errno("EINVAL", vm.slot(0, RAM, PAGE, hva))

    async def test_vmm_mapping_needs_no_prot_mte(self):
        """Only VMA flags are checked: guest RAM mapped without PROT_MTE (no VM_MTE) is accepted and tag-capable."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE, prot=RW)
        assert not vm.vmm.vma(hva).flags & VM_MTE
        await vm.stg(RAM, PAGE, 4)
        assert await vm.ldg(RAM, 32) == [4, 4]

    async def test_holes_are_skipped(self):
        """A slot over [anon][hole][anon] is accepted; the pages around the hole work, the hole faults EFAULT."""
        k = Kernel()
        vm = await Vm.create(k)
        base = await vm.map(3 * PAGE)
        await vm.vmm("munmap", addr=base + PAGE, size=PAGE)
        await vm.slot(0, RAM, 3 * PAGE, base)
        await vm.stg(RAM, 16, 1)
        await vm.stg(RAM + 2 * PAGE, 16, 2)
        assert await vm.ldg(RAM, 16) == [1] and await vm.ldg(RAM + 2 * PAGE, 16) == [2]
        await expect_errno("EFAULT", vm.load(RAM + PAGE, 8))

    async def test_slot_over_nothing_is_accepted(self):
        """A slot over an address range with no VMA at all has nothing to refuse (the guest faults EFAULT later)."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.slot(0, RAM, 4 * PAGE, 0x1000_0000)
        assert 0 in vm.kvm.memslots
        await expect_errno("EFAULT", vm.store(RAM, b"x"))

    @pytest.mark.parametrize("bad", NOT_TAG_CAPABLE)
    async def test_one_bad_vma_among_good_ones_is_einval(self, bad):
        """A slot over [anon][file or device][anon] is refused as a whole, even though most VMAs are fine."""
        k = Kernel()
        vm = await Vm.create(k)
        base = await vm.map(3 * PAGE)
        await vm.map(PAGE, backing=bad, addr=base + PAGE)
        await expect_errno("EINVAL", vm.slot(0, RAM, 3 * PAGE, base))
        assert vm.kvm.memslots == {}

    async def test_bad_vma_at_the_last_page_is_einval(self):
        """The check covers the slot's whole range: a file mapping at its last page is found."""
        k = Kernel()
        vm = await Vm.create(k)
        base = await vm.map(4 * PAGE, backing="memfd")
        await vm.map(PAGE, backing="file", addr=base + 3 * PAGE)
        await expect_errno("EINVAL", vm.slot(0, RAM, 4 * PAGE, base))
        await vm.slot(0, RAM, 3 * PAGE, base)  # the same range without it is fine

    async def test_bad_vma_next_to_the_slot_does_not_matter(self):
        """Only intersecting VMAs count: a file mapping right after the slot's end is not checked."""
        k = Kernel()
        vm = await Vm.create(k)
        base = await vm.map(2 * PAGE)
        await vm.map(PAGE, backing="file", addr=base + 2 * PAGE)
        await vm.slot(0, RAM, 2 * PAGE, base)
        assert 0 in vm.kvm.memslots


class TestPlainVmBackings:
    """A VM without MTE accepts every backing."""

    @pytest.mark.parametrize("backing", TAG_CAPABLE + NOT_TAG_CAPABLE)
    async def test_every_backing_is_accepted(self, backing):
        """A non-MTE VM registers memslots over any backing, including files and devices."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        await vm.ram(0, RAM, size_for(backing), backing=backing)
        assert 0 in vm.kvm.memslots

    async def test_host_without_mte_accepts_files_even_if_the_vm_tried_mte(self):
        """On a host without MTE (enable-cap refused) a file-backed memslot is accepted."""
        k = Kernel(mte=False)
        vm = await Vm.create(k, mte=False)
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-mte"))
        await vm.ram(0, RAM, PAGE, backing="file")
        assert 0 in vm.kvm.memslots


class TestPfnmapAndDirtyLog:
    """VM_PFNMAP with KVM_MEM_LOG_DIRTY_PAGES is EINVAL for every VM."""

    async def test_device_with_dirty_logging_is_einval_on_a_plain_vm(self):
        """Even without MTE, a device slot asking for dirty logging is EINVAL."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        hva = await vm.map(2 * PAGE, backing="device")
        await expect_errno("EINVAL", vm.slot(0, RAM, 2 * PAGE, hva, flags=["log-dirty-pages"]))
        assert vm.kvm.memslots == {} and vm.kvm.nr_memslots_dirty_logging == 0

    async def test_device_slot_cannot_start_logging_later(self):
        """KVM_MR_FLAGS_ONLY re-runs the check: turning dirty logging on for a device slot is EINVAL."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        hva = await vm.ram(0, RAM, 2 * PAGE, backing="device")
        await expect_errno("EINVAL", vm.slot(0, RAM, 2 * PAGE, hva, flags=["log-dirty-pages"]))
        assert vm.kvm.memslots[0].flags == 0 and vm.kvm.nr_memslots_dirty_logging == 0
        await expect_errno("ENOENT", vm("kvm-get-dirty-log", slot=0))

    async def test_readonly_device_slot_is_fine(self):
        """A read-only flag is no reason to refuse a device slot of a plain VM."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        await vm.ram(0, RAM, PAGE, backing="device", flags=["readonly"])
        assert vm.kvm.memslots[0].readonly

    async def test_anon_with_dirty_logging_is_fine(self):
        """Dirty logging over ordinary RAM is accepted for an MTE VM."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, PAGE, flags=["log-dirty-pages"])
        assert vm.kvm.nr_memslots_dirty_logging == 1


class TestIpaSize:
    """base_gfn + npages beyond kvm_phys_size is EFAULT."""

    @pytest.mark.parametrize("bits", [32, 36, 40])
    async def test_slot_ending_at_the_ipa_limit_is_accepted_one_page_more_is_efault(self, bits):
        """A slot ending exactly at 2^ipa_bits is fine; one page further is EFAULT."""
        k = Kernel()
        vm = await Vm.create(k, ipa_bits=bits)
        top = 1 << bits
        hva = await vm.map(2 * PAGE)
        await expect_errno("EFAULT", vm.slot(0, top - PAGE, 2 * PAGE, hva))
        await expect_errno("EFAULT", vm.slot(0, top, PAGE, hva))
        assert vm.kvm.memslots == {}
        await vm.slot(0, top - 2 * PAGE, 2 * PAGE, hva)
        assert 0 in vm.kvm.memslots

    async def test_ipa_check_comes_before_the_vma_check(self):
        """A file-backed slot of an MTE VM beyond the IPA size is EFAULT (the IPA check runs first)."""
        k = Kernel()
        vm = await Vm.create(k, ipa_bits=32)
        hva = await vm.map(PAGE, backing="file")
        await expect_errno("EFAULT", vm.slot(0, 1 << 32, PAGE, hva))

    async def test_larger_ipa_space_takes_the_same_slot(self):
        """The same slot refused with 32 IPA bits is accepted with 33."""
        k = Kernel()
        small = await Vm.create(k, ipa_bits=32, name="small")
        big = await Vm.create(k, ipa_bits=33, name="big")
        await expect_errno("EFAULT", small.ram(0, 1 << 32, PAGE))
        await big.ram(0, 1 << 32, PAGE)
        await big.store(1 << 32, b"hi")
        assert (await big.load(1 << 32, 2)).value == b"hi"


class TestGenericChecks:
    """__kvm_set_memory_region: alignment, slot ids, overlap, delete, move, what may change."""

    @pytest.mark.parametrize("field", ["size", "ipa", "addr"])
    async def test_unaligned_is_einval(self, field):
        """An unaligned size, guest address or userspace address is EINVAL."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.map(2 * PAGE)
        args = {"slot": 0, "ipa": RAM, "size": PAGE, "addr": hva}
        args[field] += 0x10 if field != "size" else 0x800
        await expect_errno("EINVAL", vm("kvm-set-memory-region", **args))
        assert vm.kvm.memslots == {}

    async def test_slot_id_beyond_32766_is_einval(self):
        """Slot ids are below KVM_USER_MEM_SLOTS (32767 since v5.13); 512 and 32766 are fine."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.map(2 * PAGE)
        await expect_errno("EINVAL", vm.slot(32767, RAM, PAGE, hva))
        await vm.slot(512, RAM, PAGE, hva)
        await vm.slot(32766, RAM + PAGE, PAGE, hva + PAGE)
        assert sorted(vm.kvm.memslots) == [512, 32766]

    @pytest.mark.parametrize("ipa", [RAM, RAM + PAGE, RAM - PAGE])
    async def test_overlap_is_eexist(self, ipa):
        """A new slot whose guest range overlaps an existing slot's is EEXIST."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, 2 * PAGE)
        hva = await vm.map(2 * PAGE)
        await expect_errno("EEXIST", vm.slot(1, ipa, 2 * PAGE, hva))
        assert list(vm.kvm.memslots) == [0]

    async def test_adjacent_slots_do_not_overlap(self):
        """A slot starting where another ends is fine."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, 2 * PAGE)
        await vm.ram(1, RAM + 2 * PAGE, PAGE)
        assert sorted(vm.kvm.memslots) == [0, 1]

    async def test_delete_unmaps_stage2_and_the_ipa_becomes_mmio(self):
        """Size 0 deletes the slot: its stage-2 entries go, and a guest access there exits to the VMM as MMIO."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 2 * PAGE)
        await vm.store(RAM, b"data")
        assert vm.s2(RAM) is not None
        await vm.slot(0, RAM, 0, hva)
        assert vm.kvm.memslots == {} and vm.s2(RAM) is None
        r = await vm.load(RAM, 4)
        assert r.value["exit"] == "mmio" and r.value["ipa"] == RAM
        assert (await vm.vmm("load", addr=hva, size=4)).value == b"data"  # the VMM's memory is untouched
        assert invariants(k) == []

    async def test_delete_of_a_missing_slot_is_einval(self):
        """Deleting a slot id that has no slot is EINVAL."""
        k = Kernel()
        vm = await Vm.create(k)
        await expect_errno("EINVAL", vm.slot(3, RAM, 0, 0))

    async def test_delete_of_a_logging_slot_drops_the_logging_count(self):
        """Deleting a slot that logged dirty pages takes it out of nr_memslots_dirty_logging (TO_GUEST works again)."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, PAGE)
        hva = await vm.ram(1, RAM + PAGE, PAGE, flags=["log-dirty-pages"])
        await expect_errno("EBUSY", vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes(256)))
        await vm.slot(1, RAM + PAGE, 0, hva)
        assert vm.kvm.nr_memslots_dirty_logging == 0
        assert (await vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes(256)))["length"] == PAGE

    @pytest.mark.parametrize("change", ["size", "addr", "readonly"])
    async def test_changing_size_address_or_readonly_is_einval(self, change):
        """An existing slot's size, userspace address or read-only flag cannot change (delete it first)."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 2 * PAGE)
        other = await vm.map(2 * PAGE)
        args = {"slot": 0, "ipa": RAM, "size": 2 * PAGE, "addr": hva, "flags": []}
        if change == "size":
            args["size"] = PAGE
        elif change == "addr":
            args["addr"] = other
        else:
            args["flags"] = ["readonly"]
        await expect_errno("EINVAL", vm("kvm-set-memory-region", **args))
        s = vm.kvm.memslots[0]
        assert (s.npages, s.userspace_addr, s.flags) == (2, hva, 0)

    async def test_move_unmaps_the_old_ipa_and_keeps_the_memory(self):
        """KVM_MR_MOVE: the old IPA is unmapped at stage 2; at the new IPA the guest finds its data and tags."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE)
        await vm.store(RAM, b"moved")
        await vm.stg(RAM, 16, 6)
        new = RAM + 0x10_0000
        await vm.slot(0, new, PAGE, hva)
        assert vm.s2(RAM) is None and vm.kvm.memslots[0].base_gfn == new >> 12
        assert (await vm.load(new, 5)).value == b"moved"
        assert await vm.ldg(new, 16) == [6]
        assert (await vm.load(RAM, 1)).value["exit"] == "mmio"
        assert invariants(k) == []

    async def test_move_onto_another_slot_is_eexist(self):
        """Moving a slot over another slot's guest range is EEXIST and the slot stays where it was."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE)
        await vm.ram(1, RAM + 0x10_0000, PAGE)
        await expect_errno("EEXIST", vm.slot(0, RAM + 0x10_0000, PAGE, hva))
        assert vm.kvm.memslots[0].base_gfn == RAM >> 12

    async def test_same_region_again_is_a_no_op(self):
        """Setting a slot to exactly what it is succeeds and changes nothing (its stage 2 stays)."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE)
        await vm.store(RAM, b"x")
        entry = vm.s2(RAM)
        await vm.slot(0, RAM, PAGE, hva)
        assert vm.s2(RAM) is entry


class TestFlagsOnlyRecheck:
    """KVM_MR_FLAGS_ONLY runs kvm_arch_prepare_memory_region again over the current VMAs."""

    async def test_file_mapped_over_guest_ram_blocks_enabling_dirty_logging(self):
        """After the VMM maps a file over part of an MTE VM's RAM, enabling dirty logging on that slot is EINVAL."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 4 * PAGE)
        await vm.map(PAGE, backing="file", addr=hva + 2 * PAGE)
        await expect_errno("EINVAL", vm.slot(0, RAM, 4 * PAGE, hva, flags=["log-dirty-pages"]))
        assert vm.kvm.memslots[0].flags == 0 and vm.kvm.nr_memslots_dirty_logging == 0

    async def test_flags_change_over_good_vmas_is_accepted(self):
        """The same flags change with the VMM's RAM intact is accepted and starts logging."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 4 * PAGE)
        await vm.slot(0, RAM, 4 * PAGE, hva, flags=["log-dirty-pages"])
        assert vm.kvm.memslots[0].logging and vm.kvm.nr_memslots_dirty_logging == 1
        assert await vm("kvm-get-dirty-log", slot=0) == []

    async def test_plain_vm_accepts_the_same_flags_change(self):
        """Without MTE the file over guest RAM is no reason to refuse the flags change."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        hva = await vm.ram(0, RAM, 4 * PAGE)
        await vm.map(PAGE, backing="file", addr=hva + 2 * PAGE)
        await vm.slot(0, RAM, 4 * PAGE, hva, flags=["log-dirty-pages"])
        assert vm.kvm.memslots[0].logging
