"""The system-call layer: one handler per ABI op, validated arguments in, values out.

Handlers receive the kernel, the calling task (process role) and the
arguments already checked by :func:`shared.abi.validate_args`. They return a
plain value, or an :class:`~hypervisor.access.user.AccessResult` when the access
raised a modelled architectural event; errors are :class:`KernelError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from hypervisor.access.user import AccessResult, user_irg, user_ldg, user_load, user_stg, user_store
from hypervisor.access.vcpu import guest_memory_access
from hypervisor.arm64.mte import get_tagged_addr_ctrl, set_tagged_addr_ctrl
from hypervisor.arm64.mte_tag_storage import meminfo_physmem
from hypervisor.fork import copy_process, kill_task
from hypervisor.kvm.copy_tags import kvm_vm_ioctl_mte_copy_tags
from hypervisor.kvm.memslot import kvm_set_memory_region, kvm_vm_ioctl_clear_dirty_log, kvm_vm_ioctl_get_dirty_log
from hypervisor.kvm.mmu import stage2_entry_report
from hypervisor.mm.fault_inject import host_inject_fault
from hypervisor.mm.gup import host_pin_pages
from hypervisor.mm.ksm import ksm_merge_range
from hypervisor.mm.migrate import migrate_range
from hypervisor.mm.mincore import do_mincore
from hypervisor.mm.mmap import do_madvise, do_mmap, do_mprotect_pkey, do_munmap, vma_flags_report
from hypervisor.mm.page_alloc import host_alloc_pages, host_free_pages
from hypervisor.mm.swap import madvise_pageout
from hypervisor.ptrace import mte_ptrace_copy_tags
from shared.abi import MAX_IO, OPS, bind, validate_args
from shared.errno import ENOSYS, ErrnoError, KernelError
from shared.mte import PAGE_SIZE, page_align_up

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.mm_types import MM
    from hypervisor.process import Task


async def sys_mmap(k, t, a):
    return await do_mmap(k, t.mm, a["addr"], a["size"], a["prot"], a["share"], a["backing"], a["object"], a["offset"],
                         hugepage_size=a["hugepage_size"], node=a.get("node"), region=a.get("region"),
                         attr=a.get("attr"))


async def sys_mprotect(k, t, a):
    await do_mprotect_pkey(k, t.mm, a["addr"], a["size"], a["prot"])


async def sys_munmap(k, t, a):
    await do_munmap(k, t.mm, a["addr"], a["size"])


async def sys_madvise(k, t, a):
    await do_madvise(k, t.mm, a["addr"], a["size"], a["advice"])


async def sys_prctl(k, t, a):
    if a["tcf"] is None and a["include"] is None:
        raise KernelError("EINVAL", "prctl: give tcf, include or both")
    set_tagged_addr_ctrl(k, t.mte_ctrl, a["tcf"], a["include"])


async def sys_prctl_get(k, t, a):
    return get_tagged_addr_ctrl(t.mte_ctrl)


async def sys_tco(k, t, a):
    t.tco = a["on"]


async def sys_store(k, t, a):
    return await user_store(k, t, a["addr"], a["tag"], a["data"])


async def sys_load(k, t, a):
    return await user_load(k, t, a["addr"], a["tag"], a["size"])


async def sys_stg(k, t, a):
    return await user_stg(k, t, a["addr"], a["tag"], a["size"])


async def sys_ldg(k, t, a):
    return await user_ldg(k, t, a["addr"], a["size"])


async def sys_irg(k, t, a):
    return user_irg(k, t)


async def sys_getpid(k, t, a):
    return t.pid


async def sys_fork(k, t, a):
    child = await copy_process(k, t, a["child"])
    return {"pid": child.pid, "token": child.fork_token}


async def sys_peek(k, t, a):
    return list(await mte_ptrace_copy_tags(k, t, k.task(a["target"]), a["addr"], a["count"], None))


async def sys_poke(k, t, a):
    return await mte_ptrace_copy_tags(k, t, k.task(a["target"]), a["addr"], 0, a["tags"])


async def sys_mincore(k, t, a):
    return await do_mincore(k, t.mm, a["addr"], a["size"])


# ---- oracle equipment: the TAGS-AS-WRITTEN record of a VM, for a migration ------

async def ghost_export(k, t, a):
    """The VM's TAGS-AS-WRITTEN record: ``{"entries": {str(gfn): [tags or nil, data hash or nil]}}``."""
    return {"entries": k.oracle.ghost.export_vm(k.kvm.vm(t, a["vm"]))}


async def ghost_import(k, t, a):
    """Replace the VM's TAGS-AS-WRITTEN record with a ``ghost-export``'s entries; returns None."""
    k.oracle.ghost.import_vm(k.kvm.vm(t, a["vm"]), a["entries"])


# ---- KVM ioctls of the VMM (a process) ---------------------------------------

