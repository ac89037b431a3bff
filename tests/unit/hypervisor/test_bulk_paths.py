"""Bulk copies under the free scheduler (COPY_TAGS, load, store): run-based there, the same results and every
per-page scheduling point under a controlled scheduler."""

from __future__ import annotations

import pytest
from support import RW, RWM, Proc, Vm, expect_errno, invariants, run_once

from hypervisor.arm64.mte_lock import PG_mte_tagged
from hypervisor.kernel import Kernel
from hypervisor.sched import FreeScheduler

PAGE = 4096
IPA = 0x4000_0000
NPAGES = 8
PATTERN = bytes((i * 7 + 3) % 256 for i in range(NPAGES * 256))  # high bits set too: the copy keeps 4 of 8


async def _vm(k: Kernel, *, touched: range = range(NPAGES), backing: str = "anon") -> Vm:
    """An MTE VM with NPAGES of guest RAM; the guest writes data and tag 6 to the pages in ``touched``."""
    vm = await Vm.create(k, name="vmm:bulk")
    await vm.ram(0, IPA, NPAGES * PAGE, backing=backing, prot=RW)
    for i in touched:
        await vm.store(IPA + i * PAGE, bytes([i + 1]) * 100)
        await vm.stg(IPA + i * PAGE, PAGE, tag=6)
    return vm


def _labels(trace) -> list[str]:
    return [e.label for e in trace]


class TestFreeRunsMatchThePerPagePath:
    @pytest.mark.parametrize("backing", ["anon", "memfd"])
    async def test_from_guest_dump_is_the_same_and_faults_untouched_pages_in(self, backing):
        """A free-scheduler dump over touched and untouched pages returns what the guest wrote, faults the
        untouched pages in (the zero page for anon), and takes far fewer points than pages."""
        k = Kernel()
        vm = await _vm(k, touched=range(0, NPAGES, 2), backing=backing)
        before = k.sched.points
        r = await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=True)
        assert r["length"] == NPAGES * PAGE
        assert r["tags"] == b"".join(bytes([6 if i % 2 == 0 else 0]) * 256 for i in range(NPAGES))
        assert all(vm.vmm.pte(vm.kvm.memslots[0].hva((IPA >> 12) + i)) is not None for i in range(NPAGES))
        points = k.sched.points - before
        warm = k.sched.points
        assert (await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=True))["tags"] == r["tags"]
        assert k.sched.points - warm <= 2 < points  # present now: one run, one point
        assert invariants(k) == []

    async def test_to_guest_masks_and_publishes_every_page(self):
        """A free-scheduler TO_GUEST run writes the low nibble of each byte, flags every page tagged, and a dump
        reads the same back; pages not yet present are faulted in for writing."""
        k = Kernel()
        vm = await _vm(k, touched=range(0, 3))
        r = await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=False, tags=PATTERN)
        assert r["length"] == NPAGES * PAGE
        want = PATTERN.translate(bytes(b & 0xF for b in range(256)))
        assert (await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=True))["tags"] == want
        assert all(vm.page(IPA + i * PAGE).flags & PG_mte_tagged for i in range(3))
        assert await vm.ldg(IPA + 5 * PAGE, 32) == list(want[5 * 256:5 * 256 + 2])
        assert invariants(k) == []

    async def test_short_buffer_and_hole_stop_where_the_per_page_path_does(self):
        """A TO_GUEST buffer ending mid-page returns the whole pages done; a dump running off the memslot
        returns the pages before the hole; a dump starting in the hole is EFAULT."""
        k = Kernel()
        vm = await _vm(k)
        r = await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=False, tags=PATTERN[:3 * 256 + 10])
        assert r["length"] == 3 * PAGE
        r = await vm.copy_tags(IPA + 4 * PAGE, 8 * PAGE, from_guest=True)
        assert r["length"] == 4 * PAGE and len(r["tags"]) == 4 * 256
        await expect_errno("EFAULT", vm.copy_tags(IPA + NPAGES * PAGE, PAGE, from_guest=True))

    async def test_a_lost_tag_is_still_reported_by_the_dump(self):
        """A tag changed behind the ghost's back is reported (TAGS-AS-WRITTEN) by a run-based dump's read."""
        k = Kernel()
        vm = await _vm(k)
        page = vm.page(IPA + 3 * PAGE)
        page.tags[7] = 2
        page.shadow[7] = 2  # LAST-TAG-WRITTEN cannot see it: only the end-to-end ghost can
        await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=True)
        page.tags[7] = page.shadow[7] = 6  # repaired: only the read saw it
        assert invariants(k) == ["TAGS-AS-WRITTEN"]
        assert "COPY_TAGS FROM_GUEST read tags" in k.oracle.violations[-1].message

    async def test_load_and_store_of_many_pages(self):
        """A 16-page store then load through the VMM's mapping round-trips, zero pages included, with one point."""
        k = Kernel()
        p = Proc.new(k, "vmm")
        addr = await p("mmap", size=16 * PAGE, prot=RWM)
        data = bytes(range(256)) * 16 * 8 + bytes(8 * PAGE)  # eight pages of data, eight of zeros
        await p("store", addr=addr, data=data)
        before = k.sched.points
        assert (await p("load", addr=addr, tag=0, size=16 * PAGE)).value == data
        assert k.sched.points - before == 1
        assert (await p("load", addr=addr + 100, tag=0, size=PAGE)).value == data[100:100 + PAGE]
        assert invariants(k) == []


class TestControlledRunsKeepEveryPoint:
    async def test_copy_tags_load_and_store_take_their_per_page_points(self):
        """Under a controlled scheduler a multi-page COPY_TAGS (both ways), load and store still park at every
        per-page point (the run-based paths are the free scheduler's only)."""
        async def setup(k):
            vm = await _vm(k, touched=range(0, NPAGES, 2))
            p = Proc.new(k, "p")
            addr = await p("mmap", size=NPAGES * PAGE, prot=RWM)

            async def dump(k, st):
                await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=True)

            async def restore(k, st):
                await vm.copy_tags(IPA, NPAGES * PAGE, from_guest=False, tags=PATTERN)

            async def store_load(k, st):
                await p("store", addr=addr, data=bytes([1]) * NPAGES * PAGE)
                await p("load", addr=addr, tag=0, size=NPAGES * PAGE)

            return None, {"a-dump": dump, "b-restore": restore, "c-access": store_load}

        run, trace = await run_once(setup)
        assert run.failure is None
        by = {a: _labels(e for e in trace if e.actor == a) for a in ("a-dump", "b-restore", "c-access")}
        assert by["a-dump"].count("kvm_vm_ioctl_mte_copy_tags:page") == NPAGES
        assert by["b-restore"].count("kvm_vm_ioctl_mte_copy_tags:page") == NPAGES
        assert by["b-restore"].count("kvm_vm_ioctl_mte_copy_tags:copy") == NPAGES
        assert by["b-restore"].count("try_page_mte_tagging:test") == NPAGES
        assert by["a-dump"].count("handle_mm_fault") == NPAGES  # every page goes through GUP's fault path
        assert by["c-access"].count("handle_mm_fault") == NPAGES  # the store faults every page in
        assert by["c-access"].count("uaccess") == 2


async def test_the_free_scheduler_yields_once_per_slice():
    """The free scheduler counts every point but yields to trio only when its time slice has run out."""
    sched = FreeScheduler()
    for _ in range(1000):
        await sched.point("x")
    assert sched.points == 1000
    assert 1 <= sched.yields < 100  # a yield per point would be 1000
