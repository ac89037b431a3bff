"""Memory types (the physical-memory contract, part C): device regions, their mappings and stage 2.

Checked: mmap's errors for ``node``, ``region`` and ``attr`` in the contract's order; the
VMA flags and vm_page_prot memtype of each backing (``vma-flags``); the memslot errno
table (mainline, RFC patch 16 on a dynamic host, VM without MTE; CREATE and dirty-log
enable); the stage-2 memory type table of ``user_mem_abort`` (``stage2-entry``); the
KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED capability; guest tag accesses through Normal-NC
and Device stage 2 (Untagged); ``migrate-pages to`` a coherent region; COPY_TAGS on device
memory; and the invariants TAGGED-PTE-IS-TAG-CAPABLE, MTE-VM-MEMORY-IS-TAG-CAPABLE and
STAGE2-MEMTYPE.
"""

from __future__ import annotations

import functools

import pytest
from support import RW, RWM, Proc, Vm, expect_errno, explore_bounded, invariants

from hypervisor.kernel import Kernel
from hypervisor.mm.memremap import REGION_BASE_PFN, memremap, migrate_to_coherent
from hypervisor.syscalls import HOST_OPS
from shared.abi import validate_args
from shared.physmem import NodeConfig, PhysConfig, RegionConfig

PAGE = 4096
TWO_MIB = 2 << 20
RAM = 0x4000_0000
DEV = 0x8000_0000


def host(*regions: RegionConfig, nodes=(), **kw) -> Kernel:
    """A host with these regions (and nodes, and PhysConfig keys)."""
    return Kernel(physmem=PhysConfig(regions=tuple(regions), nodes=tuple(nodes), **kw))


def region(name: str, rtype: str, size: int = TWO_MIB, attr: str = "device", allow_any_uncached: bool = True):
    return RegionConfig(name, rtype, size, attr, allow_any_uncached)


async def mmap(p: Proc, size: int = PAGE, *, backing: str, share: str = "shared", prot=RW, offset: int = 0,
               **kw) -> int:
    return await p("mmap", addr=None, size=size, prot=list(prot), share=share, backing=backing, object=None,
                   offset=offset, **kw)


async def vma_flags(k: Kernel, p: Proc, addr: int) -> dict:
    return await HOST_OPS["vma-flags"](k, validate_args("vma-flags", {"pid": p.pid, "addr": addr}))


async def stage2_entry(k: Kernel, vm: str, ipa: int) -> dict:
    return await HOST_OPS["stage2-entry"](k, validate_args("stage2-entry", {"vm": vm, "ipa": ipa}))


