"""KVM races under controlled interleavings (reference 2.3(b), 2.3(e), 4.4 locking, section 5).

Each scenario runs two kernel contexts over one page. The smaller ones are
checked under every interleaving (:func:`support.explore`); the larger
ones, whose full trees run to tens of thousands of schedules, under every
interleaving with at most two or three preemptions
(:func:`support.explore_bounded`; each race below needs one), plus a
batch of seeded random, unbounded schedules. The fixed model must keep the
invariants in all of them, and the bug-zoo switch that reintroduces each race
must break them in at least one:

* VMM STG through a PROT_MTE view vs the guest's first fault (sanitise):
  ``no-tag-lock`` loses the VMM's tags (EXCLUSIVE-INIT, PRESERVE-ON-MAP,
  LAST-TAG-WRITTEN).
* Guest first fault vs the VMM mapping a file over that page:
  ``mte-allowed-outside-lock`` reads a freed VMA (VMA-USE-AFTER-FREE); in
  both models the guest never maps the file page (MTE-VM MEMORY IS
  TAG-CAPABLE).
* COPY_TAGS TO_GUEST vs the guest's first fault: the restored tags survive.
* Dirty-log enable vs COPY_TAGS TO_GUEST: EBUSY, or the copy landed before
  logging; the log is never incomplete (``copy-tags-during-dirty-log``
  breaks it).
* KVM_ENABLE_CAP vs an AArch32 vCPU: exactly one of them fails (CAP BEFORE
  VCPUS).
* Two vCPUs' first faults on one hugetlb folio: clean for 2 MiB blocks; for
  64 KiB (4 KiB stage-2 mappings) the loser reads stale tags in every
  interleaving (finding 3), and ``sanitise-whole-hugetlb-folio`` makes every
  interleaving clean.
"""

from __future__ import annotations

import random

import attrs
import pytest
from support import RWM, Vm, explore, explore_bounded, run_once

from hypervisor.arm64.mte_lock import PG_mte_tagged
from hypervisor.arm64.tags import ZERO_TAGS
from shared.errno import KernelError

PAGE = 4096
RAM = 0x4000_0000
VMM_TAG = 9
PATTERN = bytes((i * 3 + 1) % 16 for i in range(256))
SEEDS = range(40)


@attrs.define
class St:
    """One scenario's handles and what its contexts saw."""

    vm: Vm
    hva: int = 0
    view: int = 0
    outcome: dict = attrs.Factory(dict)  # actor -> "ok" or an errno name
    seen: list = attrs.Factory(list)  # what a context observed (tags)
    other: object = None  # a second VM


def random_policy(seed: int):
    """A uniform random walk over the runnable contexts (ControlledScheduler's random policy), seeded."""
    rng = random.Random(seed)
    return lambda runnable: rng.choice(runnable)


async def all_runs(setup, *, bugs=(), preemptions: int | None = 2, seeds=SEEDS):
    """The runs to check: every interleaving (``preemptions=None``) or the bounded-exhaustive ones plus one
    random unbounded run per seed."""
    if preemptions is None:
        return await explore(setup, bugs=bugs)
    runs = await explore_bounded(setup, preemptions=preemptions, bugs=bugs)
    for seed in seeds:
        run, _ = await run_once(setup, policy=random_policy(seed), bugs=bugs)
        runs.append(run)
    return runs


def violations(run) -> set[str]:
    return {v.invariant for v in run.k.oracle.check_state()}


async def record(st: St, actor: str, coro) -> None:
    try:
        await coro
        st.outcome[actor] = "ok"
    except KernelError as exc:
        st.outcome[actor] = exc.name


# ---- scenario 1: VMM STG through a PROT_MTE view vs the guest's first fault ------------


def vmm_stg_vs_guest_fault(same_mapping: bool):
    """The VMM stores tags through a PROT_MTE mapping of memfd guest RAM while the guest first touches the page.

    ``same_mapping``: the memslot is that PROT_MTE mapping; otherwise the memslot
    is a second, untagged view of the same memfd (as QEMU maps guest RAM).
    """

    async def setup(k):
        vm = await Vm.create(k)
        view = await vm.map(PAGE, backing="memfd", object="ram", prot=RWM)
        hva = view if same_mapping else await vm.map(PAGE, backing="memfd", object="ram")
        await vm.slot(0, RAM, PAGE, hva)
        st = St(vm, hva, view)

        async def vmm(k, st):
            await record(st, "vmm", vm.vmm("stg", addr=view, tag=VMM_TAG, size=PAGE))

        async def guest(k, st):
            try:
                st.seen = await vm.ldg(RAM, 16)  # the first touch: a read fault
                st.outcome["guest"] = "ok"
            except KernelError as exc:
                st.outcome["guest"] = exc.name

        return st, {"guest": guest, "vmm": vmm}

    return setup


