"""The host kernel: one modelled machine's memory, processes and swap.

:class:`Kernel` is the state root only: it owns every piece of state (frames,
tags, objects, tasks, swap, KSM's stable tree) and the scheduler that orders
its contexts, and does no work of its own. Mechanisms are functions that take
it: fork and exit in :mod:`hypervisor.fork`, the host's reclaim, KSM and
migration passes in :mod:`hypervisor.mm`, reached from the op tables of
:mod:`hypervisor.syscalls`; KVM
(:class:`hypervisor.kvm.kvm_main.KvmState`, ``kernel.kvm``) sits beside it and uses the
same frames, locks and tag primitives, since a VM's stage 2 maps the VMM's
pages.
"""

from __future__ import annotations

import itertools
import secrets

from hypervisor.arm64.mte_lock import PG_mte_lock, PG_mte_tagged
from hypervisor.arm64.mte_tag_storage import TagStorage, page_flags_physmem
from hypervisor.kvm.kvm_main import KvmState
from hypervisor.mm.swap import SwapDevice
from hypervisor.mm_types import MM
from hypervisor.oracles import Oracle
from hypervisor.page import PageAllocator
from hypervisor.process import Task
from hypervisor.sched import FreeScheduler, Scheduler
from shared.bugs import check_bug_names, check_kernel_fix_names
from shared.errno import KernelError
from shared.mte import PAGE_SHIFT
from shared.physmem import PhysConfig


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
        fault_replay_limit: replays of one access's fault before the access is abandoned as a
            livelock (FAULT-FORWARD-PROGRESS; Linux would spin for ever).
        physmem: tag storage, nodes and regions (a :class:`shared.physmem.PhysConfig` or its
            wire map; None: mainline's static host).

    Raises:
        ValueError: an unknown bug or kernel-fix name, or a bad ``tcf_preferred``.
    """

    def __init__(self, *, mte: bool = True, ram: int = 256 << 20, swap: int = 64 << 20, bugs=(),
                 sched: Scheduler | None = None, tcf_preferred: str = "async", kernel_fixes=(),
                 fault_replay_limit: int = 64, physmem: PhysConfig | dict | None = None):
        if tcf_preferred not in ("sync", "async", "asymm"):
            raise ValueError(f"mte_tcf_preferred {tcf_preferred!r} is not sync, async or asymm")
        self.mte = mte
        self.bugs = frozenset(check_bug_names(bugs))
        self.fixes = frozenset(check_kernel_fix_names(kernel_fixes))
        self.sched = sched or FreeScheduler()
        self.tcf_preferred = tcf_preferred
        if fault_replay_limit < 1:
            raise ValueError(f"fault_replay_limit must be at least 1 (got {fault_replay_limit})")
        self.fault_replay_limit = fault_replay_limit
        self.physcfg = physmem if isinstance(physmem, PhysConfig) else PhysConfig.from_wire(physmem)
        self.alloc = PageAllocator(ram, mte, self.physcfg)
        self.swap = SwapDevice(swap)
        self.oracle = Oracle(self)
        self.tag_storage = TagStorage(self)  # RFC v3 dynamic tag storage (disabled on a static host)
        self.atomic: dict[str, list[str]] = {}  # spinlocks each context holds (NO-SLEEP-IN-ATOMIC)
        self.page_handles: dict = {}  # alloc-pages names -> their pages (hypervisor/mm/page_alloc.py)
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

    # ---- state queries (the host's page-flags and stats ops) ------------------------

    def page_flags(self, pid: int, addr: int, physmem: bool = False) -> dict:
        """PG_mte_tagged / PG_mte_lock of the frame mapped at ``addr`` (the folio head for hugetlb).

        ``physmem``: also where it lives (pfn, node, zone, tag-capable, storage-reserved,
        is-tag-storage, parked, fault-on-access: the physical-memory part's keys).
        """
        task = self.task(pid)
        pte = task.mm.pt.get(addr >> PAGE_SHIFT)
        if pte is None or not pte.present or pte.page is None:
            out = {"present": False, "tagged": False, "locked": False}
            return {**out, **page_flags_physmem(self, None, None)} if physmem else out
        page = pte.page
        head = page.folio
        struct_page = page.zone != "pfnmap"
        out = {"present": True, "tagged": struct_page and bool(head.flags & PG_mte_tagged),
               "locked": struct_page and bool(head.flags & PG_mte_lock)}
        return {**out, **page_flags_physmem(self, page, pte)} if physmem else out

    def stats(self) -> dict:
        """Counts for benchmarks and status."""
        resident = sum(1 for p in self.alloc.live_pages() if p.data_view() is not None)
        return {"frames_allocated": self.alloc.allocated, "frames_with_data": resident,
                "swap_slots": len(self.swap.slots), "tasks": len(self.tasks), "vms": len(self.kvm.vms),
                "violations": len(self.oracle.violations), "warnings": list(self.warnings)}
