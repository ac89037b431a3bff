"""The failures `mtekvm stress` found on the fixed model (docs/concurrency.md, "fixed-model failures";
docs/findings.md), each driven by a scripted schedule (or every interleaving) that reproduces its shrunk scenario.

1. STAGE-2-COHERENT: a memslot deleted (or moved) while a stage-2 fault that looked it up is in flight;
2. TAGS-AS-WRITTEN: a CoW store on private hugetlb racing migration of the child's page;
3. TAGS-AS-WRITTEN: KVM_ARM_MTE_COPY_TAGS TO_GUEST racing the VMM's munmap of that page;
4. PRESERVE-ON-MAP: a stage-2 permission fault racing another vCPU's CoW of the same page (a model bug:
   the permission fault mapped the new frame without sanitising it, where Linux only relaxes the
   permissions of the entry it found).
"""

from __future__ import annotations

from support import RWM, Proc, Vm, explore_bounded, frame_problems, invariants, phases, run_once

from hypervisor.syscalls import host_migrate_pages
from shared.errno import KernelError

PAGE = 4096
RAM = 0x4000_0000
SLOT_SIZE = 0x10000


def violated(run) -> list[str]:
    """The invariants the run broke (state checked now)."""
    assert run.failure is None, run.failure
    return invariants(run.k)


# ---- 1. memslot deletion / move vs an in-flight stage-2 fault ---------------------------------------------


def fault_vs_slot_change(new_ipa: int | None):
    """The guest's LDG looks slot 0 up and parks in user_mem_abort; the VMM deletes (or moves) slot 0."""

    async def setup(k):
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, SLOT_SIZE, prot=RWM)

        async def guest(k, st):
            try:
                st["ldg"] = await vm.ldg(RAM, 16)
            except KernelError as exc:  # its retry finds the slot gone: the access is not RAM any more
                st["ldg"] = exc.name

        async def vmm(k, st):
            if new_ipa is None:
                await vm.slot(0, RAM, 0, hva)
            else:
                await vm.slot(0, new_ipa, SLOT_SIZE, hva)

        return {"vm": vm, "ldg": None}, {"g": guest, "v": vmm}

    return setup


