"""The free scheduler's fault-around for writes (do_anonymous_page_run): the page-by-page state, fewer points; a
controlled scheduler keeps every per-page fault."""

from __future__ import annotations

import pytest
from support import RW, RWM, Proc, Vm, expect_errno, invariants, run_once

from hypervisor.access import user
from hypervisor.kernel import Kernel
from hypervisor.kvm import copy_tags as copy_tags_mod
from hypervisor.mm.memory import do_anonymous_page_run

PAGE = 4096
NPAGES = 16


def _per_page_only(monkeypatch) -> None:
    """Turn the run off: every empty PTE takes handle_mm_fault, as under a controlled scheduler."""
    async def nothing(k, mm, vpn, nr, *, locked=False):
        return 0
    monkeypatch.setattr(user, "do_anonymous_page_run", nothing)
    monkeypatch.setattr(copy_tags_mod, "do_anonymous_page_run", nothing)


def _state(k: Kernel, p: Proc, addr: int) -> dict:
    """Everything a fault leaves behind for the mapping's pages, without object identities."""
    mm = p.task.mm
    out: dict = {"allocated": k.alloc.allocated, "warnings": list(k.warnings)}
    for i in range(NPAGES):
        vpn = (addr >> 12) + i
        pte = mm.pt.get(vpn)
        if pte is None:
            out[i] = None
            continue
        pg = pte.page
        out[i] = dict(write=pte.write, tagged=pte.tagged, special=pte.special, swap=pte.swap,
                      zero=pg is k.alloc.zero_page, pfn=pg.pfn, flags=pg.flags, refcount=pg.refcount,
                      mapcount=pg.mapcount, rmap=sorted(v for _m, v in pg.rmap), tags=bytes(pg.tags),
                      shadow=None if pg.shadow is None else bytes(pg.shadow), initialiser=pg.initialiser,
                      inits=pg.inits, data=None if pg.data is None else bytes(pg.data))
    ghost = k.oracle.ghost.spaces.get(mm, {})
    out["ghost"] = {v - (addr >> 12): (e.tags, e.data) for v, e in ghost.items()}
    return out


async def _scenario(k: Kernel, prot: list[str]) -> tuple[Proc, int]:
    """Stores across 16 fresh pages of which one was written and one read (the zero page) before."""
    p = Proc.new(k, "vmm")
    addr = await p("mmap", size=NPAGES * PAGE, prot=prot)
    await p("store", addr=addr + 5 * PAGE, data=b"x" * 10)
    await p("load", addr=addr + 9 * PAGE, tag=0, size=8)
    await p("store", addr=addr + 100, data=bytes(range(256)) * 40)  # starts mid-page, ends mid-page 10
    await p("store", addr=addr + 12 * PAGE, data=b"y" * (4 * PAGE))
    return p, addr


