"""TAGS-AS-WRITTEN: the end-to-end ghost of what every user location last had written.

LAST-TAG-WRITTEN keeps its shadow on the frame (``page.shadow``), so a tag lost
while content moves between frames (swap, migration, CoW, KSM) moves with the
frame and is never seen. This ghost is keyed by what the *user* sees instead,
so every view of one piece of memory meets in one entry:

* a MAP_SHARED mapping of an object (memfd, shmem, anon-shared, hugetlbfs,
  file) -> ``(object, 4 KiB page offset in the object)``;
* a private mapping -> ``(mm, virtual page number)``; a private mapping of an
  object that was never written privately reads the object's entry;
* a VM's IPA -> its memslot -> the VMM's hva -> one of the above, so a guest
  write, a VMM write, a DMA write and a COPY_TAGS write to the same memory
  meet in one entry (a VM's destruction changes nothing: the VMM's memory
  still holds what was written).

Each entry holds the granule tags last written (``None``: never written, reads
zero) and a hash of the page's data after its last write (``None``: zeros).
Tags cost 256 bytes per written page; data costs one 64-bit digest, so the
ghost does not double the memory of a run.

What is recorded: a tag store the hardware performs (host STG through a
Normal-Tagged PTE, guest STG with SCTLR_EL1.ATA through stage-1 Tagged and
cacheable stage 2 in an MTE VM, PTRACE_POKEMTETAGS, COPY_TAGS TO_GUEST,
including its zero fill); a data store (host or guest store). A tag store to
untagged memory writes no tag (RAZ/WI) and is not recorded.

What may change an entry besides a write (the documented rules):

* a fresh page reads zero data and zero tags (no entry);
* MADV_DONTNEED / MADV_FREE, munmap, MAP_FIXED over a range and exit drop the
  private entries of the range (``zap_pte_range``); entries of an object stay
  while the object exists, and go when its last mapping of an unnamed object
  truncates it;
* fork copies the parent's private entries to the child;
* CoW break, KSM merge, swap and migration keep content (no change);
* mprotect(PROT_MTE) on a page whose tags were never written: tags read zero;
* a page read through an untagged mapping reads tags as 0 (nothing checked).

Checks: every user-visible read (host load and LDG, guest load and LDG,
PTRACE_PEEKMTETAGS, COPY_TAGS FROM_GUEST) compares what it returns, and
:meth:`Ghost.check` (from ``Oracle.check_state``) looks every entry up through
the current page tables, page cache and swap entries and compares the frame
(or the saved tags and data of a swap slot). A mismatch is handed to the
oracle, which reports ``TAGS-AS-WRITTEN`` only if no more specific invariant
named the same frame (see ``Oracle._flush_ghost``).

A tag write that lands in a frame the location no longer maps (a GUP holder
writing after reclaim or migration moved the content on) is still recorded
when the location still holds content (a swap or migration entry, another
frame): that write is lost, which is the point. A write through a GUP
reference taken before a fork, into a page the fork left shared
copy-on-write, may or may not be seen by the other sharers (Linux copies at
fork only for FOLL_PIN): those granules of their entries become unknown (not
checked) until written again. When the location was
dropped by a documented rule (MADV_DONTNEED, munmap), the write went to an
orphaned frame and is not recorded.
"""

from __future__ import annotations

import array
import operator
import sys
from typing import TYPE_CHECKING

from hypervisor.arm64.mte_lock import PG_mte_tagged
from hypervisor.arm64.tags import shared_tags
from hypervisor.mm_types import VM_SHARED, MemObject
from hypervisor.page import Page, data_hash
from shared.errno import KernelError
from shared.mte import MTE_GRANULES_PER_PAGE, PAGE_SHIFT, PAGE_SIZE, PAGES_PER_HPAGE, unpack_tags

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM

ZERO_TAGS = bytes(MTE_GRANULES_PER_PAGE)
#: An entry's granule whose tag may be either of two values (see ``tags_written``): not checked.
UNKNOWN = b"\xff"


