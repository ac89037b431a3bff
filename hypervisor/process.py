"""Host user processes: task_struct and the MTE thread state (include/linux/sched.h, arch/arm64 thread.mte_ctrl)."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import attrs

from hypervisor.arm64.mte import MteCtrl
from hypervisor.mm_types import MM


@attrs.define(eq=False)
class Task:
    """A host process: one address space, one MTE control word, PSTATE.TCO.

    The model runs one thread per process; parallel steps of one process share
    this state as threads of a process share their mm (TCF is per thread in
    Linux, and the model's processes set it once per process).
    """

    pid: int
    name: str
    mm: MM
    session: str
    mte_ctrl: MteCtrl = attrs.Factory(MteCtrl)
    tco: bool = False
    tfsr: int = 0  # pending asynchronous tag check fault (TFSRE0_EL1.TF0)
    rng: random.Random | None = None  # IRG's source (irg_rng()): made at its first use, not per process
    parent: int | None = None
    fork_token: str | None = None  # set until a connection attaches to this child
    attached: bool = False
    #: SIGKILL is pending (fatal_signal_pending()): acted on when the task's kernel contexts return
    sigkill: bool = False
    #: the task's requests inside the kernel now (its threads in a syscall): do_exit() waits for none,
    #: as exit_mm() runs only once the last thread has left the kernel
    in_kernel: int = 0
    exiting: bool = False  # do_exit() has begun (PF_EXITING)
    dead: bool = False  # do_exit() has finished: VMs destroyed, mm torn down, pid released
    #: set by the server for a process with a connection: closes it (a SIGKILLed process's socket goes)
    on_kill: Callable[[], Awaitable[None]] | None = None

    def irg_rng(self) -> random.Random:
        """IRG's random source, seeded with the pid at its first use (the tags of one seeded when the
        process was made: most processes never run IRG, and a seed costs as much as a small syscall)."""
        if self.rng is None:
            self.rng = random.Random(self.pid)
        return self.rng
