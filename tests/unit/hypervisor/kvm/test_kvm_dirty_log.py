"""Dirty logging with manual protect (reference section 5, DIRTY-LOG-COMPLETE).

The rules checked: turning KVM_MEM_LOG_DIRTY_PAGES on write-protects the
slot's stage 2; a guest store and a guest STG (a tag store is a write) mark
their page dirty, reads (loads, LDG, COPY_TAGS FROM_GUEST) do not;
KVM_GET_DIRTY_LOG does not clear, KVM_CLEAR_DIRTY_LOG clears and
write-protects again; turning logging off ends it (ENOENT); logging forces
4 KiB stage-2 mappings; and COPY_TAGS TO_GUEST, which marks nothing dirty, is
refused while logging (with bug ``copy-tags-during-dirty-log`` it is not, and
the DIRTY-LOG-COMPLETE oracle catches the page missing from the log).
"""

from __future__ import annotations

from support import Vm, expect_errno, invariants

from hypervisor.kernel import Kernel
from shared.mte import HPAGE_SIZE

PAGE = 4096
RAM = 0x4000_0000
PATTERN = bytes(i % 16 for i in range(256))


async def logging_vm(k: Kernel, size: int = 8 * PAGE, manual: int | None = 1, **ram) -> tuple[Vm, int]:
    """An MTE VM (with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 args[0] = ``manual`` unless None) whose slot 0 logs
    dirty pages from its creation."""
    vm = await Vm.create(k)
    if manual is not None:
        await vm("kvm-enable-cap", cap="manual-dirty-log-protect2", args=[manual])
    return vm, await vm.ram(0, RAM, size, flags=["log-dirty-pages"], **ram)


async def dirty(vm: Vm, slot: int = 0) -> list[int]:
    return await vm("kvm-get-dirty-log", slot=slot)


