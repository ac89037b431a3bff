"""The physical layout, the per-node allocator, the static carve-out and dynamic tag storage's boot.

Contract part A (static carve-out), part B's validity rules and boot state, and part C's nodes
as far as the allocator goes: zones, fallback order, tag-storage = "none" nodes, node binding.
"""

from __future__ import annotations

from support import RW, RWM, Proc, expect_errno, invariants

from hypervisor.kernel import Kernel
from hypervisor.syscalls import HOST_OPS
from shared.abi import validate_args

PAGE = 4096
MIB = 1 << 20


async def host(k: Kernel, op: str, **args):
    """A host op through the ABI validation, as a ``host`` connection sends it."""
    return await HOST_OPS[op](k, validate_args(op, args))


def node(name: str, kind: str, size: int, **kw) -> dict:
    """A node's wire map."""
    return {"name": name, "kind": kind, "size": size, **kw}


class TestStatic:
    """Part A: the carve-out is ram/32, hidden, never counted."""

    async def test_meminfo(self):
        """A 256 MiB static host counts 65536 pages and 2048 carve-out pages, none of them free."""
        m = await host(Kernel(), "meminfo")
        assert (m["ram-pages"], m["free-pages"], m["tag-storage"], m["tag-storage-pages"],
                m["tag-storage-free-pages"], m["tag-blocks-reserved"], m["tags-parked"]) == \
            (65536, 65536, "static", 2048, 0, 0, 0)
        assert m["nodes"] == {"node0": {"kind": "dram", "zone": "normal", "pages": 65536, "free-pages": 65536,
                                        "tag-storage": "static", "tag-storage-pages": 2048}}

    async def test_mte_false_has_no_tag_storage(self):
        """With mte = false there is no tag storage and the mode is none."""
        m = await host(Kernel(mte=False), "meminfo")
        assert (m["ram-pages"], m["tag-storage"], m["tag-storage-pages"]) == (65536, "none", 0)

    async def test_all_pages_never_reach_the_carve_out(self):
        """Allocating every page hands out node0's RAM only: the carve-out stays hidden."""
        k = Kernel(ram=4 * MIB)
        got = await host(k, "alloc-pages", name="x", count="all")
        assert got == {"pages": 1024, "tag-storage-pages": 0}
        assert max(k.alloc.frames) == 0x80000 + 1023
        await expect_errno("ENOMEM", host(k, "alloc-pages", name="y", count=1))
        assert "TAG-CARVE-OUT-HIDDEN" not in invariants(k)

    async def test_page_flags_keys(self):
        """page-flags reports where a page lives; nothing mapped reads pfn 0 and "none"."""
        k = Kernel()
        p = Proc.new(k, "p")
        a = await p("mmap", size=2 * PAGE, prot=RWM)
        await p("store", addr=a, data=b"x")
        f = await host(k, "page-flags", pid=p.pid, addr=a)
        assert (f["pfn"], f["node"], f["zone"], f["tag-capable"], f["storage-reserved"], f["is-tag-storage"],
                f["parked"], f["fault-on-access"]) == (0x80000, "node0", "normal", True, True, False, False, False)
        f = await host(k, "page-flags", pid=p.pid, addr=a + PAGE)
        assert (f["pfn"], f["node"], f["zone"], f["tag-capable"]) == (0, "none", "none", False)