class TestMmapErrors:
    """The contract's mapping errors, each one alone and in their order."""

    @pytest.mark.parametrize("args, errno", [
        ({"backing": "anon", "share": "private", "node": "nowhere"}, "ENOENT"),
        ({"backing": "pfnmap", "region": "nowhere"}, "ENOENT"),
        ({"backing": "dax", "region": "priv"}, "ENODEV"),
        ({"backing": "pfnmap", "share": "private", "region": "bar"}, "EINVAL"),
        ({"backing": "dax", "region": "bar"}, "EINVAL"),
        ({"backing": "p2pmem", "region": "dax"}, "EINVAL"),
        ({"backing": "pfnmap"}, "EINVAL"),
        ({"backing": "pfnmap", "region": "bar", "attr": "device"}, "EINVAL"),
        ({"backing": "memfd", "attr": "device"}, "EINVAL"),
        ({"backing": "file", "node": "cxl0"}, "EINVAL"),
        ({"backing": "hugetlb", "node": "cxl0"}, "EINVAL"),
        ({"backing": "pfnmap", "region": "bar", "size": 2 * TWO_MIB}, "EINVAL"),
        ({"backing": "pfnmap", "region": "bar", "offset": TWO_MIB}, "EINVAL"),
        ({"backing": "p2pmem", "region": "p2p", "offset": PAGE}, "EINVAL"),
        ({"backing": "pfnmap", "region": "bar", "prot": RWM}, "EINVAL"),
        ({"backing": "dax", "region": "dax", "prot": RWM}, "EINVAL"),
        ({"backing": "anon", "share": "private", "region": "bar"}, "EINVAL"),
        ({"backing": "anon", "share": "private", "region": "coh"}, "EINVAL"),
        # the order: ENOENT before ENODEV before EINVAL
        ({"backing": "dax", "share": "private", "region": "priv", "node": "nowhere"}, "ENOENT"),
        ({"backing": "pfnmap", "share": "private", "region": "priv", "attr": "device"}, "ENODEV"),
    ])
    async def test_mapping_error(self, args, errno):
        """mmap of device memory or with a node binding fails with the contract's errno, first failure first."""
        k = host(region("bar", "pfnmap"), region("priv", "private"), region("dax", "fs-dax"),
                 region("p2p", "pci-p2pdma"), region("coh", "coherent"),
                 nodes=[NodeConfig("cxl0", "cxl", 64 << 20, "movable")])
        p = Proc.new(k, "p")
        await expect_errno(errno, mmap(p, **args))

    async def test_node_binding_is_stored(self):
        """A valid node binding of anon, anon-shared, shmem and memfd is kept in vma.node (node0 included)."""
        k = host(nodes=[NodeConfig("cxl0", "cxl", 64 << 20, "movable")])
        p = Proc.new(k, "p")
        for backing, share, node in (("anon", "private", "cxl0"), ("anon-shared", "shared", "node0"),
                                     ("shmem", "shared", "cxl0"), ("memfd", "shared", "cxl0")):
            addr = await mmap(p, backing=backing, share=share, node=node)
            assert p.vma(addr).node == node


class TestVmaFlags:
    """vma-flags: the VMA of each backing, and the memtype of its vm_page_prot."""

    @pytest.mark.parametrize("regions, args, want", [
        ([region("bar", "pfnmap")], {"backing": "pfnmap", "region": "bar"},
         {"pfnmap": True, "io": True, "allow-any-uncached": True, "memtype": "device", "shared": True,
          "mixedmap": False, "mte-allowed": False}),
        ([region("bar", "pfnmap", attr="write-combine", allow_any_uncached=False)],
         {"backing": "pfnmap", "region": "bar"}, {"allow-any-uncached": False, "memtype": "normal-nc"}),
        ([], {"backing": "pfnmap", "attr": "cacheable"}, {"allow-any-uncached": True, "memtype": "normal"}),
        ([], {"backing": "device"}, {"pfnmap": True, "allow-any-uncached": False, "memtype": "device"}),
        ([region("p", "pci-p2pdma", attr="write-combine")], {"backing": "p2pmem", "region": "p"},
         {"mixedmap": True, "pfnmap": False, "io": False, "memtype": "normal-nc", "mte-allowed": False}),
        ([region("d", "generic")], {"backing": "dax", "region": "d"},
         {"pfnmap": False, "mixedmap": False, "memtype": "normal", "mte-allowed": False, "shared": True}),
        ([], {"backing": "anon", "share": "private", "prot": RWM},
         {"mte": True, "mte-allowed": True, "memtype": "normal-tagged", "shared": False}),
        ([], {"backing": "memfd"}, {"mte": False, "mte-allowed": True, "memtype": "normal", "mte-kvm": False}),
    ])
    async def test_backing_flags(self, regions, args, want):
        """Each backing's VMA has the flags and memtype of the contract's backing table."""
        k = host(*regions)
        p = Proc.new(k, "p")
        got = await vma_flags(k, p, await mmap(p, **args))
        assert {key: got[key] for key in want} == want

    async def test_no_vma_is_efault(self):
        """vma-flags where nothing is mapped fails with EFAULT."""
        k = Kernel()
        p = Proc.new(k, "p")
        await expect_errno("EFAULT", vma_flags(k, p, 0x1234_0000))

    async def test_dax_pages_are_zone_device_of_the_region(self):
        """A dax mapping faults in the region's ZONE_DEVICE pages, at the region's pfns, with no tags."""
        k = host(region("d", "fs-dax"))
        p = Proc.new(k, "p")
        addr = await mmap(p, 2 * PAGE, backing="dax", region="d", offset=PAGE)
        await p("store", addr=addr + PAGE, data=b"\x07")
        page = p.page(addr + PAGE)
        assert page.zone == "device" and page.pfn == REGION_BASE_PFN + 2
        assert (await p("load", addr=addr + PAGE, size=1)).value == b"\x07"


