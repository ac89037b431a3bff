"""Page faults, PTE installation, zapping and fork (mm/memory.c).

The paths are named after their Linux functions so a reader can hold the two
side by side:

* ``handle_mm_fault`` dispatches to ``do_anonymous_page`` (zero page for
  reads, a __GFP_ZEROTAGS page for writes under VM_MTE), ``do_fault``
  (page-cache objects: ``do_read_fault``/``do_shared_fault``/``do_cow_fault``),
  ``do_swap_page`` (with ``arch_swap_restore`` before mapping) and
  ``do_wp_page``/``wp_page_copy`` (copy-on-write through ``copy_user_highpage``).
* ``set_pte_at`` runs ``__sync_cache_and_tags`` -> ``mte_sync_tags`` for a
  tagged, accessible, non-special PTE *before* the PTE is written
  (USER-VISIBLE => TAGGED).
* ``copy_page_range`` (fork) shares anonymous pages copy-on-write.
* ``do_anonymous_page_run``: the free scheduler's fault-around for writes, a run of
  empty anonymous PTEs mapped under one lock hold with the page-by-page result.

Faults take ``mmap_lock`` for read; callers that already hold it (GUP from
ptrace) pass ``locked=True``. A fault that cannot be satisfied raises
:class:`KernelError` EFAULT, standing for SIGSEGV/SIGBUS to a user access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.copypage import copy_user_highpage
from hypervisor.arm64.mte import mte_sync_tags, tag_clear_highpage
from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.arm64.mte_tag_storage import Livelock, handle_folio_missing_tag_storage, spin_lock
from hypervisor.arm64.tags import ZERO_TAGS
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm.page_alloc import alloc_hugetlb_folio, alloc_pages, vma_gfp
from hypervisor.mm_types import VM_HUGETLB, VM_MTE, VM_PFNMAP, VM_READ, VM_SHARED, VM_WRITE, MemObject, Pte, Vma
from hypervisor.page import Page
from hypervisor.sched import current_actor
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM


# ---- page references ---------------------------------------------------------

def get_page(page: Page) -> None:
    """get_page()."""
    page.refcount += 1


def put_page(k: Kernel, page: Page) -> None:
    """put_page(): the last reference frees the frame."""
    if not page.is_ram:
        return
    page.refcount -= 1
    if page.refcount <= 0:
        if page.is_hugetlb:
            head = page.folio
            if not any(p.refcount > 0 for p in reversed(head.subpages)):  # zap frees in order: O(1), not O(n)
                k.alloc.free_page(head)
        else:
            k.alloc.free_page(page)


# ---- installing and removing PTEs ----------------------------------------------

ANY = object()  # set_pte_at(expect=ANY): install whatever the slot holds now


async def set_pte_at(k: Kernel, mm: MM, vpn: int, pte: Pte, nr: int = 1, expect=ANY) -> bool:
    """set_ptes() -> __sync_cache_and_tags() -> mte_sync_tags(), then write the PTE.

    The page's reference and rmap entry are taken here; ``pte.page`` is mapped
    at ``vpn`` (and, for ``nr > 1``, the following subpages at the following
    vpns). Sync happens only for tagged, accessible (readable), non-special PTEs.

    Linux does this under the page-table lock after a ``pte_same()`` check; the
    model's sync has scheduling points, so the check comes after them: unless
    the slot still holds ``expect`` (the entry the caller saw), nothing is
    installed and False is returned (the caller backs off, a fault retries).
    """
    hold = pte.page if not pte.special else None
    if hold is not None:
        get_page(hold)  # held across the sync points
    try:
        ts = k.tag_storage
        if ts.enabled and pte.tagged and hold is not None and ts.lacks_storage(hold):
            # mte_sync_tags() (RFC v3 patch 26): no storage, so PAGE_FAULT_ON_ACCESS instead of a tagged PTE
            pte = Pte(page=pte.page, write=pte.write, tagged=True, fault_on_access=True)
        elif k.mte and pte.tagged and hold is not None and hold.is_ram and pte_accessible(mm, vpn):
            await mte_sync_tags(k, hold, nr)
        await k.sched.point("set_pte_at")
        if expect is not ANY and mm.pt.get(vpn) is not expect:
            return False
        _install(k, mm, vpn, pte, nr)
        return True
    finally:
        if hold is not None:
            put_page(k, hold)


def _install(k: Kernel, mm: MM, vpn: int, pte: Pte, nr: int) -> None:
    page = pte.page
    assert page is not None  # set_pte_at installs present entries
    for i in range(nr):
        p = page if nr == 1 else page.folio.subpages[(page.pfn - page.folio.pfn) + i]
        old = mm.pt.get(vpn + i)
        entry = Pte(page=p, write=pte.write, tagged=pte.tagged, special=pte.special,
                    fault_on_access=pte.fault_on_access)
        if old is not None and old.page is not None and old.page is not p and not old.migrating:
            mmu_notifier_invalidate_range(mm, (vpn + i) << PAGE_SHIFT, (vpn + i + 1) << PAGE_SHIFT, "clear")
        if not pte.special:  # take the new reference before dropping the old one (same page?)
            get_page(p)
        if old is not None:
            _release_pte(k, mm, vpn + i, old)
        mm.pt[vpn + i] = entry
        if not pte.special:
            p.rmap.add((mm, vpn + i))
            p.mapcount += 1
    k.sched.wake()


def pte_accessible(mm: MM, vpn: int) -> bool:
    """pte_access_permitted_no_overlay(pte, false): PROT_NONE/exec-only PTEs expose no tags."""
    vma = mm.find_vma(vpn << PAGE_SHIFT)
    return vma is not None and bool(vma.flags & VM_READ)


def _release_pte(k: Kernel, mm: MM, vpn: int, pte: Pte) -> None:
    if pte.page is not None and not pte.special and not pte.migrating:
        pte.page.rmap.discard((mm, vpn))
        pte.page.mapcount -= 1
        put_page(k, pte.page)
    elif pte.swap is not None:
        k.swap.swap_free(k, pte.swap)


def zap_pte_range(k: Kernel, mm: MM, start: int, end: int, event: str = "unmap") -> None:
    """zap_pte_range(): drop the PTEs of [start, end) and their page references.

    As Linux's mmu_gather, the frames whose last reference a PTE held are freed
    together after the walk (tlb_finish_mmu() -> free_pages_and_swap_cache() ->
    release_pages()), in the order the walk met them: the same frames, freed in
    the same order, as freeing each on the spot (no scheduling point between).
    The ghost's entries of the range are dropped before the frames are freed
    (the private pages read fresh), so freeing takes no digest for them.
    """
    mmu_notifier_invalidate_range(mm, start, end, event)
    k.oracle.ghost.drop_range(mm, start >> PAGE_SHIFT, end >> PAGE_SHIFT)
    pt = mm.pt
    batch: list[Page] = []
    for vpn in mm.vpns_in(start, end):
        pte = pt.pop(vpn, None)
        if pte is None:
            continue
        page = pte.page
        # the common case inline: an order-0 RAM frame mapped by an ordinary PTE (_release_pte + put_page)
        if page is not None and page.head is None and not pte.special and not pte.migrating \
                and (page.zone == "normal" or page.zone == "movable"):
            page.rmap.pop((mm, vpn), None)
            page.mapcount -= 1
            page.refcount -= 1
            if page.refcount <= 0:
                batch.append(page)
        else:
            _release_pte(k, mm, vpn, pte)
    if batch:
        k.alloc.free_pages_bulk(batch)
    k.sched.wake()


# ---- the fault handler ---------------------------------------------------------

def _segv(addr: int, why: str) -> KernelError:
    return KernelError("EFAULT", f"SIGSEGV ({why}) at {addr:#x}")


async def handle_mm_fault(k: Kernel, mm: MM, addr: int, write: bool, *, locked: bool = False,
                          force: bool = False) -> Pte:
    """handle_mm_fault(): make ``addr`` present (and writable if ``write``).

    Returns:
        The PTE now mapping ``addr``.

    Raises:
        KernelError: EFAULT for SEGV_MAPERR (no VMA) or SEGV_ACCERR (protection),
            ENOMEM when no frame can be allocated.
    """
    if not locked:
        await mm.mmap_lock.read_lock()
    try:
        return await _fault_locked(k, mm, addr, write, force)
    finally:
        if not locked:
            mm.mmap_lock.read_unlock()


async def _fault_locked(k: Kernel, mm: MM, addr: int, write: bool, force: bool = False) -> Pte:
    vma = mm.find_vma(addr)
    if vma is None:
        raise _segv(addr, "SEGV_MAPERR")
    # FOLL_FORCE (ptrace) may write a read-only *private* mapping: it breaks CoW, the PTE stays read-only
    forced = force and write and not vma.flags & VM_WRITE and not vma.flags & VM_SHARED
    if write and not vma.flags & VM_WRITE and not forced:
        raise _segv(addr, "SEGV_ACCERR: write to a mapping without PROT_WRITE")
    forced_read = force and not write  # FOLL_FORCE reads any VMA with VM_MAYREAD (all of ours)
    if not write and not vma.flags & VM_READ and not forced_read:
        raise _segv(addr, "SEGV_ACCERR: read of a mapping without PROT_READ")
    vpn = addr >> PAGE_SHIFT
    await k.sched.point("handle_mm_fault")
    replays = 0
    for _ in range(64 + k.fault_replay_limit):
        pte = mm.pt.get(vpn)
        if pte is not None and pte.fault_on_access and not pte.migrating:
            # handle_pte_protnone(): PTE_TAG_STORAGE_NONE, a tagged mapping waiting for its tag storage
            if replays >= k.fault_replay_limit:
                k.oracle.report("FAULT-FORWARD-PROGRESS", f"the fault at {addr:#x} was replayed {replays} times "
                                                          "without the page getting tag storage (livelock)", pte.page)
                raise Livelock(addr)
            replays += 1
            await handle_folio_missing_tag_storage(k, mm, vma, vpn, pte)
            continue
        if pte is not None and pte.migrating:
            # migration_entry_wait(): sleep until the migration finishes
            # the predicate is used (awaited) before the loop rebinds pte
            await k.sched.wait_until(lambda: mm.pt.get(vpn) is not pte, "migration_entry_wait")  # noqa: B023
            continue
        if pte is None:
            if vma.flags & VM_PFNMAP:
                raise _segv(addr, "SEGV_MAPERR: PFNMAP range not populated")
            if vma.is_anon:
                await do_anonymous_page(k, mm, vma, vpn, write)
            else:
                await do_fault(k, mm, vma, vpn, write)
        elif pte.swap is not None:
            await do_swap_page(k, mm, vma, vpn, pte, write)
        elif forced and not pte.special and pte.page is not None and pte.page.mapping is None \
                and pte.page.mapcount == 1 and not pte.page.ksm:
            return pte  # the private copy exists: FOLL_FORCE writes it through the kernel mapping
        elif write and not pte.write and vma.flags & VM_HUGETLB:
            await hugetlb_wp(k, mm, vma, vpn, pte)
        elif write and not pte.write:
            await do_wp_page(k, mm, vma, vpn, pte)
            if forced and mm.pt.get(vpn) is not None:
                mm.pt[vpn].write = False
        else:
            return pte
    raise KernelError("EFAULT", f"fault at {addr:#x} did not settle")


def _node(vma: Vma) -> str | None:
    """The node a VMA's pages are bound to (mmap ``node``: MPOL_BIND), or None."""
    return getattr(vma, "node", None)