class TestDynamicBoot:
    """Part B at boot: the region is MIGRATE_CMA; only the zero page's block is reserved."""

    async def test_boot_state(self):
        """ram-pages counts the tag storage; one block is reserved; nothing is parked."""
        k = Kernel(physmem={"tag_storage": "dynamic"})
        m = await host(k, "meminfo")
        assert (m["ram-pages"], m["free-pages"], m["tag-storage"], m["tag-storage-pages"],
                m["tag-storage-free-pages"], m["tag-blocks-reserved"], m["tags-parked"]) == \
            (65536 + 2048, 65536 + 2047, "dynamic", 2048, 2047, 1, 0)
        assert invariants(k) == []

    async def test_block_size(self):
        """tag-block-size 16 KiB: block_size_pages 4, the zero page's block takes four pages."""
        k = Kernel(physmem={"tag_storage": "dynamic", "tag_block_size": 16384})
        m = await host(k, "meminfo")
        assert (m["tag-storage-free-pages"], m["tag-blocks-reserved"]) == (2044, 1)

    async def test_invalid_disables_management(self):
        """A zero block size, or a region not a multiple of 2 MiB, leaves the host static, without an error."""
        for kw in ({"tag_block_size": 0}, {}):
            ram = 256 * MIB if kw else 96 * MIB  # 96 MiB / 32 = 3 MiB: not a multiple of 2 MiB
            k = Kernel(ram=ram, physmem={"tag_storage": "dynamic", **kw})
            m = await host(k, "meminfo")
            assert (m["tag-storage"], m["ram-pages"], m["tag-storage-free-pages"], m["tag-blocks-reserved"]) == \
                ("static", ram // PAGE, 0, 0)

    async def test_mte_false_gives_the_region_to_the_allocator(self):
        """With mte = false a valid region goes to the allocator as ordinary pages (RFC invariant 2)."""
        m = await host(Kernel(mte=False, physmem={"tag_storage": "dynamic"}), "meminfo")
        assert (m["tag-storage"], m["ram-pages"], m["tag-storage-pages"]) == ("none", 65536 + 2048, 0)

    async def test_untagged_allocation_prefers_normal_pages(self):
        """A movable allocation takes tag storage first only once its free pages outnumber the zone's others."""
        k = Kernel(ram=64 * MIB, physmem={"tag_storage": "dynamic"})  # 511 free tag storage pages
        assert await host(k, "alloc-pages", name="x", count=16384 - 600) == {"pages": 15784, "tag-storage-pages": 0}
        got = await host(k, "alloc-pages", name="y", count=200)
        n0 = k.alloc.nodes[0]
        assert got["tag-storage-pages"] > 0 and n0.free_pages - len(n0.cma_free) > 0

    async def test_tagged_and_kernel_never_use_tag_storage(self):
        """__GFP_TAGGED and GFP_KERNEL allocations never come from MIGRATE_CMA; from tag-storage rules."""
        k = Kernel(ram=64 * MIB, physmem={"tag_storage": "dynamic"})
        await expect_errno("ENOMEM", host(k, "alloc-pages", name="x", count=16385, gfp="kernel"))
        got = await host(k, "alloc-pages", name="t", count=100, gfp="tagged")
        assert got["tag-storage-pages"] == 0
        await expect_errno("EINVAL", host(k, "alloc-pages", name="y", count=1, gfp="tagged", **{"from": "tag-storage"}))
        got = await host(k, "alloc-pages", name="c", count=3, **{"from": "tag-storage"})
        assert got == {"pages": 3, "tag-storage-pages": 3}
        await expect_errno("EEXIST", host(k, "alloc-pages", name="c", count=1))
        assert await host(k, "free-pages", name="c") == 3
        await expect_errno("ENOENT", host(k, "free-pages", name="c"))
        await expect_errno("EINVAL", host(Kernel(), "alloc-pages", name="z", count=1, **{"from": "tag-storage"}))

    async def test_claim_migrates_movable_pages_and_fails_on_pinned(self):
        """Claiming a block migrates its movable page away (data kept); a pinned page makes the claim fail."""
        k = Kernel(ram=64 * MIB, physmem={"tag_storage": "dynamic"})
        await host(k, "alloc-pages", name="data", count=64)  # pfns 0x80000.., needing the first two blocks
        await host(k, "alloc-pages", name="ts", count=1, **{"from": "tag-storage"})  # the first block
        await host(k, "alloc-pages", name="pinned", count=1, pin=True, **{"from": "tag-storage"})  # the second
        old = k.page_handles["ts"][0]
        data = old.read(0, PAGE)
        ts = k.tag_storage
        assert await ts.reserve_tag_storage(k.page_handles["data"][0])
        new = k.page_handles["ts"][0]
        assert new is not old and not new.is_tag_storage and new.read(0, PAGE) == data and old.free
        assert not await ts.reserve_tag_storage(k.page_handles["data"][32])
        assert not ts.has_storage(k.page_handles["data"][32])
        m = await host(k, "meminfo")
        assert m["tag-blocks-reserved"] == 2
        assert invariants(k) == []


class TestNodes:
    """Part C as far as the allocator goes: nodes, zones, fallback, binding, migration to a node."""

    def kernel(self, **kw) -> Kernel:
        return Kernel(ram=64 * MIB, physmem={"nodes": [node("cxl0", "cxl", 64 * MIB),
                                                        node("bad", "dram", 64 * MIB, tag_storage="none")], **kw})

    async def test_layout_and_meminfo(self):
        """Nodes start at 1 GiB boundaries in declared order, with their own zone and tag storage."""
        k = self.kernel()
        m = await host(k, "meminfo")
        assert m["nodes"]["cxl0"] == {"kind": "cxl", "zone": "movable", "pages": 16384, "free-pages": 16384,
                                      "tag-storage": "static", "tag-storage-pages": 512}
        assert m["nodes"]["bad"]["tag-storage"] == "none" and m["ram-pages"] == 3 * 16384
        assert m["tag-storage-pages"] == 1024
        assert [n.start for n in k.alloc.nodes] == [0x80000, 0xC0000, 0x100000]

    async def test_kernel_allocations_skip_movable_nodes(self):
        """GFP_KERNEL falls back from node0 to the next normal node, never to a movable one."""
        k = self.kernel()
        await expect_errno("EINVAL", host(k, "alloc-pages", name="k", count=1, gfp="kernel", node="cxl0"))
        await host(k, "alloc-pages", name="k", count=16384 + 1, gfp="kernel")
        assert k.page_handles["k"][-1].node == "bad"
        await host(k, "alloc-pages", name="m", count=1)
        assert k.page_handles["m"][0].node == "cxl0"

    async def test_mmap_node_binds_and_oom(self):
        """An mmap bound to a node takes its pages there; a full bound node fails the access with ENOMEM."""
        k = self.kernel()
        p = Proc.new(k, "p")
        a = await p("mmap", size=2 * PAGE, prot=RW, node="cxl0")
        await p("store", addr=a, data=b"z")
        assert p.page(a).node == "cxl0" and p.page(a).zone == "movable"
        await host(k, "alloc-pages", name="all", count="all", node="cxl0")
        await expect_errno("ENOMEM", p("store", addr=a + PAGE, data=b"z"))

    async def test_none_node_keeps_no_tags(self):
        """On a tag-storage = "none" node a tag write is lost and LDG reads 0; the tagged PTE is reported."""
        k = self.kernel()
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM, node="bad")
        await p("stg", addr=a, tag=7, size=32)
        assert await p.tags(a, 32) == [0, 0]
        f = await host(k, "page-flags", pid=p.pid, addr=a)
        assert (f["node"], f["tag-capable"]) == ("bad", False)
        assert "TAGGED-PTE-IS-TAG-CAPABLE" in invariants(k)

    async def test_migrate_to_node(self):
        """migrate-pages to = NODE moves pages there (data and tags kept); pages already there stay; ENOENT."""
        k = self.kernel()
        p = Proc.new(k, "p")
        a = await p("mmap", size=2 * PAGE, prot=RWM)
        await p("stg", addr=a, tag=4, size=2 * PAGE)
        assert await host(k, "migrate-pages", pid=p.pid, addr=a, size=2 * PAGE, to="cxl0") == 2
        assert p.page(a).node == "cxl0" and await p.tags(a, 32) == [4, 4]
        assert await host(k, "migrate-pages", pid=p.pid, addr=a, size=2 * PAGE, to="cxl0") == 0
        await expect_errno("ENOENT", host(k, "migrate-pages", pid=p.pid, addr=a, size=PAGE, to="nowhere"))
        await expect_errno("EINVAL", host(k, "migrate-pages", pid=p.pid, addr=a, size=PAGE, to="tag-storage"))
        assert invariants(k) == []


