"""Hugetlb: the four arm64 sizes, the stage-2 mapping Linux picks for each, fork CoW, and finding 3.

Rules checked (mm/hugetlb.c, arch/arm64/mm/hugetlbpage.c, arch/arm64/kvm/mmu.c
``user_mem_abort``):

* mmap takes 64 KiB, 2 MiB, 32 MiB and 1 GiB huge pages (EINVAL otherwise, or
  for a length or address not a multiple of the size); a host fault maps the
  whole folio.
* Stage 2: 64 KiB (CONT_PTE) maps 4 KiB per fault (force_pte); 2 MiB maps a
  PMD block when the slot allows it, else 4 KiB; 32 MiB (CONT_PMD) maps 2 MiB
  blocks; 1 GiB maps a PUD block when IPA and hva are 1 GiB congruent and the
  block lies in the slot, else falls back to 2 MiB.
* MAP_PRIVATE hugetlb is copy-on-write across fork in both directions, tags
  included (kselftest ``check_hugetlb_options``).
* Finding 3 (docs/findings.md): ``sanitise_mte_tags`` clears only the pages the
  fault maps but flags the whole folio, and COPY_TAGS TO_GUEST into one page
  flags the whole folio too; the host fix ``sanitise-whole-hugetlb-folio``
  clears every page of the folio when the lock is won.
"""

from __future__ import annotations

import pytest
from support import RW, RWM, Proc, Vm, expect_errno, invariants, run_once, run_until_then

from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.fork import do_exit
from hypervisor.kernel import Kernel

PAGE = 4096
K64, M2, M32, G1 = 64 << 10, 2 << 20, 32 << 20, 1 << 30
RAM = 0x4000_0000
FIX = ("sanitise-whole-hugetlb-folio",)


async def huge_map(p: Proc, size: int, hs: int, prot=RW, addr: int | None = None) -> int:
    """A private MAP_HUGETLB mapping of ``size`` bytes in huge pages of ``hs`` bytes."""
    return await p("mmap", addr=addr, size=size, prot=list(prot), share="private", backing="hugetlb",
                   hugepage_size=hs)


async def huge_vm(k: Kernel, size: int, hs: int, ipa: int = RAM, flags=()) -> tuple[Vm, int]:
    """An MTE VM with one hugetlb memslot (``hs`` pages) at ``ipa``; returns it and the VMM address."""
    vm = await Vm.create(k)
    hva = await huge_map(vm.vmm, size, hs)
    await vm.slot(0, ipa, size, hva, flags)
    return vm, hva