async def _alloc(k: Kernel, vma: Vma) -> Page:
    """vma_alloc_folio(): the VMA's gfp (arch_calc_vma_gfp) and node binding.

    Raises:
        KernelError: ENOMEM (VM_FAULT_OOM) when the bound node, or every node, is full.
    """
    node = _node(vma)
    if not k.tag_storage.enabled and node is None:
        return k.alloc.alloc_page()
    return await alloc_pages(k, vma_gfp(vma), node)


def _pte_for(vma: Vma, page: Page, write: bool, special: bool = False) -> Pte:
    return Pte(page=page, write=write, tagged=bool(vma.flags & VM_MTE), special=special)


async def do_anonymous_page(k: Kernel, mm: MM, vma: Vma, vpn: int, write: bool) -> None:
    """do_anonymous_page(): the zero page for a read, a new zeroed page for a write."""
    if not write:
        await set_pte_at(k, mm, vpn, _pte_for(vma, k.alloc.zero_page, False, special=True), expect=None)
        return
    page = await vma_alloc_zeroed_movable_folio(k, vma)
    await set_pte_at(k, mm, vpn, _pte_for(vma, page, True), expect=None)
    put_page(k, page)


#: Bug-zoo switches that change the tag lock: their faults take the per-page path, which models them.
_RUN_SLOW_BUGS = frozenset({"flag-before-init", "no-tag-lock"})


