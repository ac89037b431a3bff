"""Stage 2: guest faults, tag sanitising, MMU notifiers, write protection (arch/arm64/kvm/mmu.c).

A VM's stage-2 table (``kvm.s2``) maps guest frame numbers to the VMM's frames
with a permission and a memory type. It is filled on demand by
:func:`kvm_handle_guest_abort` -> :func:`user_mem_abort` and emptied by the MMU
notifier whenever the VMM's host PTEs change (munmap, MAP_FIXED, swap-out,
migration, copy-on-write, mprotect, exit).

``user_mem_abort`` follows the v6.17-era code step by step (reference 4.3):
look the VMA up under ``mmap_read_lock`` and sample ``VM_MTE_ALLOWED``, the
flags and the cacheability there; read ``mmu_invalidate_seq``; unlock; fault
the page in through GUP; take the MMU lock and retry if an invalidation ran
meanwhile; then, for non-permission faults of cacheable mappings of an MTE VM,
``sanitise_mte_tags`` (or EFAULT when the VMA lacked VM_MTE_ALLOWED); map.

The stage-2 memory type (the contract's table): memory outside the linear map
(``!pfn_is_map_memory``: PFNMAP frames and ZONE_DEVICE pages) of a VM_PFNMAP or
VM_MIXEDMAP VMA is mapped Normal only if the VMA is cacheable and the CPUs have
FEAT_S2FWB and CTR_EL0.DIC (else KVM_RUN fails with EFAULT); a non-cacheable one is
forced non-cacheable: Normal-NC with VM_ALLOW_ANY_UNCACHED, else Device-nGnRE, and
never sanitised. Everything else is Normal.

Dynamic tag storage under ``kvm-tag-storage = "reserve"`` (RFC v3 patches 32, 33):
a non-permission fault of an MTE VM that maps Normal memory of a VM_MTE_ALLOWED VMA
sets VM_MTE_KVM on a VMA that lacks it, then reserves the page's tag storage
before sanitising. A tag storage page, or a failed reservation, makes the fault
migrate the folio (``replace_folio_with_tagged``) and replay: KVM_RUN never fails
for it; :func:`kvm_tag_storage_fault` counts the replays (``livelock`` after
``k.fault_replay_limit``).

Model notes:
    * The MMU notifier runs synchronously where the host PTE changes, while
      Linux's ``invalidate_range_start`` waits for ``mmu_lock``. Since
      sanitising has scheduling points, the fault checks
      ``mmu_invalidate_retry`` again right before installing, with no point in
      between: the same exclusion, expressed as a retry.
    * The fault runs inside ``srcu_read_lock(&kvm->srcu)`` (``kvm_handle_guest_abort``),
      so deleting or moving its memslot (``kvm_invalidate_memslot`` in
      :mod:`hypervisor.kvm.memslot`) waits for it before zapping stage 2; a
      fault that starts once the slot is marked ``KVM_MEMSLOT_INVALID`` sees no
      memslot (an MMIO exit).
    * Stage 2 keeps no page reference (as KVM): it relies on the notifier.
      The STAGE-2 COHERENT oracle checks that every entry still maps the frame
      the VMM's PTE maps.
    * The zero page: a read fault on untouched anonymous memory maps the
      shared zero page read-only. ``sanitise_mte_tags`` skips it
      (2986a6257400, "KVM: arm64: Omit tag sync on stage-2 mappings of the
      zero page"); bug-zoo ``kvm-tags-zero-page`` brings the old code back.

Bug zoo here: ``mte-allowed-outside-lock`` samples ``VM_MTE_ALLOWED`` through
the VMA pointer after ``mmap_read_unlock`` (before 8c2e8ac8ad4b). If the VMM
unmapped or replaced that VMA meanwhile, that is a use-after-free of the VMA,
which the VMA-USE-AFTER-FREE oracle reports as KASAN would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.arm64.mte_lock import (
    folio_set_hugetlb_mte_tagged,
    folio_try_hugetlb_mte_tagging,
    set_page_mte_tagged,
    try_page_mte_tagging,
)
from hypervisor.arm64.tags import mte_clear_page_tags
from hypervisor.kvm.kvm_host import (
    Kvm,
    Memslot,
    S2Entry,
    Vcpu,
    ghost_kvm_write,
    kvm_has_mte,
    kvm_supports_cacheable_pfnmap,
    kvm_tag_storage_reserve,
    mark_page_dirty,
)
from hypervisor.mm.memory import get_page, handle_mm_fault, put_page
from hypervisor.mm.memremap import pfn_is_map_memory
from hypervisor.mm.migrate import replace_folio_with_tagged
from hypervisor.mm.mmu_notifier import MmuNotifierRange, mmu_notifier_register, mmu_notifier_unregister
from hypervisor.mm_types import (
    VM_ALLOW_ANY_UNCACHED,
    VM_HUGETLB,
    VM_MIXEDMAP,
    VM_MTE_ALLOWED,
    VM_MTE_KVM,
    VM_PFNMAP,
    kvm_vma_is_cacheable,
)
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

#: user_mem_abort() asks its caller to re-enter the guest (the fault is taken again).
RETRY = object()
#: kvm_handle_guest_abort() found no memslot: KVM_EXIT_MMIO to the VMM.
MMIO = object()
#: user_mem_abort() migrated a folio that had no tag storage: the fault is replayed (counted for livelock).
TAG_STORAGE_RETRY = object()
#: KVM_MEMSLOT_INVALID (include/linux/kvm_host.h): a slot being deleted or moved; readers see no hva in it.
KVM_MEMSLOT_INVALID = 1 << 16


# ---- kvm->srcu -----------------------------------------------------------------

@attrs.define(eq=False)
class SrcuStruct:
    """struct srcu_struct (kernel/rcu/srcutree.c): readers counted per grace-period index.

    A reader records the index current when it entered; a grace period flips the
    index and waits until every reader of the indexes before the flip has left.
    """

    name: str
    idx: int = 0
    readers: dict = attrs.Factory(dict)  # index -> readers inside that entered under it


def srcu_read_lock(ssp: SrcuStruct) -> int:
    """srcu_read_lock(): enter a read-side critical section; the index to hand back."""
    idx = ssp.idx
    ssp.readers[idx] = ssp.readers.get(idx, 0) + 1
    return idx


def srcu_read_unlock(k: Kernel, ssp: SrcuStruct, idx: int) -> None:
    """srcu_read_unlock(): leave the critical section entered with ``idx``."""
    ssp.readers[idx] -= 1
    if not ssp.readers[idx]:
        del ssp.readers[idx]
    k.sched.wake()


async def synchronize_srcu_expedited(k: Kernel, ssp: SrcuStruct) -> None:
    """synchronize_srcu_expedited(): wait for every reader that entered before the call to leave.

    Readers that enter after the call started are not waited for (they see the
    state the updater published before calling it).
    """
    old = ssp.idx
    ssp.idx += 1
    await k.sched.point(f"{ssp.name}:synchronize_srcu_expedited")
    await k.sched.wait_until(lambda: not any(n for i, n in ssp.readers.items() if i <= old),
                             f"{ssp.name}:srcu_wait")


# ---- MMU notifiers -------------------------------------------------------------

def kvm_init_mmu_notifier(k: Kernel, kvm: Kvm) -> None:
    """kvm_init_mmu_notifier(): hear every change of the VMM's host PTEs."""

    def invalidate(r: MmuNotifierRange) -> None:
        kvm_mmu_notifier_invalidate_range_start(k, kvm, r)

    kvm.notifier = invalidate
    mmu_notifier_register(kvm.mm, invalidate)