async def vm_with_region(k: Kernel, *, mte: bool, backing: str = "pfnmap", slot_flags=(), **mmap_args):
    """A VM with 1 MiB of anon RAM and a 2 MiB device slot at DEV; returns (vm, device hva)."""
    vm = await Vm.create(k, mte=mte)
    await vm.ram(0, RAM, 1 << 20)
    hva = await vm.map(TWO_MIB, backing=backing, **mmap_args) if "region" not in mmap_args else \
        await vm.vmm("mmap", addr=None, size=TWO_MIB, prot=RW, share="shared", backing=backing, object=None,
                     region=mmap_args["region"])
    await vm.slot(1, DEV, TWO_MIB, hva, slot_flags)
    return vm, hva


# the memslot table's rows: (regions, mmap args of the slot)
_ROWS = {
    "anon": ([], {"backing": "anon", "share": "private"}),
    "memfd": ([], {"backing": "memfd"}),
    "file": ([], {"backing": "file"}),
    "dax": ([region("d", "fs-dax")], {"backing": "dax", "region": "d"}),
    "p2pmem": ([region("p", "pci-p2pdma")], {"backing": "p2pmem", "region": "p"}),
    "pfnmap-nc": ([region("b", "pfnmap")], {"backing": "pfnmap", "region": "b"}),
    "device": ([], {"backing": "device"}),
    "pfnmap-cacheable": ([region("b", "pfnmap", attr="cacheable")], {"backing": "pfnmap", "region": "b"}),
}


