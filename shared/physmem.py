"""The host's physical memory configuration: tag storage, hot-plugged nodes, device regions.

A scenario's ``[host]`` table (or ``[hosts.NAME]``) describes where allocation tags live and
what memory the host has beyond its boot DRAM (the contract's "physical memory" part). The
scenario parser builds a :class:`PhysConfig` from it; the runner sends it to the hypervisor in
``boot`` as a plain map (:meth:`PhysConfig.to_wire`), and the hypervisor checks it again
(:meth:`PhysConfig.from_wire`: a bad map is EINVAL, never a crash) before building its nodes
and regions (``hypervisor/mm/memory_hotplug.py``, ``hypervisor/mm/memremap.py``).

Physical layout (page frame numbers), documented in docs/model.md:

- the zero page is pfn ``0x7ffff``;
- ``node0`` (the boot DRAM, ``ram`` bytes) starts at pfn ``0x80000`` (2 GiB); its tag storage
  (the static carve-out or the dynamic tag storage region, ram/32) follows it, rounded up to a
  2 MiB boundary;
- each declared node starts at the next 1 GiB boundary after the previous node's tag storage,
  in declared order, and its own tag storage (if any) follows its RAM the same way;
- regions start at pfn ``0x1000000`` (64 GiB), each at the next boundary of 2 MiB after the
  previous one, in declared order.
"""

from __future__ import annotations

from typing import Any

import attrs

from shared.mte import PAGE_SIZE

TAG_STORAGE_MODES = ("static", "dynamic")
KVM_TAG_STORAGE = ("reserve", "refuse")
NODE_KINDS = ("dram", "cxl", "gpu")
NODE_ZONES = ("normal", "movable")
NODE_TAG_STORAGE = ("static", "none")
REGION_TYPES = ("pfnmap", "private", "coherent", "fs-dax", "generic", "pci-p2pdma")
REGION_ATTRS = ("device", "write-combine", "cacheable")
#: Names a scenario may not give a node or region.
RESERVED_NAMES = ("node0", "tag-storage")
TWO_MIB = 2 << 20


@attrs.frozen
class NodeConfig:
    """``[host.nodes.NAME]``: memory hot-plugged with add_memory_resource(), a CPU-less NUMA node."""

    name: str
    kind: str
    size: int
    zone: str
    tag_storage: str | None = None  # None: the host's mode (dram) or "static" (cxl, gpu)

    def to_wire(self) -> dict:
        """As ``boot`` carries it."""
        return {"name": self.name, "kind": self.kind, "size": self.size, "zone": self.zone,
                "tag_storage": self.tag_storage}


@attrs.frozen
class RegionConfig:
    """``[host.regions.NAME]``: device memory (a PFNMAP region or a ZONE_DEVICE dev_pagemap)."""

    name: str
    type: str
    size: int
    attr: str = "device"
    allow_any_uncached: bool = True

    def to_wire(self) -> dict:
        """As ``boot`` carries it."""
        return {"name": self.name, "type": self.type, "size": self.size, "attr": self.attr,
                "allow_any_uncached": self.allow_any_uncached}


@attrs.frozen
class PhysConfig:
    """Everything of the physical-memory part a host is booted with (defaults: mainline, static)."""

    tag_storage: str = "static"
    tag_block_size: int = PAGE_SIZE
    kvm_tag_storage: str = "reserve"
    stage2_fwb: bool = True
    cache_dic: bool = True
    nodes: tuple[NodeConfig, ...] = ()
    regions: tuple[RegionConfig, ...] = ()

    @property
    def is_default(self) -> bool:
        """Nothing beyond mainline's static host: ``boot`` need not carry it."""
        return self is _DEFAULT or self == _DEFAULT

    def to_wire(self) -> dict:
        """As ``boot`` carries it."""
        return {"tag_storage": self.tag_storage, "tag_block_size": self.tag_block_size,
                "kvm_tag_storage": self.kvm_tag_storage, "stage2_fwb": self.stage2_fwb,
                "cache_dic": self.cache_dic, "nodes": [n.to_wire() for n in self.nodes],
                "regions": [r.to_wire() for r in self.regions]}

    @classmethod
    def from_wire(cls, m: Any) -> PhysConfig:
        """Check a map from ``boot`` (or a scenario, already normalised) and build the config.

        Raises:
            ValueError: a missing or unknown key, a value of the wrong kind, a reserved or
                repeated name, a size that is not a multiple of its unit.
        """
        if m is None:
            return cls()
        if not isinstance(m, dict):
            raise ValueError("physmem must be a map")
        _keys(m, ("tag_storage", "tag_block_size", "kvm_tag_storage", "stage2_fwb", "cache_dic", "nodes",
                  "regions"), "physmem")
        nodes = tuple(_node(n) for n in _list(m.get("nodes", []), "physmem.nodes"))
        regions = tuple(_region(r) for r in _list(m.get("regions", []), "physmem.regions"))
        check_names([n.name for n in nodes] + [r.name for r in regions])
        return cls(tag_storage=_choice(m.get("tag_storage", "static"), TAG_STORAGE_MODES, "tag_storage"),
                   tag_block_size=_uint(m.get("tag_block_size", PAGE_SIZE), "tag_block_size"),
                   kvm_tag_storage=_choice(m.get("kvm_tag_storage", "reserve"), KVM_TAG_STORAGE, "kvm_tag_storage"),
                   stage2_fwb=_bool(m.get("stage2_fwb", True), "stage2_fwb"),
                   cache_dic=_bool(m.get("cache_dic", True), "cache_dic"),
                   nodes=nodes, regions=regions)