def kvm_uninit_mmu_notifier(k: Kernel, kvm: Kvm) -> None:
    """mmu_notifier_unregister() at VM destruction."""
    if kvm.notifier is not None:
        mmu_notifier_unregister(kvm.mm, kvm.notifier)
        kvm.notifier = None


def kvm_mmu_notifier_invalidate_range_start(k: Kernel, kvm: Kvm, r: MmuNotifierRange) -> None:
    """kvm_mmu_notifier_invalidate_range_start() -> kvm_unmap_gfn_range() for every slot hit."""
    kvm.mmu_invalidate_seq += 1  # mmu_invalidate_begin/end: a fault that sampled the old value retries
    for slot in kvm.memslots.values():
        s_start, s_end = slot.userspace_addr, slot.userspace_addr + (slot.npages << PAGE_SHIFT)
        lo, hi = max(r.start, s_start), min(r.end, s_end)
        if lo >= hi:
            continue
        first = slot.base_gfn + ((lo - s_start) >> PAGE_SHIFT)
        last = slot.base_gfn + ((hi - 1 - s_start) >> PAGE_SHIFT)
        if last - first + 1 > len(kvm.s2):
            for gfn in [g for g in kvm.s2 if first <= g <= last]:
                del kvm.s2[gfn]
        else:
            for gfn in range(first, last + 1):
                kvm.s2.pop(gfn, None)
    k.sched.wake()