class TestMemslotTable:
    """kvm_arch_prepare_memory_region over each kind of VMA, per column of the contract's table."""

    @pytest.mark.parametrize("row, mainline, dynamic, nomte", [
        ("anon", None, None, None),
        ("memfd", None, None, None),
        ("file", "EINVAL", "EINVAL", None),
        ("dax", "EINVAL", "EINVAL", None),
        ("p2pmem", "EINVAL", "EINVAL", None),
        ("pfnmap-nc", "EINVAL", None, None),
        ("device", "EINVAL", None, None),
        ("pfnmap-cacheable", "EINVAL", None, None),
    ])
    @pytest.mark.parametrize("column", ["mainline", "dynamic", "nomte"])
    async def test_create(self, row, mainline, dynamic, nomte, column):
        """Memslot CREATE of a VMA of this kind succeeds or fails as the contract's table says."""
        regions, args = _ROWS[row]
        k = host(*regions, tag_storage="dynamic" if column == "dynamic" else "static")
        vm = await Vm.create(k, mte=column != "nomte")
        hva = await vm.vmm("mmap", addr=None, size=TWO_MIB, prot=RW, object=None,
                           **{"share": "shared", **args})
        want = {"mainline": mainline, "dynamic": dynamic, "nomte": nomte}[column]
        if want is None:
            await vm.slot(1, DEV, TWO_MIB, hva)
        else:
            await expect_errno(want, vm.slot(1, DEV, TWO_MIB, hva))

    @pytest.mark.parametrize("fwb, dic", [(False, True), (True, False)])
    @pytest.mark.parametrize("mte, tag_storage", [(False, "static"), (True, "static"), (True, "dynamic")])
    async def test_cacheable_pfnmap_without_fwb_or_dic(self, fwb, dic, mte, tag_storage):
        """A cacheable PFNMAP slot without FEAT_S2FWB or CTR_EL0.DIC is EINVAL in every column."""
        k = host(region("b", "pfnmap", attr="cacheable"), stage2_fwb=fwb, cache_dic=dic, tag_storage=tag_storage)
        vm = await Vm.create(k, mte=mte)
        hva = await vm.vmm("mmap", addr=None, size=TWO_MIB, prot=RW, share="shared", backing="pfnmap",
                           object=None, region="b")
        await expect_errno("EINVAL", vm.slot(1, DEV, TWO_MIB, hva))

    @pytest.mark.parametrize("mte, tag_storage", [(False, "static"), (True, "dynamic")])
    async def test_dirty_logging_of_pfnmap(self, mte, tag_storage):
        """A PFNMAP slot with log-dirty-pages is EINVAL at CREATE, and when logging is enabled later (FLAGS_ONLY)."""
        k = host(region("b", "pfnmap"), tag_storage=tag_storage)
        vm = await Vm.create(k, mte=mte)
        hva = await vm.vmm("mmap", addr=None, size=TWO_MIB, prot=RW, share="shared", backing="pfnmap",
                           object=None, region="b")
        await expect_errno("EINVAL", vm.slot(1, DEV, TWO_MIB, hva, ["log-dirty-pages"]))
        await vm.slot(1, DEV, TWO_MIB, hva)
        await expect_errno("EINVAL", vm.slot(1, DEV, TWO_MIB, hva, ["log-dirty-pages"]))
        assert not vm.kvm.memslots[1].dirty_tracked

    async def test_ipa_beyond_ipa_bits_is_efault_first(self):
        """A slot past the IPA space is EFAULT even over a VMA the table refuses."""
        k = Kernel()
        vm = await Vm.create(k, mte=True, ipa_bits=32)
        hva = await vm.map(PAGE, backing="file")
        await expect_errno("EFAULT", vm.slot(1, 1 << 32, PAGE, hva))


