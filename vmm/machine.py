"""The VMM core: one VM, in the role QEMU or crosvm play.

:class:`Vmm` serves :data:`shared.control.VMM_CONTROL` (the orchestrator's
channel) and :data:`shared.control.EXIT_CHANNEL` (its guest's vCPU exits). It
is a host process of the hypervisor (one ``process`` connection, hello
``{role: "process", name: "vmm:NAME", session}``): it maps guest RAM in its
own address space, issues the KVM ioctls (``kvm-*`` ops) on the VM it
created, starts the guest through a launcher (:mod:`vmm.guestlink`) and hands
it the vCPU tokens, emulates the DMA device (:mod:`vmm.dma`) and supervises
the guest: when the guest dies the exit is recorded, the VM destroyed and
guest RAM unmapped, and later guest ops get ESRCH.

Every hypervisor call made for a request carries that request's ``ctx``, so
the hypervisor's controlled scheduler names the kernel context after the
scenario step.

The same class runs in a ``python -m vmm`` process and in-process (over
``trio.testing.memory_stream_pair``); only the launchers differ.

Errors (as :class:`VmmError` or passed through from the hypervisor/guest):
    ENODEV: no VM yet / no such vCPU / the VMM has shut down.
    EEXIST: a second VM for this VMM.
    ESRCH: the guest is gone (the message says how it died).
    EFAULT: an IPA outside every memslot (DMA, ipa-to-hva).
    EINVAL: bad arguments; dirty-log on an unknown slot.
    ENOSYS: unknown VMM op.
    EIO: the hypervisor connection was lost, or the guest could not be started.
    ESTALE: the VM has migrated away (``moved_to``); the orchestrator retries on the destination.

Pause (:meth:`Vmm.pause`/:meth:`Vmm.resume`) holds every ``guest-op`` and ``vmm-op`` (but
migrate, snapshot and restore, which pause themselves) at a gate and waits for those in flight,
as kicking the vCPUs out of KVM_RUN does; :meth:`Vmm.guest_state` and :meth:`Vmm.set_guest_state`
save and install the vCPUs' registers and stage 1 (:mod:`vmm.guestram` reads and writes RAM).
"""

from __future__ import annotations

import collections
import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from shared.abi import MAX_IO, OPS, ops_of, validate_args
from shared.control import EXIT_CHANNEL, KVM_OPS, VMM_CONTROL
from shared.errno import EEXIST, EINVAL, EIO, ENODEV, ENOSYS, EOPNOTSUPP, ESRCH, ESTALE, errno_name
from shared.mte import MTE_GRANULE_SIZE, PAGE_SIZE
from shared.rpc import serve_requests
from shared.wire import Client, ConnectionClosed, RemoteError, Reply
from vmm import dma, guestram, migration
from vmm.errors import VmmError

if TYPE_CHECKING:
    from vmm.guestlink import GuestHandle

__all__ = ["Vmm", "VmmError"]


async def _no_hook(point: str) -> None:
    """The default migration hook: nothing."""

log = logging.getLogger("mtekvm.vmm")

#: Host-process ops a VMM runs on its own address space, forwarded unchanged.
HOST_PROCESS_OPS = frozenset(ops_of(OPS, "vmm"))
#: KVM_ARM_MTE_COPY_TAGS refuses lengths over INT_MAX.
INT_MAX = (1 << 31) - 1
#: VMM ops that pause the vCPUs themselves, so they do not wait at (or count for) the pause gate.
UNGATED_KVM_OPS = frozenset({"migrate", "snapshot", "restore"})
#: Exits kept for ``status`` (the oldest are dropped).
MAX_EXITS = 1024


Connect = Callable[..., Awaitable[tuple[Client, dict]]]


