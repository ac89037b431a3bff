"""Shared helpers for the host-kernel unit tests (not a test module).

* :class:`Proc` drives one modelled process in-process: ``await p("mmap", ...)``
  validates the arguments with the ABI and calls the syscall handler, exactly
  as the server does for a ``process`` connection.
* :func:`explore` runs a small concurrent scenario under **every** interleaving
  the :class:`~hypervisor.sched.ControlledScheduler` can produce. It replaces
  the scheduler's random source with a scripted one and walks the decision
  tree depth first (stateless model checking: each run replays a prefix of
  choices, then takes the first option at every later decision).
"""

from __future__ import annotations

import inspect
from typing import Awaitable, Callable

import attrs
import trio

from hypervisor.errors import KernelError
from hypervisor.kernel import Kernel
from hypervisor.process import Task
from hypervisor.sched import ControlledScheduler
from hypervisor.syscalls import PROCESS_OPS
from shared.abi import validate_args
from shared.mte import PAGE_SHIFT

RW = ["read", "write"]
RWM = ["read", "write", "mte"]


class Proc:
    """One host process of a :class:`Kernel`, called like a syscall table."""

    def __init__(self, k: Kernel, task: Task):
        self.k = k
        self.task = task

    @classmethod
    def new(cls, k: Kernel, name: str, session: str | None = None) -> "Proc":
        """A fresh process (optionally in the same ptrace session as another)."""
        return cls(k, k.create_task(name, session))

    @property
    def pid(self) -> int:
        return self.task.pid

    async def __call__(self, op: str, **args):
        return await PROCESS_OPS[op](self.k, self.task, validate_args(op, args))

    async def fork(self, name: str | None = None) -> "Proc":
        """fork(2): the child as a Proc."""
        res = await self("fork", child=name)
        return Proc(self.k, self.k.task(res["pid"]))

    async def tags(self, addr: int, size: int) -> list[int]:
        """LDG over a range (one tag per granule)."""
        return (await self("ldg", addr=addr, size=size)).value

    def pte(self, addr: int):
        """The PTE mapping ``addr`` (None if none)."""
        return self.task.mm.pt.get(addr >> PAGE_SHIFT)

    def page(self, addr: int):
        """The frame mapped at ``addr`` (asserts it is present)."""
        pte = self.pte(addr)
        assert pte is not None and pte.present, f"{addr:#x} is not present"
        return pte.page

    def vma(self, addr: int):
        """The VMA containing ``addr``."""
        return self.task.mm.find_vma(addr)


async def expect_errno(name: str, coro: Awaitable) -> KernelError:
    """Await ``coro`` and check it fails with errno ``name``; returns the error."""
    try:
        value = await coro
    except KernelError as exc:
        assert exc.name == name, f"expected {name}, got {exc.name}: {exc.message}"
        return exc
    raise AssertionError(f"expected {name}, got success ({value!r})")


def invariants(k: Kernel) -> list[str]:
    """Names of the invariants the oracle reports as broken right now."""
    return [v.invariant for v in k.oracle.check_state()]


# ---- exhaustive interleaving exploration --------------------------------------


class _ScriptedChoice:
    """Stands in for the scheduler's ``random.Random``.

    It follows a prefix of choice indices into the (name-sorted) runnable
    contexts, then takes index 0; or, with ``policy``, asks
    ``policy(runnable)`` (the scheduler's parked-actor records, which carry
    ``.name`` and ``.label``, the point each one is parked at).
    """

    def __init__(self, prefix: list[int], on_decision: Callable[[], None] | None, policy=None):
        self.prefix = prefix
        self.log: list[tuple[int, int]] = []  # (index chosen, number of runnable contexts)
        self.on_decision = on_decision
        self.policy = policy

    def choice(self, seq):
        if self.on_decision is not None:
            self.on_decision()  # every context is parked at a scheduling point now
        i = len(self.log)
        if self.policy is not None:
            c = seq.index(self.policy(seq))
        else:
            c = self.prefix[i] if i < len(self.prefix) else 0
            assert c < len(seq), "the model ran differently on replay of the same choices (non-determinism)"
        self.log.append((c, len(seq)))
        return seq[c]


@attrs.define
class Run:
    """One complete interleaving: its kernel, scenario state and schedule."""

    k: Kernel
    state: object
    schedule: str
    trace: list
    failure: Exception | None


Body = Callable[[Kernel, object], Awaitable[None]]