class TestEnableDisable:
    """KVM_MR_FLAGS_ONLY turning logging on and off."""

    async def test_enabling_write_protects_the_slot(self):
        """Pages the guest had mapped writable are write-protected at stage 2 when logging starts."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 4 * PAGE)
        await vm.store(RAM, b"a")
        await vm.store(RAM + 3 * PAGE, b"b")
        assert vm.s2(RAM).writable and vm.s2(RAM + 3 * PAGE).writable
        await vm.slot(0, RAM, 4 * PAGE, hva, flags=["log-dirty-pages"])
        assert not vm.s2(RAM).writable and not vm.s2(RAM + 3 * PAGE).writable
        assert vm.s2(RAM).page is not None  # still mapped, only read-only
        assert await dirty(vm) == []  # writes before logging started are not in the log
        assert vm.kvm.nr_memslots_dirty_logging == 1

    async def test_enabling_on_one_slot_leaves_the_others_writable(self):
        """Write protection covers only the slot that starts logging."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE)
        await vm.ram(1, RAM + PAGE, PAGE)
        await vm.store(RAM, b"a")
        await vm.store(RAM + PAGE, b"b")
        await vm.slot(0, RAM, PAGE, hva, flags=["log-dirty-pages"])
        assert not vm.s2(RAM).writable and vm.s2(RAM + PAGE).writable
        await expect_errno("ENOENT", dirty(vm, 1))

    async def test_disabling_ends_the_log(self):
        """Turning logging off drops the log (GET is ENOENT), the count returns to 0, and guest writes go on."""
        k = Kernel()
        vm, hva = await logging_vm(k)
        await vm.store(RAM, b"a")
        await vm.slot(0, RAM, 8 * PAGE, hva)
        assert vm.kvm.nr_memslots_dirty_logging == 0
        await expect_errno("ENOENT", dirty(vm))
        await expect_errno("ENOENT", vm("kvm-clear-dirty-log", slot=0))
        await vm.store(RAM + PAGE, b"b")
        assert vm.s2(RAM + PAGE).writable

    async def test_re_enabling_starts_a_fresh_log(self):
        """Logging off and on again starts with an empty log and write-protects again."""
        k = Kernel()
        vm, hva = await logging_vm(k)
        await vm.store(RAM, b"a")
        await vm.slot(0, RAM, 8 * PAGE, hva)
        await vm.store(RAM, b"b")
        await vm.slot(0, RAM, 8 * PAGE, hva, flags=["log-dirty-pages"])
        assert await dirty(vm) == [] and not vm.s2(RAM).writable

    async def test_get_on_a_slot_that_does_not_log_is_enoent(self):
        """GET/CLEAR on a slot without logging or on a missing slot is ENOENT; on an id >= 32767 it is EINVAL."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, PAGE)
        await expect_errno("ENOENT", dirty(vm, 0))
        await expect_errno("ENOENT", dirty(vm, 7))
        await expect_errno("ENOENT", vm("kvm-clear-dirty-log", slot=7))
        await expect_errno("EINVAL", dirty(vm, 32767))
        await expect_errno("EINVAL", vm("kvm-clear-dirty-log", slot=32767))


class TestWhatIsDirty:
    """Stage-2 write faults mark pages dirty; reads do not."""

    async def test_guest_store_marks_its_page(self):
        """A guest store makes exactly its page dirty (the slot-relative index)."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.store(RAM + 5 * PAGE + 100, b"x")
        assert await dirty(vm) == [5]
        assert vm.s2(RAM + 5 * PAGE).writable

    async def test_guest_stg_marks_its_page(self):
        """A guest STG is a write: it marks its page dirty, so tag-only changes reach the log."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.stg(RAM + 2 * PAGE, 16, 3)
        assert await dirty(vm) == [2]

    async def test_stg_on_a_write_protected_page_marks_it(self):
        """A page mapped before a clear is write-protected again; an STG alone then marks it dirty."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.store(RAM, b"data")
        await vm("kvm-clear-dirty-log", slot=0)
        assert await dirty(vm) == [] and not vm.s2(RAM).writable
        await vm.stg(RAM + 64, 16, 12)
        assert await dirty(vm) == [0]
        assert await vm.ldg(RAM + 64, 16) == [12]

    async def test_reads_do_not_mark(self):
        """Guest loads and LDGs, and COPY_TAGS FROM_GUEST, leave the log empty and the pages read-only."""
        k = Kernel()
        vm, _ = await logging_vm(k, backing="memfd")
        await vm.load(RAM, 8)
        await vm.ldg(RAM + PAGE, 64)
        await vm.copy_tags(RAM, 4 * PAGE, from_guest=True)
        assert await dirty(vm) == []
        assert not vm.s2(RAM).writable and not vm.s2(RAM + PAGE).writable

    async def test_read_then_write_marks(self):
        """A page first read (mapped read-only) is marked when the guest later writes it."""
        k = Kernel()
        vm, _ = await logging_vm(k, backing="memfd")
        await vm.load(RAM + 3 * PAGE, 8)
        assert await dirty(vm) == []
        await vm.store(RAM + 3 * PAGE, b"w")
        assert await dirty(vm) == [3]

    async def test_sync_tag_check_fault_store_still_marks(self):
        """A store suppressed by a sync tag check fault still took the write fault, so its page is marked."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        r = await vm.store(RAM, b"x", tag=7, check="sync")
        assert r.fault is not None and r.fault["kind"] == "tag-check-fault"
        assert await dirty(vm) == [0]

    async def test_indexes_are_relative_to_the_slot(self):
        """The log of a second slot counts pages from that slot's base gfn."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, PAGE)
        await vm.ram(1, RAM + 0x10_0000, 4 * PAGE, flags=["log-dirty-pages"])
        await vm.store(RAM + 0x10_0000 + 3 * PAGE, b"x")
        await vm.store(RAM, b"not logged")
        assert await dirty(vm, 1) == [3]

    async def test_hugetlb_is_mapped_4k_while_logging(self):
        """Dirty logging forces PTE-sized stage-2 mappings: a hugetlb fault maps one gfn, and marks one page."""
        k = Kernel()
        vm, _ = await logging_vm(k, HPAGE_SIZE, backing="hugetlb")
        await vm.store(RAM + 5 * PAGE, b"x")
        assert sorted(vm.kvm.s2) == [(RAM >> 12) + 5]
        assert await dirty(vm) == [5]
        assert await vm.ldg(RAM + 5 * PAGE, 32) == [0, 0]