_ZERO_PAGE = bytes(PAGE_SIZE)
_NO_ENTRIES: dict = {}


class Entry:
    """What was last written at one user location.

    The data digest is taken lazily: after a store, the entry points at the
    page written (``_src``) and means "what that page holds now"; the digest
    is computed when someone asks for ``data``, or by the page itself just
    before its content changes (``Page._settle``), whichever comes first. So a
    page stored and never checked costs no CRC, and a load of a page whose
    entry still points at it needs none to know it reads what was written.
    """

    __slots__ = ("tags", "_data", "_src")

    def __init__(self, tags: bytes | None = None, data: int | None = None):
        self.tags = tags  # immutable: shared between copies (and one object per uniform page, shared_tags)
        self._data = data
        self._src: Page | None = None

    @property
    def data(self) -> int | None:
        """The digest of the data last written (None: zeros)."""
        src = self._src
        if src is not None:
            self._data, self._src = src.data_hash(), None
        return self._data

    @data.setter
    def data(self, value: int | None) -> None:
        self._data, self._src = value, None

    def written_from(self, page: Page) -> None:
        """The data last written here is what ``page`` holds now (digest taken later, see the class)."""
        if self._src is not page:
            self._src = page
            page.lazy_entry(self)

    def holds(self, page: Page) -> bool:
        """The data last written here is what ``page`` holds (no digest needed when the entry points at it)."""
        return self._src is page or self.data == page.data_hash()

    def copy(self) -> Entry:
        """A private copy (fork, first private write over an object); the immutable tags are shared."""
        return Entry(self.tags, self.data)

    def expected_tags(self) -> bytes:
        """The 256 tags a read must see."""
        return ZERO_TAGS if self.tags is None else self.tags