class TestSizes:
    """mmap of the four hugetlb sizes."""

    @pytest.mark.parametrize("hs", [K64, M2, M32])
    async def test_host_fault_maps_the_whole_folio(self, hs):
        """A host write fault maps every page of the folio, all subpages of one naturally aligned folio."""
        k = Kernel()
        p = Proc.new(k, "p")
        addr = await huge_map(p, 2 * hs, hs)
        assert addr % hs == 0
        await p("store", addr=addr + hs + 3 * PAGE, data=b"x")
        head = p.page(addr + hs)
        assert head.folio is head and len(head.subpages) == hs // PAGE and head.pfn % (hs // PAGE) == 0
        assert [p.page(addr + hs + i * PAGE) for i in range(hs // PAGE)] == head.subpages
        assert p.pte(addr) is None  # the other folio is untouched

    @pytest.mark.parametrize("hs", [4096, 1 << 20, 4 << 20, 512 << 20, 2 << 30])
    async def test_other_sizes_are_einval(self, hs):
        """Sizes other than 64 KiB, 2 MiB, 32 MiB and 1 GiB are refused with EINVAL."""
        from hypervisor.mm.mmap import do_mmap

        k = Kernel()
        p = Proc.new(k, "p")
        await expect_errno("EINVAL", do_mmap(k, p.task.mm, None, 4 * hs, ("read",), "private", "hugetlb", None, 0,
                                             hugepage_size=hs))

    @pytest.mark.parametrize("hs,size", [(K64, K64 + PAGE), (M32, M2), (M32, M32 + M2)])
    async def test_length_rounds_up_to_the_huge_page_size(self, hs, size):
        """A length that is not a multiple of the huge page size maps whole huge pages (ksys_mmap_pgoff ALIGN)."""
        k = Kernel()
        p = Proc.new(k, "p")
        addr = await huge_map(p, size, hs)
        want = -(-size // hs) * hs
        vma = [v for v in p.task.mm.vmas if v.start == addr][0]
        assert vma.end - vma.start == want
        await p("store", addr=addr + want - PAGE, data=b"x")  # the rounded-up tail is mapped

    @pytest.mark.parametrize("op", ["munmap", "mprotect"])
    async def test_split_inside_a_huge_page_is_einval(self, op):
        """munmap/mprotect of 4 KiB inside a 2 MiB hugetlb mapping is EINVAL (hugetlb_vm_op_split); nothing changes."""
        k = Kernel()
        p = Proc.new(k, "p")
        addr = await huge_map(p, 2 * M2, M2)
        args = {"addr": addr + PAGE, "size": PAGE}
        if op == "mprotect":
            args["prot"] = ["read"]
        await expect_errno("EINVAL", p(op, **args))
        assert [(v.start, v.end) for v in p.task.mm.vmas] == [(addr, addr + 2 * M2)]
        await p(op, **dict(args, addr=addr + M2, size=M2))  # at a huge page boundary it splits

    async def test_address_must_be_aligned(self):
        """A MAP_FIXED address aligned to 2 MiB but not to 32 MiB is EINVAL for 32 MiB pages."""
        k = Kernel()
        p = Proc.new(k, "p")
        await expect_errno("EINVAL", huge_map(p, M32, M32, addr=0x1000_0000 + M2))
        assert await huge_map(p, M32, M32, addr=0x1000_0000) == 0x1000_0000


class TestStage2Size:
    """The vma_shift switch of user_mem_abort for each hugetlb size."""

    async def test_64k_maps_4k_per_fault(self):
        """64 KiB (contiguous PTEs) maps one 4 KiB page at stage 2 per fault (force_pte)."""
        k = Kernel()
        vm, _ = await huge_vm(k, K64, K64)
        await vm.store(RAM + 5 * PAGE, b"x")
        assert sorted(vm.kvm.s2) == [(RAM >> 12) + 5]

    async def test_2m_maps_a_block_when_congruent(self):
        """2 MiB maps a 512-page PMD block when IPA and hva are 2 MiB congruent."""
        k = Kernel()
        vm, _ = await huge_vm(k, M2, M2)
        await vm.store(RAM + 5 * PAGE, b"x")
        assert sorted(vm.kvm.s2) == list(range(RAM >> 12, (RAM >> 12) + 512))

    async def test_2m_falls_back_to_4k_when_not_congruent(self):
        """A 2 MiB hugetlb slot at an IPA only 64 KiB aligned cannot use blocks: 4 KiB per fault."""
        k = Kernel()
        vm, _ = await huge_vm(k, M2, M2, ipa=RAM + K64)
        await vm.store(RAM + K64 + 5 * PAGE, b"x")
        assert sorted(vm.kvm.s2) == [((RAM + K64) >> 12) + 5]

    async def test_32m_maps_2m_blocks(self):
        """32 MiB (contiguous PMDs) maps 2 MiB blocks: one fault maps the 512 pages of its block only."""
        k = Kernel()
        vm, _ = await huge_vm(k, M32, M32)
        await vm.store(RAM + 3 * M2 + 7 * PAGE, b"x")
        first = (RAM + 3 * M2) >> 12
        assert sorted(vm.kvm.s2) == list(range(first, first + 512))
        folio = vm.page(RAM + 3 * M2).folio
        assert len(folio.subpages) == M32 // PAGE and vm.page(RAM + 3 * M2) is folio.subpages[3 * 512]

    async def test_1g_maps_a_pud_block_when_congruent(self):
        """1 GiB maps a PUD block (262144 pages) when IPA and hva are 1 GiB congruent and the slot holds it."""
        k = Kernel(ram=2 << 30)
        vm, _ = await huge_vm(k, G1, G1)
        await vm.store(RAM + 5 * M2, b"x")
        assert len(vm.kvm.s2) == G1 // PAGE
        assert await vm.ldg(RAM + G1 - 32, 32) == [0, 0]
        assert invariants(k) == []

class TestFinding3:
    """sanitise_mte_tags and COPY_TAGS TO_GUEST flag a whole hugetlb folio after clearing part of it."""

    async def _trigger(self, k: Kernel, how: str) -> tuple[Vm, int]:
        """Set up trigger ``how``; returns the VM and an IPA of the folio whose tags nobody initialised."""
        if how == "64k":
            vm, _ = await huge_vm(k, K64, K64)
            await vm.store(RAM, b"x")
            return vm, RAM + PAGE
        if how == "32m":
            vm, _ = await huge_vm(k, M32, M32)
            await vm.store(RAM, b"x")
            return vm, RAM + M2
        if how == "dirty-log":
            vm, _ = await huge_vm(k, M2, M2, flags=["log-dirty-pages"])
            await vm.store(RAM, b"x")
            return vm, RAM + PAGE
        if how == "copy-tags":
            vm, _ = await huge_vm(k, M2, M2)
            r = await vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes([9]) * 256)
            assert r["length"] == PAGE
            return vm, RAM + PAGE
        raise AssertionError(how)

    @pytest.mark.parametrize("how", ["64k", "32m", "dirty-log", "copy-tags"])
    async def test_stale_tags_reach_the_guest(self, how):
        """Without the fix the guest's LDG of another page of the folio returns stale nonzero tags, and the
        oracles name it (NO-PUBLISH-BEFORE-VALID, LAST-TAG-WRITTEN)."""
        k = Kernel()
        vm, stale = await self._trigger(k, how)
        assert any(await vm.ldg(stale, 64))
        names = set(invariants(k))
        assert {"NO-PUBLISH-BEFORE-VALID", "LAST-TAG-WRITTEN"} <= names

    @pytest.mark.parametrize("how", ["64k", "32m", "dirty-log", "copy-tags"])
    async def test_the_fix_clears_the_whole_folio(self, how):
        """With sanitise-whole-hugetlb-folio every page of the folio reads zero tags and no invariant breaks."""
        k = Kernel(kernel_fixes=FIX)
        vm, stale = await self._trigger(k, how)
        assert await vm.ldg(stale, 64) == [0, 0, 0, 0]
        assert invariants(k) == [] and k.oracle.violations == []
        if how == "copy-tags":
            assert await vm.ldg(RAM, 32) == [9, 9]  # the page the VMM wrote keeps its tags

    async def test_1g_pmd_fallback_leaves_the_rest_stale_and_the_fix_clears_it(self):
        """A 1 GiB slot 2 MiB but not 1 GiB congruent maps 2 MiB blocks; its folio is flagged after 2 MiB is
        cleared, leaving the rest stale; the fix clears all of it."""
        for fixes, stale_seen in (((), True), (FIX, False)):
            k = Kernel(ram=2 << 30, kernel_fixes=fixes)
            vm, _ = await huge_vm(k, G1, G1, ipa=RAM + M2)
            await vm.store(RAM + M2 + PAGE, b"x")
            assert sorted(vm.kvm.s2) == list(range((RAM + M2) >> 12, ((RAM + M2) >> 12) + 512))
            assert bool(any(await vm.ldg(RAM + M2 + 3 * M2, 64))) is stale_seen
            assert ("LAST-TAG-WRITTEN" in {v.invariant for v in k.oracle.check_state()}) is stale_seen

    async def test_scheduling_point_between_folio_lock_and_clear(self):
        """sanitise_mte_tags parks between winning the folio's tag lock and clearing: the folio is then
        PG_mte_lock without PG_mte_tagged and its tags still stale."""
        seen = {}

        async def setup(k):
            vm, _ = await huge_vm(k, M2, M2)

            async def guest(k, st):
                await vm.store(RAM, b"x")

            async def observer(k, st):
                folio = vm.vmm.page(vm.kvm.memslots[0].userspace_addr).folio
                seen["flags"] = folio.flags
                seen["tags"] = bytes(folio.subpages[1].tags)

            return vm, {"a-guest": guest, "b-observer": observer}

        run, _ = await run_once(setup, policy=run_until_then("a-guest", "sanitise_mte_tags:clear", "b-observer"))
        assert run.failure is None
        assert seen["flags"] & PG_mte_lock and not seen["flags"] & PG_mte_tagged
        assert any(seen["tags"])
        assert await run.state.ldg(RAM + PAGE, 16) == [0]


class TestForkCow:
    """MAP_PRIVATE hugetlb across fork: copy-on-write in both directions, tags included."""

    async def _parent(self, k: Kernel, hs: int = M2) -> tuple[Proc, int]:
        p = Proc.new(k, "parent")
        await p("prctl", tcf="sync", include=0xFFFF)
        addr = await huge_map(p, hs, hs, prot=RWM)
        await p("stg", addr=addr, tag=3, size=64)
        await p("store", addr=addr, tag=3, data=b"parent")
        return p, addr

    async def test_child_write_copies_the_folio_with_its_tags(self):
        """A child's write gets its own folio carrying the parent's tags; the parent's data and tags stay."""
        k = Kernel()
        p, addr = await self._parent(k)
        c = await p.fork("child")
        assert p.page(addr) is c.page(addr)
        await c("stg", addr=addr + 64, tag=5, size=16)
        await c("store", addr=addr, tag=3, data=b"CHILD!")
        assert c.page(addr) is not p.page(addr) and c.page(addr).folio is not p.page(addr).folio
        assert (await c("load", addr=addr, tag=3, size=6)).value == b"CHILD!"
        assert (await p("load", addr=addr, tag=3, size=6)).value == b"parent"
        assert await c.tags(addr, 80) == [3, 3, 3, 3, 5]
        assert await p.tags(addr, 80) == [3, 3, 3, 3, 0]
        assert c.page(addr).folio.flags & PG_mte_tagged
        assert invariants(k) == [] and k.oracle.violations == [] and k.warnings == []

    async def test_parent_write_copies_and_the_child_keeps_the_old_folio(self):
        """After fork the parent's write copies too; the child then owns the old folio alone and reuses it."""
        k = Kernel()
        p, addr = await self._parent(k)
        c = await p.fork("child")
        old = p.page(addr).folio
        await p("store", addr=addr + 8, tag=3, data=b"P2")
        assert p.page(addr).folio is not old and c.page(addr).folio is old
        await c("store", addr=addr + 8, tag=3, data=b"C2")
        assert c.page(addr).folio is old  # exclusive now: hugetlb_wp reuses it
        assert (await p("load", addr=addr + 8, tag=3, size=2)).value == b"P2"
        assert (await c("load", addr=addr + 8, tag=3, size=2)).value == b"C2"
        assert await p.tags(addr, 64) == [3, 3, 3, 3] and await c.tags(addr, 64) == [3, 3, 3, 3]
        assert invariants(k) == [] and k.oracle.violations == []

    async def test_64k_and_exit_free_the_copies(self):
        """A 64 KiB private mapping CoWs the same way, and both folios are freed when the processes exit."""
        k = Kernel()
        p, addr = await self._parent(k, K64)
        c = await p.fork("child")
        await c("store", addr=addr + PAGE, tag=0, data=b"c")
        assert len(c.page(addr).folio.subpages) == 16 and c.page(addr).folio is not p.page(addr).folio
        before = k.alloc.allocated
        await do_exit(k, c.task)
        await do_exit(k, p.task)
        assert k.alloc.allocated == before - 32
        assert invariants(k) == []
