"""The TAGS-AS-WRITTEN ghost (hypervisor/ghost.py): keyed by what the user sees, changed only by
writes and documented rules, checked on reads and state checks, and quiet when a more specific
invariant already names the loss."""

from __future__ import annotations

from support import RW, RWM, Proc, Vm, invariants

from hypervisor.fork import do_exit
from hypervisor.kernel import Kernel
from hypervisor.mm_types import MemObject
from hypervisor.syscalls import host_migrate_pages, host_swap_out

PAGE = 4096
RAM = 0x4000_0000


async def tagged(k: Kernel, tag: int = 5):
    """A process with one private PROT_MTE page: data and tag ``tag``."""
    p = Proc.new(k, "P")
    addr = await p("mmap", size=PAGE, prot=RWM)
    await p("store", addr=addr, data=b"ghost data")
    await p("stg", addr=addr, tag=tag, size=PAGE)
    return p, addr


def entries(k: Kernel, space) -> dict:
    """The ghost's entries of one address space or object."""
    return k.oracle.ghost.spaces.get(space, {})


class TestRecordAndCheck:
    """Writes are recorded where the user sees them and content survives moving between frames."""

    async def test_swap_migrate_and_read_back_stay_clean(self):
        """Tags and data written, swapped out, read back, migrated and read again: nothing is reported."""
        k = Kernel()
        p, addr = await tagged(k)
        assert list(entries(k, p.task.mm)) == [addr >> 12]
        assert await host_swap_out(k, p.pid, addr, PAGE) == 1
        assert invariants(k) == []
        assert await p.tags(addr, 32) == [5, 5]
        assert await host_migrate_pages(k, p.pid, addr, PAGE) == 1
        assert (await p("load", addr=addr, tag=5, size=10)).value == b"ghost data"
        assert invariants(k) == []

    async def test_a_tag_lost_behind_the_shadows_back_fires_tags_as_written(self):
        """Tags changed in the frame *and* its shadow (a loss the per-frame shadow cannot see) fire TAGS-AS-WRITTEN
        alone."""
        k = Kernel()
        p, addr = await tagged(k)
        page = p.page(addr)
        page.tags[3] = 9
        page.shadow[3] = 9
        assert invariants(k) == ["TAGS-AS-WRITTEN"]
        msg = k.oracle.violations[-1].message
        assert "g3: 9 (last written 5)" in msg and k.oracle.violations[-1].pfn == page.pfn

    async def test_a_read_reports_what_it_saw(self):
        """An LDG returning a tag nobody wrote there is reported (at the next state check) even if the frame is later
        repaired."""
        k = Kernel()
        p, addr = await tagged(k)
        page = p.page(addr)
        page.tags[0], page.shadow[0] = 9, 9
        assert (await p.tags(addr, 16)) == [9]
        page.tags[0], page.shadow[0] = 5, 5
        assert invariants(k) == ["TAGS-AS-WRITTEN"]
        assert "ldg by pid" in k.oracle.violations[-1].message

    async def test_a_specific_invariant_takes_precedence(self):
        """When LAST-TAG-WRITTEN names the frame, the ghost does not report the same loss again."""
        k = Kernel()
        p, addr = await tagged(k)
        p.page(addr).tags[3] = 9  # the shadow still says 5
        assert invariants(k) == ["LAST-TAG-WRITTEN"]

    async def test_lost_data_fires(self):
        """Data that changed without a store is reported as TAGS-AS-WRITTEN."""
        k = Kernel()
        p, addr = await tagged(k)
        page = p.page(addr)
        page.write(0, bytes([page.data[0] ^ 0xFF]))  # the frame changes (Page's own path), no store is recorded
        assert invariants(k) == ["TAGS-AS-WRITTEN"]
        assert "data" in k.oracle.violations[-1].message

    async def test_swapped_out_content_is_checked_in_the_slot(self):
        """A swap slot whose saved tags differ from what was written is found without faulting the page in."""
        k = Kernel()
        p, addr = await tagged(k)
        await host_swap_out(k, p.pid, addr, PAGE)
        entry = p.pte(addr).swap
        packed, shadow = k.swap.tags.store[entry]
        k.swap.tags.store[entry] = (bytes(len(packed)), shadow)
        assert invariants(k) == ["TAGS-AS-WRITTEN"]
        assert f"swap entry {entry}" in k.oracle.violations[-1].message