async def kvm_create_vm(k, t, a):
    return k.kvm.kvm_dev_ioctl_create_vm(t, a["ipa_bits"]).handle


async def kvm_check_extension(k, t, a):
    kvm = None if a["vm"] is None else k.kvm.vm(t, a["vm"])
    return k.kvm.kvm_vm_ioctl_check_extension(kvm, a["cap"])


async def kvm_enable_cap(k, t, a):
    await k.kvm.kvm_vm_ioctl_enable_cap(k.kvm.vm(t, a["vm"]), a["cap"], a["flags"], a["args"])


async def kvm_create_vcpu(k, t, a):
    vcpu = await k.kvm.kvm_vm_ioctl_create_vcpu(k.kvm.vm(t, a["vm"]), a["aarch32"])
    return {"index": vcpu.index, "token": vcpu.token}


async def kvm_set_memory_region_op(k, t, a):
    await kvm_set_memory_region(k, k.kvm.vm(t, a["vm"]), a["slot"], a["ipa"], a["size"], a["addr"], a["flags"])


async def kvm_get_dirty_log(k, t, a):
    return await kvm_vm_ioctl_get_dirty_log(k, k.kvm.vm(t, a["vm"]), a["slot"])


async def kvm_clear_dirty_log(k, t, a):
    await kvm_vm_ioctl_clear_dirty_log(k, k.kvm.vm(t, a["vm"]), a["slot"], a["first"], a["num"])


async def kvm_copy_tags(k, t, a):
    return await kvm_vm_ioctl_mte_copy_tags(k, k.kvm.vm(t, a["vm"]), a["guest_ipa"], a["length"], a["flags"],
                                            a["reserved"], a["tags"])


async def kvm_destroy_vm(k, t, a):
    await k.kvm.kvm_destroy_vm(k.kvm.vm(t, a["vm"]))


async def sys_batch(k: Kernel, t: Task, a) -> list:
    """Run process ops in order; each result is ``[ok, value or errno, fault]``.

    Raises:
        KernelError: E2BIG when the data the batch would return exceeds
            :data:`shared.abi.MAX_IO` (checked before anything runs).
    """
    want = sum(args.get("size", 0) for op, args in a["ops"]
               if op in OPS and OPS[op].returns in ("bytes", "tags") and isinstance(args.get("size"), int))
    if want > MAX_IO:
        raise KernelError("E2BIG", f"batch: {want} bytes of replies exceed the {MAX_IO} one reply may carry")
    async def run(op, args):
        if op not in PROCESS_OPS:
            raise KernelError(ENOSYS, f"{op!r} is not a process op")
        return await PROCESS_OPS[op](k, t, validate_args(op, args))

    return await run_batch(a["ops"], run)


async def run_batch(ops, run) -> list:
    """The one batch loop (``batch``, ``vcpu-batch``): ``await run(op, args)`` for each op in order.

    Each result is ``[True, value, fault]``, or ``[False, errno, message]`` for an
    :class:`~shared.errno.ErrnoError` (the batch goes on).
    """
    out = []
    for op, args in ops:
        try:
            r = await run(op, args)
        except ErrnoError as exc:
            out.append([False, exc.errno, exc.message])
            continue
        if isinstance(r, AccessResult):
            out.append([True, r.value, r.fault])
        else:
            out.append([True, r, None])
    return out


#: The process ops' handlers, keyed by the ABI's names (``bind`` checks every process op has one).
PROCESS_OPS: dict[str, Callable[..., Awaitable]] = bind(
    {name: d for name, d in OPS.items() if d.role == "process"},
    mmap=sys_mmap, mprotect=sys_mprotect, munmap=sys_munmap, madvise=sys_madvise, prctl=sys_prctl,
    prctl_get=sys_prctl_get, tco=sys_tco, store=sys_store, load=sys_load, stg=sys_stg, ldg=sys_ldg, irg=sys_irg,
    fork=sys_fork, ptrace_peek_tags=sys_peek, ptrace_poke_tags=sys_poke, getpid=sys_getpid, batch=sys_batch,
    kvm_create_vm=kvm_create_vm, kvm_check_extension=kvm_check_extension, kvm_enable_cap=kvm_enable_cap,
    kvm_create_vcpu=kvm_create_vcpu, kvm_set_memory_region=kvm_set_memory_region_op,
    kvm_get_dirty_log=kvm_get_dirty_log, kvm_clear_dirty_log=kvm_clear_dirty_log,
    kvm_copy_tags=kvm_copy_tags, kvm_destroy_vm=kvm_destroy_vm, mincore=sys_mincore, ghost_export=ghost_export,
    ghost_import=ghost_import,
)


