"""Process creation and exit: fork (kernel/fork.c) and exit (kernel/exit.c, mm/mmap.c ``exit_mmap``).

A child is a new :class:`~hypervisor.process.Task` registered in the kernel
(:meth:`hypervisor.kernel.Kernel.create_task`) whose mm copies the parent's
VMAs and shares its private pages copy-on-write (``copy_page_range``). Exit
closes the task's VM fds (destroying its VMs), then tears down its address
space.

Model notes: Linux copies migration entries into the child; the model lets
in-flight migrations of the parent finish first. Exit needs no mm refcount:
nothing outside the task holds its mm once its VMs are gone.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import attrs

from hypervisor.arm64.mte import MteCtrl
from hypervisor.mm.memory import copy_page_range, zap_pte_range
from hypervisor.mm.mmap import remove_vma
from hypervisor.mm.mmu_notifier import mmu_notifier_invalidate_range
from hypervisor.mm_types import MM, VM_SHARED
from shared.errno import KernelError
from shared.mte import TASK_SIZE

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel
    from hypervisor.process import Task


async def dup_mmap(k: Kernel, mm: MM, oldmm: MM) -> None:
    """dup_mmap() (kernel/fork.c): copy the VMAs under the parent's mmap_lock, CoW-protect private ranges."""
    async with oldmm.mmap_lock.write():
        await k.sched.point("dup_mmap")
        # Linux copies migration entries into the child; the model lets the migrations finish first
        await k.sched.wait_until(lambda: not any(p.migrating for p in oldmm.pt.values()),
                                 "dup_mmap:migration_entry_wait")
        for v in oldmm.vmas:
            nv = attrs.evolve(v)  # vm_area_dup(): every field (the node binding too)
            if v.obj is not None:
                v.obj.mappings += 1
            mm.vmas.append(nv)
            if not v.flags & VM_SHARED:  # copy_page_range(): MMU_NOTIFY_PROTECTION_PAGE for CoW ranges
                mmu_notifier_invalidate_range(oldmm, v.start, v.end, "protection_page")
        await copy_page_range(k, mm, oldmm)


async def copy_process(k: Kernel, parent: Task, child_name: str | None) -> Task:
    """kernel_clone() -> copy_process() (kernel/fork.c): a child sharing the parent's memory copy-on-write.

    The child inherits the MTE controls (TCF, include mask, tagged-address ABI)
    and PSTATE.TCO; its fork token lets its process connect to it.
    """
    child = k.create_task(child_name or f"{parent.name}-child", parent.session)
    child.parent = parent.pid
    child.mte_ctrl = MteCtrl(parent.mte_ctrl.tcf, parent.mte_ctrl.excl, parent.mte_ctrl.tagged_addr)
    child.tco = parent.tco
    child.fork_token = secrets.token_hex(16)
    try:
        await dup_mmap(k, child.mm, parent.mm)  # dup_mm()
    except KernelError:  # dup_mmap() failed: the half-built child goes, and fork(2) fails with its errno
        await exit_mmap(k, child.mm)
        k.tasks.pop(child.pid, None)
        raise
    return child


async def exit_mmap(k: Kernel, mm: MM) -> None:
    """exit_mmap() (mm/mmap.c): drop every VMA's object reference, zap all PTEs (mmu_notifier_release())."""
    async with mm.mmap_lock.write():
        for v in list(mm.vmas):
            remove_vma(k, v)
        zap_pte_range(k, mm, 0, TASK_SIZE, "release")
        mm.vmas.clear()


async def do_exit(k: Kernel, task: Task) -> None:
    """do_exit() (kernel/exit.c): the VM fds close (their VMs are destroyed), then exit_mmap() frees the mm.

    A second caller (a SIGKILL racing the connection's close) waits until the
    first one has finished, so either returns with the process gone. Before
    the VMs and the mm go, the exit waits until none of the task's requests is
    inside the kernel: in Linux a fatal signal is acted on only on the way back
    to user space, and exit_mm() runs once the last thread has left the kernel,
    so no syscall or ioctl is cut in half (e.g. KVM_ARM_MTE_COPY_TAGS between
    try_page_mte_tagging() and set_page_mte_tagged()). The model's exit runs in
    another context than the task's (see kill_task()), so it waits for them.
    """
    if task.exiting:
        await k.sched.wait_until(lambda: task.dead, "do_exit:wait")
        return
    task.exiting = True  # PF_EXITING
    task.sigkill = True  # new requests of the task get ESRCH from now on
    try:
        await k.sched.wait_until(lambda: task.in_kernel == 0, "do_exit:wait_in_kernel")
        await k.kvm.release_task(task)
        await exit_mmap(k, task.mm)
    finally:
        k.tasks.pop(task.pid, None)
        task.dead = True
        k.sched.wake()


async def kill_task(k: Kernel, task: Task) -> None:
    """SIGKILL (kernel/signal.c, the fatal-signal path to do_exit()): the process exits now.

    The signal is made pending first (fatal_signal_pending()): the task's
    requests already inside the kernel run to their end, new ones get ESRCH,
    and do_exit() tears the VMs and the mm down once none is left inside.

    Deliberate difference: the model's process exits in the caller's context
    rather than its own, so that the caller returns once the exit (its VMs
    destroyed, its memory freed) is done; then the server closes its
    connection, as the socket of a dead process closes.
    """
    task.sigkill = True  # signal_wake_up(): fatal_signal_pending(task) from now on
    await do_exit(k, task)
    close, task.on_kill = task.on_kill, None
    if close is not None:
        await close()
