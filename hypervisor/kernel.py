"""The host kernel: one modelled machine's memory, processes and swap.

:class:`Kernel` owns every piece of state (frames, tags, objects, tasks,
swap, KSM's stable tree) and the scheduler that orders its contexts. The
syscall layer (hypervisor/syscalls.py) calls into it; KVM
(:class:`hypervisor.kvm.kvm_main.KvmState`, ``kernel.kvm``) sits beside it and uses the
same frames, locks and tag primitives, since a VM's stage 2 maps the VMM's
pages.
"""

from __future__ import annotations

import itertools
import secrets

from hypervisor.errors import KernelError
from hypervisor.mm.ksm import ksm_merge_range
from hypervisor.kvm.kvm_main import KvmState
from hypervisor.mm.memory import copy_page_range, zap_pte_range
from hypervisor.mm.migrate import migrate_range
from hypervisor.mm.mmap import MM, _drop_object_ref
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm_types import VM_SHARED
from hypervisor.arm64.mte import MteCtrl
from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.oracles import Oracle
from hypervisor.page import PageAllocator
from hypervisor.process import Task
from hypervisor.sched import FreeScheduler, Scheduler
from hypervisor.mm.swap import SwapDevice, shrink_folio_list
from shared.bugs import check_bug_names, check_kernel_fix_names
from shared.mte import PAGE_SHIFT, PAGE_SIZE, TASK_SIZE, page_align_up