async def do_anonymous_page_run(k: Kernel, mm: MM, vpn: int, nr: int, *, locked: bool = False) -> int:
    """do_anonymous_page() for a run of untouched pages, as alloc_anon_folio() + set_ptes(nr) map an mTHP (mm/memory.c).

    Deliberate difference (the free scheduler's fault-around for writes): the
    pages stay order-0 frames, and up to ``nr`` write faults on empty PTEs of
    one anonymous writable VMA from ``vpn`` are handled under one mmap_lock
    hold with one scheduling point (the lock's), leaving exactly the state the
    page-by-page path leaves: a new frame per page, its tags cleared and
    PG_mte_lock|PG_mte_tagged set under VM_MTE (tag_clear_highpage, one
    initialiser), a writable PTE (Normal-Tagged under VM_MTE), the rmap entry,
    mapcount 1, one reference, no ghost entry. Only the free scheduler may
    call it (no other context runs between two pages there); a controlled
    scheduler keeps every per-page point. Returns the pages mapped: 0 when the
    first page is not an empty PTE of such a VMA (the caller's per-page fault
    decides); stops at the first page that is not empty or when memory runs out
    (ENOMEM is raised only when no page was mapped).
    """
    if not locked:
        await mm.mmap_lock.read_lock()  # the run's scheduling point
    try:
        vma = mm.find_vma(vpn << PAGE_SHIFT)
        if vma is None or not vma.is_anon or not vma.flags & VM_WRITE or vma.flags & (VM_PFNMAP | VM_HUGETLB) \
                or k.bugs & _RUN_SLOW_BUGS or k.tag_storage.enabled or _node(vma) is not None:
            return 0
        nr = min(nr, (vma.end >> PAGE_SHIFT) - vpn)
        pt = mm.pt
        alloc = k.alloc
        tagged = bool(vma.flags & VM_MTE)
        clear = tagged and k.mte  # vma_alloc_zeroed_movable_folio(): __GFP_ZEROTAGS
        actor = current_actor.get()
        done = 0
        present = list(map(pt.__contains__, range(vpn, vpn + nr)))  # (C-level: a run is thousands of pages)
        empty = present.index(True) if True in present else len(present)
        pages = alloc.alloc_pages_bulk(empty)
        if empty and not pages:
            pages = [alloc.alloc_page()]  # out of memory: ENOMEM, as the page-by-page path raises it
        oracle = k.oracle
        for v, page in zip(range(vpn, vpn + len(pages)), pages, strict=True):
            if clear:  # tag_clear_highpage(): try_page_mte_tagging() wins on a new page
                page.flags |= PG_mte_lock
                if page.inits:
                    oracle.on_init_start(page, actor)  # a second initialiser: EXCLUSIVE-INIT reports it
                else:
                    page.inits = 1  # (on_init_start, inline)
                # mte_clear_page_tags(), inline: on_tag_write() checks only tag storage, off on this path
                page.tags[:] = ZERO_TAGS
                if page.initialiser != "write":
                    page.shadow = ZERO_TAGS
                    page.initialiser = "init"
                else:
                    oracle.on_tags_overwritten(page, "mte_clear_page_tags")
                page.flags |= PG_mte_tagged  # set_page_mte_tagged(); waiters are woken below
            # set_pte_at(): mte_sync_tags() finds the page tagged; _install() takes the PTE's reference,
            # put_page() drops the allocation's: one reference, the PTE's
            pt[v] = Pte(page, None, True, tagged)  # (page, swap, write, tagged)
            page.rmap[(mm, v)] = None  # Rmap.add
            page.mapcount += 1
            done += 1
        k.sched.wake()
        return done
    finally:
        if not locked:
            mm.mmap_lock.read_unlock()