class TestStage2Memtype:
    """user_mem_abort's memory type, read back with stage2-entry."""

    @pytest.mark.parametrize("backing, rtype, attr, allow, fwb_dic, want", [
        ("pfnmap", "pfnmap", "device", True, True, "normal-nc"),
        ("pfnmap", "pfnmap", "device", False, True, "device"),
        ("pfnmap", "pfnmap", "write-combine", True, True, "normal-nc"),
        ("pfnmap", "pfnmap", "write-combine", False, True, "device"),
        ("pfnmap", "pfnmap", "cacheable", True, True, "normal"),
        ("p2pmem", "pci-p2pdma", "device", True, True, "device"),
        ("p2pmem", "pci-p2pdma", "cacheable", True, True, "normal"),
        ("p2pmem", "pci-p2pdma", "cacheable", True, False, "EFAULT"),
        ("dax", "fs-dax", "device", True, False, "normal"),
    ])
    async def test_memtype(self, backing, rtype, attr, allow, fwb_dic, want):
        """A guest access maps the IPA with the stage-2 type of the contract's table (or KVM_RUN fails)."""
        k = host(RegionConfig("r", rtype, TWO_MIB, attr, allow), stage2_fwb=fwb_dic, cache_dic=fwb_dic)
        vm = await Vm.create(k, mte=False, name="vmm:vm0")
        hva = await vm.vmm("mmap", addr=None, size=TWO_MIB, prot=RW, share="shared", backing=backing,
                           object=None, region="r")
        await vm.slot(1, DEV, TWO_MIB, hva)
        if want == "EFAULT":
            await expect_errno("EFAULT", vm.store(DEV, b"\x01"))
            assert (await stage2_entry(k, "vm0", DEV))["mapped"] is False
            return
        await vm.store(DEV + PAGE, b"\x01\x02")
        e = await stage2_entry(k, "vm0", DEV + PAGE)
        assert e == {"mapped": True, "pfn": memremap(k).regions["r"].base_pfn + 1, "memtype": want,
                     "writable": True}
        assert (await vm.load(DEV + PAGE, 2)).value == b"\x01\x02"
        assert invariants(k) == []

    async def test_unmapped_and_unknown_vm(self):
        """An IPA stage 2 does not map reads as unmapped; a VM that is not here is ESRCH."""
        k = Kernel()
        vm = await Vm.create(k, mte=False, name="vmm:vm0")
        await vm.ram(0, RAM, PAGE)
        assert await stage2_entry(k, "vm0", RAM) == {"mapped": False, "pfn": 0, "memtype": "none", "writable": False}
        await expect_errno("ESRCH", stage2_entry(k, "vm1", RAM))

    async def test_mte_vm_cacheable_pfnmap_is_efault(self):
        """An MTE VM on a dynamic host registers a cacheable PFNMAP slot; its fault is EFAULT (no VM_MTE_ALLOWED)."""
        k = host(region("b", "pfnmap", attr="cacheable"), tag_storage="dynamic")
        vm, _ = await vm_with_region(k, mte=True, region="b")
        await expect_errno("EFAULT", vm.load(DEV, 8))

    async def test_ram_is_normal(self):
        """Anonymous guest RAM is mapped Normal."""
        k = Kernel()
        vm = await Vm.create(k, mte=True, name="vmm:vm0")
        await vm.ram(0, RAM, PAGE)
        await vm.store(RAM, b"\x01")
        assert (await stage2_entry(k, "vm0", RAM))["memtype"] == "normal"

    async def test_stage2_memtype_oracle(self):
        """An entry whose type is not the table's is reported as STAGE2-MEMTYPE."""
        k = host(region("b", "pfnmap"))
        vm, _ = await vm_with_region(k, mte=False, region="b")
        await vm.load(DEV, 8)
        assert invariants(k) == []
        vm.s2(DEV).memtype = "device"  # VM_ALLOW_ANY_UNCACHED says Normal-NC
        assert "STAGE2-MEMTYPE" in invariants(k)


class TestCapability:
    """KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED."""

    @pytest.mark.parametrize("fwb, dic, want", [(True, True, 1), (False, True, 0), (True, False, 0)])
    async def test_check_extension(self, fwb, dic, want):
        """The capability is 1 with FEAT_S2FWB and CTR_EL0.DIC, else 0; enabling it is EINVAL."""
        k = host(stage2_fwb=fwb, cache_dic=dic)
        vm = await Vm.create(k, mte=False)
        assert await vm("kvm-check-extension", cap="arm-cacheable-pfnmap-supported") == want
        await expect_errno("EINVAL", vm("kvm-enable-cap", cap="arm-cacheable-pfnmap-supported"))


class TestGuestTagAccess:
    """A tagged guest access per stage-2 type (Arm ARM: only Normal Write-Back memory holds tags)."""

    @pytest.mark.parametrize("allow", [True, False])
    async def test_untagged_stage2_ignores_stg_and_checks_nothing(self, allow):
        """Through Normal-NC or Device stage 2, STG is ignored, LDG reads 0, a mismatching tag is not checked."""
        k = host(region("b", "pfnmap", allow_any_uncached=allow), tag_storage="dynamic")
        vm, _ = await vm_with_region(k, mte=True, region="b")
        await vm.stg(DEV, 32, 9)
        assert await vm.ldg(DEV, 32) == [0, 0]
        assert (await vm.load(DEV, 16, tag=5, check="sync")).fault is None
        assert vm.s2(DEV).memtype == ("normal-nc" if allow else "device")
        assert invariants(k) == []

    async def test_coherent_memory_keeps_no_tags(self):
        """An MTE guest's page moved to coherent memory: STG is lost, LDG reads 0, checks compare against 0."""
        k = host(region("c", "coherent"))
        vm = await Vm.create(k, mte=True)
        hva = await vm.ram(0, RAM, PAGE)
        await vm.store(RAM, b"\x05")
        assert await migrate_to_coherent(k, vm.vmm.task.mm, hva, hva + PAGE, "c") == 1
        assert vm.vmm.page(hva).zone == "device"
        await vm.stg(RAM, 16, 9)
        assert await vm.ldg(RAM, 16) == [0]
        assert (await vm.load(RAM, 1, tag=0, check="sync")).value == b"\x05"
        r = await vm.load(RAM, 1, tag=9, check="sync")
        assert r.fault is not None and r.fault["memory_tag"] == 0
        assert "MTE-VM-MEMORY-IS-TAG-CAPABLE" in invariants(k)