def kvm_arch_flush_shadow_memslot(k: Kernel, kvm: Kvm, slot: Memslot) -> None:
    """kvm_arch_flush_shadow_memslot(): unmap a deleted or moved slot from stage 2.

    As in Linux it does not touch ``mmu_invalidate_seq``: the caller
    (kvm_invalidate_memslot) has marked the slot invalid and waited out every
    fault that could still hold it (``synchronize_srcu_expedited``).
    """
    for gfn in range(slot.base_gfn, slot.base_gfn + slot.npages):
        kvm.s2.pop(gfn, None)
    k.sched.wake()


def kvm_mmu_wp_memory_region(k: Kernel, kvm: Kvm, slot: Memslot) -> None:
    """kvm_mmu_wp_memory_region(): write-protect a slot's stage 2 when dirty logging starts."""
    kvm_arch_mmu_enable_log_dirty_pt_masked(k, kvm, slot, range(slot.npages))


def kvm_arch_mmu_enable_log_dirty_pt_masked(k: Kernel, kvm: Kvm, slot: Memslot, indexes) -> None:
    """kvm_arch_mmu_enable_log_dirty_pt_masked(): write-protect these pages of the slot again."""
    for i in indexes:
        e = kvm.s2.get(slot.base_gfn + i)
        if e is not None:
            e.writable = False


# ---- the fault -----------------------------------------------------------------

PMD_SHIFT, PUD_SHIFT = 21, 30
CONT_PTE_SHIFT, CONT_PMD_SHIFT = PAGE_SHIFT + 4, PMD_SHIFT + 4  # 16 contiguous entries (4 KiB granule)


def get_vma_page_shift(vma, hva: int) -> int:
    """get_vma_page_shift(): huge_page_shift(hstate_vma(vma)) for hugetlb, else PAGE_SHIFT.

    The model has no PUD/PMD-mapped VM_PFNMAP or THP here: other VMAs map 4 KiB.
    """
    if vma.flags & VM_HUGETLB and vma.obj is not None:
        return PAGE_SHIFT + vma.obj.hpage_pages.bit_length() - 1
    return PAGE_SHIFT


def fault_supports_stage2_huge_mapping(slot: Memslot, hva: int, map_size: int) -> bool:
    """fault_supports_stage2_huge_mapping(): IPA and hva congruent mod ``map_size``, block inside the slot."""
    gpa_start = slot.base_gfn << PAGE_SHIFT
    uaddr_start = slot.userspace_addr
    uaddr_end = uaddr_start + (slot.npages << PAGE_SHIFT)
    if (gpa_start & (map_size - 1)) != (uaddr_start & (map_size - 1)):
        return False
    block = hva & ~(map_size - 1)
    return block >= uaddr_start and block + map_size <= uaddr_end


