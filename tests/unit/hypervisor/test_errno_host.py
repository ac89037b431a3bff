"""The errno table of reference section 7, for host processes (one test per applicable row).

Each test drives the syscall layer in-process (validated arguments, the same
handlers the server calls) and checks the errno Linux returns, plus a positive
control where the row's condition is absent.
"""

from __future__ import annotations

import pytest
from support import RW, RWM, Proc, expect_errno

from hypervisor.kernel import Kernel
from hypervisor.mm_types import VM_MTE, VM_MTE_ALLOWED
from shared.mte import tagged_pointer


def kernel_and_proc(**kw) -> tuple[Kernel, Proc]:
    k = Kernel(**kw)
    return k, Proc.new(k, "A")


class TestMmapProtMte:
    """mmap(PROT_MTE): arch_calc_vm_prot_bits / arch_calc_vm_flag_bits / arch_validate_flags."""

    @pytest.mark.parametrize("share", ["private", "shared"])
    async def test_prot_mte_on_regular_file_is_einval(self, share):
        """PROT_MTE on a regular-file mapping (no VM_MTE_ALLOWED) fails with EINVAL."""
        k, p = kernel_and_proc()
        await expect_errno("EINVAL", p("mmap", size=4096, prot=RWM, share=share, backing="file", object="f"))
        assert p.task.mm.vmas == []

    async def test_prot_mte_on_device_is_einval(self):
        """PROT_MTE on a device (PFNMAP) mapping fails with EINVAL."""
        k, p = kernel_and_proc()
        await expect_errno("EINVAL", p("mmap", size=4096, prot=RWM, share="shared", backing="device", object="d"))

    @pytest.mark.parametrize("backing,share", [("anon", "private"), ("anon-shared", "shared"),
                                               ("memfd", "shared"), ("shmem", "shared"), ("memfd", "private")])
    async def test_prot_mte_on_tag_capable_memory_sets_vm_mte(self, backing, share):
        """Anonymous, anon-shared, memfd and shmem mappings accept PROT_MTE and get VM_MTE|VM_MTE_ALLOWED."""
        k, p = kernel_and_proc()
        obj = None if backing in ("anon", "anon-shared") else "obj"
        addr = await p("mmap", size=8192, prot=RWM, share=share, backing=backing, object=obj)
        flags = p.vma(addr).flags
        assert flags & VM_MTE and flags & VM_MTE_ALLOWED

    async def test_file_without_prot_mte_is_fine_and_not_tag_capable(self):
        """A regular-file mapping without PROT_MTE succeeds, without VM_MTE_ALLOWED."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=4096, prot=RW, share="shared", backing="file", object="f")
        assert not p.vma(addr).flags & (VM_MTE | VM_MTE_ALLOWED)

    async def test_prot_mte_without_mte_cpu_is_silently_dropped(self):
        """On a CPU without MTE, mmap(PROT_MTE) succeeds but the VMA has no VM_MTE (nor VM_MTE_ALLOWED)."""
        k, p = kernel_and_proc(mte=False)
        addr = await p("mmap", size=4096, prot=RWM)
        assert not p.vma(addr).flags & (VM_MTE | VM_MTE_ALLOWED)
        # and memory behaves untagged: stores through any pointer tag work, LDG reads zeros
        r = await p("store", addr=tagged_pointer(addr, 9), data=b"x" * 32)
        assert r.fault is None
        assert await p.tags(addr, 64) == [0, 0, 0, 0]

    async def test_prot_mte_on_file_without_mte_cpu_is_also_dropped(self):
        """Without MTE the PROT_MTE bit is dropped before validation, so even a file mapping succeeds."""
        k, p = kernel_and_proc(mte=False)
        addr = await p("mmap", size=4096, prot=RWM, share="shared", backing="file", object="f")
        assert not p.vma(addr).flags & VM_MTE


class TestMprotectProtMte:
    """mprotect(PROT_MTE): arch_validate_prot and arch_validate_flags in do_mprotect_pkey."""

    async def test_prot_mte_without_mte_cpu_is_einval(self):
        """On a CPU without MTE, mprotect(PROT_MTE) fails with EINVAL (arch_validate_prot)."""
        k, p = kernel_and_proc(mte=False)
        addr = await p("mmap", size=4096, prot=RW)
        await expect_errno("EINVAL", p("mprotect", addr=addr, size=4096, prot=RWM))
        await p("mprotect", addr=addr, size=4096, prot=["read"])  # control: without PROT_MTE it works

    async def test_prot_mte_on_file_mapping_is_einval(self):
        """mprotect(PROT_MTE) on a regular-file mapping fails with EINVAL and leaves the VMA untagged."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=4096, prot=RW, share="shared", backing="file", object="f")
        await expect_errno("EINVAL", p("mprotect", addr=addr, size=4096, prot=RWM))
        assert not p.vma(addr).flags & VM_MTE

    async def test_prot_mte_on_device_mapping_is_einval(self):
        """mprotect(PROT_MTE) on a device mapping fails with EINVAL."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=4096, prot=RW, share="shared", backing="device", object="d")
        await expect_errno("EINVAL", p("mprotect", addr=addr, size=4096, prot=RWM))

    async def test_prot_mte_on_anon_sets_vm_mte(self):
        """mprotect(PROT_MTE) on anonymous memory sets VM_MTE (control for the rows above)."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=4096, prot=RW)
        await p("mprotect", addr=addr, size=4096, prot=RWM)
        assert p.vma(addr).flags & VM_MTE

    async def test_prot_mte_is_sticky(self):
        """mprotect without PROT_MTE keeps VM_MTE, the PTEs stay tagged and tag checks go on."""
        k, p = kernel_and_proc()
        await p("prctl", tcf="sync", include=0xFFFE)
        addr = await p("mmap", size=4096, prot=RWM)
        await p("stg", addr=addr, tag=3, size=4096)
        await p("mprotect", addr=addr, size=4096, prot=RW)
        assert p.vma(addr).flags & VM_MTE
        assert p.pte(addr).tagged
        assert await p.tags(addr, 32) == [3, 3]
        r = await p("load", addr=tagged_pointer(addr, 4), size=8)
        assert r.fault is not None and r.fault["kind"] == "tag-check-fault"
        await p("mprotect", addr=addr, size=4096, prot=["read"])
        assert p.vma(addr).flags & VM_MTE

    async def test_einval_stops_at_the_first_bad_vma(self):
        """A range anon+file: the file VMA fails with EINVAL, the anon VMA before it is already changed."""
        k, p = kernel_and_proc()
        base = await p("mmap", size=8192, prot=RW)
        await p("mmap", addr=base + 4096, size=4096, prot=RW, share="shared", backing="file", object="f")
        await expect_errno("EINVAL", p("mprotect", addr=base, size=8192, prot=RWM))
        assert p.vma(base).flags & VM_MTE
        assert not p.vma(base + 4096).flags & VM_MTE
        assert k.oracle.check_state() == []