class Kernel:
    """One modelled host.

    Args:
        mte: the CPUs implement MTE (system_supports_mte()).
        ram: bytes of RAM.
        swap: bytes of swap.
        bugs: bug-zoo names to switch on.
        sched: the scheduler for this kernel's contexts (free by default).
        tcf_preferred: the per-CPU ``mte_tcf_preferred`` (async, as Linux boots;
            ``sync``, ``async`` or ``asymm``, the values its sysfs file accepts).
        kernel_fixes: proposed kernel fixes this host applies (names from
            :data:`shared.bugs.KERNEL_FIXES`).

    Raises:
        ValueError: an unknown bug or kernel-fix name, or a bad ``tcf_preferred``.
    """

    def __init__(self, *, mte: bool = True, ram: int = 256 << 20, swap: int = 64 << 20, bugs=(),
                 sched: Scheduler | None = None, tcf_preferred: str = "async", kernel_fixes=()):
        if tcf_preferred not in ("sync", "async", "asymm"):
            raise ValueError(f"mte_tcf_preferred {tcf_preferred!r} is not sync, async or asymm")
        self.mte = mte
        self.bugs = frozenset(check_bug_names(bugs))
        self.fixes = frozenset(check_kernel_fix_names(kernel_fixes))
        self.sched = sched or FreeScheduler()
        self.tcf_preferred = tcf_preferred
        self.alloc = PageAllocator(ram)
        self.swap = SwapDevice(swap)
        self.oracle = Oracle(self)
        self.objects: dict = {}
        self.tasks: dict[int, Task] = {}
        self.ksm_stable: dict = {}
        self.warnings: list[str] = []
        self._pids = itertools.count(100)
        self.kvm = KvmState(self)

    def warn_once(self, msg: str) -> None:
        """WARN_ON_ONCE(): recorded, never fatal."""
        if msg not in self.warnings:
            self.warnings.append(msg)

    # ---- processes -------------------------------------------------------------

    def create_task(self, name: str, session: str | None = None) -> Task:
        """A new process as after execve: TCF none, include mask 0, TCO 0, empty mm."""
        pid = next(self._pids)
        session = session or secrets.token_hex(8)
        task = Task(pid=pid, name=name or f"pid{pid}", mm=MM(self, name or f"pid{pid}", session), session=session)
        task.rng.seed(pid)
        self.tasks[pid] = task
        return task

    def task(self, pid: int) -> Task:
        """find_task_by_vpid().

        Raises:
            KernelError: ESRCH when there is no such process.
        """
        t = self.tasks.get(pid)
        if t is None:
            raise KernelError("ESRCH", f"no process {pid}")
        return t

    async def fork(self, parent: Task, child_name: str | None) -> Task:
        """kernel_clone(): a child sharing the parent's memory copy-on-write."""
        child = self.create_task(child_name or f"{parent.name}-child", parent.session)
        child.parent = parent.pid
        child.mte_ctrl = MteCtrl(parent.mte_ctrl.tcf, parent.mte_ctrl.excl, parent.mte_ctrl.tagged_addr)
        child.tco = parent.tco
        child.fork_token = secrets.token_hex(16)
        async with parent.mm.mmap_lock.write():  # dup_mmap()
            await self.sched.point("dup_mmap")
            # Linux copies migration entries into the child; the model lets the migrations finish first
            await self.sched.wait_until(lambda: not any(p.migrating for p in parent.mm.pt.values()),
                                        "dup_mmap:migration_entry_wait")
            for v in parent.mm.vmas:
                nv = type(v)(v.start, v.end, v.flags, v.backing, v.obj, v.pgoff)
                if v.obj is not None:
                    v.obj.mappings += 1
                child.mm.vmas.append(nv)
                if not v.flags & VM_SHARED:  # copy_page_range(): MMU_NOTIFY_PROTECTION_PAGE for CoW ranges
                    mmu_notifier_invalidate_range(parent.mm, v.start, v.end, "protection_page")
            copy_page_range(self, child.mm, parent.mm)
        return child

    async def exit_task(self, task: Task) -> None:
        """do_exit(): the VM fds close (their VMs are destroyed), then exit_mmap() frees the address space."""
        await self.kvm.release_task(task)
        mm = task.mm
        async with mm.mmap_lock.write():
            for v in list(mm.vmas):
                _drop_object_ref(self, v)
            zap_pte_range(self, mm, 0, TASK_SIZE, "release")  # exit_mmap() -> mmu_notifier_release()
            mm.vmas.clear()
        self.tasks.pop(task.pid, None)

    # ---- the host kernel's own work (the `host` actor) ------------------------------

    def _range(self, addr: int, size: int) -> tuple[int, int]:
        if addr & (PAGE_SIZE - 1):
            raise KernelError("EINVAL", f"address {addr:#x} is not page aligned")
        return addr, addr + page_align_up(size)

    async def swap_out(self, pid: int, addr: int, size: int) -> int:
        """Reclaim the pages mapped in a range of a process; returns pages swapped out."""
        task = self.task(pid)
        start, end = self._range(addr, size)
        pages = []
        for vpn in task.mm.vpns_in(start, end):
            pte = task.mm.pt.get(vpn)
            if pte is not None and pte.present and not pte.special and pte.page not in pages:
                pages.append(pte.page)
        return await shrink_folio_list(self, pages)

    async def ksm_merge(self, pid: int, addr: int, size: int) -> int:
        """One KSM pass over a range; returns pages merged."""
        task = self.task(pid)
        start, end = self._range(addr, size)
        return await ksm_merge_range(self, task.mm, start, end)

    async def migrate_pages(self, pid: int, addr: int, size: int) -> int:
        """Move a range's pages to new frames; returns pages (folios) moved."""
        task = self.task(pid)
        start, end = self._range(addr, size)
        return await migrate_range(self, task.mm, start, end)

    def page_flags(self, pid: int, addr: int) -> dict:
        """PG_mte_tagged / PG_mte_lock of the frame mapped at ``addr`` (the folio head for hugetlb)."""
        task = self.task(pid)
        pte = task.mm.pt.get(addr >> PAGE_SHIFT)
        if pte is None or not pte.present:
            return {"present": False, "tagged": False, "locked": False}
        head = pte.page.folio
        return {"present": True, "tagged": bool(head.flags & PG_mte_tagged),
                "locked": bool(head.flags & PG_mte_lock)}

    def stats(self) -> dict:
        """Counts for benchmarks and status."""
        resident = sum(1 for p in self.alloc.live_pages() if p.data is not None)
        return {"frames_allocated": self.alloc.allocated, "frames_with_data": resident,
                "swap_slots": len(self.swap.slots), "tasks": len(self.tasks), "vms": len(self.kvm.vms),
                "violations": len(self.oracle.violations), "warnings": list(self.warnings)}
