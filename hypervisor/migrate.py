"""Page migration (mm/migrate.c): move pages to new frames through copy_highpage.

``migrate_pages`` unmaps every PTE of the folio into a migration entry
(faults on it wait), copies data and tags with ``folio_copy`` ->
``copy_highpage`` (PRESERVE ON COPY), then ``remove_migration_ptes`` maps the
new frame in the same places with ``set_pte_at`` and frees the old one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.copypage import copy_highpage
from hypervisor.memory import get_page, put_page, set_pte_at
from hypervisor.page import Page
from hypervisor.vma import Pte
from shared.mte import PAGE_SHIFT

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm import MM


async def migrate_range(k: "Kernel", mm: "MM", start: int, end: int) -> int:
    """migrate_pages() for every migratable page mapped in [start, end); returns pages moved."""
    folios: dict[int, Page] = {}  # isolate_migratepages(): each folio once, chosen before any moves
    for vpn in mm.vpns_in(start, end):
        pte = mm.pt.get(vpn)
        if pte is None or not pte.present or pte.special:
            continue
        page = pte.page.folio
        if page.zone == "normal" and not page.ksm and page.swap_entry is None:
            folios.setdefault(page.pfn, page)
    moved = 0
    for page in folios.values():
        if not page.free:
            moved += await migrate_folio(k, page)
    return moved


async def migrate_folio(k: "Kernel", old: Page) -> int:
    """migrate_folio_unmap() + move_to_new_folio() + remove_migration_ptes()."""
    huge = old.is_hugetlb
    olds = old.subpages if huge else [old]
    new_head = k.alloc.alloc_hugetlb_folio() if huge else k.alloc.alloc_page()
    news = new_head.subpages if huge else [new_head]
    await k.sched.point("migrate:unmap")
    # try_to_migrate(): PTEs become migration entries
    mappings = []
    for o in olds:
        for mm, vpn in list(o.rmap):
            pte = mm.pt.get(vpn)
            if pte is not None and pte.page is o:
                pte.migrating = True
                mappings.append((mm, vpn, pte, o))
    # move_to_new_folio() -> folio_copy() -> copy_highpage() per page (hugetlb: once, from the head)
    if huge:
        for n, o in zip(news, olds):
            n.copy_data_from(o)
        await copy_highpage(k, new_head, old)
    else:
        await copy_highpage(k, new_head, old)
    await k.sched.point("migrate:copied")
    # page cache / swap cache now points at the new frame
    if old.mapping is not None:
        obj = old.mapping
        for n, o in zip(news, olds):
            n.mapping, n.index = o.mapping, o.index
        obj.pages[old.index] = new_head
        get_page(new_head)  # the page cache's reference moves to the new frame
    # remove_migration_ptes(): map the new frames where the old ones were
    for mm, vpn, pte, o in mappings:
        n = news[olds.index(o)] if huge else new_head
        pte.migrating = False
        entry = Pte(page=n, write=pte.write, tagged=pte.tagged)
        await set_pte_at(k, mm, vpn, entry)
    k.sched.wake()
    if old.mapping is not None:
        for o in olds:
            o.mapping = None
        if huge:
            k.alloc.free_page(old)
        else:
            put_page(k, old)  # the old page cache reference
    put_page(k, new_head) if not huge else None
    return 1
