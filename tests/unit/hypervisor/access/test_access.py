"""Tag-checked user accesses: load/store/STG/LDG/IRG, TCF modes, TCO (hypervisor/access/user.py).

The checks follow the Arm ARM and arch/arm64/kernel/mte.c: only loads and
stores through a Normal-Tagged PTE are checked, per 16-byte granule; SYNC
suppresses the access and reports its address; ASYNC performs it and reports
later; ASYMM is sync for reads and async for writes; the mode a thread really
runs in is ``mte_update_sctlr_user``'s resolution of the request against the
per-CPU preference; PSTATE.TCO disables checks; STG/LDG never check.
"""

from __future__ import annotations

import pytest
from support import RW, RWM, Proc, expect_errno, invariants

from hypervisor.arm64.mte import (
    MTE_CTRL_TCF_ASYMM,
    MTE_CTRL_TCF_ASYNC,
    MTE_CTRL_TCF_SYNC,
    MteCtrl,
    mte_update_sctlr_user,
)
from hypervisor.kernel import Kernel
from shared.mte import tagged_pointer

PAGE = 4096


async def setup(tcf: str | None = "sync", *, preferred: str = "async", prot=RWM, pages: int = 1):
    """A process with ``pages`` of memory whose first two granules are tagged 3 and 4, the rest 3."""
    k = Kernel(tcf_preferred=preferred)
    p = Proc.new(k, "A")
    if tcf is not None:
        await p("prctl", tcf=tcf, include=0xFFFE)
    base = await p("mmap", size=pages * PAGE, prot=prot)
    await p("stg", addr=base, tag=3, size=pages * PAGE)
    await p("stg", addr=base + 16, tag=4, size=16)
    return k, p, base


class TestGranuleChecks:
    """Which granules an access is checked against, and the fault address."""

    async def test_matching_tag_passes(self):
        """A load and a store whose pointer tag matches every granule they touch raise nothing."""
        k, p, base = await setup()
        r = await p("store", addr=tagged_pointer(base + 32, 3), data=b"abcdefgh")
        assert r.fault is None
        r = await p("load", addr=tagged_pointer(base + 32, 3), size=8)
        assert r == type(r)(b"abcdefgh", None)

    async def test_access_spanning_two_granules_is_checked_against_both(self):
        """An 8-byte access over granules tagged 3|4 faults whichever single tag the pointer carries."""
        k, p, base = await setup()
        for tag in (3, 4):
            r = await p("load", addr=tagged_pointer(base + 12, tag), size=8)
            assert r.fault is not None and r.fault["kind"] == "tag-check-fault", tag

    async def test_fault_address_is_the_first_byte_of_the_first_mismatching_granule(self):
        """Tag 3 over granules 3|4: the fault is reported at the start of granule 1 (base+16)."""
        k, p, base = await setup()
        r = await p("load", addr=tagged_pointer(base, 3), size=48)
        assert r.fault["addr"] == base + 16
        assert r.fault["pointer_tag"] == 3 and r.fault["memory_tag"] == 4

    async def test_fault_address_of_an_aligned_first_granule_mismatch(self):
        """Tag 4 from base: granule 0 (tag 3) mismatches first, reported at base."""
        k, p, base = await setup()
        r = await p("store", addr=tagged_pointer(base, 4), data=bytes(40))
        assert r.fault["addr"] == base

    async def test_fault_address_is_never_before_the_access(self):
        """An access starting mid-granule in a mismatching granule reports its own first byte, not the granule's."""
        k, p, base = await setup()
        r = await p("load", addr=tagged_pointer(base + 20, 3), size=4)
        assert r.fault["addr"] == base + 20

    async def test_access_across_a_page_boundary_checks_both_pages(self):
        """A load across two pages faults on the second page's first granule when only it mismatches."""
        k, p, base = await setup(pages=2)
        await p("stg", addr=base + PAGE, tag=9, size=16)
        r = await p("load", addr=tagged_pointer(base + PAGE - 16, 3), size=32)
        assert r.fault["addr"] == base + PAGE and r.fault["memory_tag"] == 9

    async def test_only_tagged_pages_are_checked(self):
        """An access spanning a PROT_MTE page and a plain page is checked only on the PROT_MTE one."""
        k = Kernel()
        p = Proc.new(k, "A")
        await p("prctl", tcf="sync")
        base = await p("mmap", size=2 * PAGE, prot=RWM)
        await p("mmap", addr=base + PAGE, size=PAGE, prot=RW)
        r = await p("load", addr=tagged_pointer(base + PAGE - 16, 0), size=32)
        assert r.fault is None
        r = await p("load", addr=tagged_pointer(base + PAGE - 16, 5), size=32)
        assert r.fault["addr"] == base + PAGE - 16

    async def test_untouched_page_is_checked_against_zero_tags(self):
        """A read of a never-written PROT_MTE page (the zero page) is checked against tag 0."""
        k = Kernel()
        p = Proc.new(k, "A")
        await p("prctl", tcf="sync")
        base = await p("mmap", size=PAGE, prot=RWM)
        assert (await p("load", addr=base, size=8)).fault is None
        r = await p("load", addr=tagged_pointer(base + 64, 2), size=8)
        assert r.fault["addr"] == base + 64 and r.fault["memory_tag"] == 0

    async def test_explicit_tag_argument_is_the_pointer_tag(self):
        """The ``tag`` argument stands for bits 59:56 of the pointer."""
        k, p, base = await setup()
        assert (await p("load", addr=base + 32, tag=3, size=4)).fault is None
        assert (await p("load", addr=base + 32, tag=5, size=4)).fault is not None


