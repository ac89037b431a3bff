"""Shared helpers for the host-kernel unit tests (not a test module).

* :class:`Proc` drives one modelled process in-process: ``await p("mmap", ...)``
  validates the arguments with the ABI and calls the syscall handler, exactly
  as the server does for a ``process`` connection.
* :func:`explore` / :func:`explore_bounded` run a small concurrent scenario
  under **every** interleaving (or every one with at most N preemptions): thin
  loops over the engine's :class:`~hypervisor.sched.Dfs` and
  :class:`~hypervisor.sched.Bounded` policies (``policy.new_execution()``
  until it says the tree is done), one :func:`run_once` per execution.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import attrs
import trio

from hypervisor.kernel import Kernel
from hypervisor.process import Task
from hypervisor.sched import (
    Bounded,
    ControlledScheduler,
    Decision,
    Dfs,
    Replay,
    SchedulingPolicy,
    Scripted,
)
from hypervisor.syscalls import PROCESS_OPS
from shared.abi import validate_args
from shared.errno import KernelError, ScheduleDivergence
from shared.mte import PAGE_SHIFT

RW = ["read", "write"]
RWM = ["read", "write", "mte"]


class Proc:
    """One host process of a :class:`Kernel`, called like a syscall table."""

    def __init__(self, k: Kernel, task: Task):
        self.k = k
        self.task = task

    @classmethod
    def new(cls, k: Kernel, name: str, session: str | None = None) -> Proc:
        """A fresh process (optionally in the same ptrace session as another)."""
        return cls(k, k.create_task(name, session))

    @property
    def pid(self) -> int:
        return self.task.pid

    async def __call__(self, op: str, **args):
        return await PROCESS_OPS[op](self.k, self.task, validate_args(op, args))

    async def fork(self, name: str | None = None) -> Proc:
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


class _Observed:
    """A policy that calls ``hook()`` before each decision (every context is parked then), then
    asks ``inner``: a test checks model state at every scheduling point this way."""

    def __init__(self, inner: SchedulingPolicy, hook: Callable[[], None]):
        self.inner = inner
        self.hook = hook

    def new_execution(self) -> bool:
        return self.inner.new_execution()

    def choose(self, d: Decision):
        self.hook()
        return self.inner.choose(d)

    def describe(self) -> str:
        return self.inner.describe()


@attrs.define
class Run:
    """One complete interleaving: its kernel, scenario state and schedule."""

    k: Kernel
    state: object
    schedule: str
    trace: list
    failure: Exception | None


Body = Callable[[Kernel, object], Awaitable[None]]


async def run_once(setup: Callable[[Kernel], tuple[object, dict[str, Body]]], *, schedule: str | None = None,
                   policy=None, bugs=(), on_decision=None) -> tuple[Run, list]:
    """Run the scenario once under a controlled scheduler.

    ``setup(k)`` (a function or a coroutine function) builds the initial state
    outside any context (sequentially: no interleaving) and returns
    ``(state, {actor: body})``; every body then runs as its own kernel context.
    ``policy`` is a :class:`~hypervisor.sched.SchedulingPolicy` or a function of
    the runnable contexts (those carry ``.name`` and ``.label``, the point each
    is parked at); ``schedule`` replays a recorded schedule string; neither is
    the default order (lowest name first). ``on_decision(k, state)`` is called
    before every decision. Returns the run and its trace (the releases, in order).
    """
    if schedule is not None:
        pol = Replay(schedule)
    elif policy is None:
        pol = Scripted(lambda runnable: runnable[0])
    elif callable(policy) and not hasattr(policy, "choose"):
        pol = Scripted(policy)
    else:
        pol = policy
    holder: dict = {}
    if on_decision is not None:
        pol = _Observed(pol, lambda: on_decision(holder["k"], holder["state"]))
    sched = ControlledScheduler(pol)
    k = Kernel(sched=sched, bugs=bugs)
    built = setup(k)
    state, bodies = (await built) if inspect.isawaitable(built) else built
    holder.update(k=k, state=state)

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
    run = Run(k, state, sched.schedule, list(sched.trace), sched.failure)
    return run, run.trace


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


async def _walk(setup, policy: SchedulingPolicy, *, bugs, on_decision, until, limit: int) -> list[Run]:
    """Run ``setup``'s scenario once per execution ``policy`` offers (see :func:`explore`)."""
    runs: list[Run] = []
    while policy.new_execution():
        run, _ = await run_once(setup, policy=policy, bugs=bugs, on_decision=on_decision)
        assert not isinstance(run.failure, ScheduleDivergence), run.failure  # the model is not deterministic
        runs.append(run)
        if until is not None and until(run):
            return runs
        assert len(runs) <= limit, "state space larger than expected"
    return runs


async def explore(setup, *, bugs=(), on_decision=None, until=None, limit: int = 20_000) -> list[Run]:
    """Every interleaving of the scenario built by ``setup`` (see :func:`run_once`), by :class:`Dfs`.

    With ``until`` (a predicate on a :class:`Run`) the walk stops at the first
    run for which it holds (a counterexample search); that run is the last one
    returned.
    """
    return await _walk(setup, Dfs(), bugs=bugs, on_decision=on_decision, until=until, limit=limit)


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
                     name: str = "vmm", session: str | None = None) -> Vm:
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
    """Every interleaving of ``setup``'s scenario with at most ``preemptions`` preemptions
    (:class:`~hypervisor.sched.Bounded`, CHESS's bound). ``until`` as in :func:`explore`."""
    return await _walk(setup, Bounded(preemptions), bugs=bugs, on_decision=None, until=until, limit=limit)


async def vmm_with_client(nursery, host, name: str = "vm0"):
    """An in-process VMM for VM ``name`` on ``host`` (an InProcessHost) and a control client to it."""
    import trio.testing

    from guest.agent import GuestAgent
    from shared.wire import Client
    from vmm.guestlink import InProcessGuests
    from vmm.machine import Vmm

    vmm = Vmm(host.connect, InProcessGuests(nursery, host.connect, GuestAgent), name=name, session="unit")
    await vmm.start()
    a, b = trio.testing.memory_stream_pair()
    nursery.start_soon(vmm.serve, b)
    client = Client(a)
    await nursery.start(client.run)
    return vmm, client


#: Shrinking kept short for the stress campaigns of the default suite (the command's defaults: 6 tries, 400 runs).
STRESS_SHRINK = {"shrink_tries": 3, "shrink_runs": 60}


def until_bug_worker():
    """A stress campaign worker class that stops at the first failure the switched-on bug explains (one that
    does not fail on the fixed model), for the quality tests' short campaigns."""
    from mtekvm.stress.campaign import Worker

    class UntilBug(Worker):
        def _out_of_budget(self) -> bool:
            return super()._out_of_budget() or any(f.get("fails_without_bugs") is False for f in self.failures)

    return UntilBug
