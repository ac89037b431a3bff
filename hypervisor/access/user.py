"""User memory accesses with MTE tag checks: load, store, STG, LDG, IRG.

The CPU executing a host process's instructions (no single Linux file; the TCF
handling is arch/arm64/kernel/mte.c). The per-granule check is
:func:`hypervisor.access.tagcheck.mte_check_access`, shared with guest accesses.

Hardware checks tags where they live, atomically with the access; so does the
model. An access first faults in every page it touches (the fault paths have
scheduling points), then checks and performs the whole access with no point in
between, retrying if a page went away meanwhile.

Checks (Arm ARM, and the kernel's TCF handling in mte.c):

* Only loads and stores through a Normal-Tagged PTE are checked, and only when
  the thread's effective TCF (``mte_update_sctlr_user``) is not NONE and
  PSTATE.TCO is 0. STG/LDG never check.
* Every granule the access touches is compared with the pointer tag; an access
  spanning two granules is checked against both.
* SYNC (and ASYMM reads): the access is suppressed; the outcome is a
  ``tag-check-fault`` whose address is the first byte the access touches in
  the first mismatching granule (the granule's first byte for aligned
  accesses).
* ASYNC (and ASYMM writes): the access is performed, TFSR records the fault,
  and the outcome is ``async-tag-check-fault``.
* Allocation tags of memory that is not Normal-Tagged read as zero and ignore
  writes (RAZ/WI).

Signals are reported as errors: SIGSEGV (no mapping, or no permission) and
SIGBUS (an unaligned STG) come back as EFAULT with the signal named.
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import TYPE_CHECKING, cast

from hypervisor.access.tagcheck import AccessResult, mte_check_access
from hypervisor.arm64.mte import mte_update_sctlr_user
from hypervisor.arm64.mte_tag_storage import Livelock
from hypervisor.arm64.tags import read_tags, write_tags
from hypervisor.ghost import Entry, Ghost, loc_of
from hypervisor.mm.memory import do_anonymous_page_run, handle_mm_fault
from shared.errno import KernelError
from shared.mte import MTE_GRANULE_SIZE, MTE_GRANULES_PER_PAGE, PAGE_SHIFT, PAGE_SIZE, pointer_tag, untagged_addr

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import Pte
    from hypervisor.process import Task

__all__ = ["AccessResult", "effective_tcf", "user_irg", "user_ldg", "user_load", "user_stg", "user_store"]

#: The zero page's tags (all zero), for a special (zero-page) PTE.
ZERO_PAGE_TAGS = bytes(MTE_GRANULES_PER_PAGE)
_ZERO_PAGE = bytes(PAGE_SIZE)


def _pages(va: int, size: int):
    """(vpn, offset in page, length) for each page of [va, va+size)."""
    end = va + size
    while va < end:
        off = va & (PAGE_SIZE - 1)
        n = min(PAGE_SIZE - off, end - va)
        yield va >> PAGE_SHIFT, off, n
        va += n


async def _fault_in(k: Kernel, task: Task, va: int, size: int, write: bool):
    """Fault every page in, then return their PTEs, all checked at one instant.

    Each entry is ``(pte, offset in page, length, vpn, vma)``. The pages are
    looked up with C-level list operations (a 16 MiB access is 4096 pages);
    the faults, and so the scheduling points, are the same as page by page.
    """
    mm = task.mm
    pt = mm.pt
    lo, hi = va >> PAGE_SHIFT, ((va + size - 1) >> PAGE_SHIFT) + 1
    around = write and k.sched.kind == "free"  # a run of empty PTEs is faulted in at once
    for _ in range(16):
        faulted = False
        ptes0 = list(map(pt.get, range(lo, hi)))
        vpn = lo
        while vpn < hi:
            pte = pt.get(vpn) if faulted else ptes0[vpn - lo]  # a fault may have yielded: the tables as they are
            if pte is None and around:
                empty = hi - vpn if faulted else _empty_run(ptes0, vpn - lo)
                done = await do_anonymous_page_run(k, mm, vpn, empty)
                faulted = True
                if done:
                    vpn += done
                    continue
                pte = pt.get(vpn)
            if pte is None or not pte.present or (write and not pte.write) or pte.fault_on_access:
                await handle_mm_fault(k, mm, vpn << PAGE_SHIFT, write)
                faulted = True
            vpn += 1
        await k.sched.point("uaccess")
        found = list(map(pt.get, range(lo, hi)))
        if None in found:
            continue  # a page went away after its fault: fault again
        got = cast("list[Pte]", found)  # no None left
        if not all(map(_PRESENT, got)) or (write and not all(map(_WRITE, got))) or any(map(_FAULT_ON_ACCESS, got)):
            continue  # (C-level walks: a 16 MiB access is 4096 PTEs)
        ptes = []
        vpn = lo
        while vpn < hi:  # one VMA lookup per VMA, not per page
            addr = vpn << PAGE_SHIFT
            vma = mm.find_vma(addr)
            if vma is None:
                raise KernelError("EFAULT", f"SIGSEGV (SEGV_MAPERR) at {addr:#x}")
            last = min(hi, vma.end >> PAGE_SHIFT)
            ptes += [(pte, 0, PAGE_SIZE, v, vma) for v, pte in zip(range(vpn, last), got[vpn - lo:last - lo],
                                                                     strict=True)]
            vpn = last
        first_off = va & (PAGE_SIZE - 1)
        if first_off or len(ptes) == 1:
            pte, _, _, v, vma = ptes[0]
            ptes[0] = (pte, first_off, min(PAGE_SIZE - first_off, size), v, vma)
        if len(ptes) > 1:
            pte, _, _, v, vma = ptes[-1]
            ptes[-1] = (pte, 0, va + size - (v << PAGE_SHIFT), v, vma)
        return ptes
    raise KernelError("EFAULT", f"access at {va:#x} kept losing its pages")


_PRESENT = operator.attrgetter("present")
_WRITE = operator.attrgetter("write")
_FAULT_ON_ACCESS = operator.attrgetter("fault_on_access")


def _empty_run(ptes: list, i: int) -> int:
    """How many entries of ``ptes`` from ``i`` are None (empty PTEs)."""
    taken = list(map(_IS_NOT, itertools.islice(ptes, i, None), itertools.repeat(None)))  # (C-level walk)
    return taken.index(True) if True in taken else len(taken)


_IS_NOT = operator.is_not


def effective_tcf(k: Kernel, task: Task) -> str:
    """SCTLR_EL1.TCF0 as the task runs, after the per-CPU preference."""
    if not k.mte:
        return "none"
    return mte_update_sctlr_user(task.mte_ctrl, k.tcf_preferred)


def _check(k, task, ptes, tag: int, write: bool, va: int) -> dict | None:
    """The tag check (:func:`~hypervisor.access.tagcheck.mte_check_access`) with the thread's TCF and TCO."""
    tcf = "none" if task.tco else effective_tcf(k, task)
    if tcf == "none":
        return None  # nothing is checked: no spans to build
    spans = [(None if not pte.tagged or pte.page.zone == "pfnmap"
              else ZERO_PAGE_TAGS if pte.special or not pte.page.tag_capable else pte.page.tags, off, n)
             for pte, off, n, _vpn, _vma in ptes]
    m = mte_check_access(spans, tag, tcf, write)
    if m is None:
        return None
    addr = (ptes[m.index][3] << PAGE_SHIFT) + m.first
    return {"kind": m.kind, "addr": addr, "pointer_tag": tag, "memory_tag": m.memory_tag}