async def run_once(setup: Callable[[Kernel], tuple[object, dict[str, Body]]], *, prefix: list[int] | None = None,
                   schedule: str | None = None, policy=None, bugs=(),
                   on_decision=None) -> tuple[Run, list[tuple[int, int]]]:
    """Run the scenario once under a controlled scheduler.

    ``setup(k)`` (a function or a coroutine function) builds the initial state
    outside any context (sequentially: no interleaving) and returns
    ``(state, {actor: body})``; every body then runs as its own kernel context.
    With ``prefix`` (or ``policy``, see :class:`_ScriptedChoice`) the scripted
    explorer picks the contexts; with ``schedule`` the scheduler replays a
    recorded schedule string.
    """
    if schedule is not None:
        sched = ControlledScheduler(schedule=schedule)
        script = None
    else:
        sched = ControlledScheduler(seed=0)
        script = _ScriptedChoice(prefix or [], None, policy)
        sched._rng = script
    k = Kernel(sched=sched, bugs=bugs)
    built = setup(k)
    state, bodies = (await built) if inspect.isawaitable(built) else built
    if script is not None and on_decision is not None:
        script.on_decision = lambda: on_decision(k, state)

    async def actor(name, body):
        try:
            async with sched.context(name):
                await body(k, state)
        except Exception as exc:  # a deadlock or divergence cancels the parked contexts with it
            if sched.failure is None or exc is not sched.failure:
                raise

    async with trio.open_nursery() as outer:
        await outer.start(sched.run_driver)
        with trio.fail_after(10):
            async with trio.open_nursery() as inner:
                for name, body in bodies.items():
                    inner.start_soon(actor, name, body)
        outer.cancel_scope.cancel()
    return Run(k, state, sched.schedule, list(sched.trace), sched.failure), (script.log if script else [])


def run_until_then(first: str, label: str, other: str):
    """A policy: run ``first`` until it parks at ``label``, then ``other`` to the end, then the rest."""
    switched = False

    def policy(runnable):
        nonlocal switched
        by_name = {a.name: a for a in runnable}
        if first in by_name and by_name[first].label == label:
            switched = True
        if switched and other in by_name:
            return by_name[other]
        if not switched and first in by_name:
            return by_name[first]
        return runnable[0]

    return policy


def next_prefix(log: list[tuple[int, int]]) -> list[int] | None:
    """Depth-first backtracking: the choice prefix of the next unexplored run, or None when all are done."""
    i = len(log) - 1
    while i >= 0 and log[i][0] + 1 >= log[i][1]:
        i -= 1
    if i < 0:
        return None
    return [c for c, _ in log[:i]] + [log[i][0] + 1]


async def explore(setup, *, bugs=(), on_decision=None, until=None, limit: int = 20_000) -> list[Run]:
    """Every interleaving of the scenario built by ``setup`` (see :func:`run_once`).

    With ``until`` (a predicate on a :class:`Run`) the walk stops at the first
    run for which it holds (a counterexample search); that run is the last one
    returned.
    """
    runs: list[Run] = []
    prefix: list[int] = []
    while True:
        run, log = await run_once(setup, prefix=prefix, bugs=bugs, on_decision=on_decision)
        runs.append(run)
        if until is not None and until(run):
            return runs
        assert len(runs) <= limit, "state space larger than expected"
        prefix = next_prefix(log)
        if prefix is None:
            return runs


def frame_problems(k: Kernel) -> list[str]:
    """Bookkeeping of frames at rest: every PTE maps a live frame that knows it, and no frame leaks.

    * every PTE lies inside a VMA, and no migration entry is left at rest;
    * a present PTE maps a frame that is not free and whose rmap holds that PTE;
    * every rmap entry of a live frame is a PTE that really maps it;
    * mapcount == len(rmap);
    * every live frame is reachable: mapped, in an object's page cache, in the
      swap cache or KSM's stable tree (otherwise it leaked).
    """
    out = []
    cached = set()
    for obj in _objects(k):
        cached.update(id(p) for p in obj.pages.values() if not isinstance(p, int))
    cached.update(id(p) for p in k.swap.cache.values())
    cached.update(id(p) for p in k.ksm_stable.values())
    mms = [t.mm for t in k.tasks.values()]
    for mm in mms:
        for vpn, pte in mm.pt.items():
            if mm.find_vma(vpn << PAGE_SHIFT) is None:
                out.append(f"{mm!r} vpn {vpn:#x} has a PTE outside every VMA")
            if pte.migrating:
                out.append(f"{mm!r} vpn {vpn:#x}: a migration entry at rest")
            if not pte.present or pte.special or pte.page.zone != "normal":
                continue
            if pte.page.free:
                out.append(f"{mm!r} vpn {vpn:#x} maps freed pfn {pte.page.pfn:#x}")
            if (mm, vpn) not in pte.page.rmap:
                out.append(f"{mm!r} vpn {vpn:#x} maps pfn {pte.page.pfn:#x} but is not in its rmap")
    for page in k.alloc.live_pages():
        if page.zone != "normal":
            continue
        for mm, vpn in page.rmap:
            pte = mm.pt.get(vpn)
            if pte is None or pte.page is not page:
                out.append(f"pfn {page.pfn:#x} rmap names {mm!r} vpn {vpn:#x}, which does not map it")
        if page.mapcount != len(page.rmap):
            out.append(f"pfn {page.pfn:#x} mapcount {page.mapcount} but {len(page.rmap)} rmap entries")
        head = page.folio
        reachable = page.rmap or id(page) in cached or id(head) in cached or any(s.rmap for s in (head.subpages or []))
        if not reachable:
            out.append(f"pfn {page.pfn:#x} is allocated but nothing maps or caches it (leaked)")
    return out