class TestGetAndClear:
    """KVM_GET_DIRTY_LOG reports without clearing; KVM_CLEAR_DIRTY_LOG clears and write-protects."""

    async def test_get_does_not_clear(self):
        """Two GETs in a row return the same pages."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.store(RAM, b"a")
        await vm.stg(RAM + 4 * PAGE, 16, 1)
        assert await dirty(vm) == [0, 4]
        assert await dirty(vm) == [0, 4]

    async def test_clear_clears_and_write_protects_again(self):
        """CLEAR drops the bits and write-protects the pages; the next write marks the page again."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.store(RAM, b"a")
        assert vm.s2(RAM).writable
        await vm("kvm-clear-dirty-log", slot=0)
        assert await dirty(vm) == [] and not vm.s2(RAM).writable
        await vm.store(RAM, b"b")
        assert await dirty(vm) == [0] and vm.s2(RAM).writable

    async def test_clear_of_a_range_leaves_the_rest(self):
        """CLEAR of pages [64, 128) leaves pages outside the range dirty and writable."""
        k = Kernel()
        vm, _ = await logging_vm(k, 200 * PAGE)
        for i in (1, 64, 127, 128, 199):
            await vm.store(RAM + i * PAGE, b"x")
        await vm("kvm-clear-dirty-log", slot=0, first=64, num=64)
        assert await dirty(vm) == [1, 128, 199]
        assert vm.s2(RAM + PAGE).writable and not vm.s2(RAM + 64 * PAGE).writable
        assert not vm.s2(RAM + 127 * PAGE).writable and vm.s2(RAM + 128 * PAGE).writable

    async def test_clear_alignment(self):
        """CLEAR's first page must be a multiple of 64, and its count too unless it reaches the slot's end."""
        k = Kernel()
        vm, _ = await logging_vm(k, 200 * PAGE)
        for i in (0, 70, 199):
            await vm.store(RAM + i * PAGE, b"x")
        await expect_errno("EINVAL", vm("kvm-clear-dirty-log", slot=0, first=2, num=62))
        await expect_errno("EINVAL", vm("kvm-clear-dirty-log", slot=0, first=64, num=10))
        await expect_errno("EINVAL", vm("kvm-clear-dirty-log", slot=0, first=128, num=73))
        assert await dirty(vm) == [0, 70, 199]
        await vm("kvm-clear-dirty-log", slot=0, first=128, num=72)  # 200 - 128: reaches the end
        await vm("kvm-clear-dirty-log", slot=0, first=0, num=0)
        assert await dirty(vm) == [0, 70]
        await vm("kvm-clear-dirty-log", slot=0, first=64)  # the rest of the slot
        assert await dirty(vm) == [0]

    async def test_clear_beyond_the_slot_is_einval(self):
        """A CLEAR range past the slot's last page is EINVAL and clears nothing."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.store(RAM, b"x")
        await expect_errno("EINVAL", vm("kvm-clear-dirty-log", slot=0, first=0, num=9))
        await expect_errno("EINVAL", vm("kvm-clear-dirty-log", slot=0, first=64, num=0))
        assert await dirty(vm) == [0]

    async def test_oracle_is_silent_on_a_complete_log(self):
        """With guest writes only, every GET and CLEAR sees a complete log: no DIRTY-LOG-COMPLETE report."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.store(RAM, b"x")
        await vm.stg(RAM + PAGE, 32, 4)
        await dirty(vm)
        await vm("kvm-clear-dirty-log", slot=0)
        await vm.stg(RAM + PAGE, 32, 5)
        await dirty(vm)
        assert invariants(k) == [] and k.oracle.violations == []