def _livelock(fn):
    """An access whose fault was replayed ``fault_replay_limit`` times ends ``livelock`` (an outcome)."""
    @functools.wraps(fn)
    async def wrapper(k, task, *args):
        try:
            return await fn(k, task, *args)
        except Livelock as exc:
            return AccessResult(None, {"kind": "livelock", "addr": exc.addr})
    return wrapper


@_livelock
async def user_load(k: Kernel, task: Task, ptr: int, tag: int, size: int) -> AccessResult:
    """A load of ``size`` bytes through a pointer carrying ``tag``."""
    va = untagged_addr(ptr)
    tag = tag or pointer_tag(ptr)
    if size == 0:
        return AccessResult(b"")
    ptes = await _fault_in(k, task, va, size, False)
    fault = _check(k, task, ptes, tag, False, va)
    if fault and fault["kind"] == "tag-check-fault":
        return AccessResult(None, fault)
    if fault:
        task.tfsr |= 1
    data = b"".join([_ZERO_PAGE[:n] if (d := pte.page.data_view()) is None else memoryview(d)[off:off + n]
                     for pte, off, n, _vpn, _vma in ptes])
    ghost = k.oracle.ghost
    mm = task.mm
    records = ghost.spaces.get(mm, _NO_RECORDS)
    for pte, _off, _n, vpn, vma in ptes:
        page = pte.page
        if page.zone in ("device", "pfnmap"):
            continue
        if vma.obj is None:  # private anonymous: Ghost.reads_as_written(), inline
            h = page.data_hash()
            e = records.get(vpn)
            if (h is None) if e is None else (e._src is page or e.data == h):
                continue
        elif ghost.reads_as_written(mm, vma, vpn, page):
            continue
        ghost.check_read_data(Ghost.run_loc(mm, vma, vpn), page, f"load by pid {task.pid}")  # reports
    return AccessResult(data, fault)