def stage2_mapping_shift(vma, slot: Memslot, hva: int, logging_active: bool) -> int:
    """The vma_shift switch of user_mem_abort() (kvm_s2_resolve_vma_size() in 2026 sources).

    PUD (1 GiB) if the slot allows it, else fall back to PMD; CONT_PMD (32 MiB)
    maps as PMD (2 MiB) blocks; PMD if the slot allows it, else PTE; CONT_PTE
    (64 KiB) maps as PTEs (force_pte). Dirty logging forces PTEs.
    """
    shift = PAGE_SHIFT if logging_active else get_vma_page_shift(vma, hva)
    if shift == PUD_SHIFT:
        if fault_supports_stage2_huge_mapping(slot, hva, 1 << PUD_SHIFT):
            return PUD_SHIFT
        shift = CONT_PMD_SHIFT  # fallthrough
    if shift == CONT_PMD_SHIFT:
        shift = PMD_SHIFT
    if shift == PMD_SHIFT:
        if fault_supports_stage2_huge_mapping(slot, hva, 1 << PMD_SHIFT):
            return PMD_SHIFT
        shift = CONT_PTE_SHIFT
    if shift == CONT_PTE_SHIFT:
        return PAGE_SHIFT
    return shift


async def __kvm_faultin_pfn(k: Kernel, kvm: Kvm, hva: int, write: bool) -> tuple[Page, bool]:
    """__kvm_faultin_pfn() -> GUP in the VMM's mm: the page (referenced) and whether it may be written.

    Raises:
        KernelError: EFAULT when GUP fails (kvm_handle_guest_abort returns it to KVM_RUN).
    """
    try:
        pte = await handle_mm_fault(k, kvm.mm, hva, write)
    except KernelError as exc:
        raise KernelError("EFAULT", f"user_mem_abort: no page at hva {hva:#x} ({exc.message})") from None
    page = pte.page
    assert page is not None  # handle_mm_fault returns a present entry
    if not pte.special:
        get_page(page)
    return page, pte.write


def _release(k: Kernel, page: Page) -> None:
    if page.zone not in ("device", "pfnmap", "zero") and page is not k.alloc.zero_page:
        put_page(k, page)