class TestAlignment:
    """Unaligned addresses and zero lengths: EINVAL."""

    async def test_mmap_fixed_unaligned_address_is_einval(self):
        """mmap(MAP_FIXED) at an address that is not page aligned fails with EINVAL."""
        k, p = kernel_and_proc()
        await expect_errno("EINVAL", p("mmap", addr=0x10_0000_0010, size=4096, prot=RW))

    async def test_mmap_unaligned_offset_is_einval(self):
        """mmap with a file offset that is not page aligned fails with EINVAL."""
        k, p = kernel_and_proc()
        await expect_errno("EINVAL", p("mmap", size=4096, prot=RW, share="shared", backing="memfd", object="m",
                                       offset=100))

    async def test_mmap_zero_length_is_einval(self):
        """mmap of length 0 fails with EINVAL."""
        k, p = kernel_and_proc()
        await expect_errno("EINVAL", p("mmap", size=0, prot=RW))

    async def test_mmap_unaligned_length_is_rounded_up(self):
        """A length that is not a page multiple is rounded up (not an error)."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=100, prot=RW)
        v = p.vma(addr)
        assert v.end - v.start == 4096

    async def test_munmap_unaligned_is_einval(self):
        """munmap at an address that is not page aligned fails with EINVAL and unmaps nothing."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=8192, prot=RW)
        await expect_errno("EINVAL", p("munmap", addr=addr + 8, size=4096))
        assert p.vma(addr) is not None

    async def test_munmap_zero_length_is_einval(self):
        """munmap of length 0 fails with EINVAL."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=4096, prot=RW)
        await expect_errno("EINVAL", p("munmap", addr=addr, size=0))

    async def test_mprotect_unaligned_is_einval(self):
        """mprotect at an address that is not page aligned fails with EINVAL."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=8192, prot=RW)
        await expect_errno("EINVAL", p("mprotect", addr=addr + 1, size=4096, prot=RWM))
        assert not p.vma(addr).flags & VM_MTE

    async def test_madvise_unaligned_is_einval(self):
        """madvise at an address that is not page aligned fails with EINVAL."""
        k, p = kernel_and_proc()
        addr = await p("mmap", size=8192, prot=RW)
        await expect_errno("EINVAL", p("madvise", addr=addr + 16, size=4096, advice="dontneed"))