def vmm_tags_lost(run) -> bool:
    page = run.state.vm.vmm.page(run.state.view)
    return bytes(page.tags) != bytes([VMM_TAG]) * 256


class TestVmmStgVsGuestFault:
    """Race 2.3(b), KVM form: sanitise_mte_tags and mte_sync_tags initialise the same page."""

    @pytest.mark.parametrize("same_mapping", [False, True])
    async def test_fixed_model_never_loses_the_vmms_tags(self, same_mapping):
        """In every explored interleaving the VMM's tags survive, the page is initialised once, no invariant breaks."""
        runs = await all_runs(vmm_stg_vs_guest_fault(same_mapping))
        assert len(runs) > 100
        for run in runs:
            assert run.failure is None, run.failure
            st = run.state
            assert st.outcome == {"guest": "ok", "vmm": "ok"}
            assert not vmm_tags_lost(run)
            page = st.vm.vmm.page(st.view)
            assert page.flags & PG_mte_tagged and page.inits == 1
            assert st.vm.page(RAM) is page
            assert violations(run) == set()
        # not vacuous: the guest initialised first (and saw zeros) in some runs, after the VMM's STG in others
        assert {tuple(r.state.seen) for r in runs} == {(0,), (VMM_TAG,)}

    @pytest.mark.parametrize("same_mapping", [False, True])
    async def test_no_tag_lock_loses_the_vmms_tags(self, same_mapping):
        """With ``no-tag-lock`` some interleaving lets sanitise zero the VMM's tags, and the oracle reports it."""
        runs = await explore_bounded(vmm_stg_vs_guest_fault(same_mapping), bugs=["no-tag-lock"],
                                     until=vmm_tags_lost)
        run = runs[-1]
        assert vmm_tags_lost(run)
        assert bytes(run.state.vm.vmm.page(run.state.view).tags) == ZERO_TAGS
        assert {"EXCLUSIVE-INIT", "PRESERVE-ON-MAP", "LAST-TAG-WRITTEN"} <= violations(run)

    @staticmethod
    def two_vms_on_one_memfd():
        """Two VMMs (one session) back their VMs with the same memfd; guest A STGs its page, guest B reads it."""

        async def setup(k):
            a = await Vm.create(k, name="vmm-a")
            b = await Vm.create(k, name="vmm-b", session=a.vmm.task.session)  # may open a's memfd
            await a.ram(0, RAM, PAGE, backing="memfd", object="shared-ram")
            await b.ram(0, RAM, PAGE, backing="memfd", object="shared-ram")
            st = St(a, other=b)

            async def guest_a(k, st):
                await a.stg(RAM, PAGE, VMM_TAG)  # its first touch: a write fault, then the tag store

            async def guest_b(k, st):
                await b.load(RAM, 8)  # its first touch: a read fault on the same frame

            return st, {"a": guest_a, "b": guest_b}

        return setup

    @staticmethod
    def a_tags_lost(run) -> bool:
        return bytes(run.state.vm.page(RAM).tags) != bytes([VMM_TAG]) * 256

    async def test_two_vms_sharing_memfd_ram_keep_the_first_guests_tags(self):
        """Two VMs on one memfd page: whatever the interleaving of both first faults, guest A's tags survive."""
        runs = await all_runs(self.two_vms_on_one_memfd(), seeds=range(10))
        for r in runs:
            assert r.failure is None, r.failure
            assert r.state.other.page(RAM) is r.state.vm.page(RAM)  # one frame, two stage 2s
            assert not self.a_tags_lost(r)
            assert r.state.vm.page(RAM).inits == 1
            assert violations(r) == set()

    async def test_two_vms_sharing_memfd_ram_lose_tags_with_no_tag_lock(self):
        """With ``no-tag-lock`` guest B's sanitise can zero the tags guest A already stored in the shared page."""
        runs = await explore_bounded(self.two_vms_on_one_memfd(), bugs=["no-tag-lock"], until=self.a_tags_lost)
        assert self.a_tags_lost(runs[-1])
        assert {"EXCLUSIVE-INIT", "PRESERVE-ON-MAP"} <= violations(runs[-1])