async def user_mem_abort(k: Kernel, kvm: Kvm, vcpu: Vcpu, gfn: int, slot: Memslot, hva: int, write: bool,
                         fault_is_perm: bool):
    """user_mem_abort() (arch/arm64/kvm/mmu.c, v6.17-era), MTE steps line for line.

    Returns:
        None when the stage-2 entry is installed (or, for a permission fault, relaxed),
        :data:`RETRY` when an MMU invalidation raced with the fault (the guest takes it
        again; for a permission fault, also when the entry it found is gone),
        :data:`TAG_STORAGE_RETRY` when a folio without tag storage was migrated
        (dynamic tag storage, "reserve"; replayed too).

    Raises:
        KernelError: EFAULT: no VMA at the hva, GUP failure, a cacheable PFNMAP or
            MIXEDMAP without FEAT_S2FWB and CTR_EL0.DIC, or an MTE VM whose VMA has lost
            (or never had) VM_MTE_ALLOWED.
    """
    mm = kvm.mm
    logging_active = slot.logging
    force_pte = logging_active
    bug = "mte-allowed-outside-lock" in k.bugs
    await mm.mmap_lock.read_lock()
    try:
        vma = mm.find_vma(hva)  # vma_lookup()
        if vma is None:
            raise KernelError("EFAULT", f"user_mem_abort: no VMA at hva {hva:#x} for IPA {gfn << PAGE_SHIFT:#x}")
        vma_shift = stage2_mapping_shift(vma, slot, hva, force_pte)
        nr_pages = 1 << (vma_shift - PAGE_SHIFT)  # vma_pagesize >> PAGE_SHIFT
        if not bug:
            mte_allowed = bool(vma.flags & VM_MTE_ALLOWED)  # kvm_vma_mte_allowed(vma), under the lock
        vm_flags = vma.flags
        is_vma_cacheable = kvm_vma_is_cacheable(vma)  # vm_page_prot neither Normal-NC nor Device
        vfio_allow_any_uncached = bool(vm_flags & VM_ALLOW_ANY_UNCACHED)
        stale_vma = vma
        reserve = kvm_tag_storage_reserve(k) and kvm_has_mte(k, kvm) and not fault_is_perm \
            and bool(vma.flags & VM_MTE_ALLOWED)
        if reserve and not vma.flags & VM_MTE_KVM:
            # RFC v3: a VMA created after the memslot gets VM_MTE_KVM at its first stage-2 fault.
            # Deliberate difference: set under mmap_read_lock (vm_flags_set() wants the write lock)
            vma.flags |= VM_MTE_KVM
            kvm.mte_kvm_vmas.add(vma)
        mmu_seq = kvm.mmu_invalidate_seq
        await k.sched.point("user_mem_abort:mmap_read_unlock")
    finally:
        mm.mmap_lock.read_unlock()
    page, host_writable = await __kvm_faultin_pfn(k, kvm, hva, write)
    got: Page | None = page
    try:
        s2_force_noncacheable = False
        if vm_flags & (VM_PFNMAP | VM_MIXEDMAP) and not pfn_is_map_memory(page):
            if is_vma_cacheable:
                # the CMOs need a kernel VA, which this memory may lack: only FWB and DIC make it safe
                if not kvm_supports_cacheable_pfnmap(k):
                    raise KernelError("EFAULT", f"user_mem_abort: cacheable PFNMAP/MIXEDMAP memory at hva {hva:#x} "
                                                "and the CPUs lack FEAT_S2FWB or CTR_EL0.DIC")
            else:
                s2_force_noncacheable = True
        if reserve and not s2_force_noncacheable and not await kvm_reserve_tag_storage(k, page):
            _release(k, page)  # the fault's reference would make the folio busy for migration
            got = None
            folio = page.folio
            if not await replace_folio_with_tagged(k, folio) and folio.isolated:
                # Another CPU is migrating the folio (compaction): in Linux the replays spin until it is
                # done. The model waits for it instead, so that an unfair schedule cannot make a livelock
                # out of a migration that would finish.
                await k.sched.wait_until(lambda: not folio.isolated, "user_mem_abort:folio_isolated")
            return TAG_STORAGE_RETRY
        if bug:
            await k.sched.point("user_mem_abort:kvm_vma_mte_allowed")
            k.oracle.on_vma_read(stale_vma, "user_mem_abort: kvm_vma_mte_allowed(vma) after mmap_read_unlock")
            mte_allowed = bool(stale_vma.flags & VM_MTE_ALLOWED)
        await k.sched.point("user_mem_abort:kvm_fault_lock")
        if kvm.mmu_invalidate_seq != mmu_seq or kvm.destroyed:  # mmu_invalidate_retry()
            return RETRY
        if nr_pages > 1:  # PMD or PUD block: ipa &= ~(vma_pagesize - 1), so the pfn is the block's first
            gfn &= ~(nr_pages - 1)
            page = page.folio.subpages[(page.pfn - page.folio.pfn) & ~(nr_pages - 1)]
        if not fault_is_perm and not s2_force_noncacheable and kvm_has_mte(k, kvm):
            # Check the VMM hasn't introduced a new disallowed VMA
            if mte_allowed:
                await sanitise_mte_tags(k, kvm, page, nr_pages)
            else:
                raise KernelError("EFAULT", f"user_mem_abort: the VMA at hva {hva:#x} has no VM_MTE_ALLOWED "
                                            "(the VMM replaced guest RAM after creating the memslot)")
        if kvm.mmu_invalidate_seq != mmu_seq or kvm.destroyed:  # see "Model notes"
            return RETRY
        writable = host_writable and not slot.readonly
        if logging_active and not write:
            writable = False  # only map writable on a write fault while logging
        if fault_is_perm and nr_pages == 1:
            # kvm_pgtable_stage2_relax_perms() (vma_pagesize == fault_granule): a permission fault adds
            # permissions to the entry it found and never changes its frame; if an invalidation removed
            # that entry before this fault read mmu_seq, the walk finds no valid entry (-EAGAIN) and the
            # guest takes the fault again, now a translation fault that sanitises the new frame
            found = kvm.s2.get(gfn)
            if found is None:
                return RETRY
            kvm.s2[gfn] = S2Entry(found.page, found.writable or writable, found.memtype)
            if writable:
                mark_page_dirty(kvm, gfn)
            k.sched.wake()
            return None
        if s2_force_noncacheable:  # KVM_PGTABLE_PROT_NORMAL_NC or KVM_PGTABLE_PROT_DEVICE
            memtype = "normal-nc" if vfio_allow_any_uncached else "device"
        else:
            memtype = "normal"
        base = 0 if nr_pages == 1 else page.pfn - page.folio.pfn
        for i in range(nr_pages):
            sub = page if nr_pages == 1 else page.folio.subpages[base + i]
            kvm.s2[gfn + i] = S2Entry(sub, writable, memtype)
        if writable:
            mark_page_dirty(kvm, gfn)
        k.sched.wake()
        return None
    finally:
        if got is not None:
            _release(k, got)  # kvm_release_faultin_page(): stage 2 holds no reference