class TestTcfModes:
    """SYNC, ASYNC, ASYMM, NONE: what happens to a mismatching access."""

    async def test_sync_store_is_suppressed(self):
        """Under SYNC a mismatching store is not performed: the data stays as it was."""
        k, p, base = await setup("sync")
        await p("store", addr=tagged_pointer(base, 3), data=b"old!")
        r = await p("store", addr=tagged_pointer(base, 7), data=b"new!")
        assert r.fault["kind"] == "tag-check-fault" and r.fault["addr"] == base
        assert (await p("load", addr=tagged_pointer(base, 3), size=4)).value == b"old!"
        assert p.task.tfsr == 0

    async def test_sync_load_returns_no_data(self):
        """Under SYNC a mismatching load delivers no value, only the fault."""
        k, p, base = await setup("sync")
        r = await p("load", addr=tagged_pointer(base, 7), size=4)
        assert r.value is None and r.fault["kind"] == "tag-check-fault"

    async def test_async_store_is_performed_and_reported(self):
        """Under ASYNC a mismatching store is performed, reported as async, and TFSR records it."""
        k, p, base = await setup("async")
        r = await p("store", addr=tagged_pointer(base, 7), data=b"new!")
        assert r.fault["kind"] == "async-tag-check-fault"
        assert p.task.tfsr == 1
        assert (await p("load", addr=tagged_pointer(base, 3), size=4)).value == b"new!"

    async def test_async_load_returns_data_and_reports(self):
        """Under ASYNC a mismatching load returns the data and reports an async fault."""
        k, p, base = await setup("async")
        await p("store", addr=tagged_pointer(base, 3), data=b"val")
        r = await p("load", addr=tagged_pointer(base, 7), size=3)
        assert r.value == b"val" and r.fault["kind"] == "async-tag-check-fault"

    async def test_asymm_reads_sync_writes_async(self):
        """With the CPU preferring asymm, an asymm thread's reads fault synchronously and writes asynchronously."""
        k, p, base = await setup("asymm", preferred="asymm")
        r = await p("load", addr=tagged_pointer(base, 7), size=4)
        assert r.value is None and r.fault["kind"] == "tag-check-fault"
        r = await p("store", addr=tagged_pointer(base, 7), data=b"wxyz")
        assert r.fault["kind"] == "async-tag-check-fault"
        assert (await p("load", addr=tagged_pointer(base, 3), size=4)).value == b"wxyz"

    async def test_asymm_request_runs_async_with_default_preference(self):
        """With the default preference (async), a prctl asymm request (sync|async) runs async, reads included."""
        k, p, base = await setup("asymm")
        assert (await p("prctl-get"))["tcf"] == "asymm"
        await p("store", addr=tagged_pointer(base, 3), data=b"abc")
        r = await p("load", addr=tagged_pointer(base, 7), size=3)
        assert r.value == b"abc" and r.fault["kind"] == "async-tag-check-fault"

    async def test_asymm_request_runs_sync_with_sync_preference(self):
        """With the CPU preferring sync, a sync|async request runs sync: writes are suppressed too."""
        k, p, base = await setup("asymm", preferred="sync")
        r = await p("store", addr=tagged_pointer(base, 7), data=b"abc")
        assert r.fault["kind"] == "tag-check-fault"

    async def test_sync_request_stays_sync_whatever_the_preference(self):
        """A thread that asks only for sync runs sync even when the CPU prefers async or asymm."""
        for pref in ("async", "asymm"):
            k, p, base = await setup("sync", preferred=pref)
            r = await p("store", addr=tagged_pointer(base, 7), data=b"abc")
            assert r.fault["kind"] == "tag-check-fault", pref

    async def test_tcf_none_checks_nothing(self):
        """With TCF none (the state after execve) nothing is checked."""
        k, p, base = await setup(None)
        r = await p("store", addr=tagged_pointer(base, 7), data=b"abc")
        assert r.fault is None
        await p("prctl", tcf="sync")
        await p("prctl", tcf="none")
        assert (await p("load", addr=tagged_pointer(base, 7), size=3)).fault is None

    @pytest.mark.parametrize("request_bits,pref,expected", [
        (0, "async", "none"),
        (MTE_CTRL_TCF_SYNC, "async", "sync"),
        (MTE_CTRL_TCF_ASYNC, "sync", "async"),
        (MTE_CTRL_TCF_SYNC | MTE_CTRL_TCF_ASYNC | MTE_CTRL_TCF_ASYMM, "async", "async"),
        (MTE_CTRL_TCF_SYNC | MTE_CTRL_TCF_ASYNC | MTE_CTRL_TCF_ASYMM, "sync", "sync"),
        (MTE_CTRL_TCF_SYNC | MTE_CTRL_TCF_ASYNC | MTE_CTRL_TCF_ASYMM, "asymm", "asymm"),
        (MTE_CTRL_TCF_SYNC, "asymm", "sync"),
        (MTE_CTRL_TCF_ASYNC, "asymm", "async"),
    ])
    def test_mte_update_sctlr_user_resolution(self, request_bits, pref, expected):
        """resolved = (mte_ctrl & pref) ? pref : mte_ctrl, then ASYMM > ASYNC > SYNC."""
        assert mte_update_sctlr_user(MteCtrl(tcf=request_bits), pref) == expected

    async def test_prctl_asymm_sets_the_asymm_bit(self):
        """set_mte_ctrl: requesting sync|async also sets MTE_CTRL_TCF_ASYMM."""
        k = Kernel()
        p = Proc.new(k, "A")
        await p("prctl", tcf="asymm")
        assert p.task.mte_ctrl.tcf == MTE_CTRL_TCF_SYNC | MTE_CTRL_TCF_ASYNC | MTE_CTRL_TCF_ASYMM