# ---- scenario 2: guest first fault vs MAP_FIXED of a file over that page ---------------


def guest_fault_vs_map_fixed_file():
    """The guest's first store to a page while the VMM maps a regular file over it (MAP_FIXED)."""

    async def setup(k):
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 2 * PAGE)
        st = St(vm, hva)

        async def vmm(k, st):
            await record(st, "vmm", vm.map(PAGE, backing="file", addr=hva))

        async def guest(k, st):
            await record(st, "guest", vm.store(RAM, b"guest"))

        return st, {"guest": guest, "vmm": vmm}

    return setup


class TestGuestFaultVsMapFixedFile:
    """Race 2.3(e): user_mem_abort must sample VM_MTE_ALLOWED under mmap_lock."""

    @staticmethod
    def assert_never_maps_the_file_page(runs) -> None:
        outcomes = set()
        for run in runs:
            assert run.failure is None, run.failure
            st = run.state
            assert st.outcome["vmm"] == "ok"
            assert st.outcome["guest"] in ("ok", "EFAULT")
            outcomes.add(st.outcome["guest"])
            assert st.vm.s2(RAM) is None  # whatever was mapped before MAP_FIXED was invalidated
            file_vma = st.vm.vmm.vma(st.hva)
            assert file_vma.backing == "file"
            # the file page was never sanitised either: the fault re-checks mmu_invalidate_seq before sanitising
            assert not any(p.flags & PG_mte_tagged for p in file_vma.obj.pages.values())
            assert not ({"MTE-VM-MEMORY-IS-TAG-CAPABLE", "STAGE-2-COHERENT", "GUEST-VISIBLE-IMPLIES-TAGGED"}
                        & violations(run))
        assert outcomes == {"ok", "EFAULT"}  # the guest won the race in some runs and lost it in others

    async def test_fixed_model_never_maps_the_file_page_nor_reads_a_freed_vma(self):
        """In every interleaving: no stage-2 entry over the file page, and no VMA-USE-AFTER-FREE (nor any report)."""
        runs = await all_runs(guest_fault_vs_map_fixed_file(), preemptions=None)
        assert len(runs) > 100
        self.assert_never_maps_the_file_page(runs)
        for run in runs:
            assert violations(run) == set()

    async def test_mte_allowed_outside_lock_reads_a_freed_vma_but_still_never_maps_the_file(self):
        """With ``mte-allowed-outside-lock`` some interleaving reads the freed VMA (KASAN's report); the retry
        after the MMU notifier still keeps the file page out of stage 2."""
        runs = await all_runs(guest_fault_vs_map_fixed_file(), bugs=["mte-allowed-outside-lock"], preemptions=None)
        self.assert_never_maps_the_file_page(runs)
        uaf = [r for r in runs if "VMA-USE-AFTER-FREE" in violations(r)]
        assert uaf and len(uaf) < len(runs)
        for run in uaf:
            assert run.state.outcome["guest"] == "EFAULT"  # the retry then finds the file VMA
            msg = next(v.message for v in run.k.oracle.violations if v.invariant == "VMA-USE-AFTER-FREE")
            assert "user_mem_abort" in msg


# ---- scenario 3: COPY_TAGS TO_GUEST vs the guest's first fault -----------------------------


def copy_to_guest_vs_guest_fault(backing: str):
    """COPY_TAGS TO_GUEST of one page while the guest first touches it (then reads one tag)."""

    async def setup(k):
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, PAGE, backing=backing)
        st = St(vm, hva)

        async def vmm(k, st):
            await record(st, "vmm", vm.copy_tags(RAM, PAGE, from_guest=False, tags=PATTERN))

        async def guest(k, st):
            # memfd: a read fault maps the page-cache page; anon needs a write (a read maps the zero page)
            await record(st, "guest", vm.store(RAM + 100, b"g") if backing == "anon" else vm.load(RAM, 8))
            st.seen = await vm.ldg(RAM, 16)

        return st, {"guest": guest, "vmm": vmm}

    return setup


def restored_tags_lost(run) -> bool:
    return bytes(run.state.vm.vmm.page(run.state.hva).tags) != PATTERN