class TestCopyTagsAndTheLog:
    """COPY_TAGS TO_GUEST does not mark pages dirty, so it is refused while logging."""

    async def test_to_guest_is_ebusy_and_the_log_stays_complete(self):
        """TO_GUEST while logging is EBUSY, changes no tags, and GET finds no page missing from the log."""
        k = Kernel()
        vm, _ = await logging_vm(k)
        await vm.stg(RAM, 16, 2)
        await expect_errno("EBUSY", vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))
        assert await vm.ldg(RAM, 16) == [2]
        assert await dirty(vm) == [0]
        assert k.oracle.violations == []

    async def test_bug_copy_tags_during_dirty_log_is_caught(self):
        """With bug ``copy-tags-during-dirty-log`` TO_GUEST changes tags the log never sees: DIRTY-LOG-COMPLETE
        fires."""
        k = Kernel(bugs=["copy-tags-during-dirty-log"])
        vm, _ = await logging_vm(k)
        await vm.stg(RAM + PAGE, 16, 2)
        await vm("kvm-clear-dirty-log", slot=0)
        r = await vm.copy_tags(RAM + PAGE, PAGE, from_guest=False, tags=PATTERN)
        assert r["length"] == PAGE and bytes(await vm.ldg(RAM + PAGE, PAGE)) == PATTERN
        assert await dirty(vm) == []  # the change escaped the log
        found = [v for v in k.oracle.violations if v.invariant == "DIRTY-LOG-COMPLETE"]
        assert found and "page(s) 1 " in found[0].message

    async def test_bug_is_caught_at_clear_too(self):
        """The DIRTY-LOG-COMPLETE check also runs when the VMM clears the log after the unlogged copy."""
        k = Kernel(bugs=["copy-tags-during-dirty-log"])
        vm, _ = await logging_vm(k)
        await vm.copy_tags(RAM + 2 * PAGE, PAGE, from_guest=False, tags=PATTERN)
        await vm("kvm-clear-dirty-log", slot=0)
        assert [v.invariant for v in k.oracle.violations] == ["DIRTY-LOG-COMPLETE"]

    async def test_copy_before_logging_starts_is_not_a_miss(self):
        """A TO_GUEST that finished before logging started is not expected in the log: no report."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 4 * PAGE)
        await vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN)
        await vm.slot(0, RAM, 4 * PAGE, hva, flags=["log-dirty-pages"])
        assert await dirty(vm) == [] and k.oracle.violations == []


class TestLiveMigration:
    """Section 5: what a VMM does to move an MTE guest, end to end through the model's KVM ioctls."""

    async def test_dirty_passes_carry_tag_only_changes_to_the_destination(self):
        """Pre-copy with dirty logging: a tag-only change after the first pass is resent, and the destination
        guest (restored with TO_GUEST before it runs) sees exactly the source's data and tags."""
        k = Kernel()
        npages = 4
        src = await Vm.create(k, name="src")
        src_hva = await src.ram(0, RAM, npages * PAGE)
        for i in range(3):
            await src.store(RAM + i * PAGE, f"page {i}".encode())
            await src.stg(RAM + i * PAGE, 64, i + 1)
        sent: dict[int, tuple[bytes, bytes]] = {}

        async def send(pages) -> None:
            for i in pages:
                data = (await src.vmm("load", addr=src_hva + i * PAGE, size=PAGE)).value
                tags = (await src.copy_tags(RAM + i * PAGE, PAGE, from_guest=True))["tags"]
                sent[i] = (data, tags)

        await src.slot(0, RAM, npages * PAGE, src_hva, flags=["log-dirty-pages"])
        await send(range(npages))  # the first pass
        await src("kvm-clear-dirty-log", slot=0)
        await src.stg(RAM + PAGE + 128, 16, 15)  # tag-only change
        await src.store(RAM + 2 * PAGE, b"PAGE 2")  # data-only change
        dirty_pages = await dirty(src)
        assert dirty_pages == [1, 2]
        await send(dirty_pages)
        await src("kvm-clear-dirty-log", slot=0)
        assert await dirty(src) == []  # converged: stop and copy has nothing left

        dst = await Vm.create(k, name="dst", vcpu=False)
        dst_hva = await dst.ram(0, RAM, npages * PAGE)
        for i, (data, tags) in sorted(sent.items()):
            await dst.vmm("store", addr=dst_hva + i * PAGE, data=data)
            assert (await dst.copy_tags(RAM + i * PAGE, PAGE, from_guest=False, tags=tags))["length"] == PAGE
        await dst.add_vcpu()
        for i in range(npages):
            assert await dst.ldg(RAM + i * PAGE, PAGE) == await src.ldg(RAM + i * PAGE, PAGE), i
            assert (await dst.load(RAM + i * PAGE, 16)).value == (await src.load(RAM + i * PAGE, 16)).value
        assert await dst.ldg(RAM + PAGE + 128, 16) == [15]
        assert invariants(k) == [] and k.oracle.violations == []