def _objects(k: Kernel):
    """Every memory object reachable from the kernel (named ones and those behind VMAs)."""
    seen = {}
    for obj in k.objects.values():
        seen[id(obj)] = obj
    for t in k.tasks.values():
        for v in t.mm.vmas:
            if v.obj is not None:
                seen[id(v.obj)] = v.obj
    return seen.values()


def phases(*plan: tuple[str, str | None]):
    """A policy that runs the contexts in phases: ``("a", "label")`` runs ``a`` until it parks at
    ``label``; ``("a", None)`` runs it to its end. While the phase's context is blocked (a model
    lock, a migration entry), the lowest-named runnable context runs instead. After the plan,
    the default order (lowest name first) finishes the run.
    """
    step = 0
    seen: dict = {}

    def policy(runnable):
        nonlocal step
        for a in runnable:
            seen[a.name] = a
        by_name = {a.name: a for a in runnable}
        while step < len(plan):
            actor, label = plan[step]
            a = seen.get(actor)
            if label is None and a is not None and not a.alive:
                step += 1
                continue
            if label is not None and actor in by_name and by_name[actor].label == label and actor in started:
                step += 1
                started.discard(actor)
                continue
            if actor in by_name:
                started.add(actor)
                return by_name[actor]
            return runnable[0]  # the phase's context is blocked (or not started): let another run
        return runnable[0]

    started: set = set()
    return policy


# ---- KVM: a VMM process with one VM --------------------------------------------


def guest_segs(ipa: int, size: int, attr: str = "tagged") -> list:
    """Split a guest range into ``[ipa, length, attr]`` segments, one per 4 KiB page (as stage 1 hands them on)."""
    out, end = [], ipa + size
    while ipa < end:
        n = min(4096 - (ipa & 0xFFF), end - ipa)
        out.append([ipa, n, attr])
        ipa += n
    return out