class TestWhatIsNotATagWrite:
    """STG to untagged memory writes no tag, so the ghost records none."""

    async def test_host_stg_through_an_untagged_mapping(self):
        """A host STG on a mapping without PROT_MTE records nothing; after mprotect(PROT_MTE) the tags read zero."""
        k = Kernel()
        p = Proc.new(k, "P")
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("stg", addr=addr, tag=7, size=PAGE)
        assert entries(k, p.task.mm) == {}
        await p("mprotect", addr=addr, size=PAGE, prot=RWM)
        assert await p.tags(addr, 32) == [0, 0]
        assert invariants(k) == []

    async def test_guest_stg_without_sctlr_ata(self):
        """A guest STG with SCTLR_EL1.ATA=0 records nothing; the guest later reads zero tags."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, PAGE)
        await vm.stg(RAM, PAGE, 7, ata=False)
        assert entries(k, vm.vmm.task.mm) == {}
        assert await vm.ldg(RAM, 32) == [0, 0]
        assert invariants(k) == []


class TestOneEntryPerLocation:
    """Every view of one piece of memory meets in one entry."""

    async def test_guest_ipa_and_vmm_view_of_memfd_ram(self):
        """A guest STG through its IPA is the entry of the memfd offset, which the VMM's tagged view reads back."""
        k = Kernel()
        vm = await Vm.create(k)
        hva = await vm.ram(0, RAM, 2 * PAGE, backing="memfd", object="ram")
        view = await vm.map(2 * PAGE, backing="memfd", object="ram", prot=RWM)
        await vm.stg(RAM + PAGE, PAGE, 6)
        obj = vm.vmm.vma(hva).obj
        assert isinstance(obj, MemObject) and list(entries(k, obj)) == [1]
        assert await vm.vmm.tags(view + PAGE, 32) == [6, 6]
        got = await vm.copy_tags(RAM + PAGE, PAGE, from_guest=True)
        assert got["tags"] == bytes([6]) * 256
        assert invariants(k) == []

    async def test_copy_tags_from_guest_is_checked(self):
        """A COPY_TAGS FROM_GUEST dump returning a tag the guest never wrote is reported."""
        k = Kernel()
        vm = await Vm.create(k)
        await vm.ram(0, RAM, PAGE)
        await vm.stg(RAM, PAGE, 6)
        page = vm.page(RAM)
        page.tags[10], page.shadow[10] = 1, 1
        await vm.copy_tags(RAM, PAGE, from_guest=True)
        page.tags[10], page.shadow[10] = 6, 6
        assert invariants(k) == ["TAGS-AS-WRITTEN"]
        assert "COPY_TAGS FROM_GUEST" in k.oracle.violations[-1].message

    async def test_named_object_outlives_its_mappings(self):
        """Tags written through one process's memfd mapping are what another process reads after the first unmapped
        it."""
        k = Kernel()
        a = Proc.new(k, "A")
        b = Proc.new(k, "B", session=a.task.session)
        am = await a("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        await a("stg", addr=am, tag=4, size=PAGE)
        await a("munmap", addr=am, size=PAGE)
        bm = await b("mmap", size=PAGE, prot=RWM, share="shared", backing="memfd", object="m")
        assert await b.tags(bm, 16) == [4]
        assert invariants(k) == []


class TestDocumentedChanges:
    """A location changes only by a write or a rule the kernel documents."""

    async def test_dontneed_reads_fresh(self):
        """MADV_DONTNEED drops the private entries: the page reads zero data and tags, and nothing is reported."""
        k = Kernel()
        p, addr = await tagged(k)
        await p("madvise", addr=addr, size=PAGE, advice="dontneed")
        assert entries(k, p.task.mm) == {}
        assert await p.tags(addr, 16) == [0]
        assert (await p("load", addr=addr, size=4)).value == bytes(4)
        assert invariants(k) == []

    async def test_fork_copies_and_cow_diverges(self):
        """fork copies the parent's entries; after the child's CoW store each sees its own tags."""
        k = Kernel()
        p, addr = await tagged(k)
        c = await p.fork("C")
        assert entries(k, c.task.mm)[addr >> 12].tags == entries(k, p.task.mm)[addr >> 12].tags
        await c("stg", addr=addr, tag=7, size=PAGE)
        assert await p.tags(addr, 16) == [5] and await c.tags(addr, 16) == [7]
        assert invariants(k) == []

    async def test_exit_drops_the_address_space(self):
        """A process's exit leaves no ghost entry of its address space."""
        k = Kernel()
        p, addr = await tagged(k)
        await do_exit(k, p.task)
        assert p.task.mm not in k.oracle.ghost.spaces
        assert invariants(k) == []


class TestGupWriteAcrossFork:
    """A write through a GUP reference that lands after fork shared the page copy-on-write."""

    async def test_copy_tags_to_guest_racing_fork_is_seen_by_both(self):
        """COPY_TAGS TO_GUEST that got its page before the VMM forked writes the frame both now map; the ghost
        agrees."""
        from support import phases, run_once

        async def setup(k):
            vm = await Vm.create(k)
            hva = await vm.ram(0, RAM, PAGE, prot=RWM)
            await vm.stg(RAM, PAGE, 3)
            st = {"vm": vm, "hva": hva}

            async def vmm(k, st):
                await vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes([8]) * 256)

            async def forker(k, st):
                st["child"] = await vm.vmm.fork("child")

            return st, {"f": forker, "v": vmm}

        run, _ = await run_once(setup, policy=phases(("v", "kvm_vm_ioctl_mte_copy_tags:copy"), ("f", None),
                                                     ("v", None)))
        assert run.failure is None
        st = run.state
        assert st["child"].page(st["hva"]) is st["vm"].vmm.page(st["hva"])  # still shared copy-on-write
        assert await st["child"].tags(st["hva"], 16) == [8]
        assert invariants(run.k) == []

    async def test_a_cow_copy_made_before_the_write_may_miss_it(self):
        """The child's CoW copy taken before the pre-fork GUP write lands keeps the old tags; the ghost accepts
        either."""
        from support import phases, run_once

        async def setup(k):
            vm = await Vm.create(k)
            hva = await vm.ram(0, RAM, PAGE, prot=RWM)
            await vm.stg(RAM, PAGE, 3)
            st = {"vm": vm, "hva": hva}

            async def vmm(k, st):
                await vm.copy_tags(RAM, PAGE, from_guest=False, tags=bytes([8]) * 256)

            async def forker(k, st):
                st["child"] = child = await vm.vmm.fork("child")
                await child("store", addr=hva, data=b"child")  # CoW: the child copies the page

            return st, {"f": forker, "v": vmm}

        run, _ = await run_once(setup, policy=phases(("v", "kvm_vm_ioctl_mte_copy_tags:copy"),
                                                     ("f", "wp_page_copy:map"), ("v", None), ("f", None)))
        assert run.failure is None
        st = run.state
        assert await st["child"].tags(st["hva"], 16) == [3]  # the copy predates the write
        assert await st["vm"].vmm.tags(st["hva"], 16) == [8]
        assert invariants(run.k) == []