class TestCoherentMigration:
    """migrate-pages to = REGION for coherent regions (migrate_vma)."""

    async def test_data_moves_tags_do_not(self):
        """A tagged anonymous page moved to coherent memory keeps data and VMA, loses its tags (PRESERVE-ON-COPY)."""
        k = host(region("c", "coherent"))
        p = Proc.new(k, "p")
        addr = await mmap(p, 2 * PAGE, backing="anon", share="private", prot=RWM)
        await p("store", addr=addr, data=b"hello")
        await p("stg", addr=addr, size=16, tag=3)
        moved = await migrate_to_coherent(k, p.task.mm, addr, addr + 2 * PAGE, "c")
        assert moved == 1  # the second page was never touched
        page = p.page(addr)
        assert page.zone == "device" and p.vma(addr).backing == "anon" and p.pte(addr).tagged
        assert (await p("load", addr=addr, size=5)).value == b"hello"
        names = invariants(k)
        assert "PRESERVE-ON-COPY" in names and "TAGGED-PTE-IS-TAG-CAPABLE" in names
        assert await migrate_to_coherent(k, p.task.mm, addr, addr + PAGE, "c") == 0  # already there

    async def test_untagged_page_breaks_nothing(self):
        """An untagged anonymous page moves with no violation."""
        k = host(region("c", "coherent"))
        p = Proc.new(k, "p")
        addr = await mmap(p, PAGE, backing="anon", share="private")
        await p("store", addr=addr, data=b"x")
        assert await migrate_to_coherent(k, p.task.mm, addr, addr + PAGE, "c") == 1
        assert invariants(k) == []

    @pytest.mark.parametrize("target, backing, errno", [
        ("priv", "anon", "EOPNOTSUPP"),
        ("bar", "anon", "EINVAL"),
        ("nowhere", "anon", "ENOENT"),
        ("c", "memfd", "EINVAL"),
        ("c", "anon-shared", "EINVAL"),
    ])
    async def test_errors(self, target, backing, errno):
        """Other region types, unknown names and pages that are not private anonymous fail as the contract says."""
        k = host(region("c", "coherent"), region("priv", "private"), region("bar", "pfnmap"))
        p = Proc.new(k, "p")
        addr = await mmap(p, PAGE, backing=backing, share="private" if backing == "anon" else "shared")
        await p("store", addr=addr, data=b"x")
        await expect_errno(errno, migrate_to_coherent(k, p.task.mm, addr, addr + PAGE, target))


class TestCopyTags:
    """KVM_ARM_MTE_COPY_TAGS on device memory."""

    @pytest.mark.parametrize("from_guest", [True, False])
    async def test_pfnmap_is_efault_with_partial_copy(self, from_guest):
        """A PFNMAP IPA is EFAULT; a range that reaches it from RAM returns the RAM part done."""
        k = host(region("b", "pfnmap"), tag_storage="dynamic")
        vm = await Vm.create(k, mte=True)
        await vm.ram(0, DEV - PAGE, PAGE)
        hva = await vm.vmm("mmap", addr=None, size=TWO_MIB, prot=RW, share="shared", backing="pfnmap", object=None,
                           region="b")
        await vm.slot(1, DEV, TWO_MIB, hva)
        await expect_errno("EFAULT", vm.copy_tags(DEV, PAGE, from_guest=from_guest, tags=bytes(256)))
        r = await vm.copy_tags(DEV - PAGE, 2 * PAGE, from_guest=from_guest, tags=bytes(512))
        assert r["length"] == PAGE