class Vm:
    """A VMM :class:`Proc` with one VM: KVM ioctls on its handle, guest accesses on its vCPUs.

    ``await vm("kvm-...", **args)`` is a VM ioctl (the handle is filled in);
    :meth:`access` and its shorthands run one guest access after stage 1 on a
    vCPU (``vcpu-access``, exactly as the server does for a ``vcpu`` connection).
    """

    def __init__(self, vmm: Proc, handle: int):
        self.vmm = vmm
        self.k = vmm.k
        self.handle = handle
        self.vcpus: list = []  # hypervisor.kvm.kvm_host.Vcpu, in creation order

    @classmethod
    async def create(cls, k: Kernel, *, mte: bool = True, ipa_bits: int = 40, vcpu: bool = True,
                     name: str = "vmm", session: str | None = None) -> "Vm":
        """KVM_CREATE_VM in a new process (of ``session``: it shares named objects with that session),
        KVM_ENABLE_CAP(ARM_MTE) if ``mte``, one AArch64 vCPU if ``vcpu``."""
        vmm = Proc.new(k, name, session)
        vm = cls(vmm, await vmm("kvm-create-vm", ipa_bits=ipa_bits))
        if mte:
            await vm("kvm-enable-cap", cap="arm-mte")
        if vcpu:
            await vm.add_vcpu()
        return vm

    @property
    def kvm(self):
        """The model's ``struct kvm``."""
        return self.k.kvm.vms[self.handle]

    async def __call__(self, op: str, **args):
        return await self.vmm(op, vm=self.handle, **args)

    async def add_vcpu(self, aarch32: bool = False):
        """KVM_CREATE_VCPU (+ VCPU_INIT); returns the model's Vcpu."""
        r = await self("kvm-create-vcpu", aarch32=aarch32)
        vcpu = self.k.kvm.vcpu_by_token(r["token"])
        self.vcpus.append(vcpu)
        return vcpu

    async def map(self, size: int, *, backing: str = "anon", prot=None, share: str | None = None,
                  object: str | None = None, addr: int | None = None) -> int:
        """mmap(2) in the VMM (MAP_SHARED for everything but private anon and files unless told)."""
        if share is None:
            share = "private" if backing == "anon" else "shared"
        return await self.vmm("mmap", addr=addr, size=size, prot=list(prot or RW), share=share, backing=backing,
                              object=object)

    async def slot(self, slot: int, ipa: int, size: int, addr: int, flags=()) -> None:
        """KVM_SET_USER_MEMORY_REGION."""
        await self("kvm-set-memory-region", slot=slot, ipa=ipa, size=size, addr=addr, flags=list(flags))

    async def ram(self, slot: int, ipa: int, size: int, *, flags=(), **mmap) -> int:
        """mmap guest RAM in the VMM and register it as a memslot; returns the VMM address."""
        hva = await self.map(size, **mmap)
        await self.slot(slot, ipa, size, hva, flags)
        return hva

    async def access(self, kind: str, ipa: int, size: int, *, data: bytes = b"", tag: int = 0,
                     attr: str = "tagged", check: str = "none", ata: bool = True, vcpu: int = 0):
        """One guest access (vcpu-access) on vCPU ``vcpu``; returns the AccessResult."""
        from hypervisor.syscalls import VCPU_OPS

        v = self.vcpus[vcpu]
        args = {"vcpu": v.index, "kind": kind, "segs": guest_segs(ipa, size, attr), "tag": tag, "data": data,
                "check": check, "ata": ata}
        return await VCPU_OPS["vcpu-access"](self.k, v, validate_args("vcpu-access", args))

    async def ldg(self, ipa: int, size: int, **kw) -> list[int]:
        """Guest LDG over a range: one tag per granule."""
        return list((await self.access("ldg", ipa, size, **kw)).value)

    async def stg(self, ipa: int, size: int, tag: int, **kw) -> None:
        """Guest STG over a range."""
        await self.access("stg", ipa, size, tag=tag, **kw)

    async def load(self, ipa: int, size: int, **kw):
        """Guest load; returns the AccessResult."""
        return await self.access("load", ipa, size, **kw)

    async def store(self, ipa: int, data: bytes, **kw):
        """Guest store; returns the AccessResult."""
        return await self.access("store", ipa, len(data), data=data, **kw)

    async def copy_tags(self, ipa: int, length: int, *, from_guest: bool, tags=b"", flags: int | None = None,
                        reserved=(0, 0)) -> dict:
        """KVM_ARM_MTE_COPY_TAGS (``flags`` overrides the direction bit)."""
        return await self("kvm-copy-tags", guest_ipa=ipa, length=length,
                          flags=int(from_guest) if flags is None else flags, reserved=list(reserved),
                          tags=bytes(tags))

    def s2(self, ipa: int):
        """The stage-2 entry mapping ``ipa`` (None if none)."""
        return self.kvm.s2.get(ipa >> PAGE_SHIFT)

    def page(self, ipa: int):
        """The frame stage 2 maps at ``ipa`` (asserts there is one)."""
        e = self.s2(ipa)
        assert e is not None, f"IPA {ipa:#x} is not mapped at stage 2"
        return e.page


async def explore_bounded(setup, *, preemptions: int = 2, bugs=(), until=None, limit: int = 20_000) -> list[Run]:
    """Every interleaving of ``setup``'s scenario with at most ``preemptions`` preemptions (CHESS's bound).

    A *preemption* is switching away from the context that ran last while it is
    still runnable; choosing among contexts when it blocked or ended is free.
    Races of depth ``preemptions`` or less are all covered, and the walk stays
    polynomial where :func:`explore`'s full tree would not fit (two KVM paths of
    ten scheduling points each). ``until`` as in :func:`explore`.
    """
    runs: list[Run] = []
    prefix: list[int] = []
    while True:
        log: list[tuple[int, int]] = []
        last: list[str | None] = [None]
        used = [0]

        def policy(runnable):
            names = [a.name for a in runnable]
            if last[0] in names:  # still runnable: anything else is a preemption
                options = [last[0]] + ([n for n in names if n != last[0]] if used[0] < preemptions else [])
                costly = True
            else:
                options, costly = names, False
            i = len(log)
            c = prefix[i] if i < len(prefix) else 0
            assert c < len(options), "the model ran differently on replay of the same choices (non-determinism)"
            log.append((c, len(options)))
            if c and costly:
                used[0] += 1
            last[0] = options[c]
            return runnable[names.index(options[c])]

        run, _ = await run_once(setup, policy=policy, bugs=bugs)
        runs.append(run)
        if until is not None and until(run):
            return runs
        assert len(runs) <= limit, "state space larger than expected"
        prefix = next_prefix(log)
        if prefix is None:
            return runs
