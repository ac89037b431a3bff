"""Guest RAM as the VMM sees it: what migration and snapshots share.

A VMM knows its guest RAM from two records: the memslots it registered
(IPA -> its own address) and the mappings it made of its own address space
(``mmap`` in ``vm-setup``, and the host-process ``mmap``/``munmap``/``mprotect``
ops a manual-setup scenario forwards through it). :func:`ram_slots` joins them:
each RAM memslot with the backing of the mapping it points into. A slot backed
by ``device``, ``pfnmap`` or ``p2pmem`` memory is not RAM (neither logged nor copied);
a slot bound to a ``node`` or backed by a named ``region`` carries that name in its layout.

Pages move in runs (:class:`PageRun`: consecutive pages of one slot, their data
and, for an MTE VM, their tags, one byte per 16-byte granule):

* :func:`read_pages`: data with ``load`` through the VMM's mapping (at most
  :data:`shared.abi.MAX_IO` bytes per call), tags with one
  ``kvm-copy-tags`` FROM_GUEST per chunk, skipping pages ``mincore`` reports
  non-resident when asked to (a page nobody touched reads zero data and zero
  tags, so it need not be sent);
* :func:`write_pages`: data with ``store``, then tags with ``kvm-copy-tags``
  TO_GUEST (the kernel refuses that while dirty logging is on: EBUSY).

No per-page Python work: runs are found in the ``mincore`` vector with one
regular expression, and data and tags are sliced as bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs

from shared.abi import MAX_IO, AbiError, validate_args
from shared.errno import EFAULT
from shared.mte import MTE_GRANULE_SIZE, PAGE_SIZE
from vmm.errors import VmmError

if TYPE_CHECKING:
    from vmm.machine import Vmm

#: Tag bytes per page (one per granule).
TAGS_PER_PAGE = PAGE_SIZE // MTE_GRANULE_SIZE
#: Pages per load/store/copy-tags call.
CHUNK_PAGES = MAX_IO // PAGE_SIZE
#: KVM_ARM_TAGS_TO_GUEST / KVM_ARM_TAGS_FROM_GUEST (arch/arm64/include/uapi/asm/kvm.h).
TAGS_TO_GUEST = 0
TAGS_FROM_GUEST = 1
_RESIDENT = re.compile(rb"[^\x00]+")


#: Backings whose memslots are not guest RAM: migration and snapshots leave them out.
NOT_RAM = ("device", "pfnmap", "p2pmem")

@attrs.define
class Mapping:
    """One mmap the VMM made of its own address space (what /proc/self/maps would say)."""

    addr: int
    size: int
    backing: str
    object: str | None
    hugepage_size: int
    prot_mte: bool
    share: str
    offset: int = 0
    node: str | None = None  # the mmap's node binding
    region: str | None = None  # the device region it maps

    @property
    def end(self) -> int:
        """The first address after the mapping."""
        return self.addr + self.size


@attrs.frozen
class RamSlot:
    """A RAM memslot and the backing of the VMM mapping it points into.

    Attributes:
        slot, ipa, size, addr, flags: the memslot as registered.
        backing, object, hugepage_size, prot_mte, share: the mapping's (``anon`` and no MTE when the
            VMM does not know the mapping: it was not made through it).
        offset: the slot's offset in the backing object.
    """

    slot: int
    ipa: int
    size: int
    addr: int
    flags: tuple
    backing: str
    object: str | None
    hugepage_size: int
    prot_mte: bool
    share: str
    offset: int
    node: str | None = None
    region: str | None = None

    @property
    def pages(self) -> int:
        """The slot's size in pages."""
        return self.size // PAGE_SIZE

    def layout(self) -> dict:
        """The slot as a msgpack-safe map (migration layout, snapshot header)."""
        return {"slot": self.slot, "ipa": self.ipa, "size": self.size, "flags": list(self.flags),
                "backing": self.backing, "object": self.object, "hugepage_size": self.hugepage_size,
                "prot_mte": self.prot_mte, "share": self.share,
                **{k: v for k, v in (("node", self.node), ("region", self.region)) if v is not None}}


@attrs.define
class PageRun:
    """Consecutive pages of one slot: ``data`` (pages * 4 KiB) and ``tags`` (pages * 256, or None)."""

    slot: int
    first: int
    data: bytes
    tags: bytes | None

    @property
    def pages(self) -> int:
        """Pages in the run."""
        return len(self.data) // PAGE_SIZE


# ---- the VMM's own mappings -------------------------------------------------------------------