async def vma_alloc_zeroed_movable_folio(k: Kernel, vma: Vma) -> Page:
    """vma_alloc_zeroed_movable_folio() (mm/fault.c): __GFP_ZEROTAGS under VM_MTE."""
    page = await _alloc(k, vma)
    if vma.flags & VM_MTE:
        await tag_clear_highpage(k, page)
    return page


def _folio_unlocked(obj: MemObject, index: int, held: Page):
    """The predicate a page-cache fault waits on: ``held`` is no longer isolated, or no longer the cache's."""
    return lambda: obj.pages.get(index) is not held or not held.isolated


#: Test-only: page-cache faults do not wait for a folio under migration or reclaim (the model before it
#: had a folio lock), so tests/unit/hypervisor/test_lost_tag_races.py can show the store that loses.
_NO_FOLIO_LOCK = False


async def shmem_get_folio(k: Kernel, obj: MemObject, index: int, node: str | None = None) -> Page:
    """shmem_get_folio()/filemap_fault(): the page-cache page at ``index``, created or swapped in.

    Returns the page with a reference for the caller (drop it with put_page).
    Page-cache pages are allocated without __GFP_ZEROTAGS: they stay untagged
    until a tagged PTE maps them.
    """
    await k.sched.point("shmem_get_folio")
    cur = obj.pages.get(index)
    while isinstance(cur, Page) and cur.isolated and not _NO_FOLIO_LOCK:
        # filemap_fault() -> lock_folio_maybe_drop_mmap(): migration and reclaim hold the folio
        # lock while they unmap, copy and move the page cache on; the fault then finds the new folio
        await k.sched.wait_until(_folio_unlocked(obj, index, cur), "folio_lock")
        cur = obj.pages.get(index)
    if isinstance(cur, Page):
        get_page(cur)
        return cur
    if isinstance(cur, int):
        page = await k.swap.shmem_swapin_folio(k, obj, index, cur, node)
        get_page(page)
        return page
    if obj.kind == "hugetlbfs":
        page = k.alloc.alloc_hugetlb_folio(obj.hpage_pages, node)
        for sub in page.subpages:
            sub.mapping, sub.index = obj, index
    else:
        # page cache: movable, never __GFP_TAGGED; the allocation's reference becomes the page cache's
        page = k.alloc.alloc_page("movable", node)
        page.mapping, page.index = obj, index
    obj.pages[index] = page
    get_page(page)
    return page