class TestMemslotChangeVsStage2Fault:
    """Race 1: kvm_invalidate_memslot waits out the faults holding kvm->srcu before it zaps stage 2."""

    async def test_deleted_slot_leaves_no_mapping(self):
        """A fault that found slot 0 before its deletion finishes before the zap: no gfn stays mapped."""
        run, _ = await run_once(fault_vs_slot_change(None),
                                policy=phases(("g", "mmap_lock[vmm]:read_lock"), ("v", None), ("g", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        kvm = run.state["vm"].kvm
        assert kvm.memslots == {} and kvm.s2 == {}

    async def test_moved_slot_leaves_no_mapping_at_the_old_ipa(self):
        """A fault that found slot 0 at its old IPA before a move cannot map that IPA after the move."""
        run, _ = await run_once(fault_vs_slot_change(RAM + 0x100000),
                                policy=phases(("g", "mmap_lock[vmm]:read_lock"), ("v", None), ("g", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        kvm = run.state["vm"].kvm
        assert RAM >> 12 not in kvm.s2 and kvm.memslots[0].base_gfn == (RAM + 0x100000) >> 12


# ---- 2. a CoW store racing migration of the other sharer's page -------------------------------------------


def cow_store_vs_migration(hugepage_size: int | None):
    """P stores, forks C (the page is shared copy-on-write); the host migrates C's page while P stores again."""

    async def setup(k):
        p = Proc.new(k, "P")
        extra = {} if hugepage_size is None else {"backing": "hugetlb", "hugepage_size": hugepage_size}
        addr = await p("mmap", size=hugepage_size or PAGE, prot=RWM, share="private", **extra)
        await p("store", addr=addr, data=b"\xaa" * 64)
        c = await p.fork("C")

        async def migrate(k, st):
            st["moved"] = await host_migrate_pages(k, c.pid, addr, PAGE)

        async def store(k, st):
            await p("store", addr=addr, data=b"\xbb" * 16)

        return {"p": p, "c": c, "addr": addr}, {"h": migrate, "p": store}

    return setup


def _child_reads_parent_store(run) -> bool:
    """The child's page holds the parent's post-fork store (or an invariant broke)."""
    st = run.state
    page = st["c"].page(st["addr"])
    return run.failure is not None or invariants(run.k) != [] or bytes(page.data[:1]) == b"\xbb"


class TestCowStoreVsMigration:
    """Race 2: remove_migration_ptes() restores every sharer before a CoW fault may reuse the new folio."""

    async def test_anonymous_page(self):
        """No interleaving (one preemption) lets the parent's store reuse the migrated 4 KiB page the child maps."""
        runs = await explore_bounded(cow_store_vs_migration(None), preemptions=1, until=_child_reads_parent_store)
        assert not _child_reads_parent_store(runs[-1]), runs[-1].schedule
        assert frame_problems(runs[-1].k) == []

    async def test_hugetlb_folio(self):
        """No interleaving (one preemption) lets the parent's store reuse the migrated 64 KiB folio the child maps."""
        runs = await explore_bounded(cow_store_vs_migration(64 << 10), preemptions=1,
                                     until=_child_reads_parent_store)
        assert not _child_reads_parent_store(runs[-1]), runs[-1].schedule
        assert frame_problems(runs[-1].k) == []


# ---- 3. COPY_TAGS TO_GUEST vs the VMM's munmap of that page ------------------------------------------------


def copy_tags_vs_munmap(backing: str):
    """COPY_TAGS TO_GUEST holds the page (GUP) at its copy point while the VMM munmaps it."""

    async def setup(k):
        vm = await Vm.create(k)
        share = "shared" if backing == "memfd" else "private"
        hva = await vm.ram(0, RAM, 4 * PAGE, prot=RWM, backing=backing, share=share,
                           object="ram" if backing == "memfd" else None)
        await vm.stg(RAM, 64, 1)
        page = vm.page(RAM)

        async def copier(k, st):
            st["copied"] = await vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes([14]) * 256)

        async def unmapper(k, st):
            await vm.vmm("munmap", addr=hva, size=PAGE)

        return {"vm": vm, "page": page}, {"c": copier, "u": unmapper}

    return setup


class TestCopyTagsVsMunmap:
    """Race 3: the tags COPY_TAGS writes through its page reference land on the page it holds."""

    async def test_shared_memory_keeps_the_tags_written(self):
        """On memfd RAM the page stays in the page cache: the tags copied after the munmap are what it holds."""
        run, _ = await run_once(copy_tags_vs_munmap("memfd"),
                                policy=phases(("c", "kvm_vm_ioctl_mte_copy_tags:copy"), ("u", None), ("c", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        st = run.state
        assert st["copied"]["length"] == PAGE and st["vm"].vmm.vma(st["vm"].kvm.memslots[0].userspace_addr) is None
        assert bytes(st["page"].tags[:4]) == bytes([14]) * 4

    async def test_private_memory_drops_the_orphan(self):
        """On private anonymous RAM the page is an orphan once unmapped: the copy changes nothing anyone sees."""
        run, _ = await run_once(copy_tags_vs_munmap("anon"),
                                policy=phases(("c", "kvm_vm_ioctl_mte_copy_tags:copy"), ("u", None), ("c", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        assert run.state["copied"]["length"] == PAGE


# ---- 4. a stage-2 permission fault racing another vCPU's CoW of the same page --------------------------------


def perm_fault_vs_cow(k_unused=None):
    """The guest reads a page (stage 2 maps the zero page read-only), then two tag stores race on it: each
    takes a permission fault on that entry, and the first to CoW the host page invalidates it."""

    async def setup(k):
        vm = await Vm.create(k)
        await vm.ram(0, RAM, 4 * PAGE, prot=["read", "write"])
        assert await vm.ldg(RAM + PAGE, 16) == [0]
        assert vm.page(RAM + PAGE) is k.alloc.zero_page

        async def first(k, st):
            await vm.stg(RAM + PAGE, 64, 6)

        async def second(k, st):
            await vm.stg(RAM + PAGE, 64, 10)

        return {"vm": vm}, {"a": first, "b": second}

    return setup


def _lost_or_unsanitised(run) -> bool:
    return run.failure is not None or invariants(run.k) != []


class TestPermFaultVsCow:
    """Race 4: a permission fault only relaxes the entry it found; one an invalidation removed is -EAGAIN."""

    async def test_no_interleaving_maps_an_unsanitised_frame(self):
        """No interleaving (two preemptions) maps the CoW's new frame unsanitised or zeroes tags already stored."""
        runs = await explore_bounded(perm_fault_vs_cow(), preemptions=2, until=_lost_or_unsanitised)
        assert not _lost_or_unsanitised(runs[-1]), (runs[-1].schedule, invariants(runs[-1].k))
        assert frame_problems(runs[-1].k) == []

    async def test_the_fault_that_lost_its_entry_retries(self):
        """The shrunk failure: "a" takes a permission fault on the zero page's entry, "b" CoWs the page (which
        removes that entry) and parks in its own retried fault, then "a" goes on: it must fault again and
        sanitise the new frame itself, so "b" finds it initialised and clears no tag "a" stored."""
        run, _ = await run_once(perm_fault_vs_cow(),
                                policy=phases(("a", "mmap_lock[vmm]:read_lock"), ("b", "kvm_run:retry"),
                                              ("b", "mmap_lock[vmm]:read_lock"), ("a", None), ("b", None)))
        assert violated(run) == [] and frame_problems(run.k) == []
        vm = run.state["vm"]
        page = vm.page(RAM + PAGE)
        assert page is not run.k.alloc.zero_page and vm.s2(RAM + PAGE).writable
        assert list(page.tags[:4]) == [10, 10, 10, 10]  # "b" stored last