class TestTco:
    """PSTATE.TCO: tag check override."""

    async def test_tco_disables_checks(self):
        """With TCO set a mismatching load and store succeed silently; clearing it restores the checks."""
        k, p, base = await setup("sync")
        await p("tco", on=True)
        assert (await p("store", addr=tagged_pointer(base, 7), data=b"tco")) .fault is None
        r = await p("load", addr=tagged_pointer(base, 7), size=3)
        assert r.value == b"tco" and r.fault is None
        await p("tco", on=False)
        assert (await p("load", addr=tagged_pointer(base, 7), size=3)).fault is not None

    async def test_tco_does_not_change_tags(self):
        """TCO only skips checks: STG still writes and LDG still reads the allocation tags."""
        k, p, base = await setup("sync")
        await p("tco", on=True)
        await p("stg", addr=base, tag=12, size=16)
        assert await p.tags(base, 32) == [12, 4]


class TestStgLdg:
    """STG and LDG never check; memory that is not Normal-Tagged is RAZ/WI."""

    async def test_stg_never_checks(self):
        """Under SYNC, STG with any pointer tag over memory with other tags succeeds."""
        k, p, base = await setup("sync")
        r = await p("stg", addr=tagged_pointer(base, 11), size=32)
        assert r.fault is None
        assert await p.tags(base, 48) == [11, 11, 3]

    async def test_ldg_never_checks(self):
        """Under SYNC, LDG through a pointer with a mismatching tag returns the allocation tags."""
        k, p, base = await setup("sync")
        r = await p("ldg", addr=tagged_pointer(base, 9), size=32)
        assert r.fault is None and r.value == [3, 4]

    async def test_ldg_aligns_down_and_rounds_up(self):
        """LDG aligns the address down to its granule and rounds the size up to whole granules."""
        k, p, base = await setup()
        assert await p.tags(base + 20, 12) == [4]
        assert await p.tags(base + 16, 20) == [4, 3]
        assert await p.tags(base, 0) == []

    async def test_ldg_on_a_non_mte_mapping_reads_zeros(self):
        """LDG on a mapping without PROT_MTE reads zeros although the frame holds nonzero stale tags."""
        k = Kernel()
        p = Proc.new(k, "A")
        base = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=base, data=b"x")
        assert any(p.page(base).tags)
        assert await p.tags(base, PAGE) == [0] * 256

    async def test_stg_on_a_non_mte_mapping_is_ignored(self):
        """STG on a mapping without PROT_MTE leaves tag memory untouched and LDG still reads zeros."""
        k = Kernel()
        p = Proc.new(k, "A")
        base = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=base, data=b"x")
        before = bytes(p.page(base).tags)
        await p("stg", addr=base, tag=5, size=PAGE)
        assert bytes(p.page(base).tags) == before
        assert await p.tags(base, 16) == [0]
        assert invariants(k) == []

    async def test_stg_unaligned_address_is_sigbus(self):
        """STG at an address that is not 16-byte aligned raises SIGBUS (EFAULT)."""
        k, p, base = await setup()
        err = await expect_errno("EFAULT", p("stg", addr=base + 8, tag=1, size=16))
        assert "SIGBUS" in err.message

    async def test_stg_partial_granule_size_is_einval(self):
        """STG over a size that is not a whole number of granules is rejected with EINVAL."""
        k, p, base = await setup()
        await expect_errno("EINVAL", p("stg", addr=base, tag=1, size=24))

    async def test_stg_on_read_only_mapping_is_segv(self):
        """STG is a write: on a read-only PROT_MTE mapping it raises SIGSEGV (EFAULT)."""
        k = Kernel()
        p = Proc.new(k, "A")
        base = await p("mmap", size=PAGE, prot=["read", "mte"])
        await expect_errno("EFAULT", p("stg", addr=base, tag=1, size=16))

    async def test_access_to_unmapped_memory_is_segv(self):
        """A load from an address with no mapping raises SIGSEGV (EFAULT)."""
        k = Kernel()
        p = Proc.new(k, "A")
        err = await expect_errno("EFAULT", p("load", addr=0x10_0000_0000, size=1))
        assert "SEGV_MAPERR" in err.message

    async def test_write_to_read_only_mapping_is_segv(self):
        """A store to a read-only mapping raises SIGSEGV (EFAULT) and changes nothing."""
        k = Kernel()
        p = Proc.new(k, "A")
        base = await p("mmap", size=PAGE, prot=["read"])
        err = await expect_errno("EFAULT", p("store", addr=base, data=b"x"))
        assert "SEGV_ACCERR" in err.message


class TestLdgRange:
    async def test_unaligned_ldg_covers_every_granule_touched(self):
        """LDG over [base+20, +16) touches granules 1 and 2, so it returns both their tags."""
        k, p, base = await setup()
        await p("stg", addr=base + 16, tag=3, size=16)
        await p("stg", addr=base + 32, tag=4, size=16)
        assert (await p("ldg", addr=base + 20, size=16)).value == [3, 4]

    async def test_ldg_of_zero_bytes_is_empty(self):
        """LDG of size 0 returns no tags."""
        k, p, base = await setup()
        assert (await p("ldg", addr=base + 20, size=0)).value == []