async def do_fault(k: Kernel, mm: MM, vma: Vma, vpn: int, write: bool) -> None:
    """do_fault(): do_read_fault / do_shared_fault / do_cow_fault for object-backed VMAs."""
    obj = vma.obj
    assert obj is not None  # handle_mm_fault sends anonymous VMAs to do_anonymous_page
    index = vma.index_of(vpn << PAGE_SHIFT)
    if obj.kind == "hugetlbfs":
        # hugetlb_fault() -> hugetlb_no_page(): map the whole folio (set_huge_pte_at, nr = its pages).
        # A private mapping of a named hugetlbfs file maps the page-cache folio read-only (a write
        # then copies it in hugetlb_wp); the folio of a MAP_PRIVATE|MAP_HUGETLB mapping is its own.
        nr = obj.hpage_pages
        hindex, sub = divmod(index, nr)
        first = vpn - sub
        if not vma.flags & VM_SHARED and not obj.named:
            # MAP_PRIVATE|MAP_HUGETLB: hugetlb_no_page() gives this mm an anonymous folio of its
            # own, never added to the page cache (else a child faulting after fork shared it)
            cur = next((e for e in (mm.pt.get(v) for v in range(first, first + nr))
                        if e is not None and e.present and e.page is not None and e.page.is_hugetlb), None)
            if cur is not None and cur.page is not None:  # part of the folio is still mapped (a 4 KiB zap): map it
                await set_pte_at(k, mm, first, Pte(page=cur.page.folio, write=cur.write, tagged=cur.tagged), nr=nr,
                                 expect=mm.pt.get(first))
                return
            head = await alloc_hugetlb_folio(k, nr, vma_gfp(vma), _node(vma))
            installed = await set_pte_at(k, mm, first, _pte_for(vma, head, bool(vma.flags & VM_WRITE)), nr=nr,
                                         expect=mm.pt.get(first))
            for p in head.subpages:  # the allocation's references (the PTEs hold theirs now)
                p.refcount -= 1
            if not installed or all(p.refcount <= 0 for p in head.subpages):
                k.alloc.free_page(head)
            return
        head = await shmem_get_folio(k, obj, hindex, _node(vma))
        writable = bool(vma.flags & VM_WRITE) and (bool(vma.flags & VM_SHARED) or not obj.named)
        await set_pte_at(k, mm, first, _pte_for(vma, head, writable), nr=nr, expect=mm.pt.get(first))
        put_page(k, head)
        return
    page = await shmem_get_folio(k, obj, index, _node(vma))
    try:
        if write and not vma.flags & VM_SHARED:
            # do_cow_fault(): a private copy of the file page
            new = await _alloc(k, vma)
            await copy_user_highpage(k, new, page)
            await set_pte_at(k, mm, vpn, _pte_for(vma, new, True), expect=None)
            put_page(k, new)
            return
        writable = bool(vma.flags & VM_SHARED and vma.flags & VM_WRITE)
        await set_pte_at(k, mm, vpn, _pte_for(vma, page, writable), expect=None)
    finally:
        put_page(k, page)