def check_names(names: list[str]) -> None:
    """Node and region names share one namespace per host; ``node0`` and ``tag-storage`` are reserved.

    Raises:
        ValueError: a reserved or repeated name.
    """
    seen: set[str] = set()
    for name in names:
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is a reserved name (node0 is the boot DRAM, tag-storage the "
                             "dynamic tag storage)")
        if name in seen:
            raise ValueError(f"{name!r} names two nodes or regions (they share one namespace)")
        seen.add(name)


def default_node_zone(kind: str) -> str:
    """``zone`` when a node does not say: ``normal`` for DRAM, ``movable`` for CXL and GPU memory."""
    return "normal" if kind == "dram" else "movable"


def _node(m: Any) -> NodeConfig:
    if not isinstance(m, dict):
        raise ValueError("physmem.nodes: each node must be a map")
    _keys(m, ("name", "kind", "size", "zone", "tag_storage"), "physmem.nodes[]")
    kind = _choice(m.get("kind"), NODE_KINDS, "node kind")
    size = _uint(m.get("size"), "node size")
    if not size or size % TWO_MIB:
        raise ValueError(f"node size must be a non-zero multiple of 2 MiB (got {size})")
    ts = m.get("tag_storage")
    return NodeConfig(name=_name(m.get("name")), kind=kind, size=size,
                      zone=_choice(m.get("zone", default_node_zone(kind)), NODE_ZONES, "node zone"),
                      tag_storage=None if ts is None else _choice(ts, NODE_TAG_STORAGE, "node tag_storage"))


def _region(m: Any) -> RegionConfig:
    if not isinstance(m, dict):
        raise ValueError("physmem.regions: each region must be a map")
    _keys(m, ("name", "type", "size", "attr", "allow_any_uncached"), "physmem.regions[]")
    size = _uint(m.get("size"), "region size")
    if not size or size % PAGE_SIZE:
        raise ValueError(f"region size must be a non-zero multiple of 4 KiB (got {size})")
    return RegionConfig(name=_name(m.get("name")), type=_choice(m.get("type"), REGION_TYPES, "region type"),
                        size=size, attr=_choice(m.get("attr", "device"), REGION_ATTRS, "region attr"),
                        allow_any_uncached=_bool(m.get("allow_any_uncached", True), "allow_any_uncached"))


def _keys(m: dict, allowed: tuple[str, ...], where: str) -> None:
    extra = [k for k in m if k not in allowed]
    if extra:
        raise ValueError(f"{where}: unknown key {str(extra[0])[:40]!r}")


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list | tuple):
        raise ValueError(f"{where} must be a list")
    return list(v)


def _choice(v: Any, options: tuple[str, ...], what: str) -> str:
    if v not in options:
        raise ValueError(f"{what} must be one of {', '.join(options)} (got {str(v)[:40]!r})")
    return v


def _uint(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 52:
        raise ValueError(f"{what} must be a non-negative integer (got {str(v)[:40]!r})")
    return v


def _bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{what} must be true or false (got {str(v)[:40]!r})")
    return v


def _name(v: Any) -> str:
    if not isinstance(v, str) or not v or len(v) > 64:
        raise ValueError(f"a node or region needs a name (got {str(v)[:40]!r})")
    return v


_DEFAULT = PhysConfig()  # (frozen: what is_default compares with)