class TestHoles:
    """Ranges that are not fully mapped: ENOMEM."""

    async def test_mprotect_over_a_hole_is_enomem(self):
        """mprotect over [mapped, hole, mapped] fails with ENOMEM."""
        k, p = kernel_and_proc()
        base = await p("mmap", size=3 * 4096, prot=RW)
        await p("munmap", addr=base + 4096, size=4096)
        await expect_errno("ENOMEM", p("mprotect", addr=base, size=3 * 4096, prot=RWM))

    async def test_mprotect_of_unmapped_range_is_enomem(self):
        """mprotect of a range with no mapping at all fails with ENOMEM."""
        k, p = kernel_and_proc()
        await expect_errno("ENOMEM", p("mprotect", addr=0x10_0000_0000, size=4096, prot=RW))

    async def test_madvise_over_a_hole_is_enomem(self):
        """madvise over a range with a hole fails with ENOMEM."""
        k, p = kernel_and_proc()
        base = await p("mmap", size=2 * 4096, prot=RW)
        await p("munmap", addr=base + 4096, size=4096)
        await expect_errno("ENOMEM", p("madvise", addr=base, size=2 * 4096, advice="dontneed"))

    async def test_munmap_of_a_hole_is_fine(self):
        """munmap of a range that is not mapped succeeds (nothing to do)."""
        k, p = kernel_and_proc()
        await p("munmap", addr=0x10_0000_0000, size=4096)


class TestPrctl:
    """prctl(PR_SET_TAGGED_ADDR_CTRL): set_tagged_addr_ctrl."""

    @pytest.mark.parametrize("tcf", ["sync", "async", "asymm"])
    async def test_tcf_bits_without_mte_are_einval(self, tcf):
        """Asking for a TCF mode on a CPU without MTE fails with EINVAL."""
        k, p = kernel_and_proc(mte=False)
        await expect_errno("EINVAL", p("prctl", tcf=tcf))

    async def test_include_mask_without_mte_is_einval(self):
        """A nonzero tag include mask on a CPU without MTE fails with EINVAL."""
        k, p = kernel_and_proc(mte=False)
        await expect_errno("EINVAL", p("prctl", include=0x00F0))

    async def test_tagged_addr_only_without_mte_is_fine(self):
        """PR_TAGGED_ADDR_ENABLE alone (TCF none, include 0) is valid without MTE."""
        k, p = kernel_and_proc(mte=False)
        await p("prctl", tcf="none", include=0)
        assert (await p("prctl-get")) == {"tcf": "none", "include": 0}

    async def test_include_outside_16_bits_is_einval(self):
        """An include mask with bits beyond PR_MTE_TAG_MASK fails with EINVAL, leaving the state as it was."""
        k, p = kernel_and_proc()
        await p("prctl", tcf="sync", include=0x0F0F)
        await expect_errno("EINVAL", p("prctl", include=0x1_0000))
        assert (await p("prctl-get")) == {"tcf": "sync", "include": 0x0F0F}

    async def test_prctl_get_reports_the_request(self):
        """PR_GET returns the requested TCF (sync|async reads back as asymm) and include mask."""
        k, p = kernel_and_proc()
        assert (await p("prctl-get")) == {"tcf": "none", "include": 0}  # as after execve
        await p("prctl", tcf="asymm", include=0xFFFF)
        assert (await p("prctl-get")) == {"tcf": "asymm", "include": 0xFFFF}
        await p("prctl", include=0x0002)  # TCF kept when omitted
        assert (await p("prctl-get")) == {"tcf": "asymm", "include": 0x0002}


async def two_procs(**kw):
    """A tracer and a tracee in one session, the tracee with one page of PROT_MTE memory tagged 6."""
    k = Kernel(**kw)
    tracee = Proc.new(k, "tracee")
    tracer = Proc.new(k, "tracer", session=tracee.task.session)
    addr = await tracee("mmap", size=4096, prot=RWM)
    if k.mte:
        await tracee("stg", addr=addr, tag=6, size=4096)
    return k, tracer, tracee, addr


