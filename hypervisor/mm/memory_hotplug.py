"""NUMA nodes: the boot DRAM and hot-plugged memory, with their tag storage (mm/memory_hotplug.c).

``node0`` is the boot DRAM (``ram`` bytes); each ``[host.nodes.NAME]`` is memory added with
add_memory_resource() and onlined as a CPU-less node, in declared order. The physical layout
follows :mod:`shared.physmem` (docs/model.md): node0 at pfn 0x80000, its tag storage (ram/32,
rounded up to whole pages) at the next 2 MiB boundary after its RAM, every further node at the
next 1 GiB boundary after the previous node's tag storage (or RAM), its own tag storage after it.

Each node's tag storage is in one of three modes, decided at boot (:func:`build_nodes`):

* ``static``: the hardware's carve-out, never handed out and never counted (TAG-CARVE-OUT-HIDDEN);
* ``dynamic``: RFC v3's ``arm,mte-tag-storage`` region, given to the allocator as MIGRATE_CMA
  (mte_tag_storage_init() + cma_init_reserved_mem(); see hypervisor/arm64/mte_tag_storage.py);
* ``none``: the node keeps no tags (``mte = false``, or seed 003's erratum node).

Deliberate difference: a node is one zone (its ``zone``), and its pages are handed out order-0
from a free list plus a lazy cursor over its pfn ranges, so boot costs nothing per page.
"""

from __future__ import annotations

import math

import attrs

from shared.mte import PAGE_SHIFT, PAGE_SIZE
from shared.physmem import PhysConfig

NODE0_START = 0x80000  # 2 GiB: DRAM on the model's board
PAGES_2M = (2 << 20) >> PAGE_SHIFT
PAGES_1G = (1 << 30) >> PAGE_SHIFT
MAX_TAG_STORAGE_REGIONS = 32  # MAX_TAG_STORAGE_REGIONS (RFC v3 patch 19)


def _round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@attrs.define(eq=False, repr=False)
class Node:
    """pg_data_t of one node, reduced to one zone and its free lists."""

    name: str
    kind: str  # "dram" (node0 too), "cxl", "gpu"
    zone: str  # "normal" or "movable"
    start: int  # first pfn of its RAM
    nr: int  # pages of RAM
    ts_mode: str  # "static", "dynamic" or "none": the mode in effect
    ts_start: int = 0  # first pfn of its tag storage (static carve-out or dynamic region)
    ts_pages: int = 0  # pages of tag storage (0 for "none")
    ts_ordinary: bool = False  # mte = false: a valid dynamic region went to the allocator as ordinary pages
    # the free lists: never-used pfn ranges (handed out in order) and freed order-0 pages (LIFO)
    ranges: list[list[int]] = attrs.Factory(list)
    free: list = attrs.Factory(list)
    free_huge: dict[int, list] = attrs.Factory(dict)
    cma_free: dict[int, None] = attrs.Factory(dict)  # MIGRATE_CMA: free tag storage pfns (popitem: lowest first)
    managed: int = 0  # pages the allocator manages (ram-pages of the node)
    used: int = 0  # of which in use

    def __repr__(self) -> str:
        return f"<node {self.name} {self.kind} {self.zone} pfn {self.start:#x}+{self.nr} ts={self.ts_mode}>"

    @property
    def end(self) -> int:
        """One past the last pfn of its RAM."""
        return self.start + self.nr

    @property
    def dynamic(self) -> bool:
        """The node's tag storage is managed dynamically (its pages need storage reserved)."""
        return self.ts_mode == "dynamic"

    def in_tag_storage(self, pfn: int) -> bool:
        """``pfn`` lies in this node's tag storage (carve-out or region)."""
        return self.ts_start <= pfn < self.ts_start + self.ts_pages

    def owns(self, pfn: int) -> bool:
        """``pfn`` is RAM of this node or its tag storage."""
        return self.start <= pfn < self.end or self.in_tag_storage(pfn)

    @property
    def free_pages(self) -> int:
        """Free pages the allocator manages on this node (CMA pages included)."""
        return self.managed - self.used

    def cma_free_pages(self) -> int:
        """NR_FREE_CMA_PAGES of the node."""
        if not self.dynamic:
            return 0
        return len(self.cma_free)

    def to_meminfo(self) -> dict:
        """The node's row of ``meminfo`` ``nodes``."""
        return {"kind": self.kind, "zone": self.zone, "pages": self.managed, "free-pages": self.free_pages,
                "tag-storage": self.ts_mode, "tag-storage-pages": 0 if self.ts_mode == "none" else self.ts_pages}