def record_mmap(vmm: Vmm, addr: int, args: dict) -> None:
    """Remember a successful mmap of ``args`` (normalised ``mmap`` arguments) at ``addr``."""
    size = args["size"]
    if args["backing"] == "hugetlb":
        hp = args["hugepage_size"]
        size = -(-size // hp) * hp
    else:
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
    forget_range(vmm, addr, size)  # MAP_FIXED replaces what was there
    vmm.mappings.append(Mapping(addr, size, args["backing"], args["object"], args["hugepage_size"],
                                "mte" in args["prot"], args["share"], args["offset"], args.get("node"),
                                args.get("region")))


def _split(vmm: Vmm, addr: int, size: int) -> tuple[list[Mapping], list[Mapping]]:
    """Split the mappings at ``addr`` and ``addr + size``: (outside, inside)."""
    end = addr + size
    outside, inside = [], []
    for m in vmm.mappings:
        if m.end <= addr or m.addr >= end:
            outside.append(m)
            continue
        lo, hi = max(m.addr, addr), min(m.end, end)
        if m.addr < lo:
            outside.append(attrs.evolve(m, size=lo - m.addr))
        if hi < m.end:
            outside.append(attrs.evolve(m, addr=hi, size=m.end - hi, offset=m.offset + hi - m.addr))
        inside.append(attrs.evolve(m, addr=lo, size=hi - lo, offset=m.offset + lo - m.addr))
    return outside, inside


def forget_range(vmm: Vmm, addr: int, size: int) -> None:
    """Forget the mappings of ``[addr, addr + size)`` (a successful munmap)."""
    vmm.mappings = sorted(_split(vmm, addr, size)[0], key=lambda m: m.addr)


def note_host_op(vmm: Vmm, op: str, args: Any, value: Any) -> None:
    """Keep :attr:`Vmm.mappings` up to date after a forwarded host-process op succeeded."""
    if op not in ("mmap", "munmap", "mprotect"):
        return
    try:
        a = validate_args(op, args)
    except AbiError:
        return
    if op == "mmap" and isinstance(value, int):
        record_mmap(vmm, value, a)
    elif op == "munmap":
        forget_range(vmm, a["addr"], a["size"])
    elif op == "mprotect":
        size = -(-a["size"] // PAGE_SIZE) * PAGE_SIZE
        outside, inside = _split(vmm, a["addr"], size)
        mte = "mte" in a["prot"]
        vmm.mappings = sorted(outside + [attrs.evolve(m, prot_mte=mte) for m in inside], key=lambda m: m.addr)


def mapping_at(vmm: Vmm, addr: int) -> Mapping | None:
    """The VMM mapping holding ``addr`` (None if the VMM did not make it)."""
    for m in vmm.mappings:
        if m.addr <= addr < m.end:
            return m
    return None


def ram_slots(vmm: Vmm) -> list[RamSlot]:
    """Every RAM memslot of the VM (slot order) with the backing of the mapping behind it.

    Slots whose mapping is ``device``, ``pfnmap`` or ``p2pmem`` memory are left out (not RAM).
    """
    out = []
    for s in sorted(vmm.slots.values(), key=lambda s: s.slot):
        m = mapping_at(vmm, s.addr)
        if m is not None and m.backing in NOT_RAM:
            continue
        if m is None:
            out.append(RamSlot(s.slot, s.ipa, s.size, s.addr, tuple(s.flags), "anon", None, 2 << 20, False,
                               "private", 0))
        else:
            out.append(RamSlot(s.slot, s.ipa, s.size, s.addr, tuple(s.flags), m.backing, m.object,
                               m.hugepage_size, m.prot_mte, m.share, m.offset + s.addr - m.addr, m.node, m.region))
    return out


# ---- pages ----------------------------------------------------------------------------------

async def mincore(vmm: Vmm, slot: RamSlot, first: int, count: int, ctx: str | None) -> bytes:
    """mincore(2) over pages ``[first, first + count)`` of the slot: one byte per page, non-zero if resident."""
    out = []
    for lo in range(first, first + count, MAX_IO):
        n = min(MAX_IO, first + count - lo)
        v = (await vmm._call("mincore", {"addr": slot.addr + lo * PAGE_SIZE, "size": n * PAGE_SIZE}, ctx)).value
        out.append(bytes(v))
    return b"".join(out)


def resident_runs(vec: bytes, first: int = 0) -> list[tuple[int, int]]:
    """The runs ``(first page, count)`` of non-zero bytes of a mincore vector (offset by ``first``)."""
    return [(first + m.start(), m.end() - m.start()) for m in _RESIDENT.finditer(vec)]


def page_runs(pages: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted page indexes -> runs ``(first, count)`` of consecutive pages."""
    runs: list[list[int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return [(a, b) for a, b in runs]


async def read_tags(vmm: Vmm, ipa: int, length: int, ctx: str | None) -> bytes:
    """KVM_ARM_MTE_COPY_TAGS FROM_GUEST over ``[ipa, ipa + length)`` (one call; EFAULT if short)."""
    r = (await vmm._call("kvm-copy-tags", {"vm": vmm._need_vm(), "guest_ipa": ipa, "length": length,
                                           "flags": TAGS_FROM_GUEST, "reserved": [0, 0], "tags": b""}, ctx)).value
    if r["length"] != length:
        raise VmmError(EFAULT, f"COPY_TAGS FROM_GUEST at {ipa:#x} stopped after {r['length']} of {length} bytes")
    return bytes(r.get("tags") or b"")


async def read_pages(vmm: Vmm, slot: RamSlot, first: int, count: int, ctx: str | None, *,
                     tags: bool, resident_only: bool = True) -> list[PageRun]:
    """Read pages ``[first, first + count)`` of ``slot``: data through the VMM's mapping, tags from KVM.

    Args:
        vmm: the VMM (its VM and hypervisor connection).
        slot: the slot (:func:`ram_slots`).
        first, count: the pages, relative to the slot.
        ctx: the kernel context every call runs as.
        tags: read tags too (an MTE VM).
        resident_only: skip pages mincore reports non-resident (they read zero data and zero tags).

    Returns:
        Runs of at most :data:`CHUNK_PAGES` pages each, in page order.

    Raises:
        VmmError, shared.wire.RemoteError: a call failed.
    """
    if resident_only:
        runs = resident_runs(await mincore(vmm, slot, first, count, ctx), first)
    else:
        runs = [(first, count)] if count else []
    out = []
    for start, n in runs:
        for lo in range(start, start + n, CHUNK_PAGES):
            k = min(CHUNK_PAGES, start + n - lo)
            data = (await vmm._call("load", {"addr": slot.addr + lo * PAGE_SIZE, "tag": 0, "size": k * PAGE_SIZE},
                                    ctx)).value
            t = await read_tags(vmm, slot.ipa + lo * PAGE_SIZE, k * PAGE_SIZE, ctx) if tags else None
            out.append(PageRun(slot.slot, lo, bytes(data), t))
    return out


async def write_tags(vmm: Vmm, ipa: int, tags: bytes, ctx: str | None) -> None:
    """KVM_ARM_MTE_COPY_TAGS TO_GUEST of ``tags`` (one per granule) at ``ipa`` (one call; EFAULT if short)."""
    length = len(tags) * MTE_GRANULE_SIZE
    r = (await vmm._call("kvm-copy-tags", {"vm": vmm._need_vm(), "guest_ipa": ipa, "length": length,
                                           "flags": TAGS_TO_GUEST, "reserved": [0, 0], "tags": tags}, ctx)).value
    if r["length"] != length:
        raise VmmError(EFAULT, f"COPY_TAGS TO_GUEST at {ipa:#x} stopped after {r['length']} of {length} bytes")


async def write_data(vmm: Vmm, slot: RamSlot, first: int, data: bytes, ctx: str | None) -> None:
    """Store ``data`` at page ``first`` of ``slot`` through the VMM's mapping (at most MAX_IO per call)."""
    if len(data) <= MAX_IO:
        await vmm._call("store", {"addr": slot.addr + first * PAGE_SIZE, "tag": 0, "data": data}, ctx)
        return
    view = memoryview(data)
    for lo in range(0, len(data), MAX_IO):
        await vmm._call("store", {"addr": slot.addr + first * PAGE_SIZE + lo, "tag": 0,
                                  "data": bytes(view[lo:lo + MAX_IO])}, ctx)


async def write_pages(vmm: Vmm, slot: RamSlot, runs: Iterable[PageRun], ctx: str | None, *,
                      tags: bool = True) -> None:
    """Write runs into ``slot``: data with ``store``, then (if ``tags`` and the run has them) tags with COPY_TAGS.

    Raises:
        VmmError, shared.wire.RemoteError: a call failed (EBUSY: dirty logging is on).
    """
    for run in runs:
        await write_data(vmm, slot, run.first, run.data, ctx)
        if tags and run.tags is not None:
            for lo in range(0, len(run.tags), MAX_IO):
                await write_tags(vmm, slot.ipa + run.first * PAGE_SIZE + lo * MTE_GRANULE_SIZE,
                                 run.tags[lo:lo + MAX_IO], ctx)
