"""KVM_ARM_MTE_COPY_TAGS (reference 4.4, invariants 15 and 16, section 7).

The rules checked: the EINVAL checks in the kernel's order (no MTE, reserved,
flags, alignment, length > INT_MAX), EBUSY for TO_GUEST while any memslot
logs dirty pages, length 0 returns 0; one tag per byte, only the low nibble
used; FROM_GUEST reads zeros for untagged pages and changes no page state;
TO_GUEST makes the page PG_mte_tagged (so the guest's later fault keeps the
tags), and when the user buffer runs short the failing page is zeroed but
still tagged and the guest bytes done so far are returned (EFAULT only when
the first page fails); a gfn outside every memslot and a read-only slot for
TO_GUEST are EFAULT; the model's transport limit is E2BIG.
"""

from __future__ import annotations

import pytest
from support import RWM, Vm, expect_errno, invariants

from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.arm64.tags import ZERO_TAGS
from hypervisor.kernel import Kernel
from shared.mte import HPAGE_SIZE

PAGE = 4096
RAM = 0x4000_0000
PATTERN = bytes((i * 5 + 3) % 16 for i in range(256))  # a distinct-looking tag per granule
INT_MAX = (1 << 31) - 1


async def mte_vm(k: Kernel, size: int = 4 * PAGE, **ram) -> tuple[Vm, int]:
    vm = await Vm.create(k)
    return vm, await vm.ram(0, RAM, size, **ram)


class TestArgumentChecks:
    """kvm_vm_ioctl_mte_copy_tags' argument checks, in the kernel's order."""

    async def test_vm_without_mte_is_einval_before_anything_else(self):
        """A VM without MTE gets EINVAL for the missing capability even with bad reserved, flags and alignment."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        await vm.ram(0, RAM, PAGE)
        exc = await expect_errno("EINVAL", vm.copy_tags(RAM + 1, 10, from_guest=True, flags=6, reserved=(1, 1)))
        assert "KVM_CAP_ARM_MTE" in exc.message
        exc = await expect_errno("EINVAL", vm.copy_tags(RAM, PAGE, from_guest=True))
        assert "KVM_CAP_ARM_MTE" in exc.message

    async def test_vm_without_mte_is_einval_not_ebusy(self):
        """Even while a slot logs dirty pages, a VM without MTE gets EINVAL for TO_GUEST, not EBUSY."""
        k = Kernel()
        vm = await Vm.create(k, mte=False)
        await vm.ram(0, RAM, PAGE, flags=["log-dirty-pages"])
        await expect_errno("EINVAL", vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes(256)))

    @pytest.mark.parametrize("reserved", [(1, 0), (0, 1), (1 << 63, 7)])
    async def test_reserved_is_einval_before_flags_and_alignment(self, reserved):
        """Non-zero reserved words are EINVAL, reported before bad flags or alignment."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        exc = await expect_errno("EINVAL", vm.copy_tags(RAM + 1, 10, from_guest=True, flags=4, reserved=reserved))
        assert "reserved" in exc.message

    @pytest.mark.parametrize("flags", [2, 3, 1 << 32])
    async def test_unknown_flags_are_einval_before_alignment(self, flags):
        """Flags other than 0 and 1 are EINVAL, reported before the alignment check."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        exc = await expect_errno("EINVAL", vm.copy_tags(RAM + 1, 10, from_guest=True, flags=flags))
        assert "flags" in exc.message

    @pytest.mark.parametrize("ipa,length", [(RAM + 16, PAGE), (RAM, PAGE + 16), (RAM + PAGE // 2, PAGE // 2),
                                            (RAM, 0x8000_0010)])
    async def test_unaligned_ipa_or_length_is_einval(self, ipa, length):
        """A guest_ipa or length not a multiple of PAGE_SIZE is EINVAL (checked before the INT_MAX limit)."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        for from_guest in (True, False):
            exc = await expect_errno("EINVAL", vm.copy_tags(ipa, length, from_guest=from_guest))
            assert "aligned" in exc.message

    @pytest.mark.parametrize("from_guest", [True, False])
    async def test_length_beyond_int_max_is_einval(self, from_guest):
        """A page-aligned length above INT_MAX is EINVAL in both directions (not E2BIG, not EFAULT)."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        exc = await expect_errno("EINVAL", vm.copy_tags(RAM, INT_MAX + 1, from_guest=from_guest))
        assert "INT_MAX" in exc.message

    async def test_huge_from_guest_is_e2big(self):
        """A FROM_GUEST dump longer than one reply can carry (MAX_IO tags) is E2BIG after the kernel's checks."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await expect_errno("E2BIG", vm.copy_tags(RAM, INT_MAX + 1 - PAGE, from_guest=True))
        await expect_errno("E2BIG", vm.copy_tags(RAM, 0x1000_1000, from_guest=True))
        exc = await expect_errno("EINVAL", vm.copy_tags(RAM + 16, 0x1000_1000, from_guest=True))
        assert "aligned" in exc.message  # E2BIG comes after the kernel's own checks

    async def test_huge_to_guest_is_not_e2big(self):
        """TO_GUEST returns no tags, so a long TO_GUEST is no E2BIG: it runs and faults where the buffer ends."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        r = await vm.copy_tags(RAM, 0x1000_1000, from_guest=False, tags=PATTERN * 2)
        assert r == {"length": 2 * PAGE, "tags": b""}

    @pytest.mark.parametrize("from_guest", [True, False])
    async def test_length_zero_returns_zero(self, from_guest):
        """length 0 copies nothing and returns 0, even at an IPA outside every memslot."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        assert (await vm.copy_tags(0x9000_0000, 0, from_guest=from_guest))["length"] == 0
        assert (await vm.copy_tags(RAM, 0, from_guest=from_guest))["tags"] == b""