class Ghost:
    """The TAGS-AS-WRITTEN record of one kernel (owned by its :class:`~hypervisor.oracles.Oracle`)."""

    def __init__(self, k: Kernel):
        self.k = k
        self.spaces: dict[object, dict[int, Entry]] = {}  # MM or MemObject -> page index -> entry

    # ---- locations ---------------------------------------------------------------

    @staticmethod
    def locate(mm: MM, vpn: int):
        """``(space, index, fallback)`` for the user page ``vpn`` of ``mm``, or None (no VMA, device)."""
        vma = mm.find_vma(vpn << PAGE_SHIFT)
        return None if vma is None else Ghost.run_loc(mm, vma, vpn)

    @staticmethod
    def locate_ipa(kvm, gfn: int, slot=None):
        """The location behind a guest frame: its memslot's hva in the VMM's mm."""
        slot = slot if slot is not None else kvm.slot_of(gfn)
        if slot is None:
            return None
        return kvm.mm, slot.hva(gfn) >> PAGE_SHIFT

    def lookup(self, loc) -> Entry | None:
        """The entry a read at ``loc`` must match (None: a fresh page)."""
        space, index, fallback = loc
        e = self.spaces.get(space, {}).get(index)
        if e is None and fallback is not None:
            e = self.spaces.get(fallback[0], {}).get(fallback[1])
        return e

    def _entry(self, loc) -> Entry:
        space, index, fallback = loc
        pages = self.spaces.setdefault(space, {})
        e = pages.get(index)
        if e is None:
            base = self.lookup(loc) if fallback is not None else None
            e = base.copy() if base is not None else Entry()
            pages[index] = e
        return e

    @staticmethod
    def _backing(loc) -> tuple[str, Page | int | None]:
        """What holds the location's content now: ("page", Page), ("swap", entry) or ("none", None)."""
        space, index, fallback = loc
        if isinstance(space, MemObject):
            return Ghost._object_backing(space, index)
        pte = space.pt.get(index)
        if pte is None:
            if fallback is not None:
                return Ghost._object_backing(*fallback)
            return "none", None
        if pte.swap is not None:
            return "swap", pte.swap
        return "page", pte.page

    @staticmethod
    def _object_backing(obj: MemObject, index: int) -> tuple[str, Page | int | None]:
        nr = getattr(obj, "hpage_pages", PAGES_PER_HPAGE) if obj.kind == "hugetlbfs" else 1
        cur = obj.pages.get(index // nr)
        if cur is None:
            return "none", None
        if isinstance(cur, int):
            return "swap", cur
        if cur.subpages:
            return "page", cur.subpages[index % len(cur.subpages)]
        return "page", cur

    # ---- writes ------------------------------------------------------------------

    def tags_written(self, loc, page: Page, first: int, tags: bytes) -> None:
        """A tag store the hardware (or the kernel for the user) performed into ``page`` for ``loc``."""
        if loc is None:
            return
        kind, cur = self._backing(loc)
        if kind == "none" or (isinstance(cur, Page) and cur is not page and not cur.is_ram):
            return  # the location was dropped (MADV_DONTNEED, munmap): the write went to an orphan
        self._record_tags(loc, first, tags)
        if len(page.rmap) > 1:
            # a write through a GUP reference (taken before a fork) into a page the fork left
            # shared copy-on-write: Linux promises the other sharers nothing (only FOLL_PIN makes
            # fork copy at once), they may see it or not, so those granules become unknown there
            key = (loc[0], loc[1])
            for mm, vpn in list(page.rmap):
                other = self.locate(mm, vpn)
                if other is not None and (other[0], other[1]) != key and self._backing(other) == ("page", page):
                    self._record_tags(other, first, UNKNOWN * len(tags))

    def _record_tags(self, loc, first: int, tags: bytes) -> None:
        e = self._entry(loc)
        old = ZERO_TAGS if e.tags is None else e.tags
        n = len(tags)
        e.tags = shared_tags(tags if first == 0 and n == len(old) else old[:first] + bytes(tags) + old[first + n:])

    def data_written(self, loc, page: Page) -> None:
        """A data store into ``page`` (which ``loc`` maps at this instant) retired."""
        if loc is None:
            return
        self._entry(loc).written_from(page)

    def anon_data_written(self, mm: MM, vpn: int, page: Page) -> None:
        """``data_written`` for a page of a private anonymous VMA (the mm's entry by vpn), without a location."""
        pages = self.spaces.get(mm)
        if pages is None:
            pages = self.spaces[mm] = {}
        e = pages.get(vpn)
        if e is None:
            e = pages[vpn] = Entry()
        e.written_from(page)

    # ---- documented changes ----------------------------------------------------------

    def drop_range(self, mm: MM, start_vpn: int, end_vpn: int) -> None:
        """MADV_DONTNEED, MADV_FREE, munmap, MAP_FIXED, exit: the private pages of the range read fresh."""
        pages = self.spaces.get(mm)
        if not pages:
            return
        for vpn in [v for v in pages if start_vpn <= v < end_vpn]:
            pages.pop(vpn)._src = None  # dropped: its page need not digest its data for it
        if not pages:
            del self.spaces[mm]

    def drop_object(self, obj: MemObject) -> None:
        """An unnamed object's last mapping went: its page cache was truncated."""
        self.spaces.pop(obj, None)

    def fork(self, parent: MM, child: MM) -> None:
        """fork: the child's private pages hold what the parent's did."""
        pages = self.spaces.get(parent)
        if pages:
            self.spaces[child] = {vpn: e.copy() for vpn, e in pages.items()}

    # ---- a VM's record, for a migration (ghost-export / ghost-import) ----------------

    def _slot_spans(self, kvm, slot):
        """``(vma, gfn0, vpn0, vpn1)`` for each VMA part of the VMM's mm behind a memslot (device VMAs aside)."""
        mm = kvm.mm
        start = slot.userspace_addr
        end = start + (slot.npages << PAGE_SHIFT)
        for vma in mm.vmas_in(start, end):
            if vma.obj is not None and vma.obj.is_device_memory:
                continue
            v0, v1 = max(vma.start, start) >> PAGE_SHIFT, min(vma.end, end) >> PAGE_SHIFT
            yield vma, slot.base_gfn + v0 - (start >> PAGE_SHIFT), v0, v1

    def vm_entries(self, kvm) -> dict[int, Entry]:
        """Every entry behind the VM's memslots, by guest frame number (what a read there must match)."""
        out: dict[int, Entry] = {}
        mm = kvm.mm
        for slot in kvm.memslots.values():
            for vma, gfn0, v0, v1 in self._slot_spans(kvm, slot):
                obj = vma.obj
                if obj is not None:  # the object's entries (read through a private mapping until written)
                    i0 = vma.index_of(v0 << PAGE_SHIFT)
                    for index, e in _in_range(self.spaces.get(obj), i0, i0 + v1 - v0):
                        out[gfn0 + index - i0] = e
                    if vma.flags & VM_SHARED:
                        continue
                for vpn, e in _in_range(self.spaces.get(mm), v0, v1):
                    out[gfn0 + vpn - v0] = e
        return out

    def export_vm(self, kvm) -> dict:
        """``ghost-export``: the entries of every page with one, by guest frame number.

        Up to :data:`KEYED_MAX` entries the keyed form ``{str(gfn): [tags or None,
        data hash or None]}``, where ``tags`` is the 256 granule tags, or one byte
        when all 256 are that value. A larger record is the compact form
        ``{"runs": [[first_gfn, count, tags, hashes], ...]}`` (see
        :func:`_pack_runs`): a 1 GiB guest's 65536 entries are then a few
        items, not 200,000 for msgpack to build, frame, guard and parse.
        ``import_vm`` takes either form.
        """
        entries = self.vm_entries(kvm)
        if len(entries) > KEYED_MAX:
            return {"runs": _pack_runs(entries)}
        return {str(gfn): [_short_tags(e.tags), e.data] for gfn, e in sorted(entries.items())}

    def import_vm(self, kvm, entries: dict) -> int:
        """``ghost-import``: the VM's pages hold ``entries`` (``export_vm``'s forms); the others read fresh.

        Returns the number of entries installed. Nothing changes when an entry is refused.

        Raises:
            KernelError: EINVAL for a key that is not a guest frame number inside
                one of the VM's memslots (device memory aside), tags that are not
                256 bytes, or a data hash that is not a 64-bit number; in the
                compact form, a malformed run or one reaching outside the memslots.
        """
        if "runs" in entries:
            if len(entries) != 1:
                raise KernelError("EINVAL", "ghost-import: the compact form is {\"runs\": [...]} alone")
            todo = self._unpack_runs(kvm, entries["runs"])
        else:
            todo = self._keyed_entries(kvm, entries)
        self._drop_vm(kvm)
        installed = 0
        for item in todo:  # ...then holds what the source recorded
            if len(item) == 3:
                loc, tags, data = item
                e = self._entry(loc)
                e.tags, e.data = tags, data
                installed += 1
                continue
            # a run of private anonymous pages (_unpack_runs): their locations are (mm, vpn, None) and
            # _drop_vm left none of them an entry, so each gets a new one, as _entry would make it
            mm, vpn, per, datas = item
            self.spaces.setdefault(mm, {}).update(zip(range(vpn, vpn + len(per)), map(Entry, per, datas), strict=True))
            installed += len(per)
        return installed

    @staticmethod
    def _keyed_entries(kvm, entries: dict) -> list:
        """The keyed form's ``(loc, tags, data)`` (see import_vm)."""
        todo = []
        for key, value in entries.items():
            try:
                gfn = int(key)
            except (TypeError, ValueError):
                raise KernelError("EINVAL", f"ghost-import: key {key!r} is not a guest frame number") from None
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise KernelError("EINVAL", f"ghost-import: gfn {gfn:#x}: want [tags, data hash]")
            tags, data = value
            if isinstance(tags, (bytes, bytearray)) and len(tags) == 1:
                tags = bytes(tags) * MTE_GRANULES_PER_PAGE  # a uniform page, as export_vm writes it
            if tags is not None and (not isinstance(tags, (bytes, bytearray)) or len(tags) != MTE_GRANULES_PER_PAGE):
                raise KernelError("EINVAL", f"ghost-import: gfn {gfn:#x}: tags must be nil, one byte (all granules) "
                                            f"or {MTE_GRANULES_PER_PAGE} bytes")
            if data is not None and (type(data) is not int or not 0 <= data < 1 << 64):
                raise KernelError("EINVAL", f"ghost-import: gfn {gfn:#x}: the data hash must be nil or a u64")
            loc = loc_of_ipa(kvm, gfn) if gfn >= 0 else None
            if loc is None:
                raise KernelError("EINVAL", f"ghost-import: gfn {gfn:#x} is not RAM of the VM's memslots")
            todo.append((loc, None if tags is None else shared_tags(tags), data))
        return todo

    def _unpack_runs(self, kvm, runs) -> list:
        """The compact form's ``(loc, tags, data)`` (see _pack_runs), located a VMA span at a time.

        A span of a private anonymous VMA is one item ``(mm, first vpn, tags, hashes)`` (the lists of
        its pages) rather than a location tuple per page.
        """
        if not isinstance(runs, (list, tuple)):
            raise KernelError("EINVAL", "ghost-import: runs must be a list")
        spans = [(gfn0, gfn0 + v1 - v0, vma, v0) for slot in kvm.memslots.values()
                 for vma, gfn0, v0, v1 in self._slot_spans(kvm, slot)]
        total = sum(g1 - g0 for g0, g1, _vma, _v0 in spans)
        mm = kvm.mm
        step = MTE_GRANULES_PER_PAGE
        todo: list = []
        for run in runs:
            if not (isinstance(run, (list, tuple)) and len(run) == 4):
                raise KernelError("EINVAL", "ghost-import: a run is [first gfn, count, tags, hashes]")
            first, count, tags, hashes = run
            if type(first) is not int or type(count) is not int or first < 0 or count < 1:
                raise KernelError("EINVAL", f"ghost-import: run {first!r}+{count!r}: bad first gfn or count")
            if count > total:  # (checked before anything is built for it)
                raise KernelError("EINVAL", f"ghost-import: run {first:#x}+{count}: more pages than the memslots hold")
            if tags is None:
                per: list = [None] * count
            elif isinstance(tags, (bytes, bytearray)) and len(tags) == count:
                one = {b: _uniform(b) for b in set(tags)}
                per = [one[b] for b in tags]
            elif isinstance(tags, (bytes, bytearray)) and len(tags) == count * step:
                per = [shared_tags(tags[i * step:(i + 1) * step]) for i in range(count)]
            else:
                raise KernelError("EINVAL", f"ghost-import: run {first:#x}+{count}: tags must be nil, one byte a "
                                            f"page or {step} bytes a page")
            if hashes is None:
                datas: list = [None] * count
            elif isinstance(hashes, (bytes, bytearray)) and len(hashes) == 8 * count:
                datas = _u64s_from_bytes(hashes)
            else:
                raise KernelError("EINVAL", f"ghost-import: run {first:#x}+{count}: hashes must be nil or 8 bytes "
                                            "a page")
            gfn, end, i = first, first + count, 0
            while gfn < end:
                span = next((sp for sp in spans if sp[0] <= gfn < sp[1]), None)
                if span is None:
                    raise KernelError("EINVAL", f"ghost-import: gfn {gfn:#x} is not RAM of the VM's memslots")
                g0, g1, vma, v0 = span
                n = min(end, g1) - gfn
                vpn = v0 + gfn - g0
                if vma.obj is None:
                    todo.append((mm, vpn, per[i:i + n], datas[i:i + n]))
                else:
                    todo += [(Ghost.run_loc(mm, vma, vpn + j), per[i + j], datas[i + j]) for j in range(n)]
                gfn, i = gfn + n, i + n
        return todo

    def _drop_vm(self, kvm) -> None:
        """Every page of the VM's memslots loses its entry (import_vm's first half)."""
        mm = kvm.mm
        for slot in kvm.memslots.values():  # every page of the slots loses its entry...
            for vma, _gfn0, v0, v1 in self._slot_spans(kvm, slot):
                obj = vma.obj
                shared = vma.flags & VM_SHARED
                if obj is not None:
                    i0 = vma.index_of(v0 << PAGE_SHIFT)
                    theirs = self.spaces.get(obj, {})
                    if shared:
                        for index, _ in _in_range(theirs, i0, i0 + v1 - v0):
                            del theirs[index]
                        continue
                    # a private mapping reads the object's entry until written: a fresh entry hides it
                    for index, _ in _in_range(theirs, i0, i0 + v1 - v0):
                        self._entry((mm, v0 + index - i0, None))
                mine = self.spaces.get(mm, {})
                for vpn, e in _in_range(mine, v0, v1):
                    e._src = None  # dropped: the page it points at need not digest its data for it
                    if obj is None:
                        del mine[vpn]
                    else:
                        mine[vpn] = Entry()
        for space in [s for s, left in self.spaces.items() if not left]:
            del self.spaces[space]

    # ---- runs of pages (the free scheduler's bulk paths) -------------------------------

    @staticmethod
    def run_loc(mm: MM, vma, vpn: int):
        """``locate`` for a page already known to be inside ``vma`` (no VMA lookup)."""
        obj = vma.obj
        if obj is None:
            return mm, vpn, None
        if obj.is_device_memory:
            return None
        index = vma.index_of(vpn << PAGE_SHIFT)
        if vma.flags & VM_SHARED:
            return obj, index, None
        return mm, vpn, (obj, index)

    def run_view(self, mm: MM, vma, vpn0: int) -> tuple[dict, int, dict | None, int]:
        """The entries behind pages ``vpn0 + i`` of ``vma``: ``(pages, off, fallback, fb_off)``.

        The entry of page ``vpn0 + i`` is ``pages.get(off + i)``, else (a private
        mapping of an object never written privately) ``fallback.get(fb_off + i)``:
        ``lookup`` for a run, without a location tuple per page. Valid until the
        next scheduling point (an entry added to an empty space is not seen).
        """
        obj = vma.obj
        empty: dict = {}
        if obj is None:
            return self.spaces.get(mm, empty), vpn0, None, 0
        i0 = vma.index_of(vpn0 << PAGE_SHIFT)
        if vma.flags & VM_SHARED:
            return self.spaces.get(obj, empty), i0, None, 0
        return self.spaces.get(mm, empty), vpn0, self.spaces.get(obj), i0

    def expected_data(self, mm: MM, vma, vpn: int) -> int | None:
        """The data hash a load of page ``vpn`` (inside ``vma``) must find: ``lookup`` without a location tuple."""
        e = self._run_entry(mm, vma, vpn)
        return None if e is None else e.data

    def reads_as_written(self, mm: MM, vma, vpn: int, page: Page) -> bool:
        """A load of page ``vpn`` (inside ``vma``) from ``page`` finds the data last written there.

        The page's digest is taken here (kept until its data changes) even when the entry points at the page
        and needs none: the load just read the bytes, so the CRC runs from the cache, where ``ghost-export``
        after a migration's passes would read them from memory again.
        """
        h = page.data_hash()
        e = self._run_entry(mm, vma, vpn)
        if e is None:
            return h is None
        return e._src is page or e.data == h

    def _run_entry(self, mm: MM, vma, vpn: int) -> Entry | None:
        obj = vma.obj
        if obj is None:
            e = self.spaces.get(mm, _NO_ENTRIES).get(vpn)
        elif vma.flags & VM_SHARED:
            e = self.spaces.get(obj, _NO_ENTRIES).get(vma.index_of(vpn << PAGE_SHIFT))
        else:
            e = self.spaces.get(mm, _NO_ENTRIES).get(vpn)
            if e is None:
                e = self.spaces.get(obj, _NO_ENTRIES).get(vma.index_of(vpn << PAGE_SHIFT))
        return e

    # ---- checks ------------------------------------------------------------------

    def check_read_tags(self, loc, page: Page, first: int, got: bytes, who: str) -> None:
        """A user-visible tag read at ``loc`` returned ``got`` (granules ``first``...)."""
        if loc is None:
            return
        e = self.lookup(loc)
        want = ZERO_TAGS[first:first + len(got)] if e is None or e.tags is None else e.tags[first:first + len(got)]
        if not _same(bytes(got), want):
            self._mismatch(loc, page, f"{who} read tags {_diff(got, want, first)}")

    def check_read_data(self, loc, page: Page, who: str) -> None:
        """A user-visible load at ``loc`` read from ``page``."""
        if loc is None:
            return
        e = self.lookup(loc)
        if not (page.data_hash() is None if e is None else e.holds(page)):
            self._mismatch(loc, page, f"{who} read data that differs from what was last written there")

    def check(self) -> None:
        """Walk every entry, look it up through what maps it now, and compare."""
        zero_page = self.k.alloc.zero_page
        for space, pages in list(self.spaces.items()):
            obj = space if isinstance(space, MemObject) else None
            pt: dict = {} if obj is not None else space.pt  # type: ignore[attr-defined]  # (else an MM)
            for index, e in list(pages.items()):
                loc = (space, index, None)
                if obj is not None:
                    kind, cur = self._object_backing(obj, index)
                else:  # _backing(loc) of a user page, written out (the common case: one call less an entry)
                    pte = pt.get(index)
                    if pte is None:
                        kind, cur = "none", None
                    elif pte.swap is not None:
                        kind, cur = "swap", pte.swap
                    else:
                        kind, cur = "page", pte.page
                want = ZERO_TAGS if e.tags is None else e.tags  # (e.expected_tags())
                if isinstance(cur, Page):  # kind == "page"
                    if cur.zone in ("device", "pfnmap"):
                        continue
                    if cur is zero_page:
                        tags = ZERO_TAGS
                    elif cur.folio.flags & PG_mte_tagged:
                        tags = bytes(cur.tags)
                    else:  # untagged: zeroed when first mapped tagged, or given the tags parked for it
                        parked = self.k.tag_storage.tags_by_pfn.get(cur.pfn)  # (dynamic tag storage)
                        tags = ZERO_TAGS if parked is None else unpack_tags(parked[0])
                    data = cur.data_hash()
                    page = cur
                elif isinstance(cur, int):  # kind == "swap"
                    saved = self.k.swap.tags.store.get(cur)
                    tags = ZERO_TAGS if saved is None else unpack_tags(saved[0])
                    slot = self.k.swap.slots.get(cur)
                    data = data_hash(None if slot is None else slot.data)
                    page = None
                else:
                    tags, data, page = ZERO_TAGS, None, None
                if tags != want and not _same(tags, want):
                    self._mismatch(loc, page, f"now holds tags {_diff(tags, want, 0)}"
                                   + (f" (swap entry {cur})" if kind == "swap" else "")
                                   + (" (nothing maps it any more)" if kind == "none" else ""))
                elif data != e.data:
                    self._mismatch(loc, page, "now holds data that differs from what was last written there"
                                   + (" (nothing maps it any more)" if kind == "none" else ""))

    def _mismatch(self, loc, page: Page | None, what: str) -> None:
        space, index, _ = loc
        where = (f"{space!r} page {index:#x} (vaddr {index << PAGE_SHIFT:#x})" if not isinstance(space, MemObject)
                 else f"object {space.name!r} page offset {index:#x}")
        pfn = "" if page is None else f" (pfn {page.pfn:#x})"
        self.k.oracle.report_ghost(f"{where}{pfn}: {what}", page, (id(space), index))


#: The largest record ``export_vm`` gives in the keyed form; a larger one is given as runs.
KEYED_MAX = 1024

def _uniform(b: int) -> bytes:
    return shared_tags(bytes([b]) * MTE_GRANULES_PER_PAGE)


def _pack_runs(entries: dict[int, Entry]) -> list:
    """The compact form of a VM's record: ``[first_gfn, count, tags, hashes]`` per run of pages.

    A run is consecutive guest frames whose entries are alike in kind: tags all
    None (``tags`` nil), all uniform (``tags`` one byte a page) or not
    (``tags`` 256 bytes a page); data hashes all None (``hashes`` nil) or all
    set (``hashes`` 8 bytes a page, little-endian u64). Each entry's kind is
    worked out by C-level list operations (a 1 GiB guest has 65536 entries);
    the runs are then cut where the kind or the gfn's continuity changes.
    """
    gfns = sorted(entries)
    es = list(map(entries.__getitem__, gfns))
    tags = list(map(_TAGS, es))
    datas = list(map(_DATA, es))  # (the digest of an entry still pointing at its page is taken here)
    uniform = {}
    kinds = []
    for t in tags:
        if t is None:
            kinds.append(0)
        elif t in uniform or t.count(t[:1]) == len(t):
            uniform[t] = t[0]
            kinds.append(1)
        else:
            kinds.append(2)
    runs: list = []
    n = len(gfns)
    i = 0
    while i < n:
        kind, has = kinds[i], datas[i] is not None
        j = i + 1
        while j < n and gfns[j] == gfns[j - 1] + 1 and kinds[j] == kind and (datas[j] is not None) == has:
            j += 1
        if kind == 0:
            t = None
        elif kind == 1:
            t = bytes(map(uniform.__getitem__, tags[i:j]))
        else:
            t = b"".join(tags[i:j])
        runs.append([gfns[i], j - i, t, _u64s_to_bytes(datas[i:j]) if has else None])
        i = j
    return runs


_TAGS = operator.attrgetter("tags")
_DATA = operator.attrgetter("data")


def _u64s_to_bytes(values: list) -> bytes:
    """``values`` as little-endian u64s, 8 bytes each (a run's ``hashes``)."""
    a = array.array("Q", values)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tobytes()


def _u64s_from_bytes(raw) -> list[int]:
    """The inverse of :func:`_u64s_to_bytes`."""
    a = array.array("Q")
    a.frombytes(bytes(raw))
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


def _short_tags(tags: bytes | None) -> bytes | None:
    """A page's tags for export: one byte when every granule has that tag."""
    if tags is not None and tags.count(tags[:1]) == len(tags):
        return tags[:1]
    return tags


def _in_range(pages: dict | None, lo: int, hi: int) -> list:
    """``(index, entry)`` of ``pages`` with lo <= index < hi, by index (cheap for a huge, sparse range)."""
    if not pages:
        return []
    if hi - lo <= len(pages):
        return [(i, pages[i]) for i in range(lo, hi) if i in pages]
    return sorted((i, e) for i, e in pages.items() if lo <= i < hi)


def _same(got: bytes, want: bytes) -> bool:
    """Tags equal what was written, granules marked UNKNOWN aside."""
    if got == want:
        return True
    if 0xFF not in want:
        return False
    return all(w == 0xFF or g == w for g, w in zip(got, want, strict=True))


def _diff(got: bytes, want: bytes, first: int) -> str:
    bad = [i for i in range(min(len(got), len(want))) if got[i] != want[i] and want[i] != 0xFF]
    show = ", ".join(f"g{first + i}: {got[i]} (last written {want[i]})" for i in bad[:4])
    return f"{len(bad)} granule(s) differ from what was last written: {show}{', ...' if len(bad) > 4 else ''}"


def loc_of(k: Kernel, mm: MM, vpn: int):
    """The ghost location of ``mm``'s page ``vpn`` (a shorthand for the hooks)."""
    return Ghost.locate(mm, vpn)


def loc_of_ipa(kvm, gfn: int, slot=None):
    """The ghost location behind a guest frame (through its memslot to the VMM's mapping)."""
    at = Ghost.locate_ipa(kvm, gfn, slot)
    return None if at is None else Ghost.locate(*at)
