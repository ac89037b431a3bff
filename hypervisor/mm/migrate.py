"""Page migration (mm/migrate.c): move pages to new frames through copy_highpage.

``migrate_pages`` isolates each folio (one migrator or reclaimer at a time),
turns every PTE mapping it into a migration entry (faults on it wait), checks
that nobody else holds a reference (as ``__migrate_folio`` does before it does
more work: a GUP holder may still write the old frame), copies data and tags
with ``folio_copy`` -> ``copy_highpage`` (PRESERVE ON COPY), then freezes the
old folio's references: if anyone else still holds one (a fault
that found it in the page cache), the migration is undone, as
``folio_ref_freeze`` failing makes Linux retry. Otherwise the page cache points
at the new frame and ``remove_migration_ptes`` maps it, with ``set_pte_at``,
wherever a migration entry of this folio is still in place: a PTE zapped or
replaced meanwhile (munmap, MADV_DONTNEED, exit) is left as it is. Every sharer
is restored before a CoW fault can reuse the new folio (Linux keeps it locked
until then; see ``remove_migration_ptes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.copypage import copy_highpage
from hypervisor.arm64.mte import mte_sync_tags
from hypervisor.mm.memory import _install, get_page, pte_accessible, put_page
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm_types import VM_MTE, Pte
from hypervisor.page import Page
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM

#: Test-only: the old ordering (copy first, check references only at the freeze), so
#: tests/unit/hypervisor/test_lost_tag_races.py can show the ghost catches the COPY_TAGS write it loses.
_OLD_ORDERING = False


async def migrate_range(k: Kernel, mm: MM, start: int, end: int, to: str | None = None) -> int:
    """migrate_pages() for every migratable page mapped in [start, end); returns folios moved.

    ``to``: a node name (move_pages(2): pages already there stay), ``"tag-storage"`` (a free
    tag storage page, as compaction may pick), or None (an ordinary target on the page's node).
    Pinned pages are skipped (not counted).

    Raises:
        KernelError: ENOENT (an unknown name), EINVAL (``tag-storage`` without dynamic
            management; a region that is not ``coherent``), ENOMEM (no target page is free and
            nothing was moved).
    """
    target = _target(k, to)
    if target is None:
        from hypervisor.mm.memremap import migrate_to_coherent  # H2's: a coherent region (migrate_vma)

        assert to is not None
        return await migrate_to_coherent(k, mm, start, end, to)
    folios: dict[int, Page] = {}  # each folio once, chosen before any moves
    for vpn in mm.vpns_in(start, end):
        pte = mm.pt.get(vpn)
        if pte is None or not pte.present or pte.special or pte.page is None:
            continue
        page = pte.page.folio
        if page.is_ram and not page.ksm and page.swap_entry is None and not page.pins:
            if to is not None and to != "tag-storage" and page.node == to:
                continue  # already there
            if to == "tag-storage" and page.is_tag_storage:
                continue
            folios.setdefault(page.pfn, page)
    moved = 0
    for page in folios.values():
        if not page.free and not page.isolated and not page.pins:
            try:
                moved += await migrate_folio(k, page, target)
            except KernelError:
                if moved == 0:
                    raise
                break
    return moved


def _target(k: Kernel, to: str | None):
    """The allocation of a migration's destination (alloc_migration_target()), or None for a region."""
    from hypervisor.mm.page_alloc import alloc_hugetlb_folio, alloc_pages

    if to == "tag-storage":
        if not k.tag_storage.enabled:
            raise KernelError("EINVAL", "migrate-pages: to = tag-storage needs dynamic tag storage management")
    elif to is not None and to not in k.alloc.node_by_name:
        from hypervisor.mm.memremap import memremap

        if to in memremap(k).regions:
            return None
        raise KernelError("ENOENT", f"migrate-pages: no node or region {to!r}")

    async def target(old: Page) -> Page:
        if old.is_hugetlb:
            if to == "tag-storage":
                raise KernelError("ENOMEM", "migrate-pages: a hugetlb folio does not fit a tag storage page")
            # hugetlb folios are not parked (the model copies their tags whole): the target reserves storage
            return await alloc_hugetlb_folio(k, len(old.subpages), "tagged", old.node if to is None else to)
        if to == "tag-storage":
            return await alloc_pages(k, "movable", None, from_ts=True)
        # v3 dropped the migration target's hook: an untagged movable page (it has no storage)
        return await alloc_pages(k, "movable", old.node if to is None else to)
    return target


async def migrate_away(k: Kernel, page: Page) -> bool:
    """alloc_contig_range()'s migration of one page in use out of a tag block being claimed."""
    from hypervisor.mm.page_alloc import migrate_handle_page

    if page.pins or page.isolated or page.free:
        return False
    if page.owner is not None:  # an alloc-pages page: not mapped, the handle holds it
        new = k.alloc.alloc_page("tagged", page.node)  # never CMA: not back into the range
        migrate_handle_page(k, page, new)
        return True
    if page.swap_entry is not None or page.ksm or (page.mapcount == 0 and page.mapping is None):
        return False

    async def target(old: Page) -> Page:
        return k.alloc.alloc_page("tagged", old.node)  # never CMA (no reservation: migration targets have none)
    return bool(await migrate_folio(k, page, target)) and page.free


async def replace_folio_with_tagged(k: Kernel, folio: Page) -> bool:
    """replace_folio_with_tagged() (RFC v3 patch 27): migrate the folio to a __GFP_TAGGED page.

    migrate_pages(GFP_HIGHUSER_MOVABLE | __GFP_TAGGED), up to 3 tries while -EBUSY; the new
    page's storage is reserved by arch_alloc_page() (best effort). Returns whether it moved.
    """
    from hypervisor.mm.page_alloc import alloc_hugetlb_folio, alloc_pages

    async def target(old: Page) -> Page:
        if old.is_hugetlb:
            return await alloc_hugetlb_folio(k, len(old.subpages), "tagged", old.node)
        return await alloc_pages(k, "tagged", None if old.is_tag_storage else old.node)
    for _ in range(3):
        if folio.free or folio.pins:
            return False
        if folio.isolated:
            await k.sched.point("replace_folio_with_tagged:busy")
            continue
        try:
            if await migrate_folio(k, folio, target):
                return True
        except KernelError:
            return False
    return False


async def migrate_folio(k: Kernel, old: Page, target=None) -> int:
    """migrate_folio_unmap() + move_to_new_folio() + remove_migration_ptes(); 1 if moved, else 0."""
    if target is None:
        target = _target(k, None)
    old.isolated = True
    get_page(old)  # the isolation reference
    try:
        return await _migrate_isolated(k, old, target)
    finally:
        old.isolated = False
        put_page(k, old)
        k.sched.wake()


async def _migrate_isolated(k: Kernel, old: Page, target) -> int:
    huge = old.is_hugetlb
    olds = old.subpages if huge else [old]
    new_head = await target(old)
    news = new_head.subpages if huge else [new_head]
    await k.sched.point("migrate:unmap")
    # try_to_migrate(): each PTE becomes a migration entry of its own; the mapping's reference goes
    entries: list[tuple[MM, int, Pte, int]] = []
    for i, o in enumerate(olds):
        for mm, vpn in list(o.rmap):
            pte = mm.pt.get(vpn)
            if pte is None or pte.page is not o or pte.migrating:
                continue
            mmu_notifier_invalidate_range(mm, vpn << PAGE_SHIFT, (vpn + 1) << PAGE_SHIFT, "migrate")
            entry = Pte(page=o, write=pte.write, tagged=pte.tagged, migrating=True,
                        fault_on_access=pte.fault_on_access)
            mm.pt[vpn] = entry
            o.rmap.discard((mm, vpn))
            o.mapcount -= 1
            o.refcount -= 1
            entries.append((mm, vpn, entry, i))
    # __migrate_folio(): "check whether src does not have extra refs before we do more work". A
    # GUP holder (COPY_TAGS, ptrace) that took its reference before the unmap may still write the
    # old frame: give up now, before copying, or a write that finishes between the copy and the
    # freeze below would be lost with the old frame.
    if _refs_unexpected(old) and not _OLD_ORDERING:
        await _undo(k, olds, entries)
        _free_new(k, new_head)
        return 0
    # move_to_new_folio() -> folio_copy() -> copy_highpage() (hugetlb: once, from the head)
    if huge:
        for n, o in zip(news, olds, strict=True):
            n.copy_data_from(o)
    await copy_highpage(k, new_head, old)
    await k.sched.point("migrate:copied")
    # folio_ref_freeze(): only our isolation reference and the page cache's may remain
    if _refs_unexpected(old):
        await _undo(k, olds, entries)
        _free_new(k, new_head)
        return 0
    anon = old.mapping is None
    if not anon:
        obj = old.mapping
        assert obj is not None  # not anon: a page-cache page
        for n, o in zip(news, olds, strict=True):
            n.mapping, n.index = o.mapping, o.index
            o.mapping = None
        obj.pages[old.index] = new_head
        if not huge:
            get_page(new_head)  # the page cache's reference moves to the new frame
            put_page(k, old)
    await remove_migration_ptes(k, entries, news)
    if not huge:
        put_page(k, new_head)  # the allocation's reference
    else:
        if anon:  # an anonymous folio: the allocation's references go (a page-cache folio keeps them)
            for n in news:
                n.refcount -= 1
            if all(n.refcount <= 0 for n in news):
                k.alloc.free_page(new_head)  # every PTE was zapped meanwhile
        if all(o.mapcount == 0 for o in olds):
            k.alloc.free_page(old)
    return 1


async def remove_migration_ptes(k: Kernel, entries, news: list[Page]) -> None:
    """remove_migration_ptes() (mm/migrate.c): map the new folio wherever our migration entry still stands.

    Linux does it with the destination folio locked (``folio_lock(dst)`` until
    every entry is replaced), and a CoW fault on a PTE already restored waits
    for that lock (``hugetlb_fault``) or fails its ``folio_trylock``
    (``wp_can_reuse_anon_folio``, which also sees migration's reference): no
    fault sees the folio mapped by fewer mms than it will be, so none reuses it
    in place while another sharer is still to be restored. Deliberate
    difference: the model has no folio lock, so ``mte_sync_tags`` runs first for
    every PTE to restore (with its scheduling points, while no PTE maps the new
    folio yet), then every PTE goes in with no scheduling point between them.
    A PTE zapped or replaced meanwhile (munmap, MADV_DONTNEED, exit) is left as it is.
    """
    await _sync_and_install(k, [(mm, vpn, entry, news[i]) for mm, vpn, entry, i in entries])
    k.sched.wake()


def _vma_tagged(mm: MM, vpn: int) -> bool:
    """The VMA's vm_page_prot is Normal-Tagged (VM_MTE) where a migration entry is restored."""
    vma = mm.find_vma(vpn << PAGE_SHIFT)
    return vma is not None and bool(vma.flags & VM_MTE)


def _refs_unexpected(old: Page) -> bool:
    """folio_ref_count() != folio_expected_refs(): a reference beyond the isolation and the page cache.

    Every PTE was turned into a migration entry, and page-cache faults wait while the folio is
    isolated (``shmem_get_folio``'s folio lock), so a reference or mapping the folio has now was taken
    by someone who does not wait (a GUP holder such as COPY_TAGS or ptrace, a KSM or reclaim pass):
    the migration gives up, as a failed ``folio_ref_freeze`` makes Linux retry.
    """
    if old.is_hugetlb:  # migrate_huge_page_move_mapping(): every subpage's count (the head holds ours)
        return any(p.busy(held=int(p is old)) or p.mapcount > 0 for p in old.subpages)
    return old.busy() or old.mapcount > 0


def _free_new(k: Kernel, new_head: Page) -> None:
    """Drop the never-mapped destination folio of a migration that gave up."""
    if new_head.is_hugetlb:
        k.alloc.free_page(new_head)
    else:
        put_page(k, new_head)


async def _undo(k: Kernel, olds: list[Page], entries) -> None:
    """remove_migration_ptes(src, src): put the old frame back wherever our migration entries still stand."""
    await _sync_and_install(k, [(mm, vpn, entry, olds[i]) for mm, vpn, entry, i in entries], undo=True)
    k.sched.wake()


async def _sync_and_install(k: Kernel, items: list[tuple[MM, int, Pte, Page]], *, undo: bool = False) -> None:
    """Map ``page`` wherever our migration entry still stands, as the VMA wants it now.

    mk_pte(page, READ_ONCE(vma->vm_page_prot)): an mprotect(PROT_MTE) that ran while the folio was
    unmapped did not rewrite our entries, so the attributes come from the VMA at install time.
    Every page a tagged PTE will map is synced first (mte_sync_tags, with its scheduling points;
    ``undo``: only pages the VMA tagged since the unmap, the old frame being in sync otherwise),
    and again if an mprotect changed the answer meanwhile; then every PTE goes in with no
    scheduling point between them. A page without tag storage gets a fault-on-access PTE.
    """
    ts = k.tag_storage
    synced: set[int] = set()

    def pending() -> list[Page]:
        return [page for mm, vpn, entry, page in items
                if mm.pt.get(vpn) is entry and page.pfn not in synced and not (undo and entry.tagged) and k.mte
                and page.is_ram and _vma_tagged(mm, vpn) and not ts.lacks_storage(page) and pte_accessible(mm, vpn)]

    async def sync() -> None:
        while todo := pending():
            for page in todo:  # __sync_cache_and_tags() of each set_pte_at(), ahead of the installs
                synced.add(page.pfn)
                get_page(page)
                try:
                    await mte_sync_tags(k, page, 1)
                finally:
                    put_page(k, page)

    await sync()
    if not undo:
        await k.sched.point("remove_migration_ptes")
        await sync()
    for mm, vpn, entry, page in items:
        if mm.pt.get(vpn) is entry:
            tagged = _vma_tagged(mm, vpn)
            foa = ts.enabled and tagged and ts.lacks_storage(page)
            _install(k, mm, vpn, Pte(page=page, write=entry.write, tagged=tagged, fault_on_access=foa), 1)