def _host_range(k: Kernel, pid: int, addr: int, size: int) -> tuple[MM, int, int]:
    """The mm of process ``pid`` and the page-aligned range [addr, addr + size) a host pass works on.

    Raises:
        KernelError: ESRCH for no such process, EINVAL for an address not page aligned.
    """
    task = k.task(pid)
    if addr & (PAGE_SIZE - 1):
        raise KernelError("EINVAL", f"address {addr:#x} is not page aligned")
    return task.mm, addr, addr + page_align_up(size)


async def host_swap_out(k: Kernel, pid: int, addr: int, size: int) -> int:
    """Reclaim the pages mapped in a range of a process (madvise_pageout()); returns pages swapped out."""
    return await madvise_pageout(k, *_host_range(k, pid, addr, size))


async def host_ksm_merge(k: Kernel, pid: int, addr: int, size: int) -> int:
    """One KSM pass over a range (ksm_merge_range()); returns pages merged."""
    return await ksm_merge_range(k, *_host_range(k, pid, addr, size))


async def host_migrate_pages(k: Kernel, pid: int, addr: int, size: int, to: str | None = None) -> int:
    """Move a range's pages to new frames (migrate_range()), or to node/tag storage ``to``; returns pages moved."""
    return await migrate_range(k, *_host_range(k, pid, addr, size), to=to)


async def host_page_flags(k, a):
    return k.page_flags(a["pid"], a["addr"], physmem=True)


async def host_check(k, a):
    """check-invariants: the violations so far, from index ``since`` on (the oracle only ever appends)."""
    return [v.to_wire() for v in k.oracle.check_state()[a["since"]:]]


async def host_stats(k, a):
    return k.stats()


def vm_name(kvm) -> str:
    """A VM's name: its VMM process ``vmm:NAME`` owns VM ``NAME`` (another owner's VM goes by the owner's name)."""
    name = kvm.owner.name
    return name[4:] if name.startswith("vmm:") else name


async def host_meminfo(k, a):
    """/proc/meminfo, reduced: RAM and free pages (4 KiB frames), and the names of the VMs running now, sorted."""
    return {"ram-pages": k.alloc.nr_frames, "free-pages": k.alloc.nr_frames - k.alloc.allocated,
            "vms": sorted({vm_name(kvm) for kvm in k.kvm.vms.values() if not kvm.destroyed}), **meminfo_physmem(k)}


async def host_kill(k, a):
    """kill(pid, SIGKILL): the process exits before this returns (ESRCH when there is no such process)."""
    task = k.tasks.get(a["pid"])
    if task is None:
        raise KernelError("ESRCH", f"kill: no process {a['pid']}")
    await kill_task(k, task)


async def host_vma_flags(k: Kernel, pid: int, addr: int) -> dict:
    """The VM_* flags and memtype of the VMA at ``addr`` of process ``pid`` (ESRCH: no such process)."""
    return await vma_flags_report(k, k.task(pid).mm, addr)


async def host_stage2_entry(k, a):
    """The stage-2 leaf entry of VM ``vm`` at ``ipa`` (ESRCH when no VM of that name runs on this host)."""
    for kvm in k.kvm.vms.values():
        if not kvm.destroyed and vm_name(kvm) == a["vm"]:
            return stage2_entry_report(k, kvm, a["ipa"])
    raise KernelError("ESRCH", f"stage2-entry: no VM {a['vm']!r} runs on this host")


HOST_OPS = {
    "swap-out": lambda k, a: host_swap_out(k, a["pid"], a["addr"], a["size"]),
    "ksm-merge": lambda k, a: host_ksm_merge(k, a["pid"], a["addr"], a["size"]),
    "migrate-pages": lambda k, a: host_migrate_pages(k, a["pid"], a["addr"], a["size"], a.get("to")),
    "alloc-pages": host_alloc_pages, "free-pages": host_free_pages, "pin-pages": host_pin_pages,
    "inject-fault": host_inject_fault,
    "page-flags": host_page_flags, "check-invariants": host_check, "stats": host_stats,
    "meminfo": host_meminfo, "kill": host_kill,
    "vma-flags": lambda k, a: host_vma_flags(k, a["pid"], a["addr"]), "stage2-entry": host_stage2_entry,
}


# ---- a guest's vCPUs ------------------------------------------------------------

async def vcpu_access(k, vcpu, a):
    return await guest_memory_access(k, vcpu, a["kind"], a["segs"], a["tag"], a["data"], a["check"], a["ata"])


async def vcpu_batch(k, vcpu, a):
    """Run vcpu-access ops in order; each result is ``[ok, value or errno, fault]`` (as ``batch``)."""
    async def run(op, args):
        if op != "vcpu-access":
            raise KernelError(ENOSYS, f"{op!r} cannot be batched on a vCPU")
        return await vcpu_access(k, vcpu, validate_args(op, dict(args, vcpu=vcpu.index)))

    return await run_batch(a["ops"], run)


VCPU_OPS = {"vcpu-access": vcpu_access, "vcpu-batch": vcpu_batch}
