"""Guest memory accesses: stage-2 translation and the MTE tag check, as the hardware does them.

A guest access arrives already through the guest's stage 1 (the guest process
owns its page tables): a list of segments ``(ipa, length, attr)``, each within
one 4 KiB page, where ``attr`` is the stage-1 memory type: ``tagged``
(MAIR Normal-Tagged), ``normal`` or ``device``. Here the access takes stage-2
faults until every page is mapped with the permission it needs (KVM_RUN's
:func:`~hypervisor.kvm.mmu.kvm_handle_guest_abort`), then is checked and
performed with no scheduling point in between, as hardware checks tags where
they live, atomically with the access. No single Linux function does this; it
stands for the CPU plus the KVM_RUN loop.

Architecture rules modelled:
    * Allocation tags are reachable only when the VM has MTE (HCR_EL2.ATA),
      stage 1 is Normal-Tagged and stage 2 is Normal cacheable. Elsewhere
      (stage 2 Normal-NC or Device: Untagged, Arm ARM DDI 0487J.a D10-5976) tag
      reads are zero and tag writes ignored (RAZ/WI: no tag write, nothing lost),
      and nothing is checked.
    * Normal memory that keeps no tags (a ``tag-storage = "none"`` node, a
      coherent ZONE_DEVICE region): the hardware cannot tell. STG is lost, LDG
      reads 0 and checks compare against 0.
    * LDG/STG need SCTLR_EL1.ATA as well (``ata``), else RAZ/WI.
    * Loads and stores are checked when ``check`` (SCTLR_EL1.TCF, or none
      under PSTATE.TCO) is not none: every granule touched against the
      pointer tag. sync (and asymm loads): not performed, the fault is
      returned; async (and asymm stores): performed, the fault returned beside
      it. ``offset`` is the byte offset in the access of the first byte in the
      first mismatching granule.
    * A tag store is a write for stage-2 permission, so dirty logging sees it.
    * An access wholly outside every memslot (or a write to a read-only slot)
      exits to the VMM as KVM_EXIT_MMIO when it is one load or store of 1, 2,
      4 or 8 bytes (a valid syndrome), else KVM_RUN fails with ENOSYS
      (``io_mem_abort``); one that mixes RAM and MMIO is EFAULT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.access.tagcheck import AccessResult, mte_check_access
from hypervisor.arm64.tags import ZERO_TAGS, read_tags, write_tags
from hypervisor.ghost import loc_of_ipa
from hypervisor.kvm.kvm_host import Vcpu, kvm_has_mte
from hypervisor.kvm.mmu import (
    MMIO,
    RETRY,
    TAG_STORAGE_RETRY,
    io_mem_abort,
    kvm_handle_guest_abort,
    note_guest_write,
)
from hypervisor.mm.memremap import DEVICE_ZONES
from shared.errno import KernelError
from shared.mte import MTE_GRANULE_SIZE, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

MAX_RETRIES = 64


def _is_mmio(kvm, ipa: int, write: bool) -> bool:
    slot = kvm.slot_of(ipa >> PAGE_SHIFT)
    return slot is None or (write and slot.readonly)


class GuestLivelock(Exception):  # noqa: N818 - an outcome, not an error
    """A stage-2 fault replayed ``fault_replay_limit`` times for tag storage (the outcome ``livelock``)."""

    def __init__(self, offset: int):
        super().__init__(f"stage-2 fault at access offset {offset} replayed without progress")
        self.offset = offset


async def _fault_in(k: Kernel, vcpu: Vcpu, segs, write: bool) -> list:
    """Take stage-2 faults until every segment's page is mapped as needed; the entries, at one instant.

    A fault replayed because its folio had no tag storage (dynamic tag storage, "reserve") counts
    towards ``k.fault_replay_limit``: past it the access ends ``livelock`` (FAULT-FORWARD-PROGRESS).
    """
    kvm = vcpu.kvm
    replays = 0
    for _ in range(MAX_RETRIES + k.fault_replay_limit):
        pos = 0
        for ipa, n, _attr in segs:
            gfn = ipa >> PAGE_SHIFT
            e = kvm.s2.get(gfn)
            if e is None or (write and not e.writable):
                r = await kvm_handle_guest_abort(k, kvm, vcpu, gfn, write)
                if r is MMIO:
                    raise KernelError("EFAULT", f"guest access at IPA {ipa:#x} mixes RAM and MMIO")
                if r is TAG_STORAGE_RETRY:
                    replays += 1
                    if replays >= k.fault_replay_limit:
                        k.oracle.report("FAULT-FORWARD-PROGRESS", f"the stage-2 fault at IPA {ipa:#x} was replayed "
                                                                  f"{replays} times without its page getting tag "
                                                                  "storage (livelock)")
                        raise GuestLivelock(pos)
                if r is RETRY or r is TAG_STORAGE_RETRY:
                    await k.sched.point("kvm_run:retry")
            pos += n
        await k.sched.point("guest_access")
        if kvm.destroyed:
            raise KernelError("ESRCH", "the VM was destroyed under this vCPU")
        entries = [kvm.s2.get(ipa >> PAGE_SHIFT) for ipa, _n, _a in segs]
        if all(e is not None and (e.writable or not write) for e in entries):
            return entries
    raise KernelError("EFAULT", f"guest access at IPA {segs[0][0]:#x} kept losing its stage-2 mapping")


def _tags_reachable(k: Kernel, vcpu: Vcpu, attr: str, entry) -> bool:
    """The access is Tagged: stage 1 Normal-Tagged, stage 2 Normal (Write-Back), the VM has MTE."""
    return attr == "tagged" and entry.cacheable and entry.page.zone != "pfnmap" and kvm_has_mte(k, vcpu.kvm)


def _keeps_tags(page) -> bool:
    """The memory behind the entry keeps allocation tags (``tag-capable`` of page-flags)."""
    return page.zone not in DEVICE_ZONES and page.tag_capable


def _has_ghost(page) -> bool:
    """The ghost follows this frame's data and tags (RAM other than the zero page)."""
    return page.zone not in DEVICE_ZONES and page.zone != "zero"