class TestPtraceMteTags:
    """PTRACE_PEEKMTETAGS / PTRACE_POKEMTETAGS: mte_ptrace_copy_tags / __access_remote_tags."""

    async def test_peek_and_poke_work_in_one_session(self):
        """A tracer in the same session reads and writes the tracee's tags, one tag per byte."""
        k, tracer, tracee, addr = await two_procs()
        assert await tracer("ptrace-peek-tags", target=tracee.pid, addr=addr, count=4) == [6, 6, 6, 6]
        assert await tracer("ptrace-poke-tags", target=tracee.pid, addr=addr + 16, tags=[1, 2]) == 2
        assert await tracee.tags(addr, 64) == [6, 1, 2, 6]
        assert k.oracle.check_state() == []

    async def test_no_mte_is_eio(self):
        """On a CPU without MTE both requests fail with EIO."""
        k, tracer, tracee, addr = await two_procs(mte=False)
        await expect_errno("EIO", tracer("ptrace-peek-tags", target=tracee.pid, addr=addr, count=1))
        await expect_errno("EIO", tracer("ptrace-poke-tags", target=tracee.pid, addr=addr, tags=[1]))

    async def test_vma_without_vm_mte_is_eio(self):
        """A VMA without VM_MTE gives EIO (the code turns -EOPNOTSUPP into -EIO when nothing was copied)."""
        k, tracer, tracee, _ = await two_procs()
        plain = await tracee("mmap", size=4096, prot=RW)
        await tracee("store", addr=plain, data=b"y")
        await expect_errno("EIO", tracer("ptrace-peek-tags", target=tracee.pid, addr=plain, count=1))
        await expect_errno("EIO", tracer("ptrace-poke-tags", target=tracee.pid, addr=plain, tags=[1]))

    async def test_unmapped_address_is_eio(self):
        """An address with no mapping gives EIO (GUP failed, nothing copied)."""
        k, tracer, tracee, _ = await two_procs()
        await expect_errno("EIO", tracer("ptrace-peek-tags", target=tracee.pid, addr=0x10_0000_0000, count=1))
        await expect_errno("EIO", tracer("ptrace-poke-tags", target=tracee.pid, addr=0x10_0000_0000, tags=[1]))

    async def test_other_session_is_eperm(self):
        """A process outside the tracee's session may not access its tags: EPERM."""
        k, tracer, tracee, addr = await two_procs()
        stranger = Proc.new(k, "stranger")
        await expect_errno("EPERM", stranger("ptrace-peek-tags", target=tracee.pid, addr=addr, count=1))
        await expect_errno("EPERM", stranger("ptrace-poke-tags", target=tracee.pid, addr=addr, tags=[1]))
        assert await tracee.tags(addr, 16) == [6]

    async def test_unknown_pid_is_esrch(self):
        """A pid that does not exist gives ESRCH."""
        k, tracer, tracee, addr = await two_procs()
        await expect_errno("ESRCH", tracer("ptrace-peek-tags", target=99_999, addr=addr, count=1))
        await expect_errno("ESRCH", tracer("ptrace-poke-tags", target=99_999, addr=addr, tags=[1]))

    async def test_partial_peek_returns_the_tags_copied(self):
        """A PEEK running off the end of the VM_MTE mapping succeeds with only the tags it copied."""
        k, tracer, tracee, _ = await two_procs()
        base = await tracee("mmap", size=2 * 4096, prot=RWM)
        await tracee("munmap", addr=base + 4096, size=4096)  # a hole right after the first page
        await tracee("stg", addr=base + 4096 - 32, tag=9, size=32)
        got = await tracer("ptrace-peek-tags", target=tracee.pid, addr=base + 4096 - 64, count=10)
        assert got == [0, 0, 9, 9]

    async def test_partial_peek_stops_at_a_vma_without_vm_mte(self):
        """A PEEK crossing into a non-VM_MTE VMA stops there and returns the count copied so far."""
        k, tracer, tracee, _ = await two_procs()
        base = await tracee("mmap", size=2 * 4096, prot=RWM)
        await tracee("mmap", addr=base + 4096, size=4096, prot=RW)  # MAP_FIXED over the second page
        got = await tracer("ptrace-peek-tags", target=tracee.pid, addr=base, count=512)
        assert len(got) == 256

    async def test_partial_poke_returns_the_count_written(self):
        """A POKE running off the end of the mapping succeeds with the number of tags written."""
        k, tracer, tracee, addr = await two_procs()
        n = await tracer("ptrace-poke-tags", target=tracee.pid, addr=addr + 4096 - 32, tags=[3] * 5)
        assert n == 2
        assert await tracee.tags(addr + 4096 - 32, 32) == [3, 3]

    async def test_address_is_aligned_down_to_the_granule(self):
        """The address is silently aligned down to its 16-byte granule."""
        k, tracer, tracee, addr = await two_procs()
        await tracee("stg", addr=addr + 16, tag=11, size=16)
        assert await tracer("ptrace-peek-tags", target=tracee.pid, addr=addr + 16 + 7, count=1) == [11]
        assert await tracer("ptrace-poke-tags", target=tracee.pid, addr=addr + 15, tags=[12]) == 1
        assert await tracee.tags(addr, 32) == [12, 11]

    async def test_poke_of_read_only_private_mapping_uses_foll_force(self):
        """POKE into a read-only private PROT_MTE mapping succeeds: GUP uses FOLL_FORCE, which breaks CoW for the
        tracer."""
        k, tracer, tracee, _ = await two_procs()
        ro = await tracee("mmap", size=4096, prot=["read", "mte"])
        assert await tracer("ptrace-poke-tags", target=tracee.pid, addr=ro, tags=[7, 7]) == 2
        assert await tracer("ptrace-peek-tags", target=tracee.pid, addr=ro, count=3) == [7, 7, 0]

    async def test_poke_of_read_only_shared_mapping_is_eio(self):
        """FOLL_FORCE does not write a read-only MAP_SHARED mapping (not a CoW mapping): POKE fails with EIO."""
        k, tracer, tracee, _ = await two_procs()
        ro = await tracee("mmap", size=4096, prot=["read", "mte"], share="shared", backing="memfd", object="ro")
        await expect_errno("EIO", tracer("ptrace-poke-tags", target=tracee.pid, addr=ro, tags=[7]))

    async def test_peek_of_prot_none_mapping_uses_foll_force(self):
        """PEEK of a PROT_NONE|PROT_MTE mapping succeeds: FOLL_FORCE reads any VMA with VM_MAYREAD."""
        k, tracer, tracee, addr = await two_procs()
        await tracee("mprotect", addr=addr, size=4096, prot=["mte"])
        assert await tracer("ptrace-peek-tags", target=tracee.pid, addr=addr, count=2) == [6, 6]

    async def test_peek_of_untouched_page_reads_zero_tags(self):
        """PEEK of a never-touched VM_MTE page reads the zero page's zero tags and leaves it unflagged."""
        k, tracer, tracee, _ = await two_procs()
        fresh = await tracee("mmap", size=4096, prot=RWM)
        assert await tracer("ptrace-peek-tags", target=tracee.pid, addr=fresh, count=4) == [0] * 4
        assert k.alloc.zero_page.flags == 0


