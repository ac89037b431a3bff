"""PTRACE_PEEKMTETAGS / PTRACE_POKEMTETAGS (kernel/mte.c ``mte_ptrace_copy_tags``).

Tags travel one per byte. The address is aligned down to its granule. Pages
are reached through GUP with FOLL_FORCE (faulting them in, FOLL_WRITE for
POKE); each must be in a VM_MTE VMA. Errors follow the code, not the
documentation: a VMA without VM_MTE stops the walk with -EOPNOTSUPP, which
``__access_remote_tags`` turns into -EIO when no tag was copied (reference
section 3.5). A partial copy succeeds with the count copied.

Errors:
    EIO: no MTE on the CPU; nothing copied because the first page is unmapped
        or not VM_MTE.
    EPERM: the target is not traceable by the caller (another session).
    ESRCH: no such process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.mte_tag_storage import Livelock, handle_folio_missing_tag_storage
from hypervisor.arm64.tags import read_tags, write_tags
from hypervisor.ghost import loc_of
from hypervisor.mm.memory import get_page, handle_mm_fault, put_page
from hypervisor.mm_types import VM_MTE
from shared.errno import KernelError
from shared.mte import MTE_GRANULE_MASK, MTE_GRANULE_SIZE, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.process import Task

#: Test-only: the old ordering (no page reference across the scheduling point), so
#: tests/unit/hypervisor/test_lost_tag_races.py can show the ghost catches the lost poke.
_OLD_ORDERING = False


async def mte_ptrace_copy_tags(k: Kernel, tracer: Task, target: Task, addr: int, count: int,
                               poke: bytes | None) -> bytes | int:
    """mte_ptrace_copy_tags(): returns the tags read (PEEK) or the number written (POKE).

    Raises:
        KernelError: EIO, EPERM as listed in the module docstring.
    """
    if not k.mte:
        raise KernelError("EIO", "PTRACE_*MTETAGS: the CPU has no MTE")
    if target.session != tracer.session:
        raise KernelError("EPERM", f"pid {target.pid} is not traceable by pid {tracer.pid} (another session)")
    if target.mm is None:
        raise KernelError("EPERM", f"pid {target.pid} has no mm")
    addr &= MTE_GRANULE_MASK
    mm = target.mm
    want = count if poke is None else len(poke)
    out = bytearray()
    done = 0
    err = None
    async with mm.mmap_lock.read():
        while done < want:
            # get_user_page_lookup_vma(): GUP with FOLL_FORCE (and FOLL_WRITE for POKE)
            vma = mm.find_vma(addr)
            if vma is None:
                err = "EIO"
                break
            if not vma.flags & VM_MTE:
                err = "EOPNOTSUPP"
                break
            cur = mm.pt.get(addr >> PAGE_SHIFT)
            if cur is not None and cur.fault_on_access and not cur.migrating:
                # RFC v3 patch 30: a page without tag storage is faulted in first (FAULT_FLAG_RETRY_NOWAIT:
                # one attempt, reserve or migrate); if it still has none, the copy stops (EIO if nothing copied)
                await handle_folio_missing_tag_storage(k, mm, vma, addr >> PAGE_SHIFT, cur)
                cur = mm.pt.get(addr >> PAGE_SHIFT)
                if cur is not None and cur.fault_on_access:
                    err = "EIO"
                    break
            try:
                pte = await handle_mm_fault(k, mm, addr, poke is not None, locked=True, force=True)
            except (KernelError, Livelock):
                err = "EIO"
                break
            page = pte.page
            assert page is not None  # handle_mm_fault returns a present entry
            hold = not pte.special and not _OLD_ORDERING
            if hold:
                get_page(page)  # GUP's FOLL_GET reference: reclaim and migration leave the page alone
            try:
                await k.sched.point("access_remote_tags")
                offset = addr & (PAGE_SIZE - 1)
                n = min(want - done, (PAGE_SIZE - offset) // MTE_GRANULE_SIZE)
                first = offset // MTE_GRANULE_SIZE
                loc = loc_of(k, mm, addr >> PAGE_SHIFT)
                if pte.special:  # the zero page: its tags are zero, never written
                    if poke is not None:
                        err = "EIO"
                        break
                    out += bytes(n)
                elif poke is None:
                    got = read_tags(k, page, first, n, f"ptrace-peek by pid {tracer.pid}")
                    k.oracle.ghost.check_read_tags(loc, page, first, got, f"ptrace-peek by pid {tracer.pid}")
                    out += got
                else:
                    tags = bytes(t & 0xF for t in poke[done:done + n])
                    write_tags(k, page, first, tags)
                    k.oracle.ghost.tags_written(loc, page, first, tags)
            finally:
                if hold:
                    put_page(k, page)
            done += n
            addr = ((addr >> PAGE_SHIFT) + 1) << PAGE_SHIFT
    if done == 0 and want > 0:
        why = {"EIO": "address not mapped", "EOPNOTSUPP": "VMA not mapped with PROT_MTE (EOPNOTSUPP, returned as EIO)"}
        raise KernelError("EIO", f"PTRACE_*MTETAGS at {addr:#x}: {why[err or 'EIO']}")
    return bytes(out) if poke is None else done
