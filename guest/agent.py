"""The guest agent: the guest kernel of one VM, running its vCPUs' scripted work.

The VMM talks to the agent over :data:`shared.control.GUEST_CHANNEL`: it hands
over vCPUs (``vcpu-add``: attach to the hypervisor with the token
``kvm-create-vcpu`` gave out) and runs guest ops of docs/scenarios.md on them
(``guest-op``). The agent plays the guest kernel: it owns stage 1 and each
vCPU's MTE registers (:mod:`guest.cpu`), and turns every memory op into ONE
``vcpu-access`` request to the hypervisor (where tags live and are checked).

What comes back from an access:

* a value: the access retired;
* a ``fault`` beside it: a tag check. Synchronous: the access did not happen;
  the guest takes a data abort with DFSC 0x11 and FAR_EL1 = the faulting
  address. Asynchronous: it happened, and TFSR_EL1 records the fault;
* an MMIO exit (the value is ``{"exit": "mmio", ...}``): the access left
  KVM_RUN; the agent hands it to the VMM (``exit-mmio`` on
  :data:`shared.control.EXIT_CHANNEL`) and completes it with the VMM's data;
* an errno (``RemoteError``): KVM_RUN failed; the VMM learns it
  (``exit-error``) and the op fails with that errno.

Every hypervisor and exit-channel call made for a request carries the
request's ``ctx``: the hypervisor's scheduler names kernel contexts by it.

Errors (:class:`GuestError`, or the :class:`shared.wire.RemoteError` of a
failed call, both carrying ``errno``): ENODEV unknown vCPU, ENOSYS unknown op,
EINVAL bad arguments, EEXIST a vCPU index added twice, EOPNOTSUPP enable-mte
without MTE, EFAULT an unaligned STG, EIO the hypervisor connection is gone.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from guest import cpu as cpu_state
from guest.cpu import VcpuRegs
from guest.stage1 import Stage1, Stage1Error
from shared import wire
from shared.abi import ACCESS_KINDS, OPS, AbiError, bind, ops_of, validate_args
from shared.control import GUEST_CHANNEL, GUEST_OPS
from shared.errno import EEXIST, EFAULT, EINVAL, EIO, ENODEV, EOPNOTSUPP, ErrnoError
from shared.mte import MTE_GRANULE_SIZE, pointer_tag, untagged_addr
from shared.rpc import serve_requests

log = logging.getLogger("mtekvm.guest")

#: ESR_ELx.DFSC of a synchronous tag check fault.
DFSC_TAG_CHECK = 0x11


def _irg(cpu: VcpuRegs, a: dict) -> int:
    return cpu.irg()


def _tco(cpu: VcpuRegs, a: dict) -> None:
    cpu.tco = a["on"]


#: The host-process instructions a guest runs on its registers alone (no memory access).
_REGISTER_OPS = bind({n: d for n, d in ops_of(OPS, "guest").items() if n not in ACCESS_KINDS}, irg=_irg, tco=_tco)


class GuestError(ErrnoError):
    """A guest op the guest kernel refuses or cannot complete (``errno``, ``message``)."""




class GuestAgent:
    """The guest kernel of one VM.

    Args:
        hv: a connection to the hypervisor, already introduced with hello
            role ``vcpu`` (the guest's vCPU connection).
        exits: a connection to the VMM's :data:`shared.control.EXIT_CHANNEL`.
    """

    def __init__(self, hv: wire.Client, exits: wire.Client):
        self.hv = hv
        self.exits = exits
        self.stage1 = Stage1()
        self.vcpus: dict[int, VcpuRegs] = {}

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve :data:`shared.control.GUEST_CHANNEL` on ``stream`` until the VMM closes it."""
        await serve_requests(stream, GUEST_CHANNEL, self.handle, name="guest")

    async def handle(self, op: str, args: dict, ctx: str | None) -> Any:
        """Run one validated GUEST_CHANNEL request (the handler for :func:`shared.rpc.serve_requests`).

        Args:
            op: ``vcpu-add`` or ``guest-op``.
            args: its arguments, validated against GUEST_CHANNEL.
            ctx: the request's kernel context name, passed on to every call made for it.

        Returns:
            The op's value, or a :class:`shared.wire.Reply` carrying a fault.

        Raises:
            GuestError, shared.wire.RemoteError: the op failed with an errno.
        """
        if op == "vcpu-add":
            return await self.add_vcpu(args["index"], args["token"], ctx)
        if op == "vcpu-state-get":
            return self.get_state()
        if op == "vcpu-state-set":
            return self.set_state(args["vcpus"], args["stage1"])
        return await self.run_op(args["vcpu"], args["op"], args["args"], ctx)

    async def add_vcpu(self, index: int, token: str, ctx: str | None = None) -> dict:
        """Attach to the vCPU ``token`` names and boot it (MAIR from ID_AA64PFR1_EL1.MTE).

        Returns:
            ``{"index", "vcpu", "vm", "mte"}``.

        Raises:
            GuestError: EEXIST if ``index`` already runs here.
            shared.wire.RemoteError: the hypervisor refused the token.
        """
        if index in self.vcpus:
            raise GuestError(EEXIST, f"vcpu-add: vCPU {index} is already running in this guest")
        reply = await self._hv_call("vcpu-attach", {"token": token}, ctx)
        v = reply.value if isinstance(reply.value, dict) else {}
        regs = VcpuRegs(index=index, token=token, mte=int(v.get("mte") or 0),
                        vcpu=v.get("vcpu", index), vm=v.get("vm"))
        self.vcpus[index] = regs
        log.info("vCPU %d attached (hypervisor vcpu %s, vm %s, MTE %d)", index, regs.vcpu, regs.vm, regs.mte)
        return {"index": index, "vcpu": regs.vcpu, "vm": regs.vm, "mte": regs.mte}

    def get_state(self) -> dict:
        """Every vCPU's registers and stage 1, msgpack-safe (the guest half of a migration or snapshot).

        Returns:
            ``{"vcpus": {str(index): state}, "stage1": [[va, size, ipa, attr], ...]}``
            (state as :func:`guest.cpu.get_state`).
        """
        return {"vcpus": {str(i): cpu_state.get_state(r) for i, r in sorted(self.vcpus.items())},
                "stage1": self.stage1.export()}

    def set_state(self, vcpus: dict, stage1: list) -> None:
        """Install a :meth:`get_state` result; the vCPUs must already be added. All or nothing.

        Raises:
            GuestError: EINVAL for a malformed state, ENODEV for a vCPU this guest does not run
                (or one it runs that the state lacks).
        """
        if not isinstance(vcpus, dict):
            raise GuestError(EINVAL, "vcpu-state-set: vcpus must be a map of index -> state")
        checked = {}
        for key, state in vcpus.items():
            if not isinstance(key, str) or not key.isdigit() or str(int(key)) != key:
                raise GuestError(EINVAL, f"vcpu-state-set: vCPU key {str(key)[:20]!r} is not an index")
            if int(key) not in self.vcpus:
                raise GuestError(ENODEV, f"vcpu-state-set: no vCPU {key} in this guest (vcpu-add it first)")
            try:
                checked[int(key)] = cpu_state.check_state(state)
            except ValueError as exc:
                raise GuestError(EINVAL, f"vcpu-state-set: vCPU {key}: {exc}") from None
        if set(checked) != set(self.vcpus):
            raise GuestError(ENODEV, f"vcpu-state-set: the state has vCPUs {sorted(checked)}, "
                                     f"this guest runs {sorted(self.vcpus)}")
        try:
            stage1_new = Stage1.from_export(stage1)
        except Stage1Error as exc:
            raise GuestError(exc.errno, f"vcpu-state-set: {exc.message}") from None
        for index, state in checked.items():
            cpu_state.set_state(self.vcpus[index], state)
        self.stage1 = stage1_new

    async def run_op(self, index: int, op: str, args: dict, ctx: str | None = None) -> Any:
        """Run one guest op of docs/scenarios.md on vCPU ``index``.

        Returns:
            The op's value, or a :class:`shared.wire.Reply` whose ``fault`` is a tag check.

        Raises:
            GuestError: ENODEV unknown vCPU, ENOSYS unknown op, EINVAL bad
                arguments, or the op's own errno.
            shared.wire.RemoteError: the hypervisor or the VMM failed the access.
        """
        cpu = self.vcpus.get(index)
        if cpu is None:
            raise GuestError(ENODEV, f"{op}: no vCPU {index} in this guest (vcpu-add it first)")
        try:
            a = validate_args(op, args, GUEST_OPS)
        except AbiError as exc:
            raise GuestError(exc.errno, exc.message) from None
        if op == "enable-mte":
            if not cpu.has_mte:
                raise GuestError(EOPNOTSUPP, "ID_AA64PFR1_EL1.MTE is 0: the VMM did not enable KVM_CAP_ARM_MTE")
            cpu.enable_mte(a["tcf"], a["include"])
            return None
        if op == "map":
            try:
                self.stage1.map(a["va"], a["ipa"], a["size"], a["attr"])
            except Stage1Error as exc:
                raise GuestError(exc.errno, exc.message) from None
            return None
        if op in _REGISTER_OPS:
            return _REGISTER_OPS[op](cpu, a)
        if op == "read-tfsr":
            return cpu.tfsr
        if op == "clear-tfsr":
            cpu.tfsr = 0
            return None
        return await self._memory_op(cpu, op, a, ctx)

    async def _memory_op(self, cpu: VcpuRegs, op: str, a: dict, ctx: str | None) -> Any:
        """load/store/stg/ldg: stage 1, then one ``vcpu-access``."""
        va = untagged_addr(a["addr"])
        tag = a.get("tag") or pointer_tag(a["addr"])
        data = b""
        if op == "store":
            data = a["data"]
            size = len(data)
        elif op == "stg":
            size = a["size"]
            if va % MTE_GRANULE_SIZE:
                raise GuestError(EFAULT, f"alignment fault: STG at {va:#x} is not 16-byte aligned")
            if size % MTE_GRANULE_SIZE:
                raise GuestError(EINVAL, f"stg: size {size} is not a multiple of the 16-byte granule")
        elif op == "ldg":
            end = va + a["size"]
            va -= va % MTE_GRANULE_SIZE
            end += -end % MTE_GRANULE_SIZE
            size = end - va if a["size"] else 0
        else:
            size = a["size"]
        if size == 0:
            return {"load": b"", "ldg": []}.get(op)
        try:
            segs = self.stage1.translate(va, size)
        except Stage1Error as exc:
            raise GuestError(exc.errno, exc.message) from None
        segs = [[ipa, n, cpu.memory_type(attr)] for ipa, n, attr in segs]
        req = {"vcpu": cpu.vcpu, "kind": op, "segs": segs, "tag": tag, "data": data,
               "check": cpu.effective_check(), "ata": cpu.sctlr_ata}
        try:
            reply = await self._hv_call("vcpu-access", req, ctx)
        except wire.RemoteError as exc:
            await self._report_error(cpu, exc, ctx)
            raise
        value = reply.value
        if isinstance(value, dict) and value.get("exit") == "mmio":
            return await self._mmio(cpu, op, value, ctx)
        if reply.fault is not None:
            return self._tag_fault(cpu, va, value, reply.fault)
        if op == "ldg":
            return list(value)
        return value if op == "load" else None

    def _tag_fault(self, cpu: VcpuRegs, va: int, value: Any, fault: dict) -> wire.Reply:
        """The guest's view of a tag check fault the hypervisor reported at ``va + offset``."""
        addr = va + int(fault.get("offset", 0))
        kind = fault.get("kind")
        out = {"kind": kind, "addr": addr, "pointer_tag": fault.get("pointer_tag"),
               "memory_tag": fault.get("memory_tag")}
        if kind == "tag-check-fault":  # data abort: DFSC tag check, FAR_EL1 = addr; nothing written
            out["esr_dfsc"] = DFSC_TAG_CHECK
            return wire.Reply(None, out)
        if kind == "async-tag-check-fault":
            cpu.record_async_fault(addr)
            return wire.Reply(value, out)
        if kind == "livelock":  # KVM replayed the stage-2 fault fault-replay-limit times (Linux spins for ever)
            return wire.Reply(None, {"kind": kind, "addr": addr})
        raise GuestError(EIO, f"the hypervisor reported an unknown fault kind {kind!r}")

    async def _mmio(self, cpu: VcpuRegs, op: str, ex: dict, ctx: str | None) -> Any:
        """KVM_EXIT_MMIO: the VMM emulates the access; a load returns its bytes."""
        args = {"vcpu": cpu.index, "ipa": ex.get("ipa"), "size": ex.get("size"),
                "write": bool(ex.get("write")), "data": ex.get("data") or b""}
        try:
            reply = await self.exits.call("exit-mmio", args, ctx=ctx)
        except wire.ConnectionClosed as exc:
            raise GuestError(EIO, f"exit-mmio: the VMM's exit channel is gone: {exc}") from None
        if op == "load":
            return bytes(reply.value or b"")
        if op == "ldg":
            return list(reply.value or b"")
        return None

    async def _report_error(self, cpu: VcpuRegs, exc: wire.RemoteError, ctx: str | None) -> None:
        """Tell the VMM KVM_RUN failed (``exit-error``); a failure to tell it is only logged."""
        try:
            await self.exits.call("exit-error", {"vcpu": cpu.index, "errno": exc.errno,
                                                 "message": exc.message[:256]}, ctx=ctx)
        except (wire.RemoteError, wire.WireError) as err:
            log.info("exit-error for vCPU %d not delivered: %s", cpu.index, err)

    async def _hv_call(self, op: str, args: dict, ctx: str | None) -> wire.Reply:
        """One hypervisor call; a lost connection becomes EIO.

        Raises:
            shared.wire.RemoteError: the hypervisor replied with an errno.
            GuestError: EIO when the connection has gone.
        """
        try:
            return await self.hv.call(op, args, ctx=ctx)
        except wire.ConnectionClosed as exc:
            raise GuestError(EIO, f"{op}: the hypervisor connection is gone: {exc}") from None