class TestTagStorageInvariants:
    """The state checks of part B can fail (each is shown breaking on a state made by hand)."""

    async def test_clobbered_data_of_a_tag_storage_page(self):
        """A tag storage page in use as data whose bytes change behind its owner breaks TAG-STORAGE-NOT-CLOBBERED."""
        k = Kernel(physmem={"tag_storage": "dynamic"})
        await host(k, "alloc-pages", name="ts", count=1, **{"from": "tag-storage"})
        assert invariants(k) == []
        k.page_handles["ts"][0].write(0, b"\xff" * 16)  # a tag write into an unreserved block, as it were
        assert "TAG-STORAGE-NOT-CLOBBERED" in invariants(k)

    async def test_refcount_and_zero_page(self):
        """A block refcount off by one breaks TAG-BLOCK-REFCOUNT; dropping the zero page's block breaks
        ZERO-PAGE-HAS-STORAGE."""
        k = Kernel(physmem={"tag_storage": "dynamic"})
        ts = k.tag_storage
        (b,) = ts.blocks
        ts.blocks[b] += 1
        assert "TAG-BLOCK-REFCOUNT" in invariants(k)
        del ts.blocks[b]
        assert "ZERO-PAGE-HAS-STORAGE" in invariants(k)

    async def test_tagged_without_storage(self):
        """A PG_mte_tagged page of a dynamic node without PG_tag_storage_reserved breaks TAGGED-IMPLIES-STORAGE."""
        from hypervisor.arm64.mte_tag_storage import PG_tag_storage_reserved

        k = Kernel(physmem={"tag_storage": "dynamic"})
        p = Proc.new(k, "p")
        a = await p("mmap", size=PAGE, prot=RWM)
        await p("stg", addr=a, tag=1, size=16)
        assert invariants(k) == []
        p.page(a).flags &= ~PG_tag_storage_reserved
        assert "TAGGED-IMPLIES-STORAGE" in invariants(k)


async def test_meminfo_regions_are_not_ram():
    """meminfo lists named regions by type and size; they are never counted in ram-pages."""
    k = Kernel(physmem={"regions": [{"name": "bar0", "type": "pfnmap", "size": 2 << 20}]})
    m = await host(k, "meminfo")
    assert m["regions"] == {"bar0": {"type": "pfnmap", "pages": 512}} and m["ram-pages"] == 65536