async def do_swap_page(k: Kernel, mm: MM, vma: Vma, vpn: int, pte: Pte, write: bool) -> None:
    """do_swap_page(): bring the page back (tags restored first), then map it."""
    entry = pte.swap
    assert entry is not None  # handle_mm_fault calls this for swap entries only
    page = await k.swap.swapin(k, entry, vma_gfp(vma), _node(vma))
    if mm.pt.get(vpn) is not pte:  # someone else handled it while we slept
        put_page(k, page)
        return
    exclusive = k.swap.count(entry) == 1 and page.mapcount == 0
    # installing over the swap PTE drops its swap reference (_release_pte -> swap_free)
    await set_pte_at(k, mm, vpn, _pte_for(vma, page, exclusive and bool(vma.flags & VM_WRITE)), expect=pte)
    put_page(k, page)


async def do_wp_page(k: Kernel, mm: MM, vma: Vma, vpn: int, pte: Pte) -> None:
    """do_wp_page(): reuse an exclusive anonymous page, else wp_page_copy()."""
    page = pte.page
    assert page is not None  # a write fault on a present entry
    if vma.flags & VM_SHARED and not vma.is_anon:
        _pte_mkwrite(mm, vpn, pte)  # a shared mapping only needs its write bit back
        return
    if not pte.special and page.mapping is None and page.mapcount == 1 and page.swap_entry is None \
            and not page.ksm and page.is_ram:
        _pte_mkwrite(mm, vpn, pte)  # wp_can_reuse_anon_folio()
        return
    await wp_page_copy(k, mm, vma, vpn, pte)