class TestDirtyLoggingBusy:
    """TO_GUEST is EBUSY while any memslot logs dirty pages (it would not mark them dirty)."""

    async def test_to_guest_is_ebusy_while_any_slot_logs(self):
        """TO_GUEST into a slot that does not log is still EBUSY when another slot does, and writes nothing."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await vm.ram(1, RAM + 0x10_0000, PAGE, flags=["log-dirty-pages"])
        await vm.store(RAM, b"x")
        await expect_errno("EBUSY", vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))
        assert await vm.ldg(RAM, 16) == [0]

    async def test_to_guest_length_zero_is_ebusy_too(self):
        """The EBUSY check runs before the copy loop, so even length 0 is EBUSY while logging."""
        k = Kernel()
        vm, _ = await mte_vm(k, flags=["log-dirty-pages"])
        await expect_errno("EBUSY", vm.copy_tags(RAM, 0, from_guest=False))

    async def test_from_guest_is_allowed_while_logging(self):
        """Reading tags works while dirty logging (it is what migration does) and marks nothing dirty."""
        k = Kernel()
        vm, _ = await mte_vm(k, flags=["log-dirty-pages"])
        await vm.stg(RAM, 16, 9)
        await vm("kvm-clear-dirty-log", slot=0)
        r = await vm.copy_tags(RAM, 2 * PAGE, from_guest=True)
        assert r["length"] == 2 * PAGE and r["tags"][0] == 9
        assert await vm("kvm-get-dirty-log", slot=0) == []
        assert invariants(k) == []

    async def test_to_guest_works_again_once_logging_stops(self):
        """After the last logging slot stops logging, TO_GUEST succeeds."""
        k = Kernel()
        vm, hva = await mte_vm(k, flags=["log-dirty-pages"])
        await expect_errno("EBUSY", vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))
        await vm.slot(0, RAM, 4 * PAGE, hva)
        assert (await vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))["length"] == PAGE
        assert bytes(await vm.ldg(RAM, PAGE)) == PATTERN


class TestFromGuest:
    """FROM_GUEST: one tag per byte; untagged pages read as zeros; nothing changes (invariant 16)."""

    async def test_reads_the_guests_tags_one_per_byte(self):
        """Tags the guest stored come back one per granule, one per byte, for every page; the length is returned."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await vm.stg(RAM, PAGE, 4)
        await vm.stg(RAM + 32, 16, 15)
        await vm.stg(RAM + PAGE + PAGE - 16, 16, 1)
        r = await vm.copy_tags(RAM, 2 * PAGE, from_guest=True)
        assert r["length"] == 2 * PAGE and len(r["tags"]) == 512
        assert list(r["tags"][:4]) == [4, 4, 15, 4]
        assert r["tags"][256:511] == bytes(255) and r["tags"][511] == 1

    async def test_untagged_page_reads_zeros_and_stays_untagged(self):
        """A page only the VMM touched (untagged, stale tag memory) reads as zeros and stays untagged."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("store", addr=hva, data=b"vmm")
        page = vm.vmm.page(hva)
        assert bytes(page.tags) != ZERO_TAGS
        flags = page.flags
        r = await vm.copy_tags(RAM, PAGE, from_guest=True)
        assert r["tags"] == ZERO_TAGS
        assert page.flags == flags and not page.flags & (PG_mte_tagged | PG_mte_lock)
        assert k.page_flags(vm.vmm.pid, hva)["tagged"] is False
        assert invariants(k) == []

    async def test_untouched_gfn_reads_zeros_and_flags_nothing(self):
        """A gfn nobody touched reads as zeros; the zero page it faults in stays unflagged, stage 2 stays empty."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        r = await vm.copy_tags(RAM, 4 * PAGE, from_guest=True)
        assert r == {"length": 4 * PAGE, "tags": bytes(1024)}
        assert k.alloc.zero_page.flags == 0 and vm.kvm.s2 == {}
        assert not k.page_flags(vm.vmm.pid, hva)["tagged"]
        assert invariants(k) == []

    async def test_readonly_slot_can_be_read(self):
        """FROM_GUEST does not need write access: a read-only slot's tags can be read."""
        k = Kernel()
        vm = await Vm.create(k)
        tagged = await vm.map(PAGE, backing="memfd", object="rom", prot=RWM)
        await vm.vmm("stg", addr=tagged, tag=2, size=32)
        hva = await vm.map(PAGE, backing="memfd", object="rom")
        await vm.slot(0, RAM, PAGE, hva, flags=["readonly"])
        assert list((await vm.copy_tags(RAM, PAGE, from_guest=True))["tags"][:3]) == [2, 2, 0]

    async def test_hugetlb_folio_tags_are_read_per_page(self):
        """For a tagged hugetlb folio each 4 KiB page's own tags are returned."""
        k = Kernel()
        vm, _ = await mte_vm(k, HPAGE_SIZE, backing="hugetlb")
        await vm.stg(RAM + 9 * PAGE, 16, 7)
        r = await vm.copy_tags(RAM + 8 * PAGE, 2 * PAGE, from_guest=True)
        assert r["tags"][:256] == ZERO_TAGS and r["tags"][256] == 7 and r["tags"][257:] == bytes(255)

    async def test_gfn_outside_memslots_is_efault(self):
        """The first gfn outside every memslot: EFAULT; a range running off the slot returns the bytes done."""
        k = Kernel()
        vm, _ = await mte_vm(k, 2 * PAGE)
        await expect_errno("EFAULT", vm.copy_tags(0x9000_0000, PAGE, from_guest=True))
        r = await vm.copy_tags(RAM + PAGE, 3 * PAGE, from_guest=True)
        assert r["length"] == PAGE and len(r["tags"]) == 256

    @pytest.mark.parametrize("from_guest", [True, False])
    async def test_device_memory_is_efault(self, from_guest):
        """A gfn whose VMM page is device memory (mapped over guest RAM after the slot was made) is EFAULT."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.map(PAGE, backing="device", addr=hva)
        await expect_errno("EFAULT", vm.copy_tags(RAM, PAGE, from_guest=from_guest, tags=PATTERN))
        r = await vm.copy_tags(RAM + PAGE, PAGE, from_guest=from_guest, tags=PATTERN)
        assert r["length"] == PAGE  # the next page is ordinary RAM

    async def test_vmm_hole_is_efault(self):
        """A gfn whose VMM address has no VMA fails GUP: EFAULT."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("munmap", addr=hva, size=PAGE)
        await expect_errno("EFAULT", vm.copy_tags(RAM, PAGE, from_guest=True))