_NO_RECORDS: dict = {}


@_livelock
async def user_store(k: Kernel, task: Task, ptr: int, tag: int, data: bytes) -> AccessResult:
    """A store of ``data`` through a pointer carrying ``tag``."""
    va = untagged_addr(ptr)
    tag = tag or pointer_tag(ptr)
    if not data:
        return AccessResult(None)
    ptes = await _fault_in(k, task, va, len(data), True)
    fault = _check(k, task, ptes, tag, True, va)
    if fault and fault["kind"] == "tag-check-fault":
        return AccessResult(None, fault)
    if fault:
        task.tfsr |= 1
    pos = 0
    view = memoryview(data)
    ghost = k.oracle.ghost
    mm = task.mm
    records = None
    for pte, off, n, vpn, vma in ptes:
        page = pte.page
        if page.zone in ("device", "pfnmap"):
            page.write(off, view[pos:pos + n])
        elif vma.obj is None:  # private anonymous: the mm's entry by vpn (Ghost.anon_data_written, inline)
            if records is None:
                records = ghost.spaces.setdefault(mm, {})
            e = records.get(vpn)
            if e is None:
                e = records[vpn] = Entry()
            elif e._src is page:
                e._src = None  # about to be overwritten: the page's change need not digest what it held
            page.write(off, view[pos:pos + n])
            e._src = page  # Entry.written_from(page), inline (the entry does not point at the page here)
            if page._lazy is None:
                page._lazy = [e]
            else:
                page._lazy.append(e)
        else:
            page.write(off, view[pos:pos + n])
            ghost.data_written(Ghost.run_loc(mm, vma, vpn), page)
        pos += n
    return AccessResult(None, fault)


@_livelock
async def user_stg(k: Kernel, task: Task, ptr: int, tag: int, size: int) -> AccessResult:
    """STG over [ptr, ptr+size): set the allocation tag of every granule to ``tag``.

    Raises:
        KernelError: EFAULT (SIGBUS) for an address not 16-byte aligned;
            EINVAL for a size that is not a whole number of granules.
    """
    va = untagged_addr(ptr)
    tag = tag or pointer_tag(ptr)
    if va % MTE_GRANULE_SIZE:
        raise KernelError("EFAULT", f"SIGBUS (BUS_ADRALN): STG at {va:#x} is not 16-byte aligned")
    if size % MTE_GRANULE_SIZE:
        raise KernelError("EINVAL", f"stg: size {size} is not a multiple of the 16-byte granule")
    if size == 0:
        return AccessResult(None)
    ptes = await _fault_in(k, task, va, size, True)  # a tag store is a write
    for pte, off, n, vpn, _vma in ptes:
        if pte.tagged and pte.page.is_ram and pte.page.tag_capable:  # untagged memory: no tag written (RAZ/WI)
            tags = bytes([tag]) * (n // MTE_GRANULE_SIZE)
            write_tags(k, pte.page, off // MTE_GRANULE_SIZE, tags)
            k.oracle.ghost.tags_written(loc_of(k, task.mm, vpn), pte.page, off // MTE_GRANULE_SIZE, tags)
    return AccessResult(None)


@_livelock
async def user_ldg(k: Kernel, task: Task, ptr: int, size: int) -> AccessResult:
    """LDG over [ptr, ptr+size): one allocation tag per granule the range touches."""
    start = untagged_addr(ptr)
    va = start & ~(MTE_GRANULE_SIZE - 1)
    end = (start + size + MTE_GRANULE_SIZE - 1) & ~(MTE_GRANULE_SIZE - 1)
    size = end - va if size else 0
    if size == 0:
        return AccessResult([])
    ptes = await _fault_in(k, task, va, size, False)
    out = bytearray()
    for pte, off, n, vpn, _vma in ptes:
        g = n // MTE_GRANULE_SIZE
        if pte.tagged and not pte.special and pte.page.is_ram and pte.page.tag_capable:
            got = read_tags(k, pte.page, off // MTE_GRANULE_SIZE, g, f"ldg by pid {task.pid}")
            k.oracle.ghost.check_read_tags(loc_of(k, task.mm, vpn), pte.page, off // MTE_GRANULE_SIZE, got,
                                           f"ldg by pid {task.pid}")
            out += got
        else:
            out += bytes(g)  # zero page tags are zero; untagged memory is RAZ
    return AccessResult(list(out))


def user_irg(k: Kernel, task: Task) -> int:
    """IRG: a random tag not excluded by GCR_EL1.Exclude (0 if all are excluded)."""
    allowed = [t for t in range(16) if not task.mte_ctrl.excl & (1 << t)]
    if not allowed or not k.mte:
        return 0
    return task.irg_rng().choice(allowed)