async def kvm_reserve_tag_storage(k: Kernel, page: Page) -> bool:
    """RFC v3 patch 33: the page about to be mapped Normal in an MTE VM gets its tag storage.

    Called before the MMU lock (reserve_tag_storage may sleep). False when the page is tag
    storage itself or the reservation failed: the caller migrates the folio
    (replace_folio_with_tagged) and replays the fault.
    """
    if page is k.alloc.zero_page:
        return True
    ts = k.tag_storage
    folio = page.folio
    if folio.is_tag_storage:
        return False
    if ts.has_storage(folio):
        return True
    await k.sched.point("user_mem_abort:reserve_tag_storage")
    return await ts.reserve_tag_storage(folio)


async def sanitise_mte_tags(k: Kernel, kvm: Kvm, page: Page, nr_pages: int) -> None:
    """sanitise_mte_tags() (arch/arm64/kvm/mmu.c, v6.13+ with 2986a6257400).

    Hugetlb: the flags live on the folio head; the tags of the ``nr_pages``
    pages this fault maps are cleared (one page of a 64 KiB folio, or with dirty
    logging; 2 MiB of a 32 MiB or PMD-mapped 1 GiB folio), then the whole folio
    is flagged: finding 3 of docs/findings.md. With the host's kernel fix
    ``sanitise-whole-hugetlb-folio`` every page of the folio is cleared instead.
    Other pages: each one initialised under the two-bit lock.
    """
    if not kvm_has_mte(k, kvm):
        return
    if page is k.alloc.zero_page and "kvm-tags-zero-page" not in k.bugs:
        if nr_pages != 1:
            k.warn_once("sanitise_mte_tags: zero page with nr_pages != 1")
        return
    if page.is_hugetlb:
        folio = page.folio
        if await folio_try_hugetlb_mte_tagging(k, folio):
            await k.sched.point("sanitise_mte_tags:clear")
            if "sanitise-whole-hugetlb-folio" in k.fixes:
                pages = folio.subpages
            else:
                first = page.pfn - folio.pfn
                pages = folio.subpages[first:first + nr_pages]
            for p in pages:
                mte_clear_page_tags(k, p)
            folio_set_hugetlb_mte_tagged(k, folio)
        return
    for i in range(nr_pages):
        p = page if i == 0 else k.alloc.frames[page.pfn + i]
        if await try_page_mte_tagging(k, p):
            await k.sched.point("sanitise_mte_tags:clear")
            mte_clear_page_tags(k, p)
            set_page_mte_tagged(k, p)