class TestToGuest:
    """TO_GUEST: low nibble, always PG_mte_tagged afterwards (invariant 15), partial results."""

    async def test_low_nibble_of_each_byte_is_the_tag(self):
        """Each byte's low nibble becomes the granule's tag; the high nibble is ignored."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        buf = bytes(((i % 16) << 4) | (i % 13) for i in range(256))
        r = await vm.copy_tags(RAM, PAGE, from_guest=False, tags=buf)
        assert r == {"length": PAGE, "tags": b""}
        assert await vm.ldg(RAM, PAGE) == [b & 0xF for b in buf]
        assert (await vm.copy_tags(RAM, PAGE, from_guest=True))["tags"] == bytes(b & 0xF for b in buf)

    async def test_tags_written_before_the_guest_faults_survive_the_fault(self):
        """TO_GUEST into never-mapped pages makes them tagged, so the guest's first fault keeps the tags."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        assert vm.kvm.s2 == {}
        r = await vm.copy_tags(RAM, 2 * PAGE, from_guest=False, tags=PATTERN + PATTERN[::-1])
        assert r["length"] == 2 * PAGE
        assert k.page_flags(vm.vmm.pid, hva)["tagged"] and k.page_flags(vm.vmm.pid, hva + PAGE)["tagged"]
        assert bytes(await vm.ldg(RAM, PAGE)) == PATTERN
        assert bytes(await vm.ldg(RAM + PAGE, PAGE)) == PATTERN[::-1]
        assert (await vm.load(RAM, 16, tag=PATTERN[0], check="sync")).fault is None
        assert invariants(k) == []

    async def test_restore_over_a_vmm_written_page_tags_it(self):
        """A page with data the VMM wrote (untagged) becomes tagged with the given tags and keeps its data."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("store", addr=hva, data=b"migrated data")
        await vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN)
        assert vm.vmm.page(hva).flags & PG_mte_tagged
        assert bytes(await vm.ldg(RAM, PAGE)) == PATTERN
        assert (await vm.load(RAM, 13)).value == b"migrated data"
        assert invariants(k) == []

    async def test_overwrites_tags_of_an_already_tagged_page(self):
        """TO_GUEST ignores try_page_mte_tagging's result: a page the guest already tagged gets the new tags."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await vm.stg(RAM, PAGE, 8)
        await vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN)
        assert bytes(await vm.ldg(RAM, PAGE)) == PATTERN
        assert vm.page(RAM).inits == 1
        assert invariants(k) == []

    async def test_short_buffer_returns_partial_length_and_zero_tags_the_failing_page(self):
        """With a buffer for 1.5 pages of 3, the first page is copied, the second zeroed but tagged, 4096 returned."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("store", addr=hva + PAGE, data=b"p1")
        await vm.vmm("store", addr=hva + 2 * PAGE, data=b"p2")
        r = await vm.copy_tags(RAM, 3 * PAGE, from_guest=False, tags=PATTERN + bytes([9]) * 128)
        assert r["length"] == PAGE
        p1 = vm.vmm.page(hva + PAGE)
        assert p1.flags & PG_mte_tagged and bytes(p1.tags) == ZERO_TAGS  # no partial tags
        assert not vm.vmm.page(hva + 2 * PAGE).flags & PG_mte_tagged  # never reached
        assert bytes(await vm.ldg(RAM, PAGE)) == PATTERN
        assert await vm.ldg(RAM + PAGE, PAGE) == [0] * 256
        assert invariants(k) == []

    async def test_first_page_failing_is_efault_and_the_page_is_zeroed_but_tagged(self):
        """A buffer shorter than one page fails the first page: EFAULT, and that page is tagged with zero tags."""
        k = Kernel()
        vm, hva = await mte_vm(k)
        await vm.vmm("store", addr=hva, data=b"p0")
        page = vm.vmm.page(hva)
        await expect_errno("EFAULT", vm.copy_tags(RAM, 2 * PAGE, from_guest=False, tags=bytes([5]) * 200))
        assert page.flags & PG_mte_tagged and bytes(page.tags) == ZERO_TAGS
        assert page.flags & PG_mte_lock  # the lock was taken and the flag set: no waiter is stuck
        assert invariants(k) == []

    async def test_empty_buffer_is_efault(self):
        """TO_GUEST with no buffer at all fails the first page with EFAULT."""
        k = Kernel()
        vm, _ = await mte_vm(k)
        await expect_errno("EFAULT", vm.copy_tags(RAM, PAGE, from_guest=False))

    async def test_gfn_outside_memslots_is_efault_and_partial_success_wins(self):
        """TO_GUEST at a gfn with no memslot is EFAULT; running off the slot's end returns the bytes done."""
        k = Kernel()
        vm, _ = await mte_vm(k, 2 * PAGE)
        await expect_errno("EFAULT", vm.copy_tags(0x9000_0000, PAGE, from_guest=False, tags=PATTERN))
        r = await vm.copy_tags(RAM + PAGE, 2 * PAGE, from_guest=False, tags=PATTERN * 2)
        assert r["length"] == PAGE
        assert bytes(await vm.ldg(RAM + PAGE, PAGE)) == PATTERN

    async def test_readonly_slot_is_efault(self):
        """TO_GUEST into a read-only memslot is EFAULT and tags nothing."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE, backing="memfd", flags=["readonly"])
        await vm.vmm("store", addr=hva, data=b"rom")
        await expect_errno("EFAULT", vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))
        assert not vm.vmm.page(hva).flags & PG_mte_tagged

    async def test_read_only_vmm_mapping_is_efault(self):
        """TO_GUEST needs FOLL_WRITE: over a PROT_READ mapping GUP fails (EFAULT), while FROM_GUEST still reads."""
        k = Kernel()
        vm, _ = await mte_vm(k, prot=["read"])
        await expect_errno("EFAULT", vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))
        assert (await vm.copy_tags(RAM, PAGE, from_guest=True))["tags"] == ZERO_TAGS

    async def test_readonly_slot_after_a_writable_one_returns_the_bytes_done(self):
        """A range from a writable slot into a read-only one copies the writable pages and returns their length."""
        k = Kernel()
        vm, _ = await mte_vm(k, PAGE)
        await vm.ram(1, RAM + PAGE, PAGE, flags=["readonly"])
        r = await vm.copy_tags(RAM, 2 * PAGE, from_guest=False, tags=PATTERN * 2)
        assert r["length"] == PAGE

    async def test_hugetlb_page_gets_the_tags_and_the_folio_the_flag(self):
        """TO_GUEST into a hugetlb page sets that page's tags and PG_mte_tagged on the folio head only."""
        k = Kernel()
        vm = await Vm.create(k)
        view = await vm.map(HPAGE_SIZE, backing="hugetlb", object="h", prot=RWM)
        await vm.vmm("load", addr=view, size=1)  # the VMM's PROT_MTE fault zero-tags the whole folio
        await vm.ram(0, RAM, HPAGE_SIZE, backing="hugetlb", object="h")
        await vm.copy_tags(RAM + 3 * PAGE, PAGE, from_guest=False, tags=PATTERN)
        head = vm.vmm.page(view)
        assert head.flags & PG_mte_tagged and all(p.flags == 0 for p in head.subpages[1:])
        assert bytes(head.subpages[3].tags) == PATTERN
        assert bytes(await vm.ldg(RAM + 3 * PAGE, PAGE)) == PATTERN
        assert await vm.ldg(RAM + 4 * PAGE, 16) == [0]
        assert invariants(k) == []