class TestIrg:
    """IRG and the GCR_EL1 exclude mask derived from the prctl include mask."""

    async def test_after_exec_irg_yields_zero(self):
        """After execve the include mask is 0 (all tags excluded), so IRG always yields 0."""
        k, p = kernel_and_proc()
        assert {await p("irg") for _ in range(50)} == {0}

    async def test_include_zero_yields_zero(self):
        """An explicit include mask of 0 makes IRG yield 0."""
        k, p = kernel_and_proc()
        await p("prctl", tcf="sync", include=0xFFFF)
        await p("prctl", include=0)
        assert {await p("irg") for _ in range(50)} == {0}

    async def test_include_mask_restricts_the_tags(self):
        """With an include mask, IRG yields only included tags (and more than one of them)."""
        k, p = kernel_and_proc()
        allowed = {2, 9, 13}
        await p("prctl", tcf="sync", include=sum(1 << t for t in allowed))
        seen = {await p("irg") for _ in range(200)}
        assert seen <= allowed and len(seen) > 1

    async def test_single_included_tag(self):
        """An include mask with one tag makes IRG yield exactly that tag."""
        k, p = kernel_and_proc()
        await p("prctl", include=1 << 14)
        assert {await p("irg") for _ in range(20)} == {14}

    async def test_no_mte_irg_yields_zero(self):
        """Without MTE, IRG yields 0."""
        k, p = kernel_and_proc(mte=False)
        assert {await p("irg") for _ in range(20)} == {0}