class TestCopyToGuestVsGuestFault:
    """Migration restore racing the guest's first touch: PG_mte_lock orders them, the copy's tags win."""

    @pytest.mark.parametrize("backing", ["memfd", "anon"])
    async def test_restored_tags_survive_every_interleaving(self, backing):
        """Whichever initialises first, the page ends with the restored tags, tagged, with no invariant broken."""
        runs = await all_runs(copy_to_guest_vs_guest_fault(backing), preemptions=3)
        assert len(runs) > 100
        for run in runs:
            assert run.failure is None, run.failure
            st = run.state
            assert st.outcome == {"guest": "ok", "vmm": "ok"}
            page = st.vm.vmm.page(st.hva)
            assert bytes(page.tags) == PATTERN and page.flags & PG_mte_tagged
            assert st.vm.page(RAM) is page
            assert violations(run) == set()
        # not vacuous: the guest saw zeros (its sanitise, before the copy) in some runs, the copy's tag in others
        assert {tuple(r.state.seen) for r in runs} == {(0,), (PATTERN[0],)}

    async def test_no_tag_lock_lets_sanitise_wipe_restored_tags(self):
        """With ``no-tag-lock`` the guest's sanitise can zero tags the copy already restored."""
        runs = await explore_bounded(copy_to_guest_vs_guest_fault("memfd"), bugs=["no-tag-lock"],
                                     until=restored_tags_lost)
        run = runs[-1]
        assert restored_tags_lost(run) and bytes(run.state.vm.vmm.page(run.state.hva).tags) == ZERO_TAGS
        assert "PRESERVE-ON-MAP" in violations(run)


# ---- scenario 4: enabling dirty logging vs COPY_TAGS TO_GUEST -----------------------------


def enable_log_vs_copy_to_guest():
    """The VMM turns dirty logging on (then reads the log) while another thread restores a page's tags."""

    async def setup(k):
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 2 * PAGE)
        st = St(vm, hva)

        async def log(k, st):
            await record(st, "log", vm.slot(0, RAM, 2 * PAGE, hva, flags=["log-dirty-pages"]))
            st.outcome["first-get"] = await vm("kvm-get-dirty-log", slot=0)

        async def copy(k, st):
            await record(st, "copy", vm.copy_tags(RAM + PAGE, PAGE, from_guest=False, tags=PATTERN))

        return st, {"copy": copy, "log": log}

    return setup


async def final_log(run) -> list[int]:
    """The VMM's KVM_GET_DIRTY_LOG once both contexts are done (checks DIRTY-LOG-COMPLETE again)."""
    return await run.state.vm("kvm-get-dirty-log", slot=0)


class TestEnableLogVsCopyToGuest:
    """TO_GUEST and the start of dirty logging both take slots_lock: EBUSY, or the copy came first."""

    async def test_either_ebusy_or_the_copy_landed_before_logging(self):
        """In every interleaving the copy is EBUSY (tags untouched) or done before logging; the log is complete."""
        runs = await all_runs(enable_log_vs_copy_to_guest(), preemptions=None)
        seen = set()
        for run in runs:
            assert run.failure is None, run.failure
            st = run.state
            assert st.outcome["log"] == "ok"
            assert st.outcome["copy"] in ("ok", "EBUSY")
            seen.add(st.outcome["copy"])
            page_tagged = run.k.page_flags(st.vm.vmm.pid, st.hva + PAGE)["tagged"]
            if st.outcome["copy"] == "ok":
                assert page_tagged and bytes(st.vm.vmm.page(st.hva + PAGE).tags) == PATTERN
            else:
                assert not page_tagged
            assert await final_log(run) == []
            assert "DIRTY-LOG-COMPLETE" not in {v.invariant for v in run.k.oracle.violations}
            assert violations(run) == set()
        assert seen == {"ok", "EBUSY"}

    async def test_copy_tags_during_dirty_log_bug_leaves_the_log_incomplete(self):
        """With ``copy-tags-during-dirty-log`` some interleaving copies after logging started: DIRTY-LOG-COMPLETE."""
        runs = await all_runs(enable_log_vs_copy_to_guest(), bugs=["copy-tags-during-dirty-log"], preemptions=None)
        broken = []
        for run in runs:
            assert run.state.outcome["copy"] == "ok"
            await final_log(run)
            if "DIRTY-LOG-COMPLETE" in {v.invariant for v in run.k.oracle.violations}:
                broken.append(run)
        assert broken and len(broken) < len(runs)


# ---- scenario 5: KVM_ENABLE_CAP vs an AArch32 vCPU -----------------------------------------