def _check(k, vcpu, segs, entries, tag: int, write: bool, check: str) -> dict | None:
    """The tag check (:func:`~hypervisor.access.tagcheck.mte_check_access`) where the guest reaches tags."""
    spans = [((e.page.tags if _keeps_tags(e.page) else ZERO_TAGS) if _tags_reachable(k, vcpu, attr, e) else None,
              ipa & (PAGE_SIZE - 1), n)
             for (ipa, n, attr), e in zip(segs, entries, strict=True)]
    m = mte_check_access(spans, tag, check, write)
    if m is None:
        return None
    pos = sum(n for _ipa, n, _attr in segs[:m.index])
    off = segs[m.index][0] & (PAGE_SIZE - 1)
    return {"kind": m.kind, "offset": pos + m.first - off, "pointer_tag": tag, "memory_tag": m.memory_tag}


async def guest_memory_access(k: Kernel, vcpu: Vcpu, kind: str, segs, tag: int, data: bytes, check: str,
                              ata: bool) -> AccessResult:
    """One guest load, store, STG or LDG after stage 1 (see the module docstring).

    Returns:
        An :class:`AccessResult`: load -> bytes, ldg -> one tag per granule (bytes),
        with a ``fault`` dict for a tag check fault; or, for MMIO, the value
        ``{"exit": "mmio", "ipa", "size", "write", "data"}``.

    Raises:
        KernelError: EFAULT (KVM_RUN failed, or RAM/MMIO mixed), EINVAL (bad
            data length, unaligned STG), ESRCH (the VM is gone).
    """
    write = kind in ("store", "stg")
    total = sum(n for _i, n, _a in segs)
    if kind == "store" and len(data) != total:
        raise KernelError("EINVAL", f"store of {len(data)} bytes over segments of {total}")
    if kind in ("stg", "ldg") and any(ipa % MTE_GRANULE_SIZE or n % MTE_GRANULE_SIZE for ipa, n, _a in segs):
        raise KernelError("EINVAL", f"{kind}: segments must be whole 16-byte granules")
    kvm = vcpu.kvm
    mmio = [_is_mmio(kvm, ipa, write) for ipa, _n, _a in segs]
    if all(mmio):
        io_mem_abort(kind, segs)  # ENOSYS unless a single load/store of 1, 2, 4 or 8 bytes
        await k.sched.point("kvm_run:exit_mmio")
        return AccessResult({"exit": "mmio", "ipa": segs[0][0], "size": total, "write": write,
                             "data": data if write else b""})
    if any(mmio):
        raise KernelError("EFAULT", f"guest access at IPA {segs[0][0]:#x} mixes RAM and MMIO")
    try:
        entries = await _fault_in(k, vcpu, segs, write)
    except GuestLivelock as exc:
        return AccessResult(None, {"kind": "livelock", "offset": exc.offset})
    if kind == "load":
        fault = _check(k, vcpu, segs, entries, tag, False, check)
        if fault and fault["kind"] == "tag-check-fault":
            return AccessResult(None, fault)
        out = b"".join(e.page.read(ipa & (PAGE_SIZE - 1), n) for (ipa, n, _a), e in zip(segs, entries, strict=True))
        for (ipa, _n, _a), e in zip(segs, entries, strict=True):
            if _has_ghost(e.page):
                k.oracle.ghost.check_read_data(loc_of_ipa(kvm, ipa >> PAGE_SHIFT), e.page,
                                               f"guest load on vCPU {vcpu.index}")
        return AccessResult(out, fault)
    if kind == "store":
        fault = _check(k, vcpu, segs, entries, tag, True, check)
        if fault and fault["kind"] == "tag-check-fault":
            return AccessResult(None, fault)
        pos = 0
        for (ipa, n, _a), e in zip(segs, entries, strict=True):
            e.page.write(ipa & (PAGE_SIZE - 1), data[pos:pos + n])
            if _has_ghost(e.page):
                k.oracle.ghost.data_written(loc_of_ipa(kvm, ipa >> PAGE_SHIFT), e.page)
            note_guest_write(kvm, ipa >> PAGE_SHIFT)
            pos += n
        return AccessResult(None, fault)
    if kind == "stg":
        for (ipa, n, attr), e in zip(segs, entries, strict=True):
            if ata and _tags_reachable(k, vcpu, attr, e) and _has_ghost(e.page):
                first, tags = (ipa & (PAGE_SIZE - 1)) // MTE_GRANULE_SIZE, bytes([tag]) * (n // MTE_GRANULE_SIZE)
                if _keeps_tags(e.page):  # else the memory drops the write (as the host's STG: user_stg)
                    write_tags(k, e.page, first, tags)
                    k.oracle.ghost.tags_written(loc_of_ipa(kvm, ipa >> PAGE_SHIFT), e.page, first, tags)
                note_guest_write(kvm, ipa >> PAGE_SHIFT)
        return AccessResult(None)
    ldg = bytearray()
    for (ipa, n, attr), e in zip(segs, entries, strict=True):
        g = n // MTE_GRANULE_SIZE
        if ata and _tags_reachable(k, vcpu, attr, e) and _has_ghost(e.page):
            first = (ipa & (PAGE_SIZE - 1)) // MTE_GRANULE_SIZE
            got = read_tags(k, e.page, first, g, f"guest ldg on vCPU {vcpu.index}") if _keeps_tags(e.page) \
                else bytes(g)
            k.oracle.ghost.check_read_tags(loc_of_ipa(kvm, ipa >> PAGE_SHIFT), e.page, first, got,
                                           f"guest ldg on vCPU {vcpu.index}")
            ldg += got
        else:
            ldg += bytes(g)
    return AccessResult(bytes(ldg))
