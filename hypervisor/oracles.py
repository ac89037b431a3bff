"""The invariants of reference section 6, as code.

Two kinds of checks:

* *Event checks*, called by the model at the moment something happens: a tag
  read of a page that claims PG_mte_tagged but holds tags nobody defined
  (NO-PUBLISH-BEFORE-VALID), a second initialiser in one page lifetime
  (EXCLUSIVE-INIT), an initialising clear that wipes tags an actor wrote
  (PRESERVE-ON-MAP), a swap-in that does not restore what was saved (SWAP
  ROUND-TRIP), a KSM merge of a tagged page.
* *State checks* (:meth:`Oracle.check_state`), run after every step of a
  controlled run and at the end of every scenario: LAST-TAG-WRITTEN (every
  tagged page holds exactly the tags its actors last wrote, or zeros from its
  one initialisation), USER-VISIBLE-IMPLIES-TAGGED, VM_MTE-IMPLIES-VM_MTE_ALLOWED,
  ZERO PAGE NEVER FLAGGED, LOCK-LIVENESS (at rest, no page is locked but
  untagged), PTE-ATTRS-MATCH-VMA (at rest, a present PTE is Normal-Tagged exactly where
  its VMA has VM_MTE), and for every VM: GUEST-VISIBLE-IMPLIES-TAGGED, MTE-VM MEMORY IS
  TAG-CAPABLE (checked on what stage 2 maps), STAGE-2 COHERENT (stage 2 maps
  the frame the VMM's PTE maps: the MMU notifier did its job) and CAP BEFORE
  VCPUS (no AArch32 vCPU runs in an MTE VM).
* The end-to-end ghost, TAGS-AS-WRITTEN (hypervisor/ghost.py): what every
  user location last had written, keyed by what the user sees, checked on
  every user-visible read and in every state check; reported only when no
  more specific invariant named the same frame.

KVM event checks: COPY_TAGS WRITE => TAGGED and COPY_TAGS READ OF UNTAGGED =
ZEROS (a read changes no page state), DIRTY-LOG-COMPLETE (when the VMM reads or
clears a dirty log, every page a KVM path changed since the last clear is in
it) and VMA-USE-AFTER-FREE (a kernel path read a VMA that munmap had freed, as
KASAN would report).

A broken invariant becomes a :class:`Violation` with the actor that broke it;
nothing is raised, so a run goes on and reports every violation with its
schedule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.ghost import Ghost
from hypervisor.kvm.kvm_host import kvm_has_mte, kvm_tag_storage_reserve
from hypervisor.mm.memremap import is_device_page, pfn_is_map_memory
from hypervisor.mm_types import (
    VM_ALLOW_ANY_UNCACHED,
    VM_MIXEDMAP,
    VM_MTE,
    VM_MTE_ALLOWED,
    VM_MTE_KVM,
    VM_PFNMAP,
    VM_READ,
    arch_validate_flags,
    flag_names,
    kvm_vma_is_cacheable,
)
from hypervisor.page import Page
from hypervisor.sched import current_actor

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel


@attrs.frozen
class Violation:
    """One broken invariant."""

    invariant: str
    message: str
    actor: str
    pfn: int | None = None

    def to_wire(self) -> dict:
        """The msgpack/JSON form."""
        return {"invariant": self.invariant, "message": self.message, "actor": self.actor, "pfn": self.pfn}


def _granules(a: bytes | bytearray, b: bytes | bytearray) -> str:
    diff = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    show = ", ".join(f"g{i}: {a[i]}" + (f" (expected {b[i]})" if b[i] != 0xFF else " (never written)")
                     for i in diff[:4])
    return f"{len(diff)} granule(s) differ: {show}{', ...' if len(diff) > 4 else ''}"


class Oracle:
    """Collects violations for one kernel."""

    def __init__(self, k: Kernel):
        self.k = k
        self.violations: list[Violation] = []
        self._seen: set[tuple[str, int | None]] = set()
        self.ghost = Ghost(k)
        self._ghost_pending: list[tuple[str, Page | None, tuple, str]] = []
        self._ghost_seen: set[tuple] = set()

    def report(self, invariant: str, message: str, page: Page | None = None) -> None:
        """Record a violation once per (invariant, page)."""
        key = (invariant, None if page is None else page.pfn)
        if key in self._seen:
            return
        self._seen.add(key)
        self.violations.append(Violation(invariant, message, current_actor.get(), None if page is None else page.pfn))

    def report_ghost(self, message: str, page: Page | None, key: tuple) -> None:
        """The ghost saw a location differ from what was last written there (TAGS-AS-WRITTEN, deferred).

        Reported at the next state check, and only if no more specific invariant
        named the same frame (folio) by then: TAGS-AS-WRITTEN is the end-to-end
        record, reported when nothing else explains the loss.
        """
        if key in self._ghost_seen:
            return
        self._ghost_seen.add(key)
        self._ghost_pending.append((message, page, key, current_actor.get()))

    def _flush_ghost(self) -> None:
        pending, self._ghost_pending = self._ghost_pending, []
        if not pending:
            return
        named = set()
        for v in self.violations:
            if v.pfn is not None and v.invariant != "TAGS-AS-WRITTEN":
                named.add(v.pfn)
                frame = self.k.alloc.frames.get(v.pfn)
                if frame is not None:
                    named.add(frame.folio.pfn)
        for message, page, _key, actor in pending:
            if page is not None and (page.pfn in named or page.folio.pfn in named):
                continue  # a specific invariant already names this loss
            self.violations.append(Violation("TAGS-AS-WRITTEN", message, actor,
                                             None if page is None else page.pfn))

    # ---- event checks ----------------------------------------------------------

    def on_init_start(self, page: Page, actor: str) -> None:
        """A try_* caller won initialisation of ``page``."""
        page.inits += 1
        if page.inits > 1:
            self.report("EXCLUSIVE-INIT", f"pfn {page.pfn:#x} has a second tag initialiser in one lifetime: {actor}",
                        page)

    def on_tags_read(self, page: Page, who: str) -> None:
        """A reader that trusts PG_mte_tagged is looking at ``page``'s tags."""
        head = page.folio
        if not head.flags & PG_mte_tagged:
            return
        if page.shadow is None or bytes(page.tags) != bytes(page.shadow):
            what = "never initialised (stale)" if page.shadow is None else _granules(page.tags, page.shadow)
            self.report("NO-PUBLISH-BEFORE-VALID",
                        f"{who} read tags of pfn {page.pfn:#x}, which is PG_mte_tagged, but its tags are {what}",
                        page)

    def on_tags_overwritten(self, page: Page, who: str) -> None:
        """An initialising clear hit a page whose tags an actor had already written."""
        self.report("PRESERVE-ON-MAP", f"{who} by {current_actor.get()} zeroed tags already written to pfn "
                                       f"{page.pfn:#x} (a second initialiser)", page)

    def on_vma_read(self, vma, who: str) -> None:
        """A path reads ``vma`` outside mmap_lock: report it if munmap/MAP_FIXED already freed it."""
        if vma.freed:
            self.report("VMA-USE-AFTER-FREE", f"{who}: {vma!r} was freed by munmap/MAP_FIXED while the path held "
                                              "no mmap_lock (KASAN: slab-use-after-free in vm_area_struct)")

    def check_copy_tags_write(self, page: Page) -> None:
        """COPY_TAGS WRITE => TAGGED: a page TO_GUEST touched is PG_mte_tagged."""
        if not page.folio.flags & PG_mte_tagged:
            self.report("COPY_TAGS-WRITE-IMPLIES-TAGGED", f"KVM_ARM_MTE_COPY_TAGS TO_GUEST left pfn {page.pfn:#x} "
                                                   "without PG_mte_tagged", page)

    def check_copy_tags_read(self, page: Page, flags_before: int) -> None:
        """COPY_TAGS READ changes no page state."""
        if page.folio.flags != flags_before:
            self.report("COPY_TAGS-READ-OF-UNTAGGED-=-ZEROS",
                        f"KVM_ARM_MTE_COPY_TAGS FROM_GUEST changed the flags of pfn {page.pfn:#x}", page)

    def check_dirty_log(self, kvm, slot) -> None:
        """DIRTY-LOG-COMPLETE: every page a KVM path changed since the last clear is marked dirty."""
        missed = sorted(kvm.ghost_written.get(slot.id, set()) - slot.dirty)
        if missed:
            show = ", ".join(str(i) for i in missed[:8])
            self.report("DIRTY-LOG-COMPLETE", f"VM {kvm.handle} memslot {slot.id}: page(s) {show} changed through "
                                              "KVM (guest access or COPY_TAGS) but are not in the dirty log; "
                                              "a migration would not resend them")

    def check_swap_restore(self, page: Page, saved: bytes) -> None:
        """SWAP ROUND-TRIP: what swap-in restored is what swap-out saved."""
        if bytes(page.tags) != saved:
            self.report("SWAP-ROUND-TRIP", f"pfn {page.pfn:#x} restored tags differ from the saved ones", page)

    def check_ksm_merge(self, stable: Page) -> None:
        """NO KSM MERGE OF TAGGED PAGES."""
        if stable.flags & PG_mte_tagged:
            self.report("NO-KSM-MERGE-OF-TAGGED-PAGES", f"KSM merged into tagged pfn {stable.pfn:#x}", stable)

    # ---- state checks ------------------------------------------------------------

    def check_state(self, *, at_rest: bool = True) -> list[Violation]:
        """Run every state invariant now; returns all violations so far."""
        k = self.k
        if k.alloc.zero_page.flags & PG_mte_tagged:
            self.report("ZERO-PAGE-NEVER-FLAGGED", "ZERO_PAGE has PG_mte_tagged", k.alloc.zero_page)
        page: Page | None
        for page in k.alloc.frames.values():  # live_pages() and page.folio, written out (after every step)
            if page.free:
                continue
            head = page if page.head is None else page.head
            tagged = bool(head.flags & PG_mte_tagged)
            if tagged and (page.shadow is None or page.tags != page.shadow):  # bytes/bytearray: by content
                what = ("tags nobody wrote: stale from a previous owner" if page.shadow is None
                        else "a tag changed that nobody wrote: " + _granules(page.tags, page.shadow))
                self.report("LAST-TAG-WRITTEN", f"pfn {page.pfn:#x} is PG_mte_tagged with {what}", page)
            if at_rest and head is page and page.flags & PG_mte_lock and not tagged:
                self.report("LOCK-LIVENESS", f"pfn {page.pfn:#x} is PG_mte_lock without PG_mte_tagged at rest "
                                             "(an initialiser never called set_page_mte_tagged)", page)
        for task in k.tasks.values():
            mm = task.mm
            for v in mm.vmas:
                if not arch_validate_flags(v.flags):
                    self.report("VM_MTE-IMPLIES-VM_MTE_ALLOWED",
                                f"pid {task.pid} {v!r} has VM_MTE without VM_MTE_ALLOWED")
            for vpn, pte in mm.pt.items():
                page = pte.page
                if not pte.present or page is None or pte.special or not page.is_ram:
                    continue
                vma = mm.find_vma(vpn << 12)
                if vma is None:
                    continue
                if at_rest and pte.tagged != bool(vma.flags & VM_MTE):
                    # PTE-ATTRS-MATCH-VMA: mprotect rewrites present PTEs; swap-in and migration build theirs
                    # from vm_page_prot at the restore; one that lags silently drops STG (RAZ/WI)
                    self.report("PTE-ATTRS-MATCH-VMA",
                                f"pid {task.pid} maps pfn {page.pfn:#x} at {vpn << 12:#x} "
                                f"{'tagged' if pte.tagged else 'untagged'} in {vma!r}", page)
                if not pte.tagged or pte.fault_on_access:
                    continue
                if vma.flags & VM_READ and not page.folio.flags & PG_mte_tagged:
                    self.report("USER-VISIBLE-IMPLIES-TAGGED",
                                f"pid {task.pid} maps untagged pfn {page.pfn:#x} at {vpn << 12:#x} "
                                f"through a tagged PTE ({flag_names(vma.flags & VM_MTE)})", page)
        for kvm in list(k.kvm.vms.values()):
            self._check_vm(kvm)
        self.check_physmem_state()
        self.check_memtype_state()
        self.ghost.check()
        self._flush_ghost()
        return list(self.violations)

    # ---- physical memory and tag storage (H1: SCENARIOS-physmem parts A and B) ----------------

    def on_tag_write(self, page: Page, who: str) -> None:
        """TAG-STORAGE-NOT-CLOBBERED: a tag write to a page of a dynamic node reaches its tag block,
        which must be reserved (else the write lands in someone's data)."""
        ts = self.k.tag_storage
        if not ts.enabled or page.is_tag_storage or ts.node_needs_storage(page) is None:
            return
        blocks, _refs = ts.blocks_of(page.folio)
        free = [b for b in blocks if b not in ts.blocks]
        if free:
            self.report("TAG-STORAGE-NOT-CLOBBERED", f"{who} by {current_actor.get()} wrote the tags of pfn "
                                                     f"{page.pfn:#x} into tag block {free[0]:#x}, which is not "
                                                     "reserved (it may hold another page's data)", page)

    def check_physmem_state(self) -> None:
        """The state invariants of the physical-memory part that H1 owns (parts A and B)."""
        k = self.k
        alloc = k.alloc
        for n in alloc.nodes:
            if n.ts_pages and n.ts_mode == "static" and (n.managed != n.nr or alloc.carve_out_used):
                self.report("TAG-CARVE-OUT-HIDDEN", f"node {n.name}'s static tag carve-out "
                                                    f"(pfn {n.ts_start:#x}+{n.ts_pages}) is handed out or counted")
        ts = k.tag_storage
        if not ts.enabled:
            return  # TAGGED-PTE-IS-TAG-CAPABLE is check_memtype_state's
        self._check_tag_storage(ts)
        for task in k.tasks.values():
            for vpn, pte in task.mm.pt.items():
                page = pte.page
                if page is None or not pte.tagged or pte.special or pte.migrating or pte.fault_on_access:
                    continue
                if ts.enabled and page.is_tag_storage:
                    self.report("TAG-STORAGE-NEVER-TAGGED", f"pid {task.pid} maps tag storage pfn {page.pfn:#x} "
                                                            f"at {vpn << 12:#x} through a tagged PTE", page)
                elif ts.enabled and not ts.has_storage(page):
                    self.report("TAGGED-IMPLIES-STORAGE", f"pid {task.pid} maps pfn {page.pfn:#x}, which has no "
                                                          f"tag storage, at {vpn << 12:#x} through a tagged PTE",
                                page)

    def _check_tag_storage(self, ts) -> None:
        k = self.k
        alloc = k.alloc
        from hypervisor.arm64.mte_tag_storage import PG_tag_storage_reserved

        for page in alloc.live_pages():
            head = page.folio
            if not head.flags & PG_mte_tagged or not page.is_ram:
                continue
            if page.is_tag_storage:
                self.report("TAG-STORAGE-NEVER-TAGGED", f"tag storage pfn {page.pfn:#x} is PG_mte_tagged", page)
            elif ts.node_needs_storage(page) is not None and not head.flags & PG_tag_storage_reserved:
                self.report("TAGGED-IMPLIES-STORAGE", f"pfn {page.pfn:#x} is PG_mte_tagged without "
                                                      "PG_tag_storage_reserved", page)
        for b, rc in ts.blocks.items():
            held = ts.holders.get(b, {})
            if rc != 1 + sum(held.values()) or rc <= 1:
                self.report("TAG-BLOCK-REFCOUNT", f"tag block {b:#x} has refcount {rc}, its reservations hold "
                                                  f"{sum(held.values())} references")
            for pfn in held:
                page = alloc.frames.get(pfn)
                if page is not None and page.free:
                    self.report("TAG-BLOCK-REFCOUNT", f"pfn {pfn:#x} was freed without dropping its references "
                                                      f"on tag block {b:#x}", page)
        for pfn in ts.tags_by_pfn:
            page = alloc.frames.get(pfn)
            if page is None or page.free:
                self.report("PARKED-TAGS-CONSUMED-ONCE", f"tags parked for pfn {pfn:#x} outlive its page")
            elif page.folio.flags & PG_tag_storage_reserved:
                if pfn in ts.restoring:
                    self.report("PARKED-RESTORE-BEFORE-PUBLISH", f"pfn {pfn:#x} is PG_tag_storage_reserved while "
                                                                 "its parked tags are not written yet", page)
                else:
                    self.report("PARKED-TAGS-CONSUMED-ONCE", f"tags are parked for pfn {pfn:#x}, which has "
                                                             "tag storage", page)
        for h in k.page_handles.values():  # alloc-pages pages living in tag storage keep their data
            for i, page in enumerate(h):
                if page.is_tag_storage and page.data != h.expected.get(i):
                    self.report("TAG-STORAGE-NOT-CLOBBERED", f"tag storage pfn {page.pfn:#x}, in use as data by "
                                                             f"{h.name!r}, no longer holds what its owner wrote", page)
        zp = alloc.zero_page
        blocks, _refs = ts.blocks_of(zp)
        if not zp.flags & PG_tag_storage_reserved or any(b not in ts.blocks for b in blocks):
            self.report("ZERO-PAGE-HAS-STORAGE", "the zero page's tag block is not reserved", zp)

    def _check_vm(self, kvm) -> None:
        k = self.k
        mte = kvm_has_mte(k, kvm)
        if mte and any(v.aarch32 and v.initialised for v in kvm.vcpus):
            self.report("CAP-BEFORE-VCPUS", f"VM {kvm.handle} has MTE and an initialised AArch32 vCPU")
        mm = kvm.mm
        for gfn, e in kvm.s2.items():
            slot = kvm.slot_of(gfn)
            if slot is None:
                self.report("STAGE-2-COHERENT", f"VM {kvm.handle} maps gfn {gfn:#x}, which no memslot covers")
                continue
            hva = slot.hva(gfn)
            pte = mm.pt.get(hva >> 12)
            if pte is None or not pte.present or pte.page is not e.page:
                self.report("STAGE-2-COHERENT", f"VM {kvm.handle} gfn {gfn:#x} maps pfn {e.page.pfn:#x} but the VMM's "
                                                f"PTE at {hva:#x} no longer does (a missed MMU notifier)", e.page)
                continue
            if not mte or not e.cacheable:
                continue
            # MTE-VM-MEMORY-IS-TAG-CAPABLE: check_memtype_state
            if e.page is not k.alloc.zero_page and not e.page.folio.flags & PG_mte_tagged:
                self.report("GUEST-VISIBLE-IMPLIES-TAGGED", f"VM {kvm.handle} maps untagged pfn {e.page.pfn:#x} at gfn "
                                                     f"{gfn:#x} as Normal cacheable", e.page)

    # ---- memory types and the KVM side of tag storage (H2: SCENARIOS-physmem part C, part B's KVM) ----

    def check_memtype_state(self) -> None:
        """MTE-VM-MEMORY-IS-TAG-CAPABLE, TAGGED-PTE-IS-TAG-CAPABLE, STAGE2-MEMTYPE and VM-MTE-KVM-FLAG."""
        k = self.k
        if not k.physcfg.is_default:  # memory without tags exists only with nodes, regions or dynamic storage
            for task in k.tasks.values():
                for vpn, pte in task.mm.pt.items():
                    page = pte.page
                    if pte.present and pte.tagged and page is not None and not pte.fault_on_access \
                            and not page_tag_capable(page):
                        self.report("TAGGED-PTE-IS-TAG-CAPABLE",
                                    f"pid {task.pid} maps pfn {page.pfn:#x} ({page.zone}, node {_node_of(page)}) "
                                    f"at {vpn << 12:#x} through a tagged PTE, and it keeps no tags", page)
        for kvm in list(k.kvm.vms.values()):
            if not kvm.destroyed:
                self._check_vm_memtypes(kvm)

    def _check_vm_memtypes(self, kvm) -> None:
        k = self.k
        mte = kvm_has_mte(k, kvm)
        mm = kvm.mm
        for gfn, e in kvm.s2.items():
            ram = not is_device_page(e.page)
            if ram and e.memtype == "normal" and not mte:
                continue  # RAM is Normal whatever its VMA (the table's first row): nothing to look up
            slot = kvm.slot_of(gfn)
            if slot is None:
                continue  # STAGE-2-COHERENT
            hva = slot.hva(gfn)
            pte = mm.pt.get(hva >> 12)
            if pte is None or pte.page is not e.page:
                continue  # STAGE-2-COHERENT
            vma = mm.find_vma(hva)
            if vma is None:
                continue
            want = stage2_memtype(k, vma, e.page)
            if e.memtype != want:
                self.report("STAGE2-MEMTYPE", f"VM {kvm.handle} gfn {gfn:#x} maps pfn {e.page.pfn:#x} "
                                              f"({e.page.zone}) of {vma!r} as {e.memtype}, not {want}", e.page)
            if not mte or e.memtype != "normal":
                continue
            if not vma.flags & VM_MTE_ALLOWED:
                self.report("MTE-VM-MEMORY-IS-TAG-CAPABLE",
                            f"VM {kvm.handle} gfn {gfn:#x} is mapped Normal cacheable from {vma!r}, "
                            "which lacks VM_MTE_ALLOWED", e.page)
            elif not page_tag_capable(e.page):
                self.report("MTE-VM-MEMORY-IS-TAG-CAPABLE",
                            f"VM {kvm.handle} gfn {gfn:#x} is mapped Normal cacheable to pfn {e.page.pfn:#x} "
                            f"({e.page.zone}, node {_node_of(e.page)}), which keeps no allocation tags", e.page)
        if not mte or not kvm_tag_storage_reserve(k):
            return
        slots = [(s.userspace_addr, s.userspace_addr + (s.npages << 12)) for s in kvm.memslots.values()]
        for vma in mm.vmas:
            in_slot = any(vma.start < hi and lo < vma.end for lo, hi in slots)
            if in_slot and vma.flags & VM_MTE_ALLOWED and not vma.flags & VM_MTE_KVM and vma in kvm.mte_kvm_vmas:
                self.report("VM-MTE-KVM-FLAG", f"VM {kvm.handle}: {vma!r} of a memslot lacks VM_MTE_KVM")
            if not in_slot and vma.flags & VM_MTE_KVM and vma in kvm.mte_kvm_vmas:
                self.report("VM-MTE-KVM-FLAG", f"VM {kvm.handle}: {vma!r} keeps VM_MTE_KVM outside every memslot")


def page_tag_capable(page: Page) -> bool:
    """``tag-capable`` of page-flags: the memory keeps allocation tags (device memory never does)."""
    return not is_device_page(page) and page.tag_capable


def _node_of(page: Page) -> str:
    return str(getattr(page, "node", "node0"))


def stage2_memtype(k: Kernel, vma, page: Page) -> str:
    """The stage-2 memory type user_mem_abort() gives ``page`` of ``vma`` (the contract's table)."""
    if vma.flags & (VM_PFNMAP | VM_MIXEDMAP) and not pfn_is_map_memory(page):
        if kvm_vma_is_cacheable(vma):
            return "normal"  # only with FEAT_S2FWB and CTR_EL0.DIC; otherwise no entry at all
        return "normal-nc" if vma.flags & VM_ALLOW_ANY_UNCACHED else "device"
    return "normal"