def _pte_mkwrite(mm: MM, vpn: int, pte: Pte) -> None:
    """set_pte_at(pte_mkwrite(pte)): a new PTE value, so a concurrent faulter's pte_same() fails.

    (Setting the bit on the same object would let a copier that sampled the
    read-only PTE install its stale copy over this one.)
    """
    mm.pt[vpn] = Pte(page=pte.page, write=True, tagged=pte.tagged, special=pte.special,
                     fault_on_access=pte.fault_on_access)


def _hugetlb_exclusive(mm: MM, vma: Vma, folio: Page) -> bool:
    """The folio is this private mapping's own: anonymous and mapped by no other mm (hugetlb_wp's reuse test).

    A hugetlb folio is always mapped whole, so its head's rmap names every mm mapping it.
    """
    anon = folio.mapping is None or (vma.obj is not None and not vma.obj.named)
    return anon and all(m is mm for m, _vpn in folio.rmap)


async def hugetlb_wp(k: Kernel, mm: MM, vma: Vma, vpn: int, pte: Pte) -> None:
    """hugetlb_wp() (mm/hugetlb.c): reuse an exclusive anonymous folio, else copy the whole folio.

    The copy goes through copy_user_large_folio() -> copy_user_highpage() for
    every subpage, so the data of each and, from the head, the tags of the
    whole folio (copy_highpage's hugetlb branch) reach the new folio, which is
    then mapped writable in place of the old one. A shared mapping only gets
    its write bit back.
    """
    assert pte.page is not None  # a write fault on a present entry
    old = pte.page.folio
    nr = len(old.subpages)
    first = vpn - (pte.page.pfn - old.pfn)
    if vma.flags & VM_SHARED or _hugetlb_exclusive(mm, vma, old):
        for v in range(first, first + nr):
            e = mm.pt.get(v)
            if e is not None and e.present and e.page is not None and e.page.folio is old:
                _pte_mkwrite(mm, v, e)
        return
    head_pte = mm.pt.get(first)
    get_page(old)  # folio_get(old_folio) before the allocation, which may sleep (as wp_page_copy's source)
    try:
        new = await alloc_hugetlb_folio(k, nr, vma_gfp(vma), _node(vma))
        for i in range(nr):  # copy_user_large_folio()
            await copy_user_highpage(k, new.subpages[i], old.subpages[i])
    finally:
        put_page(k, old)
    await k.sched.point("hugetlb_wp:map")
    installed = await set_pte_at(k, mm, first, _pte_for(vma, new, True), nr=nr, expect=head_pte)
    for p in new.subpages:  # the allocation's references (the PTEs hold theirs now)
        p.refcount -= 1
    if not installed or all(p.refcount <= 0 for p in new.subpages):
        k.alloc.free_page(new)  # the PTE changed meanwhile: the fault retries


