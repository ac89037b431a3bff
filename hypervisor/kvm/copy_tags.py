"""KVM_ARM_MTE_COPY_TAGS (arch/arm64/kvm/guest.c ``kvm_vm_ioctl_mte_copy_tags``, v6.13+).

Linux has no copy_tags.c: the ioctl is in guest.c and dispatched from arm.c; the model keeps
it in a file named after what it does.

The VMM's way to read (FROM_GUEST) or write (TO_GUEST) a guest's allocation
tags, one tag per byte, without mapping guest RAM PROT_MTE itself: the tool of
live migration (reference sections 4.4 and 5). Checks, in the kernel's order:

1. the VM has no MTE -> EINVAL;
2. ``reserved[0] || reserved[1]`` -> EINVAL;
3. ``flags`` other than 0 (TO_GUEST) or 1 (FROM_GUEST) -> EINVAL;
4. ``guest_ipa`` or ``length`` not page aligned -> EINVAL;
5. ``length > INT_MAX`` -> EINVAL;
6. under ``slots_lock``: TO_GUEST while any memslot logs dirty pages -> EBUSY
   (the ioctl does not call mark_page_dirty, so the tags would escape the log).

Then per page: GUP in the VMM's mm (FOLL_WRITE for TO_GUEST). A gfn outside
every memslot, a read-only slot for TO_GUEST, a GUP failure or ZONE_DEVICE
memory ends the copy with EFAULT. FROM_GUEST reads the tags of a tagged page
and zeros for an untagged one, changing nothing. TO_GUEST takes the tag lock
(result ignored), copies, zeroes the page's tags if the user buffer ran short,
and always sets PG_mte_tagged (for a hugetlb page, on the whole folio: the
folio's other pages keep whatever tags they had, finding 3 of
docs/findings.md, unless the host applies ``sanitise-whole-hugetlb-folio``,
which clears them when the lock is won). The return is the guest bytes done when at least
one page was, else the error: partial success wins over the error.

Model notes: under the free scheduler the pages are copied a run at a time
(``_copy_tags_run``: one mmap_lock hold and one scheduling point per run of
present pages, the fault path for the others), with the same results; a
controlled scheduler keeps every per-page point. The user buffer is the request's ``tags`` (TO_GUEST); a shorter
buffer faults where it ends. Replies larger than :data:`shared.abi.MAX_IO`
tags get E2BIG after the kernel's own checks (the transport's limit: split the
dump, as the VMM does).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

from hypervisor.arm64.mte_lock import (
    PG_mte_lock,
    PG_mte_tagged,
    folio_set_hugetlb_mte_tagged,
    folio_test_hugetlb_mte_tagged,
    folio_try_hugetlb_mte_tagging,
    page_mte_tagged,
    set_page_mte_tagged,
    try_page_mte_tagging,
)
from hypervisor.arm64.tags import mte_clear_page_tags, read_tags, shared_tags, write_tags
from hypervisor.ghost import Entry, loc_of_ipa
from hypervisor.kvm.kvm_host import Kvm, ghost_kvm_write, kvm_has_mte
from hypervisor.mm.memory import do_anonymous_page_run, get_page, handle_mm_fault, put_page
from hypervisor.mm.memremap import pfn_to_online_page
from hypervisor.mm_types import VM_READ, VM_SHARED, VM_WRITE, Pte
from hypervisor.page import Page
from hypervisor.sched import current_actor
from shared.abi import MAX_IO
from shared.errno import KernelError
from shared.mte import MTE_GRANULES_PER_PAGE, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

KVM_ARM_TAGS_TO_GUEST = 0
KVM_ARM_TAGS_FROM_GUEST = 1
INT_MAX = (1 << 31) - 1
ZERO_TAGS = bytes(MTE_GRANULES_PER_PAGE)
#: mte_copy_tags_from_user() keeps the low 4 bits of each byte (a translate table: no loop per byte).
_LOW_NIBBLE = bytes(b & 0xF for b in range(256))
#: Bug-zoo switches that change the tag lock: their runs take the per-page path, which models them.
_SLOW_PATH_BUGS = frozenset({"flag-before-init", "no-tag-lock"})


async def __gfn_to_page(k: Kernel, kvm: Kvm, gfn: int, write: bool) -> Page | None:
    """__gfn_to_page(): GUP the VMM page behind ``gfn`` (with a reference), or None."""
    slot = kvm.slot_of(gfn)
    if slot is None or (write and slot.readonly):
        return None
    try:
        pte = await handle_mm_fault(k, kvm.mm, slot.hva(gfn), write)
    except KernelError:
        return None
    assert pte.page is not None  # handle_mm_fault returns a present entry
    if not pte.special:
        get_page(pte.page)
    return pte.page


def _release(k: Kernel, page: Page) -> None:
    if page.is_ram:
        put_page(k, page)


def _is_tagged(k: Kernel, page: Page) -> bool:
    if page.is_hugetlb:
        return folio_test_hugetlb_mte_tagged(k, page.folio)
    return page_mte_tagged(k, page)


async def _copy_tags_run(k: Kernel, kvm: Kvm, gfn: int, npages: int, write: bool, tags: bytes, pos: int,
                         out: bytearray) -> int:
    """The free scheduler's bulk step of kvm_vm_ioctl_mte_copy_tags(): a run of pages at once.

    Deliberate difference from the per-page loop (same results, fewer steps):
    the pages from ``gfn`` that one memslot and one VMA hold are copied under
    one mmap_lock read hold, as GUP holds it across its faults: one walk
    instead of a fault-path lookup per page, one scheduling point (the lock's)
    for a run of present pages instead of 3-4 per page, and no GUP reference
    per page (nothing runs between taking and dropping it). A page that is not
    present (or not writable, for TO_GUEST) takes the real fault path,
    ``handle_mm_fault``, with its points, then the run goes on. Without a
    yield between two present pages no other context can tell the
    difference, which is why only the free scheduler takes this path: a
    controlled scheduler keeps every per-page point. The run stops at the
    first page it cannot do (a fault that fails, device memory, a tag lock
    held by another initialiser, a short tag buffer); the caller's per-page
    path takes that page, errors included. Returns the pages done (0: none).
    """
    slot = kvm.slot_of(gfn)
    if slot is None or (write and slot.readonly):
        return 0
    mm = kvm.mm
    hva = slot.hva(gfn)
    vpn0 = hva >> PAGE_SHIFT
    if write:
        npages = min(npages, (len(tags) - pos) // MTE_GRANULES_PER_PAGE)
    await mm.mmap_lock.read_lock()  # the run's one scheduling point
    try:
        vma = mm.find_vma(hva)
        if vma is None or not vma.flags & (VM_WRITE if write else VM_READ):
            return 0
        n = min(npages, slot.base_gfn + slot.npages - gfn, (vma.end >> PAGE_SHIFT) - vpn0)
        if write:
            return await _copy_to_guest_run(k, kvm, slot, gfn, mm, vma, vpn0, n, tags, pos)
        return await _copy_from_guest_run(k, mm, vma, vpn0, n, out, pos)
    finally:
        mm.mmap_lock.read_unlock()


async def _faultin(k: Kernel, mm, vpn: int, write: bool) -> Pte | None:
    """__get_user_pages() -> faultin_page() under the mmap_lock the caller holds: the PTE, or None.

    None when the fault failed (the per-page path meets the error again and
    reports it) or the page was lost again meanwhile (the per-page path retries).
    """
    try:
        await handle_mm_fault(k, mm, vpn << PAGE_SHIFT, write, locked=True)
    except KernelError:
        return None
    pte = mm.pt.get(vpn)
    if pte is None or not pte.present or (write and not pte.write):
        return None
    return pte


async def _copy_from_guest_run(k: Kernel, mm, vma, vpn0: int, n: int, out: bytearray, at: int) -> int:
    """FROM_GUEST over up to ``n`` pages from ``vpn0`` into ``out[at:]`` (see _copy_tags_run); returns the pages done.

    ``out`` is zero-filled: only pages whose tags are not all zero are copied.
    The present pages are taken a batch at a time with C-level list
    operations (one dict lookup per page; a batch of zero-page mappings costs
    no Python statement per page); the ghost is consulted for the pages it
    has an entry for and those that read non-zero tags. The batch grows while
    pages are present; pages that are not present are faulted in one by one.
    """
    if vma.obj is not None and vma.obj.is_device_memory:
        return 0  # device memory: EFAULT from the per-page path
    get = mm.pt.get
    zero_page = k.alloc.zero_page
    ghost = k.oracle.ghost
    who = "KVM_ARM_MTE_COPY_TAGS FROM_GUEST"
    step = MTE_GRANULES_PER_PAGE
    vpn, end, batch = vpn0, vpn0 + n, 64
    while vpn < end:
        # present pages, a batch at a time
        ptes = list(map(get, range(vpn, min(end, vpn + batch))))
        if None in ptes:
            ptes = ptes[:ptes.index(None)]
        if any(map(_MIGRATING, ptes)):
            ptes = ptes[:[p.migrating for p in ptes].index(True)]
        pages = list(map(_PAGE, ptes))
        if None in pages:  # a swap entry
            pages = pages[:pages.index(None)]
        read: list = []  # (index, tags) of the pages that read non-zero tags
        if pages.count(zero_page) == len(pages):
            _check_run(ghost, mm, vma, vpn, pages, read, who)  # no tags to read: only entries can differ
        elif vma.obj is None:
            _read_and_check_anon(k, ghost, mm, vma, vpn, pages, out, at + (vpn - vpn0) * step, who)
        else:
            for i, page in enumerate(pages):
                if page is zero_page:
                    continue  # never PG_mte_tagged: reads as zeros
                if page.zone in ("device", "pfnmap"):
                    del pages[i:]  # device memory: EFAULT from the per-page path
                    break
                if (page.flags if page.head is None else page.head.flags) & PG_mte_tagged:
                    got = read_tags(k, page, 0, step, who)
                    if got != ZERO_TAGS:
                        o = at + (vpn - vpn0 + i) * step
                        out[o:o + step] = got
                        read.append((i, got))
                # else: clear_user(), untagged pages read as zeros
            _check_run(ghost, mm, vma, vpn, pages, read, who)
        vpn += len(pages)
        if len(pages) == len(ptes) == batch:
            batch = min(batch * 2, 4096)
            continue
        batch = 64
        # then pages that are not present, one fault each, until a present one
        while vpn < end:
            pte = get(vpn)
            if pte is not None and pte.page is not None and not pte.migrating:
                break
            pte = await _faultin(k, mm, vpn, False)
            if pte is None:
                break
            page = pte.page
            assert page is not None  # _faultin returns a present entry
            if page is zero_page:
                got = ZERO_TAGS
            elif not page.is_ram:
                break
            elif (page.flags if page.head is None else page.head.flags) & PG_mte_tagged:
                got = read_tags(k, page, 0, step, who)
                o = at + (vpn - vpn0) * step
                out[o:o + step] = got
            else:
                got = ZERO_TAGS
            ghost.check_read_tags(ghost.run_loc(mm, vma, vpn), page, 0, got, who)
            vpn += 1
        else:
            break
        pte = get(vpn)
        if pte is None or pte.page is None or pte.migrating or not pte.page.is_ram and pte.page is not zero_page:
            break  # a fault that failed, or device memory: the per-page path decides
    return vpn - vpn0


_MIGRATING = operator.attrgetter("migrating")
_PAGE = operator.attrgetter("page")


def _check_run(ghost, mm, vma, vpn0: int, pages: list, read: list, who: str) -> None:
    """TAGS-AS-WRITTEN for whole-page tag reads of ``pages`` (mapped from ``vpn0``); ``read`` holds the
    ``(index, tags)`` of those that read non-zero tags, the others read zeros.

    Only pages with a ghost entry, or that read non-zero tags, can differ from
    what was written (no entry: zeros expected), so only those are compared.
    """
    entries, off, fallback, _ = ghost.run_view(mm, vma, vpn0)
    m = len(pages)
    got = dict(read)
    if fallback:  # a private mapping of an object: every page through the full lookup
        for i in range(m):
            ghost.check_read_tags(ghost.run_loc(mm, vma, vpn0 + i), pages[i], 0, got.get(i, ZERO_TAGS), who)
        return
    for i in sorted({i - off for i, _ in _entries_in(entries, off, off + m)} | set(got)):
        e = entries.get(off + i)
        want = ZERO_TAGS if e is None or e.tags is None else e.tags
        if got.get(i, ZERO_TAGS) != want:  # check_read_tags decides (granules marked unknown) and reports
            ghost.check_read_tags(ghost.run_loc(mm, vma, vpn0 + i), pages[i], 0, got.get(i, ZERO_TAGS), who)


def _read_and_check_anon(k: Kernel, ghost, mm, vma, vpn0: int, pages: list, out: bytearray, o: int,
                         who: str) -> None:
    """The read loop of _copy_from_guest_run and _check_run in one pass, for the pages of a private anonymous
    VMA: each page's tags (read_tags(), inline: on_tags_read() only when tags and shadow differ) go to
    ``out`` from offset ``o`` and are compared at once with the ghost's entry for the page (check_read_tags
    decides and reports on a difference), page by page as the per-page path does."""
    records = ghost.spaces.get(mm, _NO_RECORDS)
    oracle = k.oracle
    zero_page = k.alloc.zero_page
    step = MTE_GRANULES_PER_PAGE
    for i, page in enumerate(pages):
        got = ZERO_TAGS
        if page is zero_page:
            pass  # never PG_mte_tagged: reads as zeros
        elif page.zone in ("device", "pfnmap"):
            del pages[i:]  # device memory: EFAULT from the per-page path
            break
        elif (page.flags if page.head is None else page.head.flags) & PG_mte_tagged:
            tags = page.tags
            shadow = page.shadow
            if shadow is None or tags != shadow:  # read_tags(): what the oracle reports on (it checks again)
                oracle.on_tags_read(page, who)
            if tags != ZERO_TAGS:
                got = bytes(tags)
                out[o + i * step:o + (i + 1) * step] = got
        # else: clear_user(), untagged pages read as zeros
        e = records.get(vpn0 + i)
        if got != (ZERO_TAGS if e is None or e.tags is None else e.tags):
            ghost.check_read_tags(ghost.run_loc(mm, vma, vpn0 + i), page, 0, got, who)


_NO_RECORDS: dict = {}


def _entries_in(pages: dict, lo: int, hi: int) -> list:
    """``(index, entry)`` of ``pages`` with lo <= index < hi (cheap for a huge, sparse range)."""
    if not pages:
        return []
    if hi - lo <= len(pages):
        return [(i, pages[i]) for i in range(lo, hi) if i in pages]
    return [(i, e) for i, e in pages.items() if lo <= i < hi]


async def _copy_to_guest_run(k: Kernel, kvm: Kvm, slot, gfn: int, mm, vma, vpn0: int, n: int, tags: bytes,
                             pos: int) -> int:
    """TO_GUEST over up to ``n`` pages from ``vpn0`` (see _copy_tags_run); returns the pages done.

    The whole buffer is masked at once (one ``bytes.translate``). For the
    common page (not hugetlb, mapped once, anonymous or a shared object's) the
    tag write, PG_mte_tagged, the shadow and the ghost's record are updated
    inline, and the waiters are woken once at the end (nothing runs in
    between); any other page goes through the helpers one by one. Empty PTEs
    of an anonymous VMA are faulted in a run at a time (do_anonymous_page_run,
    under the mmap_lock this run holds), the same pages the fault path maps.
    """
    pt = mm.pt
    ghost = k.oracle.ghost
    logged = kvm.ghost_written.get(slot.id)
    sanitise = "sanitise-whole-hugetlb-folio" in k.fixes
    step = MTE_GRANULES_PER_PAGE
    masked = tags[pos:pos + n * step].translate(_LOW_NIBBLE)  # mte_copy_tags_from_user(), for the run
    # one tag everywhere (a restore of uniformly tagged memory): every page's tags are one shared object
    same = shared_tags(masked[:step]) if masked and masked.count(masked[:1]) == len(masked) else None
    obj = vma.obj
    if obj is None:  # the ghost's records of these pages: anonymous -> the mm's, by vpn
        records, rec_off = ghost.spaces.setdefault(mm, {}), 0
    elif vma.flags & VM_SHARED:  # a shared object's, by page index
        records, rec_off = ghost.spaces.setdefault(obj, {}), vma.index_of(vpn0 << PAGE_SHIFT) - vpn0
    else:
        records, rec_off = None, 0  # a private mapping of an object: the ghost's own rules (tags_written)
    done = 0
    oracle = k.oracle
    ts_enabled = k.tag_storage.enabled  # (on_tag_write() checks nothing without tag storage)
    try:
        for i in range(n):
            vpn = vpn0 + i
            pte = pt.get(vpn)
            if pte is None and await do_anonymous_page_run(k, mm, vpn, n - i, locked=True):
                pte = pt.get(vpn)  # the empty PTEs from here on were faulted in at once (fault-around)
            if pte is None or pte.page is None or pte.migrating or not pte.write:
                pte = await _faultin(k, mm, vpn, True)
                if pte is None:
                    break
                if records is not None:  # the fault may have yielded: the spaces as they are now
                    records = ghost.spaces.setdefault(mm if obj is None else obj, records)
            page = pte.page
            assert page is not None  # present
            if pte.special or not (page.zone == "normal" or page.zone == "movable"):  # (not page.is_ram)
                break
            hugetlb = page.head is not None
            folio = page.head if hugetlb else page  # page.folio
            assert folio is not None
            if folio.flags & PG_mte_lock and not folio.flags & PG_mte_tagged:
                break  # another initialiser holds the tag lock: the per-page path waits for it
            if not folio.flags & PG_mte_lock:  # try_page_mte_tagging() / folio_try_hugetlb_mte_tagging() won
                folio.flags |= PG_mte_lock
                k.oracle.on_init_start(folio, current_actor.get())
                if hugetlb and sanitise:
                    for sub in folio.subpages:
                        if sub is not page:
                            mte_clear_page_tags(k, sub)
            written = same if same is not None else masked[i * step:(i + 1) * step]
            if hugetlb or records is None or len(page.rmap) > 1:
                write_tags(k, page, 0, written)
                ghost.tags_written(ghost.run_loc(mm, vma, vpn), page, 0, written)
                if hugetlb:
                    folio_set_hugetlb_mte_tagged(k, folio)
                else:
                    set_page_mte_tagged(k, page)
                k.oracle.check_copy_tags_write(page)
            else:
                # write_tags() for a whole page: the shadow is the written tags (immutable, shared)
                if same is None:
                    written = shared_tags(written)
                if ts_enabled:
                    oracle.on_tag_write(page, "KVM_ARM_MTE_COPY_TAGS TO_GUEST")  # TAG-STORAGE-NOT-CLOBBERED
                page.tags[:] = written
                page.shadow = written
                page.initialiser = "write"
                # Ghost.tags_written(): this location maps this very page, nobody else does
                e = records.get(vpn + rec_off)
                if e is None:
                    records[vpn + rec_off] = Entry(written)
                else:
                    e.tags = written
                page.flags |= PG_mte_tagged  # set_page_mte_tagged(); the waiters are woken below
            if logged is not None:
                logged.add(gfn + i - slot.base_gfn)  # ghost_kvm_write()
            done += 1
    finally:
        k.sched.wake()
    return done


async def kvm_vm_ioctl_mte_copy_tags(k: Kernel, kvm: Kvm, guest_ipa: int, length: int, flags: int,
                                     reserved: tuple, tags: bytes) -> dict:
    """kvm_vm_ioctl_mte_copy_tags() (arch/arm64/kvm/guest.c).

    Returns:
        ``{"length": guest bytes done, "tags": bytearray}`` (tags empty for TO_GUEST; a bytearray
        so that the reply is the one buffer the copy wrote into: msgpack encodes it as bin).

    Raises:
        KernelError: EINVAL, EBUSY, EFAULT as in the module docstring (only when
            no page was done); E2BIG when the dump would not fit one reply.
    """
    write = not flags & KVM_ARM_TAGS_FROM_GUEST
    if not kvm_has_mte(k, kvm):
        raise KernelError("EINVAL", "KVM_ARM_MTE_COPY_TAGS: the VM does not have KVM_CAP_ARM_MTE enabled")
    if reserved[0] or reserved[1]:
        raise KernelError("EINVAL", "KVM_ARM_MTE_COPY_TAGS: reserved fields must be 0")
    if flags & ~KVM_ARM_TAGS_FROM_GUEST:
        raise KernelError("EINVAL", f"KVM_ARM_MTE_COPY_TAGS: unknown flags {flags:#x}")
    if length & (PAGE_SIZE - 1) or guest_ipa & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"KVM_ARM_MTE_COPY_TAGS: guest_ipa {guest_ipa:#x} and length {length:#x} "
                                    "must be page aligned")
    if length > INT_MAX:
        raise KernelError("EINVAL", f"KVM_ARM_MTE_COPY_TAGS: length {length:#x} exceeds INT_MAX")
    if not write and length // 16 > MAX_IO:
        raise KernelError("E2BIG", f"KVM_ARM_MTE_COPY_TAGS: {length // 16} tags exceed the {MAX_IO} one reply "
                                   "may carry; split the dump")
    # FROM_GUEST's user buffer, zero-filled (calloc): a page whose tags are all zero needs no copy
    out = bytearray(0 if write else length // 16)
    gfn = guest_ipa >> PAGE_SHIFT
    remaining = length
    pos = 0
    err: KernelError | None = None
    async with kvm.slots_lock.held():
        if write and kvm.nr_memslots_dirty_logging and "copy-tags-during-dirty-log" not in k.bugs:
            err = KernelError("EBUSY", f"KVM_ARM_MTE_COPY_TAGS TO_GUEST while {kvm.nr_memslots_dirty_logging} "
                                       "memslot(s) log dirty pages")
        free = k.sched.kind == "free" and not (k.bugs & _SLOW_PATH_BUGS)
        while err is None and remaining > 0:
            if free:  # a run of present pages at once (see _copy_tags_run); the first other page takes the path below
                done = await _copy_tags_run(k, kvm, gfn, remaining >> PAGE_SHIFT, write, tags, pos, out)
                if done:
                    gfn += done
                    pos += done * MTE_GRANULES_PER_PAGE
                    remaining -= done << PAGE_SHIFT
                    continue
            await k.sched.point("kvm_vm_ioctl_mte_copy_tags:page")
            page = await __gfn_to_page(k, kvm, gfn, write)
            if page is None:
                err = KernelError("EFAULT", f"KVM_ARM_MTE_COPY_TAGS: no page at IPA {gfn << PAGE_SHIFT:#x}")
                break
            loc = loc_of_ipa(kvm, gfn)  # the ghost location GUP found the page at (it may be unmapped by the copy)
            if pfn_to_online_page(page) is None:  # ZONE_DEVICE, or no struct page
                err = KernelError("EFAULT", f"KVM_ARM_MTE_COPY_TAGS: IPA {gfn << PAGE_SHIFT:#x} is device memory")
                break
            try:
                if not write:
                    before = page.folio.flags
                    if _is_tagged(k, page):
                        got = read_tags(k, page, 0, MTE_GRANULES_PER_PAGE, "KVM_ARM_MTE_COPY_TAGS FROM_GUEST")
                    else:
                        got = ZERO_TAGS  # clear_user(): untagged pages read as zeros
                    k.oracle.ghost.check_read_tags(loc_of_ipa(kvm, gfn), page, 0, got,
                                                   "KVM_ARM_MTE_COPY_TAGS FROM_GUEST")
                    if got is not ZERO_TAGS:
                        out[pos:pos + MTE_GRANULES_PER_PAGE] = got
                    num = MTE_GRANULES_PER_PAGE
                    k.oracle.check_copy_tags_read(page, before)
                else:
                    hugetlb = page.is_hugetlb
                    if hugetlb:
                        won = await folio_try_hugetlb_mte_tagging(k, page.folio)
                        if won and "sanitise-whole-hugetlb-folio" in k.fixes:
                            # the proposed fix: the folio is about to be flagged whole, so no page of it
                            # may keep stale tags (docs/findings.md, finding 3)
                            for sub in page.folio.subpages:
                                if sub is not page:
                                    mte_clear_page_tags(k, sub)
                    else:
                        await try_page_mte_tagging(k, page)  # the result is ignored, as in the kernel
                    chunk = tags[pos:pos + MTE_GRANULES_PER_PAGE]
                    num = len(chunk)
                    await k.sched.point("kvm_vm_ioctl_mte_copy_tags:copy")
                    if num == MTE_GRANULES_PER_PAGE:
                        written = bytes(chunk).translate(_LOW_NIBBLE)  # mte_copy_tags_from_user()
                    else:
                        written = ZERO_TAGS  # mte_clear_page_tags(): no stale or partial tags
                    write_tags(k, page, 0, written)
                    k.oracle.ghost.tags_written(loc, page, 0, written)
                    if hugetlb:
                        folio_set_hugetlb_mte_tagged(k, page.folio)
                    else:
                        set_page_mte_tagged(k, page)
                    ghost_kvm_write(kvm, gfn)  # no mark_page_dirty(): why TO_GUEST is EBUSY while logging
                    k.oracle.check_copy_tags_write(page)
            finally:
                _release(k, page)
            if num != MTE_GRANULES_PER_PAGE:
                err = KernelError("EFAULT", f"KVM_ARM_MTE_COPY_TAGS: the tag buffer ends at page "
                                            f"{(length - remaining) >> PAGE_SHIFT}")
                break
            gfn += 1
            pos += num
            remaining -= PAGE_SIZE
    if remaining != length:
        del out[pos:]  # the pages done (in place: no copy)
        return {"length": length - remaining, "tags": out}
    if err is not None:
        raise err
    return {"length": length, "tags": out}