class TestMovableNode:
    """KVM paths on RAM of a hot-plugged movable node (ZONE_MOVABLE struct pages)."""

    @pytest.mark.parametrize("from_guest", [True, False])
    async def test_copy_tags_drops_its_reference(self, from_guest):
        """COPY_TAGS on a movable node's page drops its GUP reference: the page still migrates afterwards."""
        k = host(nodes=[NodeConfig("cxl0", "cxl", 64 << 20, "movable")])
        vm = await Vm.create(k, mte=True)
        hva = await vm.vmm("mmap", addr=None, size=2 * PAGE, prot=RW, share="private", backing="anon", object=None,
                           node="cxl0")
        await vm.slot(0, RAM, 2 * PAGE, hva)
        await vm.stg(RAM, 16, 4)
        page = vm.vmm.page(hva)
        assert page.zone == "movable" and page.node == "cxl0"
        await vm.copy_tags(RAM, 2 * PAGE, from_guest=from_guest, tags=bytes([4]) * 512)
        assert page.refcount == page.mapcount == 1
        assert await HOST_OPS["migrate-pages"](k, validate_args("migrate-pages", {
            "pid": vm.vmm.pid, "addr": hva, "size": PAGE})) == 1
        assert await vm.ldg(RAM, 16) == [4]
        assert invariants(k) == []


class TestCoherentRaces:
    """migrate-pages to a coherent region against a guest's first access and a VMM store (bounded-exhaustive)."""

    @pytest.fixture(autouse=True)
    def coherent_host(self, monkeypatch):
        """support.run_once boots its Kernel with a coherent region."""
        import support

        monkeypatch.setattr(support, "Kernel", functools.partial(
            Kernel, physmem=PhysConfig(regions=(region("c", "coherent"),))))

    async def test_migration_vs_guest_and_vmm(self):
        """Whatever the interleaving, the guest and the VMM see the data, stage 2 follows the VMM's PTE, no
        invariant breaks (the page is untagged)."""
        async def setup(k):
            vm = await Vm.create(k, mte=False)
            hva = await vm.ram(0, RAM, PAGE)
            await vm.vmm("store", addr=hva, data=b"\x05")
            st: dict = {"vm": vm, "hva": hva}

            async def guest(k, st):
                st["load"] = (await vm.load(RAM, 1)).value

            async def vmm(k, st):
                await vm.vmm("store", addr=hva + 1, data=b"\x06")

            async def driver(k, st):
                st["moved"] = await migrate_to_coherent(k, vm.vmm.task.mm, hva, hva + PAGE, "c")

            return st, {"driver": driver, "guest": guest, "vmm": vmm}

        runs = await explore_bounded(setup, preemptions=1)
        assert len(runs) > 10
        for run in runs:
            assert run.failure is None, run.failure
            st = run.state
            assert st["load"] == b"\x05"
            assert (await st["vm"].vmm("load", addr=st["hva"], size=2)).value == b"\x05\x06"
            e = st["vm"].s2(RAM)
            assert e is None or e.page is st["vm"].vmm.page(st["hva"])
            assert invariants(run.k) == []
            assert (st["vm"].vmm.page(st["hva"]).zone == "device") == (st["moved"] == 1)
        # not vacuous: a stage-2 fault's GUP reference makes the page busy (migrate_vma skips it) in some runs
        assert {r.state["moved"] for r in runs} == {0, 1}