def enable_cap_vs_aarch32_vcpu():
    """One VMM thread enables MTE while another creates an AArch32 vCPU."""

    async def setup(k):
        vm = await Vm.create(k, mte=False, vcpu=False)
        st = St(vm)

        async def cap(k, st):
            await record(st, "cap", vm("kvm-enable-cap", cap="arm-mte"))

        async def vcpu(k, st):
            await record(st, "vcpu", vm("kvm-create-vcpu", aarch32=True))

        return st, {"cap": cap, "vcpu": vcpu}

    return setup


class TestEnableCapVsAarch32Vcpu:
    """Invariant 17 under concurrency: created_vcpus and kvm_has_mte are both read under kvm->lock's ordering."""

    async def test_never_both_mte_and_an_aarch32_vcpu(self):
        """In every interleaving exactly one of the two ioctls fails with EINVAL, and CAP-BEFORE-VCPUS never fires."""
        runs = await all_runs(enable_cap_vs_aarch32_vcpu(), preemptions=None)
        seen = set()
        for run in runs:
            assert run.failure is None, run.failure
            o = run.state.outcome
            assert sorted(o.values()) == ["EINVAL", "ok"], o
            seen.add(o["cap"])
            kvm = run.state.vm.kvm
            assert kvm.mte_enabled == (o["cap"] == "ok")
            assert kvm.created_vcpus == 1
            assert violations(run) == set()
        assert seen == {"ok", "EINVAL"}


# ---- scenario 6: two vCPUs' first faults on one hugetlb folio (finding 3 under concurrency) -------------


def two_vcpus_fault_one_hugetlb_folio(hs: int, fixes=()):
    """vCPU 0 and vCPU 1 first touch two different pages of one hugetlb folio of ``hs`` bytes (an LDG each)."""

    async def setup(k):
        k.fixes = frozenset(fixes)  # the host's kernel-fixes (run_once boots a default kernel)
        vm = await Vm.create(k)
        await vm.add_vcpu()
        hva = await vm.vmm("mmap", size=hs, prot=["read", "write"], share="private", backing="hugetlb",
                           hugepage_size=hs)
        await vm.slot(0, RAM, hs, hva)
        st = St(vm, hva)
        st.seen = [None, None]

        async def cpu(n):
            async def body(k, st):
                st.seen[n] = await vm.ldg(RAM + (hs - PAGE) * n, 16, vcpu=n)
            return body

        return st, {"cpu0": await cpu(0), "cpu1": await cpu(1)}

    return setup


class TestTwoVcpusFaultOneHugetlbFolio:
    """The folio's tag lock orders two first faults; what the loser maps depends on what the winner cleared."""

    async def test_2m_block_mappings_are_clean_in_every_interleaving(self):
        """2 MiB maps whole blocks: whichever vCPU wins clears the folio, the other waits, both read zeros."""
        runs = await all_runs(two_vcpus_fault_one_hugetlb_folio(2 << 20), preemptions=2, seeds=range(10))
        assert len(runs) > 10
        for run in runs:
            assert run.failure is None, run.failure
            assert run.state.seen == [[0], [0]]
            assert violations(run) == set()

    async def test_64k_loser_sees_stale_tags_in_every_interleaving(self):
        """64 KiB maps 4 KiB per fault: the winner clears only its page and flags the folio, so the other vCPU
        reads stale tags whatever the order (finding 3 needs no race)."""
        runs = await all_runs(two_vcpus_fault_one_hugetlb_folio(64 << 10), preemptions=2, seeds=range(10))
        for run in runs:
            assert run.failure is None, run.failure
            assert sorted(bool(s[0]) for s in run.state.seen) == [False, True]
            assert {"NO-PUBLISH-BEFORE-VALID", "LAST-TAG-WRITTEN"} <= violations(run) | {
                v.invariant for v in run.k.oracle.violations}

    async def test_64k_with_the_fix_is_clean_in_every_interleaving(self):
        """With sanitise-whole-hugetlb-folio the winner clears all 16 pages: both vCPUs read zeros, nothing breaks."""
        runs = await all_runs(two_vcpus_fault_one_hugetlb_folio(64 << 10, ("sanitise-whole-hugetlb-folio",)),
                              preemptions=2, seeds=range(10))
        assert len(runs) > 10
        for run in runs:
            assert run.failure is None, run.failure
            assert run.state.seen == [[0], [0]]
            assert violations(run) == set() and run.k.oracle.violations == []