class TestManualProtectCap:
    """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (kvm_main.c: check_extension, enable_cap_generic, get_dirty_log_protect)."""

    async def test_check_extension_is_3(self):
        """CHECK_EXTENSION returns KVM_DIRTY_LOG_MANUAL_CAPS, ENABLE | INITIALLY_SET = 3."""
        k = Kernel()
        vm = await Vm.create(k)
        assert await vm("kvm-check-extension", cap="manual-dirty-log-protect2") == 3

    async def test_enable_takes_0_1_3_and_refuses_the_rest(self):
        """ENABLE_CAP accepts args[0] 0, 1 and 3 at any time; 2, 4 and non-zero flags are EINVAL and change nothing."""
        k = Kernel()
        vm, _ = await logging_vm(k, manual=None)
        for arg in (1, 3, 0, 1):
            await vm("kvm-enable-cap", cap="manual-dirty-log-protect2", args=[arg])
            assert vm.kvm.manual_dirty_log_protect == arg
        for arg in (2, 4, 5, 7):
            await expect_errno("EINVAL", vm("kvm-enable-cap", cap="manual-dirty-log-protect2", args=[arg]))
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="manual-dirty-log-protect2", flags=1, args=[1]))
        assert vm.kvm.manual_dirty_log_protect == 1

    async def test_without_it_get_clears_and_write_protects(self):
        """Without manual protect, GET returns the log, clears it and write-protects the pages again."""
        k = Kernel()
        vm, _ = await logging_vm(k, manual=None)
        await vm.store(RAM, b"a")
        await vm.stg(RAM + 3 * PAGE, 16, 4)
        assert vm.s2(RAM).writable
        assert await dirty(vm) == [0, 3]
        assert not vm.s2(RAM).writable and not vm.s2(RAM + 3 * PAGE).writable
        assert await dirty(vm) == []
        await vm.store(RAM, b"b")
        assert await dirty(vm) == [0]
        assert k.oracle.violations == []

    async def test_switching_manual_mode_off_later(self):
        """The mode may change at any time: GET stops clearing once manual protect is enabled, clears again after 0."""
        k = Kernel()
        vm, _ = await logging_vm(k, manual=None)
        await vm("kvm-enable-cap", cap="manual-dirty-log-protect2", args=[1])
        await vm.store(RAM + PAGE, b"a")
        assert await dirty(vm) == [1] and await dirty(vm) == [1]
        await vm("kvm-enable-cap", cap="manual-dirty-log-protect2", args=[0])
        assert await dirty(vm) == [1] and await dirty(vm) == []

    async def test_initially_set_starts_all_ones_without_write_protecting(self):
        """With INITIALLY_SET a slot starts logging with every page dirty and its stage 2 left writable;
        CLEAR write-protects what it clears."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm("kvm-enable-cap", cap="manual-dirty-log-protect2", args=[3])
        hva = await vm.ram(0, RAM, 4 * PAGE)
        await vm.store(RAM, b"a")
        await vm.slot(0, RAM, 4 * PAGE, hva, flags=["log-dirty-pages"])
        assert await dirty(vm) == [0, 1, 2, 3]
        assert vm.s2(RAM).writable
        await vm("kvm-clear-dirty-log", slot=0)
        assert await dirty(vm) == [] and not vm.s2(RAM).writable
        await vm.store(RAM + 2 * PAGE, b"b")
        assert await dirty(vm) == [2]


class TestReadonlyAndMove:
    """What counts as dirty logging, and what a move keeps."""

    async def test_readonly_slot_with_logging_counts(self):
        """A read-only slot with log-dirty-pages counts as logging: TO_GUEST is EBUSY, GET and CLEAR succeed,
        while stage 2 still maps it read-only without forcing 4 KiB pages."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm("kvm-enable-cap", cap="manual-dirty-log-protect2", args=[1])
        await vm.ram(0, RAM, 4 * PAGE)
        await vm.ram(1, RAM + 0x10_0000, 4 * PAGE, flags=["readonly", "log-dirty-pages"])
        assert vm.kvm.nr_memslots_dirty_logging == 1
        await expect_errno("EBUSY", vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))
        await vm.load(RAM + 0x10_0000, 8)
        assert await dirty(vm, 1) == []
        await vm("kvm-clear-dirty-log", slot=1)
        assert not vm.s2(RAM + 0x10_0000).writable
        assert not vm.kvm.memslots[1].logging  # memslot_is_logging() excludes read-only slots

    async def test_moving_a_logging_slot_keeps_its_bitmap(self):
        """KVM_MR_MOVE of a logging slot keeps the dirty bitmap (relative to the slot) and keeps logging."""
        k = Kernel()
        vm, hva = await logging_vm(k)
        await vm.store(RAM + 2 * PAGE, b"x")
        await vm.slot(0, RAM + 0x100_0000, 8 * PAGE, hva, flags=["log-dirty-pages"])
        assert await dirty(vm) == [2]
        assert vm.kvm.nr_memslots_dirty_logging == 1
        await vm.store(RAM + 0x100_0000 + 5 * PAGE, b"y")
        assert await dirty(vm) == [2, 5]
        assert k.oracle.violations == []