@attrs.frozen
class Layout:
    """What boot decided: the nodes, the host's mode in effect and the tag block size."""

    nodes: tuple[Node, ...]
    mode: str  # "static", "dynamic" or "none"
    block_size_pages: int  # 0 unless dynamic management is enabled
    configured_dynamic: bool  # tag-storage = "dynamic" was asked for (the RFC's kernel, patch 16 included)


def block_size_pages(block_size: int) -> int:
    """PHYS_PFN(PAGE_SIZE * block_size / gcd(PAGE_SIZE, block_size)) (RFC v3 patch 19); 0 for 0."""
    if block_size == 0:
        return 0
    return math.lcm(PAGE_SIZE, block_size) // PAGE_SIZE


def build_nodes(cfg: PhysConfig, mte: bool, ram: int) -> Layout:
    """add_memory_resource() for every node, and mte_tag_storage_init()'s validity rules (RFC invariant 1, 2).

    Dynamic management is disabled, without an error, when the block size is 0, a dynamic node's
    tag region (size/32) is not a multiple of 2 MiB or of the block, or there are more than 32
    dynamic nodes: their regions then stay hidden, as a static carve-out.
    """
    specs = [("node0", "dram", ram, "normal", None)] + [(n.name, n.kind, n.size, n.zone, n.tag_storage)
                                                        for n in cfg.nodes]
    want_dynamic = cfg.tag_storage == "dynamic"
    bsp = block_size_pages(cfg.tag_block_size)

    def dynamic_node(kind: str, ts: str | None) -> bool:
        return want_dynamic and kind == "dram" and ts is None

    dyn = [s for s in specs if dynamic_node(s[1], s[4])]
    valid = want_dynamic and bsp > 0 and len(dyn) <= MAX_TAG_STORAGE_REGIONS
    for _name, _kind, size, _zone, _ts in dyn:
        region = size // 32
        if size % 32 or region % (2 << 20) or (region // PAGE_SIZE) % max(bsp, 1):
            valid = False
    nodes = []
    pfn = NODE0_START
    for i, (name, kind, size, zone, ts) in enumerate(specs):
        if i:
            pfn = _round_up(pfn, PAGES_1G)
        nr = size // PAGE_SIZE
        ts_pages = -(-nr // 32)
        if not mte:
            mode = "none"
        elif dynamic_node(kind, ts):
            mode = "dynamic" if valid else "static"
        else:
            mode = ts or "static"
        has_region = mode in ("static", "dynamic") or (not mte and dynamic_node(kind, ts))
        node = Node(name=name, kind=kind, zone=zone, start=pfn, nr=nr, ts_mode=mode)
        end = pfn + nr
        node.ranges.append([pfn, end])
        node.managed = nr
        if has_region:
            node.ts_start = _round_up(end, PAGES_2M)
            node.ts_pages = ts_pages
            end = node.ts_start + ts_pages
            if mode == "dynamic":
                node.managed += ts_pages
                node.cma_free = dict.fromkeys(range(end - 1, node.ts_start - 1, -1))
            elif mode == "none" and valid:  # mte = false: free_reserved_page() of a valid region (RFC invariant 2)
                node.ts_ordinary = True
                node.ranges.append([node.ts_start, end])
                node.managed += ts_pages
        nodes.append(node)
        pfn = end
    mode = "none" if not mte else "dynamic" if valid else "static"
    return Layout(tuple(nodes), mode, bsp if mode == "dynamic" else 0, want_dynamic)
