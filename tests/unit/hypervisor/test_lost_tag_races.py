"""Five lost-tag races, each driven deterministically: the fixed model keeps the tag, and the
old ordering (a private test-only switch in the module that had it) loses it and fires
TAGS-AS-WRITTEN, which no other invariant reports for these losses (the frame's shadow moves
with the frame, so LAST-TAG-WRITTEN and SWAP-ROUND-TRIP see nothing wrong).

1. host STG racing swap-out (tags saved before the unmap, a scheduling point between);
2. a second faulter taking the page from the swap cache before the reader restored its tags;
3. PTRACE_POKEMTETAGS holding no page reference across its scheduling point, racing reclaim;
4. migration copying before it checks for extra references, racing COPY_TAGS TO_GUEST;
5. guest STG (through KVM) racing swap-out of the VMM's page.
"""

from __future__ import annotations

import pytest
from support import RWM, Proc, Vm, explore_bounded, frame_problems, invariants, phases, run_once

import hypervisor.mm.memory
import hypervisor.mm.migrate
import hypervisor.mm.swap
import hypervisor.ptrace
from hypervisor.kernel import Kernel
from hypervisor.syscalls import host_migrate_pages, host_swap_out
from shared.mte import HPAGE_SIZE

PAGE = 4096
RAM = 0x4000_0000
OLD, NEW = 5, 9


@pytest.fixture
def old_order(monkeypatch):
    """Switch one module back to its old ordering for one test."""

    def switch(module, name: str = "_OLD_ORDERING") -> None:
        monkeypatch.setattr(module, name, True)

    return switch


def violated(run) -> list[str]:
    """The invariants the run broke (state checked now)."""
    assert run.failure is None, run.failure
    return invariants(run.k)


async def tagged_page(k: Kernel, name: str = "P", session: str | None = None):
    """A process with one private PROT_MTE page holding data and tag OLD."""
    p = Proc.new(k, name, session)
    addr = await p("mmap", size=PAGE, prot=RWM)
    await p("store", addr=addr, data=b"payload")
    await p("stg", addr=addr, tag=OLD, size=PAGE)
    return p, addr


# ---- 1. host STG vs swap-out ---------------------------------------------------------

def stg_vs_swap_out():
    async def setup(k):
        p, addr = await tagged_page(k)

        async def writer(k, st):
            await p("stg", addr=addr, tag=NEW, size=PAGE)

        async def reclaim(k, st):
            await host_swap_out(k, p.pid, addr, PAGE)

        return {"p": p, "addr": addr}, {"r": reclaim, "w": writer}

    return setup