async def kvm_handle_guest_abort(k: Kernel, kvm: Kvm, vcpu: Vcpu, gfn: int, write: bool):
    """kvm_handle_guest_abort(): a stage-2 fault on ``gfn``, inside ``srcu_read_lock(&kvm->srcu)``.

    The memslot is looked up and used (``user_mem_abort``) inside one SRCU
    read-side section, so a slot being deleted or moved is not flushed from
    stage 2 until this fault is over (``kvm_swap_active_memslots`` waits for
    it), and a fault that starts after the slot was marked invalid sees no hva
    (``gfn_to_hva_memslot_prot`` -> KVM_HVA_ERR_BAD).

    Returns:
        None (mapped), :data:`RETRY`, or :data:`MMIO` when no valid memslot covers
        the gfn or a write hits a read-only slot (io_mem_abort: KVM_EXIT_MMIO).

    Raises:
        KernelError: EFAULT from user_mem_abort (KVM_RUN fails with it).
    """
    ssp = kvm.srcu
    assert ssp is not None  # set by KVM_CREATE_VM
    idx = srcu_read_lock(ssp)
    try:
        slot = kvm.slot_of(gfn)
        if slot is None or slot.flags & KVM_MEMSLOT_INVALID or (write and slot.readonly):
            return MMIO
        entry = kvm.s2.get(gfn)
        fault_is_perm = entry is not None and write and not entry.writable
        return await user_mem_abort(k, kvm, vcpu, gfn, slot, slot.hva(gfn), write, fault_is_perm)
    finally:
        srcu_read_unlock(k, ssp, idx)


def io_mem_abort(kind: str, segs) -> None:
    """io_mem_abort() (arch/arm64/kvm/mmio.c): an access outside every memslot needs a valid syndrome.

    Only a single general-purpose-register load or store of 1, 2, 4 or 8 bytes
    (ESR_EL2.ISV = 1) can be emulated as KVM_EXIT_MMIO. Anything else (LDG/STG
    and the other tag instructions, pairs, vector or larger accesses) has no
    valid syndrome: without KVM_CAP_ARM_NISV_TO_USER (which the model does not
    offer) KVM_RUN fails with ENOSYS.

    Raises:
        KernelError: ENOSYS when the access has no valid instruction syndrome.
    """
    total = sum(n for _ipa, n, _a in segs)
    if kind not in ("load", "store") or len(segs) != 1 or total not in (1, 2, 4, 8):
        raise KernelError("ENOSYS", f"{kind} of {total} bytes at IPA {segs[0][0]:#x}: data abort outside memslots "
                                    "with no valid syndrome (ISV = 0), and no KVM_CAP_ARM_NISV_TO_USER")


def note_guest_write(kvm: Kvm, gfn: int) -> None:
    """A guest store or tag store retired on ``gfn`` (ghost state for DIRTY-LOG-COMPLETE)."""
    ghost_kvm_write(kvm, gfn)


def stage2_entry_report(k: Kernel, kvm: Kvm, ipa: int) -> dict:
    """The ``stage2-entry`` host op: the leaf entry at ``ipa`` (a walk of the table, kvm_pgtable_get_leaf()).

    Faults nothing in. Unmapped: ``{mapped: false, pfn: 0, memtype: "none", writable: false}``.
    """
    e = kvm.s2.get(ipa >> PAGE_SHIFT)
    if e is None:
        return {"mapped": False, "pfn": 0, "memtype": "none", "writable": False}
    return {"mapped": True, "pfn": e.page.pfn, "memtype": e.memtype, "writable": e.writable}