class Vmm:
    """One VMM: a VM, its memslots and vCPUs, its guest, its devices.

    Args:
        connect: ``await connect(role, **hello)`` -> ``(Client, hello_reply)``
            to the hypervisor (:meth:`mtekvm.links.HostLink.connect` fits).
        guests: the guest launcher (:mod:`vmm.guestlink`).
        name: the VM's name (the VMM says hello as ``vmm:NAME``).
        session: the scenario's session (named memory objects are shared per session).
        copy_chunk: guest bytes per KVM_ARM_MTE_COPY_TAGS call when a copy is
            split (a page multiple; default: the most one reply may carry).
        migration: the migration transport (:mod:`vmm.migration`: ``listen``/``dial``);
            None: this VMM cannot migrate (EOPNOTSUPP).
        die: ``await die()`` kills this VMM at once (fault injection: SIGKILL itself).
    """

    def __init__(self, connect: Connect, guests, *, name: str, session: str | None,
                 copy_chunk: int = MAX_IO * MTE_GRANULE_SIZE, migration: Any = None,
                 die: Callable[[], Awaitable[None]] | None = None):
        if copy_chunk <= 0 or copy_chunk % PAGE_SIZE:
            raise ValueError("copy_chunk must be a positive multiple of the page size")
        self.connect = connect
        self.guests = guests
        self.name = name
        self.session = session
        self.copy_chunk = copy_chunk
        self.migration = migration
        self.die = die
        self.hv: Client | None = None
        self.pid: int | None = None
        self.vm: int | None = None
        self.slots: dict[int, dma.Memslot] = {}
        self.ram: list[tuple[int, int]] = []  # guest RAM the VMM mapped itself (vm-setup)
        self.vcpus: list[int] = []
        self.guest: GuestHandle | None = None  # set once started
        self.guest_status = "not-started"
        self.guest_detail = ""
        self.exits: collections.deque = collections.deque(maxlen=MAX_EXITS)
        self.device = dma.DmaDevice(self._device_fill)
        self.closing = False
        self.done = trio.Event()  # set once shut down
        #: every mapping the VMM made of its own address space (vm-setup and forwarded mmaps), for guestram
        self.mappings: list = []
        #: the host the VM migrated to: every later guest/vmm op fails ESTALE
        self.moved_to: str | None = None
        #: dirty pages a failed migration consumed from slots that logged before it (slot -> page indexes),
        #: ORed into ``dirty-log get`` as QEMU layers its own bitmaps over KVM's
        self.dirty_extra: dict[int, set[int]] = {}
        self.mte = False  # KVM_CAP_ARM_MTE is enabled on the VM
        self.ipa_bits = 40
        self.manual_protect = False  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled (GET does not clear)
        self.migrating = False
        #: while a migration runs: pages the VMM itself wrote (DMA), slot -> page indexes (KVM logs guest writes only)
        self.mig_dirty: dict[int, set[int]] | None = None
        #: ``await migration_hook(point)`` at named points of a migration (tests direct interleavings with it)
        self.migration_hook: Callable[[str], Awaitable[None]] = _no_hook
        self._pause_gate: trio.Event | None = None  # set while paused: guest/vmm ops wait on it
        self._pauses = 0
        self._inflight = 0  # guest/vmm ops running (pause waits for them)
        self._idle = trio.Event()
        self._idle.set()
        self._start_lock = trio.Lock()
        self._guest_lock = trio.Lock()
        self._reaped = trio.Event()  # the current guest's death has been handled
        self._serving = 0
        self._no_clients = trio.Event()
        self._no_clients.set()

    # ---- connections ---------------------------------------------------------------
    async def start(self) -> None:
        """Connect to the hypervisor as the process ``vmm:NAME`` (idempotent).

        Raises:
            VmmError: ENODEV after shutdown; EIO when the hypervisor cannot be reached.
            RemoteError: the hypervisor refused the hello (EPERM: wrong secret).
        """
        async with self._start_lock:
            if self.closing:
                raise VmmError(ENODEV, "the VMM has shut down")
            if self.hv is not None:
                return
            try:
                client, hello = await self.connect("process", name=f"vmm:{self.name}", session=self.session)
            except RemoteError:
                raise
            except Exception as exc:  # noqa: BLE001 - HostStartError, OSError: report, don't crash
                raise VmmError(EIO, f"cannot reach the hypervisor: {exc}") from exc
            self.hv, self.pid = client, hello["pid"]

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve one control connection (VMM_CONTROL) until it closes."""
        if self._serving == 0:
            self._no_clients = trio.Event()
        self._serving += 1
        try:
            await serve_requests(stream, VMM_CONTROL, self._handle, name=f"vmm:{self.name}")
        finally:
            self._serving -= 1
            if self._serving == 0:
                self._no_clients.set()

    async def wait_clients_gone(self) -> None:
        """Wait until no control connection is being served."""
        await self._no_clients.wait()

    async def serve_exits(self, stream: trio.abc.Stream) -> None:
        """Serve the guest's EXIT_CHANNEL (vCPU exits) until it closes."""
        await serve_requests(stream, EXIT_CHANNEL, self._handle_exit, name=f"vmm:{self.name}:exits")

    @property
    def _hv(self) -> Client:
        """The hypervisor connection (EIO before ``connect`` made it)."""
        if self.hv is None:
            raise VmmError(EIO, "not connected to the hypervisor")
        return self.hv

    async def _call(self, op: str, args: dict, ctx: str | None) -> Reply:
        try:
            return await self._hv.call(op, args, ctx=ctx)
        except ConnectionClosed as exc:
            raise VmmError(EIO, f"lost the hypervisor connection: {exc}") from None

    async def _handle(self, op: str, a: dict, ctx: str | None) -> Any:
        if op == "status" and (self.closing or self.hv is not None):
            return await self._op_status(a, ctx)
        if self.closing:
            raise VmmError(ENODEV, "the VMM has shut down")
        if op in ("guest-op", "vmm-op") and not (op == "vmm-op" and a["op"] in UNGATED_KVM_OPS):
            await self._enter_gate()
            try:
                await self.start()
                return await self.CONTROL_HANDLERS[op](self, a, ctx)
            finally:
                self._leave_gate()
        if op != "shutdown":
            self._check_moved()
        await self.start()
        return await self.CONTROL_HANDLERS[op](self, a, ctx)

    # ---- pause (vCPUs kicked out of KVM_RUN) ---------------------------------------
    def _check_moved(self) -> None:
        if self.moved_to is not None:
            raise VmmError(ESTALE, f"the VM has migrated to host {self.moved_to}")

    async def _enter_gate(self) -> None:
        """Wait while paused; then count this guest/vmm op as in flight (ESTALE once the VM moved away)."""
        while self._pause_gate is not None:
            await self._pause_gate.wait()
        self._check_moved()
        if self.closing:
            raise VmmError(ENODEV, "the VMM has shut down")
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1

    def _leave_gate(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def pause(self, ctx: str | None = None) -> None:
        """Stop the vCPUs: new guest/vmm ops wait, and this returns once those in flight have completed.

        Models kicking every vCPU thread out of KVM_RUN (``kvm_vcpu_kick``) and holding it there, as
        QEMU's ``vm_stop`` does; ops that waited run after :meth:`resume`, or fail ESTALE if the VM
        has moved away meanwhile. Pauses nest (each needs its resume).
        """
        self._pauses += 1
        if self._pause_gate is None:
            self._pause_gate = trio.Event()
        await self._idle.wait()

    async def resume(self) -> None:
        """Undo one :meth:`pause`; the last one lets the waiting ops go."""
        if self._pauses == 0:
            return
        self._pauses -= 1
        if self._pauses == 0 and self._pause_gate is not None:
            gate, self._pause_gate = self._pause_gate, None
            gate.set()

    @property
    def paused(self) -> bool:
        """The vCPUs are paused."""
        return self._pause_gate is not None

    async def guest_state(self, ctx: str | None) -> dict:
        """Every vCPU's registers and the guest's stage 1 (GUEST_CHANNEL ``vcpu-state-get``)."""
        return (await self._guest_call("vcpu-state-get", {}, ctx)).value

    async def set_guest_state(self, state: dict, ctx: str | None) -> None:
        """Install a :meth:`guest_state` result into this VM's guest (its vCPUs already added)."""
        await self._guest_call("vcpu-state-set", {"vcpus": state.get("vcpus"), "stage1": state.get("stage1", [])},
                               ctx)

    # ---- building the VM -----------------------------------------------------------
    def _need_vm(self) -> int:
        if self.vm is None:
            raise VmmError(ENODEV, "no VM (vm-create or vm-setup first)")
        return self.vm

    async def _op_vm_create(self, a: dict, ctx: str | None) -> int:
        if self.vm is not None or self.migrating:
            raise VmmError(EEXIST, f"this VMM already runs VM {self.vm}")
        if self.guest_status == "exited":
            raise VmmError(ESRCH, f"the guest is gone ({self.guest_detail}); start a new VMM")
        self.vm = (await self._call("kvm-create-vm", {"ipa_bits": a["ipa_bits"]}, ctx)).value
        self.ipa_bits = a["ipa_bits"]
        return self.vm

    async def _op_vm_setup(self, a: dict, ctx: str | None) -> dict:
        vm = await self._op_vm_create(a, ctx)
        try:
            if a["mte"]:
                await self._call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte", "flags": 0}, ctx)
                self.mte = True
            # as QEMU does, when the kernel offers it; without INITIALLY_SET (QEMU asks for it too), so a
            # slot starts logging with an empty bitmap and write-protected, and GET never clears
            await self._call("kvm-enable-cap", {"vm": vm, "cap": "manual-dirty-log-protect2", "flags": 0,
                                                "args": [1]}, ctx)
            self.manual_protect = True
            for i, m in enumerate(a["memory"]):
                prot = ["read", "write"] + (["mte"] if m["prot_mte"] else [])
                share = "private" if m["backing"] in ("anon", "hugetlb") else "shared"  # device memory: shared
                mmap = {"size": m["size"], "prot": prot, "share": share, "backing": m["backing"],
                        "object": m["object"]}
                if m["backing"] == "hugetlb":
                    mmap["hugepage_size"] = m["hugepage_size"]
                for key in ("node", "region", "attr"):
                    if m.get(key) is not None:
                        mmap[key] = m[key]
                hva = (await self._call("mmap", mmap, ctx)).value
                guestram.record_mmap(self, hva, validate_args("mmap", mmap))
                self.ram.append((hva, m["size"]))
                await self._call("kvm-set-memory-region", {"vm": vm, "slot": i, "ipa": m["ipa"],
                                                           "size": m["size"], "addr": hva}, ctx)
                self.slots[i] = dma.Memslot(i, m["ipa"], m["size"], hva)
            created = []
            for _ in range(a["vcpus"]):
                created.append((await self._call("kvm-create-vcpu", {"vm": vm, "aarch32": False}, ctx)).value)
            for vcpu in created:
                await self._give_vcpu(vcpu, ctx)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(ctx)
                if self.guest is not None and self.guest_status == "running":
                    await self.guest.stop()
            raise
        return {"vm": vm, "pid": self.pid, "vcpus": list(self.vcpus),
                "memory": [{"slot": s.slot, "ipa": s.ipa, "size": s.size, "hva": s.addr}
                           for s in self.slots.values()]}

    async def _give_vcpu(self, vcpu: dict, ctx: str | None) -> None:
        """Record a created vCPU and hand its token to the guest (starting the guest first)."""
        index = vcpu["index"]
        self.vcpus.append(index)
        async with self._guest_lock:
            if self.guest_status == "exited":
                raise VmmError(ESRCH, f"the guest is gone ({self.guest_detail})")
            if self.guest is None:
                self._reaped = trio.Event()
                try:
                    self.guest = await self.guests.start(self.name, self.serve_exits, self._on_guest_exit)
                except VmmError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a launcher failure is a reply, not a crash
                    log.exception("vmm:%s: starting the guest failed", self.name)
                    raise VmmError(EIO, f"cannot start the guest: {exc}") from exc
                self.guest_status = "running"
        await self._guest_call("vcpu-add", {"index": index, "token": vcpu["token"]}, ctx)

    async def _teardown(self, ctx: str | None) -> None:
        """Destroy the VM and unmap guest RAM; errors are logged, not raised."""
        vm, self.vm = self.vm, None
        ranges = list(dict.fromkeys(self.ram + [(s.addr, s.size) for s in self.slots.values()]))
        for addr, size in ranges:
            guestram.forget_range(self, addr, size)
        self.dirty_extra.clear()
        self.ram.clear()
        self.slots.clear()
        self.vcpus.clear()
        if self.hv is None:
            return
        calls = ([("kvm-destroy-vm", {"vm": vm})] if vm is not None else []) + \
            [("munmap", {"addr": addr, "size": size}) for addr, size in ranges]
        for op, args in calls:
            try:
                await self.hv.call(op, args, ctx=ctx)
            except (RemoteError, ConnectionClosed) as exc:
                log.info("vmm:%s: teardown %s failed: %s", self.name, op, exc)

    # ---- the guest -----------------------------------------------------------------
    async def _guest_call(self, op: str, args: dict, ctx: str | None) -> Reply:
        guest = self.guest
        if guest is None:
            raise VmmError(ESRCH, "the guest has not started")
        try:
            return await guest.client.call(op, args, ctx=ctx)
        except ConnectionClosed:
            with trio.move_on_after(10):
                await self._reaped.wait()
            raise VmmError(ESRCH, f"the guest is gone ({guest.detail or 'its channel closed'})") from None

    async def _on_guest_exit(self, guest: GuestHandle) -> None:
        """Supervision: the guest died (launcher callback)."""
        if guest is not self.guest:
            return
        if self.guest_status == "migrated":  # stopped on purpose: the VM runs elsewhere now
            self._reaped.set()
            return
        self.guest_status = "exited"
        self.guest_detail = guest.detail or ""
        try:
            if not self.closing:
                self.exits.append({"kind": "guest-exit", "detail": self.guest_detail})
                log.info("vmm:%s: guest %s; destroying the VM", self.name, self.guest_detail)
                await self._teardown(None)
        finally:
            self._reaped.set()

    async def _op_guest_op(self, a: dict, ctx: str | None) -> Reply:
        if self.guest_status == "exited":
            raise VmmError(ESRCH, f"the guest is gone ({self.guest_detail})")
        if self.guest is None or not self.vcpus:
            raise VmmError(ENODEV, "the VM has no vCPU yet")
        if a["vcpu"] not in self.vcpus:
            raise VmmError(ENODEV, f"no vCPU {a['vcpu']} (vCPUs: {self.vcpus})")
        return await self._guest_call("guest-op", a, ctx)

    async def _op_kill_guest(self, a: dict, ctx: str | None) -> dict:
        if self.guest is None or self.guest_status != "running":
            raise VmmError(ESRCH, "no guest is running")
        await self.guest.kill()
        await self._reaped.wait()
        return {"detail": self.guest_detail}

    # ---- VMM ops -------------------------------------------------------------------
    async def _op_vmm_op(self, a: dict, ctx: str | None) -> Any:
        op, args = a["op"], a["args"]
        if op in HOST_PROCESS_OPS:
            reply = await self._call(op, args, ctx)
            guestram.note_host_op(self, op, args, reply.value)
            return reply
        if op not in KVM_OPS:
            raise VmmError(ENOSYS, f"unknown VMM op {op!r}")
        v = validate_args(op, args, KVM_OPS)
        return await self.KVM_HANDLERS[op](self, v, ctx)

    async def _kvm_check_extension(self, a: dict, ctx: str | None) -> int:
        return (await self._call("kvm-check-extension", {"vm": self.vm, "cap": a["cap"]}, ctx)).value

    async def _kvm_enable_cap(self, a: dict, ctx: str | None) -> None:
        await self._call("kvm-enable-cap", {"vm": self._need_vm(), "cap": a["cap"], "flags": a["flags"],
                                            "args": list(a["args"])}, ctx)
        if a["cap"] == "arm-mte":
            self.mte = True
        elif a["cap"] == "manual-dirty-log-protect2":
            self.manual_protect = bool(a["args"] and a["args"][0] & 1)

    async def _kvm_create_vcpu(self, a: dict, ctx: str | None) -> int:
        vm = self._need_vm()
        vcpu = (await self._call("kvm-create-vcpu", {"vm": vm, "aarch32": a["aarch32"]}, ctx)).value
        await self._give_vcpu(vcpu, ctx)
        return vcpu["index"]

    async def _kvm_set_memory_region(self, a: dict, ctx: str | None) -> None:
        vm = self._need_vm()
        await self._call("kvm-set-memory-region", {"vm": vm, "slot": a["slot"], "ipa": a["ipa"], "size": a["size"],
                                                   "addr": a["addr"], "flags": list(a["flags"])}, ctx)
        if a["size"] == 0:
            self.slots.pop(a["slot"], None)
        else:
            self.slots[a["slot"]] = dma.Memslot(a["slot"], a["ipa"], a["size"], a["addr"], tuple(a["flags"]))

    async def _kvm_copy_tags(self, a: dict, ctx: str | None) -> dict:
        vm = self._need_vm()
        from_guest = a["direction"] == "from-guest"
        flags = a["flags"] if a["flags"] is not None else int(from_guest)
        ipa, length, tags = a["ipa"], a["length"], a["tags"]

        def buffer(lo: int, hi: int) -> bytes:
            """Granules [lo, hi) of the to-guest buffer (one int: made on demand, never whole)."""
            if isinstance(tags, int):
                return bytes([tags]) * (min(hi, length // MTE_GRANULE_SIZE) - lo)
            return (tags or b"")[lo:hi]

        base = {"vm": vm, "flags": flags, "reserved": list(a["reserved"])}
        chunked = (flags in (0, 1) and a["reserved"] == (0, 0) and 0 < length <= INT_MAX
                   and not (ipa | length) % PAGE_SIZE)
        if not chunked:  # the kernel refuses it (or it is empty): one call, so its errno is the answer
            r = (await self._call("kvm-copy-tags", {**base, "guest_ipa": ipa, "length": length,
                                                    "tags": buffer(0, MAX_IO)}, ctx)).value
            return self._copy_result(from_guest, r["length"], [r.get("tags") or b""])
        done, dumped = 0, []
        while done < length:
            n = min(self.copy_chunk, length - done)
            buf = buffer(done // MTE_GRANULE_SIZE, (done + n) // MTE_GRANULE_SIZE) if flags == 0 else b""
            try:
                r = (await self._call("kvm-copy-tags", {**base, "guest_ipa": ipa + done, "length": n,
                                                        "tags": buf}, ctx)).value
            except RemoteError:
                if done == 0:
                    raise
                break  # partial success wins over a later chunk's error, as in the kernel
            got = r["length"]
            dumped.append(bytes(r.get("tags") or b"")[:got // MTE_GRANULE_SIZE])
            done += got
            if got < n:
                break
        return self._copy_result(from_guest, done, dumped)

    @staticmethod
    def _copy_result(from_guest: bool, length: int, dumped: list[bytes]) -> dict:
        if from_guest:
            return {"length": length, "tags": list(b"".join(dumped)[:length // MTE_GRANULE_SIZE])}
        return {"length": length}

    async def _kvm_dirty_log(self, a: dict, ctx: str | None) -> Any:
        vm, n, action = self._need_vm(), a["slot"], a["action"]
        if action == "get":
            pages = list((await self._call("kvm-get-dirty-log", {"vm": vm, "slot": n}, ctx)).value)
            extra = self.dirty_extra.get(n)
            return sorted(extra.union(pages)) if extra else pages
        if action == "clear":
            done = (await self._call("kvm-clear-dirty-log", {"vm": vm, "slot": n, "first": a["first"],
                                                             "num": a["count"]}, ctx)).value
            extra = self.dirty_extra.get(n)
            if extra:
                end = None if a["count"] is None else a["first"] + a["count"]
                extra.difference_update([p for p in extra if p >= a["first"] and (end is None or p < end)])
            return done
        slot = self.slots.get(n)
        if slot is None:
            raise VmmError(EINVAL, f"dirty-log {action}: no memslot {n}")
        flags = tuple(f for f in slot.flags if f != "log-dirty-pages")
        self.dirty_extra.pop(n, None)
        if action == "enable":
            flags += ("log-dirty-pages",)
        await self._call("kvm-set-memory-region", {"vm": vm, "slot": n, "ipa": slot.ipa, "size": slot.size,
                                                   "addr": slot.addr, "flags": list(flags)}, ctx)
        slot.flags = flags
        return None

    async def _kvm_dma_write(self, a: dict, ctx: str | None) -> Reply:
        if a["data"] is None and (a["fill"] is None or a["size"] is None):
            raise VmmError(EINVAL, "dma-write: give data, or fill and size")
        fault = await dma.write_guest(self._hv, self.slots.values(), a["ipa"], a["data"],
                                      fill=a["fill"] or 0, size=a["size"] or 0, ctx=ctx)
        self._mark_dirty(a["ipa"], len(a["data"]) if a["data"] is not None else a["size"] or 0)
        return Reply(None, fault)

    async def _kvm_dma_read(self, a: dict, ctx: str | None) -> Reply:
        data, fault = await dma.read_guest(self._hv, self.slots.values(), a["ipa"], a["size"], ctx=ctx)
        return Reply(data, fault)

    async def _kvm_migrate(self, a: dict, ctx: str | None) -> None:
        raise VmmError(EINVAL, "migrate: a VMM cannot migrate on its own; the orchestrator (mtekvm) starts the "
                               "destination VMM and sends migrate-incoming/migrate-out")

    async def _kvm_snapshot(self, a: dict, ctx: str | None) -> Any:
        self._check_moved()
        snapshot = importlib.import_module("vmm.snapshot")  # written apart from the machine; imported when used
        return await snapshot.snapshot(self, a, ctx)

    async def _kvm_restore(self, a: dict, ctx: str | None) -> Any:
        self._check_moved()
        snapshot = importlib.import_module("vmm.snapshot")  # written apart from the machine; imported when used
        return await snapshot.restore(self, a, ctx)

    async def _device_fill(self, ipa: int, length: int, byte: int, ctx: str | None) -> dict | None:
        fault = await dma.write_guest(self._hv, self.slots.values(), ipa, None, fill=byte, size=length, ctx=ctx)
        self._mark_dirty(ipa, length)
        return fault

    def _mark_dirty(self, ipa: int, size: int) -> None:
        """During a migration, remember the pages the VMM wrote itself (KVM's log sees only guest writes)."""
        if self.mig_dirty is None or size <= 0:
            return
        for s in self.slots.values():
            lo, hi = max(ipa, s.ipa), min(ipa + size, s.ipa + s.size)
            if lo < hi:
                self.mig_dirty.setdefault(s.slot, set()).update(
                    range((lo - s.ipa) // PAGE_SIZE, (hi - 1 - s.ipa) // PAGE_SIZE + 1))

    # ---- migration -----------------------------------------------------------------
    async def _op_migrate_incoming(self, a: dict, ctx: str | None) -> dict:
        return await migration.Destination(self, a, ctx).start()

    async def _op_migrate_out(self, a: dict, ctx: str | None) -> dict:
        return await migration.Source(self, a, ctx).run()

    async def kill_self(self) -> None:
        """Fault injection: SIGKILL this VMM (the ``die`` it was given)."""
        if self.die is None:
            raise VmmError(EOPNOTSUPP, "this VMM cannot kill itself (no die callable)")
        await self.die()

    async def stop_guest_after_migration(self) -> None:
        """The VM runs on another host: stop this host's guest without recording it as a death."""
        guest = self.guest
        if guest is None or self.guest_status != "running":
            return
        self.guest_status = "migrated"
        self.guest_detail = f"migrated to host {self.moved_to}"
        await guest.stop()

    # ---- exits, status, shutdown ---------------------------------------------------
    async def _handle_exit(self, op: str, a: dict, ctx: str | None) -> Any:
        if op == "exit-error":
            self.exits.append({"kind": "error", "vcpu": a["vcpu"], "errno": errno_name(a["errno"]),
                               "message": a["message"]})
            return None
        rec = {"kind": "mmio", "vcpu": a["vcpu"], "ipa": a["ipa"], "size": a["size"], "write": a["write"]}
        if a["write"]:
            rec["data"] = a["data"].hex()
        self.exits.append(rec)
        try:
            value = await self.device.access(a["ipa"], a["size"], a["write"], a["data"], ctx)
        except (VmmError, RemoteError) as exc:
            rec["error"] = f"{exc.name}: {exc.message}"
            raise
        except ConnectionClosed as exc:
            rec["error"] = "EIO: lost the hypervisor connection"
            raise VmmError(EIO, f"lost the hypervisor connection: {exc}") from None
        if value is not None:
            rec["data"] = value.hex()
        return value

    async def _op_ipa_to_hva(self, a: dict, ctx: str | None) -> dict:
        (hva, _), = dma.translate(self.slots.values(), a["ipa"], 1)
        return {"pid": self.pid, "hva": hva}

    async def _op_status(self, a: dict, ctx: str | None) -> dict:
        return {"pid": self.pid, "vm": self.vm,
                "guest": {"state": self.guest_status, "detail": self.guest_detail},
                "exits": list(self.exits)}

    async def _op_shutdown(self, a: dict, ctx: str | None) -> None:
        await self.shutdown(ctx)

    #: VMM_CONTROL op -> its handler (a test checks that every op of the table has one)
    CONTROL_HANDLERS: dict[str, Callable[..., Awaitable[Any]]] = {
        "vm-create": _op_vm_create, "vm-setup": _op_vm_setup, "vmm-op": _op_vmm_op, "guest-op": _op_guest_op,
        "ipa-to-hva": _op_ipa_to_hva, "status": _op_status, "kill-guest": _op_kill_guest, "shutdown": _op_shutdown,
        "migrate-incoming": _op_migrate_incoming, "migrate-out": _op_migrate_out,
    }
    #: KVM_OPS op (a ``vmm-op``) -> its handler
    KVM_HANDLERS: dict[str, Callable[..., Awaitable[Any]]] = {
        "check-extension": _kvm_check_extension, "enable-cap": _kvm_enable_cap, "create-vcpu": _kvm_create_vcpu,
        "set-memory-region": _kvm_set_memory_region, "copy-tags": _kvm_copy_tags, "dirty-log": _kvm_dirty_log,
        "dma-write": _kvm_dma_write, "dma-read": _kvm_dma_read,
        "migrate": _kvm_migrate, "snapshot": _kvm_snapshot, "restore": _kvm_restore,
    }

    async def shutdown(self, ctx: str | None = None) -> None:
        """Destroy the VM, stop the guest, close the hypervisor connection; sets :attr:`done`."""
        if self.closing:
            await self.done.wait()
            return
        self.closing = True
        if self._pause_gate is not None:  # ops waiting at a pause learn that the VMM is gone (ENODEV)
            gate, self._pause_gate, self._pauses = self._pause_gate, None, 0
            gate.set()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(15):
                if self.hv is not None and self.vm is not None:
                    try:
                        await self.hv.call("kvm-destroy-vm", {"vm": self.vm}, ctx=ctx)
                    except (RemoteError, ConnectionClosed) as exc:
                        log.info("vmm:%s: kvm-destroy-vm at shutdown: %s", self.name, exc)
                    self.vm = None
                if self.guest is not None and self.guest_status == "running":
                    await self.guest.stop()
            if self.hv is not None:
                try:
                    await self.hv.aclose()
                except Exception:  # noqa: BLE001 - already broken
                    pass
        self.done.set()