class TestStgVsSwapOut:
    """Race 1: a tag store between reclaim's tag save and its unmap."""

    async def test_fixed_model_keeps_the_tag(self):
        """With the tags saved after the unmap, a store that lands before the unmap is saved with the page."""
        run, _ = await run_once(stg_vs_swap_out(), policy=phases(("r", "add_to_swap"), ("w", None), ("r", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        st = run.state
        assert st["p"].pte(st["addr"]).swap is not None  # it really was swapped out
        assert await st["p"].tags(st["addr"], PAGE) == [NEW] * 256
        assert invariants(run.k) == []

    async def test_fixed_model_every_interleaving(self):
        """Under every interleaving with up to two preemptions the page ends with the stored tag, nothing broken."""
        runs = await explore_bounded(stg_vs_swap_out(), preemptions=2)
        assert len(runs) > 3
        for run in runs:
            assert violated(run) == []
            assert await run.state["p"].tags(run.state["addr"], PAGE) == [NEW] * 256

    async def test_old_ordering_fires_tags_as_written(self, old_order):
        """Saving before the unmap loses the store, and only TAGS-AS-WRITTEN says so."""
        old_order(hypervisor.mm.swap)
        run, _ = await run_once(stg_vs_swap_out(), policy=phases(("r", "add_to_swap"), ("w", None), ("r", None)))
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}
        st = run.state
        assert await st["p"].tags(st["addr"], PAGE) == [OLD] * 256  # the store is gone


# ---- 2. a second faulter takes the page from the swap cache ---------------------------

def two_faulters():
    async def setup(k):
        p, addr = await tagged_page(k)
        c = await p.fork("C")
        assert await host_swap_out(k, p.pid, addr, PAGE) == 1
        assert p.pte(addr).swap is not None and c.pte(addr).swap == p.pte(addr).swap
        st = {"p": p, "c": c, "addr": addr}

        async def reader(k, st):
            st["a"] = await p.tags(addr, 16)

        async def second(k, st):
            st["b"] = await c.tags(addr, 16)

        return st, {"a": reader, "b": second}

    return setup


class TestSwapInSecondFaulter:
    """Race 2: the faulter that finds the page in the swap cache maps it before its tags are restored."""

    async def test_fixed_model_restores_for_every_faulter(self):
        """The second faulter restores the tags itself before mapping: both processes read OLD."""
        run, _ = await run_once(two_faulters(), policy=phases(("a", "swap_read_folio"), ("b", None), ("a", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        assert run.state["a"] == run.state["b"] == [OLD]

    async def test_fixed_model_every_interleaving(self):
        """Under every interleaving with up to two preemptions both faulters read the swapped-out tags."""
        runs = await explore_bounded(two_faulters(), preemptions=2)
        assert len(runs) > 3
        for run in runs:
            assert violated(run) == []
            assert run.state["a"] == run.state["b"] == [OLD]

    async def test_old_ordering_fires_tags_as_written(self, old_order):
        """Restoring only in the reader lets the second faulter publish zero tags: TAGS-AS-WRITTEN."""
        old_order(hypervisor.mm.swap, "_OLD_SWAPIN")
        run, _ = await run_once(two_faulters(), policy=phases(("a", "swap_read_folio"), ("b", None), ("a", None)))
        assert run.state["b"] == [0]  # the child read zeros where it had OLD
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}


# ---- 3. PTRACE_POKEMTETAGS vs reclaim --------------------------------------------------

def poke_vs_reclaim():
    async def setup(k):
        p, addr = await tagged_page(k)
        t = Proc.new(k, "T", session=p.task.session)

        async def tracer(k, st):
            st["poked"] = await t("ptrace-poke-tags", target=p.pid, addr=addr, tags=[NEW] * 256)

        async def reclaim(k, st):
            st["swapped"] = await host_swap_out(k, p.pid, addr, PAGE)

        return {"p": p, "addr": addr}, {"r": reclaim, "t": tracer}

    return setup


class TestPokeVsReclaim:
    """Race 3: reclaim frees the frame ptrace found, before the poke lands."""

    async def test_fixed_model_holds_the_page(self):
        """GUP's reference makes reclaim give up on the page; the poke lands where the process sees it."""
        run, _ = await run_once(poke_vs_reclaim(), policy=phases(("t", "access_remote_tags"), ("r", None),
                                                                  ("t", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        assert run.state["swapped"] == 0 and run.state["poked"] == 256
        assert await run.state["p"].tags(run.state["addr"], PAGE) == [NEW] * 256

    async def test_fixed_model_every_interleaving(self):
        """Under every interleaving with up to two preemptions the poked tags are what the process reads."""
        runs = await explore_bounded(poke_vs_reclaim(), preemptions=2)
        assert len(runs) > 3
        for run in runs:
            assert violated(run) == []
            assert await run.state["p"].tags(run.state["addr"], PAGE) == [NEW] * 256

    async def test_old_ordering_fires_tags_as_written(self, old_order):
        """Without the reference the poke lands in a freed frame: the process reads OLD, TAGS-AS-WRITTEN fires."""
        old_order(hypervisor.ptrace)
        run, _ = await run_once(poke_vs_reclaim(), policy=phases(("t", "access_remote_tags"), ("r", None),
                                                                  ("t", None)))
        assert run.state["swapped"] == 1 and run.state["poked"] == 256
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}
        assert await run.state["p"].tags(run.state["addr"], PAGE) == [OLD] * 256


# ---- 4. migration vs COPY_TAGS TO_GUEST -------------------------------------------------

def copy_tags_vs_migration():
    async def setup(k):
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE)
        await vm.store(RAM, b"guest data")
        await vm.stg(RAM, PAGE, OLD)

        async def vmm(k, st):
            st["copied"] = await vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes([NEW]) * 256)

        async def migrate(k, st):
            st["moved"] = await host_migrate_pages(k, vm.vmm.pid, hva, PAGE)

        return {"vm": vm, "hva": hva}, {"c": vmm, "m": migrate}

    return setup


PLAN4 = (("c", "kvm_vm_ioctl_mte_copy_tags:copy"), ("m", "migrate:copied"), ("c", None), ("m", None))


class TestCopyTagsVsMigration:
    """Race 4: COPY_TAGS TO_GUEST finishes between migration's copy and its reference freeze."""

    async def test_fixed_model_gives_up_before_copying(self):
        """Migration sees COPY_TAGS' reference before it copies and backs off; the guest reads the new tags."""
        run, _ = await run_once(copy_tags_vs_migration(), policy=phases(*PLAN4))
        assert violated(run) == [] and frame_problems(run.k) == []
        assert run.state["moved"] == 0 and run.state["copied"]["length"] == PAGE
        assert await run.state["vm"].ldg(RAM, PAGE) == [NEW] * 256

    async def test_fixed_model_every_interleaving(self):
        """Under every interleaving with up to two preemptions the guest reads what COPY_TAGS wrote."""
        runs = await explore_bounded(copy_tags_vs_migration(), preemptions=2)
        assert len(runs) > 3
        for run in runs:
            assert violated(run) == []
            assert await run.state["vm"].ldg(RAM, PAGE) == [NEW] * 256

    async def test_old_ordering_fires_tags_as_written(self, old_order):
        """Copying before the reference check moves the old tags to the new frame: TAGS-AS-WRITTEN."""
        old_order(hypervisor.mm.migrate)
        run, _ = await run_once(copy_tags_vs_migration(), policy=phases(*PLAN4))
        assert run.state["moved"] == 1 and run.state["copied"]["length"] == PAGE
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}
        assert await run.state["vm"].ldg(RAM, PAGE) == [OLD] * 256


# ---- 5. guest STG vs swap-out of the VMM's page -------------------------------------------

def guest_stg_vs_swap_out():
    async def setup(k):
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE)
        await vm.store(RAM, b"guest data")
        await vm.stg(RAM, PAGE, OLD)

        async def guest(k, st):
            await vm.stg(RAM, PAGE, NEW)

        async def reclaim(k, st):
            st["swapped"] = await host_swap_out(k, vm.vmm.pid, hva, PAGE)

        return {"vm": vm, "hva": hva}, {"g": guest, "r": reclaim}

    return setup


class TestGuestStgVsSwapOut:
    """Race 5: the same reclaim ordering, the store coming from a vCPU through stage 2."""

    async def test_fixed_model_keeps_the_guest_tag(self):
        """The guest's store before the unmap (and its MMU notifier) is saved with the page."""
        run, _ = await run_once(guest_stg_vs_swap_out(), policy=phases(("r", "add_to_swap"), ("g", None),
                                                                        ("r", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        assert run.state["swapped"] == 1
        assert await run.state["vm"].ldg(RAM, PAGE) == [NEW] * 256

    async def test_fixed_model_every_interleaving(self):
        """Under every interleaving with up to two preemptions the guest reads the tag it stored."""
        runs = await explore_bounded(guest_stg_vs_swap_out(), preemptions=2)
        assert len(runs) > 3
        for run in runs:
            assert violated(run) == []
            assert await run.state["vm"].ldg(RAM, PAGE) == [NEW] * 256

    async def test_old_ordering_fires_tags_as_written(self, old_order):
        """Saving before the unmap loses the guest's store: TAGS-AS-WRITTEN, keyed through the memslot."""
        old_order(hypervisor.mm.swap)
        run, _ = await run_once(guest_stg_vs_swap_out(), policy=phases(("r", "add_to_swap"), ("g", None),
                                                                        ("r", None)))
        assert run.state["swapped"] == 1
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}
        assert await run.state["vm"].ldg(RAM, PAGE) == [OLD] * 256


# ---- hugetlb: a scheduling point between the folio tag lock and the clear ----------------

def two_hugetlb_faulters():
    async def setup(k):
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)
        am = await a("mmap", size=HPAGE_SIZE, prot=RWM, share="shared", backing="hugetlb", object="h")
        bm = await b("mmap", size=HPAGE_SIZE, prot=RWM, share="shared", backing="hugetlb", object="h")
        st = {}

        async def first(k, st):
            st["a"] = await a.tags(am, 16)

        async def second(k, st):
            st["b"] = await b.tags(bm + PAGE, 16)

        return st, {"a": first, "b": second}

    return setup


PLAN_HUGE = (("a", "mte_sync_tags:hugetlb_won"), ("b", None), ("a", None))


class TestHugetlbTagLockPoint:
    """mte_sync_tags has a scheduling point between winning the hugetlb folio's tag lock and the clear."""

    async def test_flag_before_init_now_shows_on_hugetlb(self):
        """With flag-before-init, a second faulter maps the folio while the winner has not cleared it yet and reads
        stale tags."""
        run, _ = await run_once(two_hugetlb_faulters(), policy=phases(*PLAN_HUGE), bugs=("flag-before-init",))
        assert run.failure is None
        assert run.state["b"] != [0]  # the folio's boot garbage
        assert "NO-PUBLISH-BEFORE-VALID" in violated(run)

    async def test_fixed_model_waits_for_the_winner(self):
        """The fixed model's second faulter waits for PG_mte_tagged: both read zero, nothing is broken."""
        run, _ = await run_once(two_hugetlb_faulters(), policy=phases(*PLAN_HUGE))
        assert violated(run) == []
        assert run.state["a"] == run.state["b"] == [0]


# ---- found by the stress campaign with the ghost on: a fault maps the page during migration ---

def fault_during_migration(unmap: bool = False):
    """Q's shared memfd page is migrated while A (PROT_MTE) faults it in and tags it, then (``unmap``)
    unmaps it again: the shape of stress seed 971."""
    async def setup(k):
        q = Proc.new(k, "Q")
        a = Proc.new(k, "A", session=q.task.session)
        qm = await q("mmap", size=PAGE, prot=["read", "write"], share="shared", backing="memfd", object="m")
        await q("store", addr=qm, data=b"shared")
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        st = {"a": a, "q": q, "am": am, "qm": qm}

        async def tagger(k, st):
            await a("stg", addr=am, tag=NEW, size=PAGE)  # A's first touch: a fault through the page cache
            if unmap:
                await a("munmap", addr=am, size=PAGE)

        async def migrate(k, st):
            st["moved"] = await host_migrate_pages(k, q.pid, qm, PAGE)

        return st, {"a": tagger, "m": migrate}

    return setup


PLAN6 = (("m", "migrate:copied"), ("a", None), ("m", None))


class TestFaultDuringMigration:
    """A process faulting the shared page in from the page cache while migration has it unmapped."""

    async def test_fault_waits_for_the_folio_lock(self):
        """The fault waits for migration's folio lock, then maps the new folio: A and Q share it, with A's tags."""
        run, _ = await run_once(fault_during_migration(), policy=phases(*PLAN6))
        assert violated(run) == [] and frame_problems(run.k) == []
        st = run.state
        assert st["moved"] == 1
        assert st["a"].page(st["am"]) is st["q"].page(st["qm"])
        assert await st["a"].tags(st["am"], 16) == [NEW]

    async def test_without_the_folio_lock_a_mapping_made_and_dropped_in_the_window_loses_the_store(self,
                                                                                                  monkeypatch):
        """Stress seed 971: without the wait, A maps the old frame after the copy, tags it and unmaps it before
        the freeze, so migration moves on without the tags: TAGS-AS-WRITTEN."""
        monkeypatch.setattr(hypervisor.mm.memory, "_NO_FOLIO_LOCK", True)
        run, _ = await run_once(fault_during_migration(unmap=True), policy=phases(*PLAN6))
        assert run.state["moved"] == 1
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}

    async def test_the_folio_lock_keeps_that_store(self):
        """With the wait, the same race tags the new folio: Q's mapping of it holds A's tags."""
        run, _ = await run_once(fault_during_migration(unmap=True), policy=phases(*PLAN6))
        assert violated(run) == [] and frame_problems(run.k) == []
        st = run.state
        assert st["moved"] == 1
        page = st["q"].page(st["qm"])
        assert list(page.tags[:1]) == [NEW]


# ---- found by the ghost in a KVM stress run: a CoW copy installed over a reused PTE --------------

def cow_copy_vs_reuse():
    async def setup(k):
        p, addr = await tagged_page(k)
        c = await p.fork("C")
        st = {"p": p, "c": c, "addr": addr}

        async def copier(k, st):  # P's write fault while C still shares the page: the copy path
            await p("store", addr=addr, data=b"from a")

        async def child(k, st):  # C breaks CoW: P's page is P's alone again
            await c("store", addr=addr, data=b"child")

        async def reuser(k, st):  # P's second thread: its write fault reuses the now-exclusive page
            await p("stg", addr=addr, tag=NEW, size=PAGE)

        return st, {"a": copier, "b": reuser, "c": child}

    return setup


PLAN7 = (("a", "wp_page_copy:map"), ("c", None), ("b", None), ("a", None))


class TestCowCopyVsReuse:
    """do_wp_page: one faulter copies while another reuses the page once it became exclusive (pte_same)."""

    async def test_fixed_model_backs_off_the_stale_copy(self):
        """Reuse writes a new PTE, so the copier's pte_same check fails and it retries: P keeps the reuser's tags."""
        run, _ = await run_once(cow_copy_vs_reuse(), policy=phases(*PLAN7))
        assert violated(run) == [] and frame_problems(run.k) == []
        st = run.state
        assert await st["p"].tags(st["addr"], 16) == [NEW]
        assert (await st["p"]("load", addr=st["addr"], size=6)).value == b"from a"

    async def test_reuse_in_place_fires_tags_as_written(self, monkeypatch):
        """With the write bit set in place (the same PTE object), the stale copy replaces the page: TAGS-AS-WRITTEN."""
        import hypervisor.mm.memory

        monkeypatch.setattr(hypervisor.mm.memory, "_pte_mkwrite", _mkwrite_in_place)
        run, _ = await run_once(cow_copy_vs_reuse(), policy=phases(*PLAN7))
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}
        assert await run.state["p"].tags(run.state["addr"], 16) == [OLD]


def _mkwrite_in_place(mm, vpn, pte):
    """The old reuse: the write bit set on the PTE object a concurrent copier still compares against."""
    pte.write = True


# ---- hugetlb migration checks references too ------------------------------------------------

def poke_vs_hugetlb_migration():
    async def setup(k):
        p = Proc.new(k, "P")
        t = Proc.new(k, "T", session=p.task.session)
        addr = await p("mmap", size=HPAGE_SIZE, prot=RWM, backing="hugetlb")
        await p("stg", addr=addr + PAGE, tag=OLD, size=PAGE)

        async def tracer(k, st):
            await t("ptrace-poke-tags", target=p.pid, addr=addr + PAGE, tags=[NEW] * 256)

        async def migrate(k, st):
            st["moved"] = await host_migrate_pages(k, p.pid, addr, PAGE)

        return {"p": p, "addr": addr}, {"m": migrate, "t": tracer}

    return setup


PLAN8 = (("t", "access_remote_tags"), ("m", "migrate:copied"), ("t", None), ("m", None))


class TestPokeVsHugetlbMigration:
    """Race 4 on a hugetlb folio: a GUP holder of one subpage writes while the folio migrates."""

    async def test_fixed_model_gives_up(self):
        """Every subpage's count is checked, so ptrace's reference on one makes the migration back off."""
        run, _ = await run_once(poke_vs_hugetlb_migration(), policy=phases(*PLAN8))
        assert violated(run) == [] and frame_problems(run.k) == []
        assert run.state["moved"] == 0
        assert await run.state["p"].tags(run.state["addr"] + PAGE, 16) == [NEW]

    async def test_unchecked_hugetlb_fires_tags_as_written(self, monkeypatch):
        """Skipping the check for hugetlb (the old code) moves the old tags and loses the poke: TAGS-AS-WRITTEN."""
        monkeypatch.setattr(hypervisor.mm.migrate, "_refs_unexpected",
                            lambda old: not old.is_hugetlb and (old.busy() or old.mapcount > 0))
        run, _ = await run_once(poke_vs_hugetlb_migration(), policy=phases(*PLAN8))
        assert run.state["moved"] == 1
        assert set(violated(run)) == {"TAGS-AS-WRITTEN"}
        assert await run.state["p"].tags(run.state["addr"] + PAGE, 16) == [OLD]


# ---- found by the ghost in a KVM + hugetlb stress run: MAP_PRIVATE|MAP_HUGETLB after fork --------

class TestPrivateHugetlbAfterFork:
    """A MAP_PRIVATE|MAP_HUGETLB page first faulted after fork belongs to the faulting process alone."""

    async def test_child_writes_stay_in_the_child(self):
        """The child's tags and data on a huge page the parent never touched do not reach the parent."""
        k = Kernel()
        p = Proc.new(k, "P")
        addr = await p("mmap", size=HPAGE_SIZE, prot=RWM, backing="hugetlb")
        c = await p.fork("C")
        await c("stg", addr=addr, tag=NEW, size=PAGE)
        await c("store", addr=addr, tag=NEW, data=b"child")
        assert await p.tags(addr, 16) == [0]
        assert (await p("load", addr=addr, size=5)).value == bytes(5)
        assert await c.tags(addr, 16) == [NEW]
        assert p.page(addr).folio is not c.page(addr).folio
        assert invariants(k) == [] and frame_problems(k) == []

    async def test_a_page_mapped_before_fork_is_copied_on_write(self):
        """A huge page the parent mapped before fork is shared until the child writes, then copied with its tags."""
        k = Kernel()
        p = Proc.new(k, "P")
        addr = await p("mmap", size=HPAGE_SIZE, prot=RWM, backing="hugetlb")
        await p("stg", addr=addr, tag=OLD, size=PAGE)
        c = await p.fork("C")
        assert p.page(addr) is c.page(addr)
        await c("stg", addr=addr + 16, tag=NEW, size=16)
        assert await p.tags(addr, 32) == [OLD, OLD]
        assert await c.tags(addr, 32) == [OLD, NEW]
        assert invariants(k) == [] and frame_problems(k) == []

    async def test_dontneed_on_hugetlb_takes_whole_huge_pages(self):
        """MADV_DONTNEED on hugetlb: an unaligned start is EINVAL, a short length rounds down to nothing, a whole page
        reads fresh."""
        from support import expect_errno

        k = Kernel()
        p = Proc.new(k, "P")
        addr = await p("mmap", size=HPAGE_SIZE, prot=RWM, backing="hugetlb")
        await p("stg", addr=addr, tag=NEW, size=2 * PAGE)
        await expect_errno("EINVAL", p("madvise", addr=addr + PAGE, size=PAGE, advice="dontneed"))
        await p("madvise", addr=addr, size=PAGE, advice="dontneed")  # rounded down: nothing
        assert await p.tags(addr, 32) == [NEW, NEW] and await p.tags(addr + PAGE, 16) == [NEW]
        await p("madvise", addr=addr, size=HPAGE_SIZE, advice="dontneed")
        assert await p.tags(addr, 16) == [0] and await p.tags(addr + PAGE, 16) == [0]
        assert invariants(k) == [] and frame_problems(k) == []

    async def test_migrating_an_anonymous_hugetlb_folio_leaks_nothing(self):
        """A private hugetlb folio migrates with its tags, and is freed once its last mapping goes."""
        k = Kernel()
        p = Proc.new(k, "P")
        addr = await p("mmap", size=HPAGE_SIZE, prot=RWM, backing="hugetlb")
        await p("stg", addr=addr + PAGE, tag=NEW, size=PAGE)
        old = p.page(addr).folio
        assert await host_migrate_pages(k, p.pid, addr, PAGE) == 1
        assert p.page(addr).folio is not old and old.free
        assert await p.tags(addr + PAGE, 16) == [NEW]
        assert invariants(k) == [] and frame_problems(k) == []
        await p("munmap", addr=addr, size=HPAGE_SIZE)
        assert k.alloc.allocated == 0 and frame_problems(k) == []