async def wp_page_copy(k: Kernel, mm: MM, vma: Vma, vpn: int, pte: Pte) -> None:
    """wp_page_copy(): copy-on-write into a new page through copy_user_highpage().

    The source holds the fault's reference from before the allocation (do_wp_page()'s
    folio_get() under the PTE lock) to the end, as in Linux: reclaim or migration that
    meets the folio meanwhile finds it busy, so it is never freed under the copy.
    """
    old = pte.page
    assert old is not None  # a write fault on a present entry
    if pte.special:  # the zero page: a fresh zeroed page (__GFP_ZEROTAGS under VM_MTE)
        new = await vma_alloc_zeroed_movable_folio(k, vma)
    else:
        get_page(old)  # do_wp_page(): folio_get() before the allocation, which may sleep
        try:
            new = await _alloc(k, vma)
            await copy_user_highpage(k, new, old)
        except BaseException:
            put_page(k, old)
            raise
    try:
        await k.sched.point("wp_page_copy:map")
        # if the PTE changed under us (pte_same() fails), back off: the fault retries
        await set_pte_at(k, mm, vpn, _pte_for(vma, new, True), expect=pte)
        put_page(k, new)
    finally:
        if not pte.special:
            put_page(k, old)  # folio_put(old_folio)


# ---- fork ------------------------------------------------------------------

async def copy_page_range(k: Kernel, dst: MM, src: MM) -> None:
    """copy_page_range() (fork): share PTEs; private anonymous pages become CoW in both.

    A pinned anonymous page (folio_needs_cow_for_dma()) is copied at once instead, into a page
    preallocated outside the locks, under both page-table locks (copy_present_page()).
    """
    k.oracle.ghost.fork(src, dst)  # the child's private pages hold what the parent's did
    for vpn, pte in list(src.pt.items()):
        vma = src.find_vma(vpn << PAGE_SHIFT)
        if pte.swap is not None:
            k.swap.swap_duplicate(pte.swap)
            dst.pt[vpn] = Pte(swap=pte.swap, tagged=pte.tagged)
            continue
        cow = vma is not None and not vma.flags & VM_SHARED
        if cow and vma is not None and vma.is_anon and not pte.special and pte.page is not None \
                and pte.page.pins and not pte.page.is_hugetlb:
            await copy_present_page(k, dst, src, vma, vpn, pte)
            continue
        if cow:
            pte.write = False
        child = Pte(page=pte.page, write=pte.write, tagged=pte.tagged, special=pte.special,
                    fault_on_access=pte.fault_on_access)
        dst.pt[vpn] = child
        if not pte.special and pte.page is not None:
            pte.page.rmap.add((dst, vpn))
            pte.page.mapcount += 1
            get_page(pte.page)


async def copy_present_page(k: Kernel, dst: MM, src: MM, vma: Vma, vpn: int, pte: Pte) -> None:
    """copy_present_page() (mm/memory.c): a pinned page is copied for the child now, not shared CoW.

    The destination is preallocated (folio_prealloc(), the VMA's gfp, outside the locks); the
    copy (copy_user_highpage -> copy_highpage, which may park tags) runs under the child's and
    the parent's page-table locks, so nothing in it may sleep (seed 002).
    """
    page = pte.page
    assert page is not None
    new = await _alloc(k, vma)  # copy_pte_range()'s prealloc
    ts = k.tag_storage
    if "tag-park-prepare" in k.fixes and ts.enabled and not ts.copy_highpage_prepare(new, page):
        put_page(k, new)
        raise KernelError("ENOMEM", "fork: no buffer for the tags of a pinned page (copy_highpage_prepare)")
    with spin_lock(k, f"ptl[{dst.owner}]"), spin_lock(k, f"ptl[{src.owner}]"):
        await copy_user_highpage(k, new, page)
    ts.prepared.discard(new.pfn)  # a buffer the copy did not need
    child = Pte(page=new, write=pte.write, tagged=pte.tagged)
    if ts.enabled and pte.tagged and ts.lacks_storage(new):
        child.fault_on_access = True
    elif k.mte and pte.tagged and not page_mte_tagged_any(new):
        await mte_sync_tags(k, new, 1)
    dst.pt[vpn] = child
    new.rmap.add((dst, vpn))
    new.mapcount += 1  # the allocation's reference is the PTE's


def page_mte_tagged_any(page: Page) -> bool:
    """PG_mte_tagged on the page (or its folio's head)."""
    return bool(page.folio.flags & PG_mte_tagged)