class TestTheRunIsThePageByPagePath:
    @pytest.mark.parametrize(("prot", "mte"), [(RWM, True), (RW, True), (RWM, False)])
    async def test_same_ptes_flags_references_tags_and_ghost(self, monkeypatch, prot, mte):
        """Stores into fresh anonymous pages leave the same PTEs, page flags, references, rmap, tags, shadow,
        initialiser counts and ghost entries with the run as page by page, in fewer scheduling points."""
        bulk = Kernel(mte=mte)
        p, addr = await _scenario(bulk, prot)
        got, bulk_points = _state(bulk, p, addr), bulk.sched.points
        assert invariants(bulk) == []
        with monkeypatch.context() as m:
            _per_page_only(m)
            slow = Kernel(mte=mte)
            q, addr2 = await _scenario(slow, prot)
        assert addr2 == addr
        assert got == _state(slow, q, addr2)
        assert bulk_points < slow.sched.points

    async def test_out_of_memory_midway_maps_what_fits_then_enomem(self, monkeypatch):
        """When RAM runs out inside a run, the pages that fit are mapped and the store fails with ENOMEM, as
        page by page."""
        async def fill(k):
            p = Proc.new(k, "vmm")
            addr = await p("mmap", size=NPAGES * PAGE, prot=RWM)
            while k.alloc.nr_frames - k.alloc.allocated > 6:
                k.alloc.alloc_page()  # leave six frames
            await expect_errno("ENOMEM", p("store", addr=addr, data=bytes(NPAGES * PAGE)))
            return _state(k, p, addr)
        bulk = await fill(Kernel(ram=1 << 20))
        with monkeypatch.context() as m:
            _per_page_only(m)
            slow = await fill(Kernel(ram=1 << 20))
        assert bulk == slow
        assert sum(1 for i in range(NPAGES) if bulk[i] is not None) == 6

    @pytest.mark.parametrize("bug", ["no-tag-lock", "flag-before-init"])
    async def test_tag_lock_bugs_take_the_per_page_path(self, bug):
        """With a bug-zoo switch of the tag lock on, the run maps nothing (the per-page path models the bug)."""
        k = Kernel(bugs=[bug])
        p = Proc.new(k, "vmm")
        addr = await p("mmap", size=NPAGES * PAGE, prot=RWM)
        assert await do_anonymous_page_run(k, p.task.mm, addr >> 12, NPAGES) == 0
        assert p.task.mm.pt.get(addr >> 12) is None

    async def test_the_run_stops_at_a_present_page_and_the_vma_end(self):
        """A run maps the empty PTEs up to the first present page, and never past its VMA."""
        k = Kernel()
        p = Proc.new(k, "vmm")
        addr = await p("mmap", size=NPAGES * PAGE, prot=RWM)
        await p("store", addr=addr + 3 * PAGE, data=b"z")
        old = p.pte(addr + 3 * PAGE)
        assert await do_anonymous_page_run(k, p.task.mm, addr >> 12, NPAGES) == 3
        assert p.pte(addr + 3 * PAGE) is old
        assert await do_anonymous_page_run(k, p.task.mm, (addr >> 12) + 4, 100) == NPAGES - 4
        assert invariants(k) == []


async def test_copy_tags_to_guest_faults_untouched_pages_in_as_a_run(monkeypatch):
    """COPY_TAGS TO_GUEST over untouched guest pages leaves the state of the per-page fault path (new frames
    holding the written tags, PTEs, references, ghost), with fewer scheduling points."""
    async def restore(k):
        vm = await Vm.create(k, name="vmm:bulk")
        await vm.ram(0, 0x4000_0000, NPAGES * PAGE, prot=RWM)
        await vm.store(0x4000_0000 + 2 * PAGE, b"d" * 10)
        before = k.sched.points
        r = await vm.copy_tags(0x4000_0000, NPAGES * PAGE, from_guest=False, tags=bytes(range(16)) * NPAGES * 16)
        assert r["length"] == NPAGES * PAGE
        assert invariants(k) == []
        return _state(k, vm.vmm, vm.kvm.memslots[0].userspace_addr), k.sched.points - before

    bulk, bulk_points = await restore(Kernel())
    with monkeypatch.context() as m:
        _per_page_only(m)
        slow, slow_points = await restore(Kernel())
    assert bulk == slow
    assert bulk_points < slow_points


async def test_a_controlled_scheduler_faults_every_page():
    """Under a controlled scheduler a store into fresh pages takes handle_mm_fault and tag_clear_highpage's
    points for every page (no run)."""
    async def setup(k):
        p = Proc.new(k, "p")
        addr = await p("mmap", size=NPAGES * PAGE, prot=RWM)

        async def store(k, st):
            await p("store", addr=addr, data=bytes([1]) * NPAGES * PAGE)

        return None, {"a-store": store}

    run, trace = await run_once(setup)
    assert run.failure is None
    labels = [e.label for e in trace if e.actor == "a-store"]
    assert labels.count("handle_mm_fault") == NPAGES
    assert labels.count("tag_clear_highpage:clear") == NPAGES


def test_a_write_of_zeros_allocates_no_data():
    """A page without data stays without data after a write of zeros (whole or part, bytes or memoryview),
    and holds exactly what was written after any other write."""
    from hypervisor.page import Page

    page = Page(pfn=1, tags=bytearray(256))
    page.write(0, memoryview(bytes(2 * PAGE))[PAGE:])
    page.write(100, memoryview(bytes(50)))
    assert page.data is None
    page.write(0, memoryview(b"\0" * (PAGE - 1) + b"\1"))
    assert page.data == bytearray(PAGE - 1) + b"\1"
    other = Page(pfn=2, tags=bytearray(256))
    other.write(10, b"ab")
    assert other.data == bytearray(10) + b"ab" + bytearray(PAGE - 12)
