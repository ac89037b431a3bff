"""The VMM's control channels: orchestrator -> VMM, VMM -> guest, guest -> VMM.

The hypervisor's ABI (:mod:`shared.abi`) is what a VMM and a guest say to the
host kernel. This module defines, the same way and with the same
:func:`shared.abi.validate_args`, what the other links of a VM carry:

* :data:`VMM_CONTROL` (``python -m vmm`` serves it; the scenario runner and
  tests call it): set a VM up, run a VMM op or a guest op, translate an IPA to
  the VMM's address, report status, shut down. A VMM op or guest op replies as
  the op itself would: the value, a modelled ``fault`` (a tag check) beside
  it, or an errno error.
* :data:`GUEST_CHANNEL` (the guest agent serves it; the VMM calls it): hand
  the guest a vCPU token, run one guest op on one vCPU.
* :data:`EXIT_CHANNEL` (the VMM serves it; the guest calls it): what comes back
  from KVM_RUN to the VMM's vCPU thread: an MMIO exit to emulate, or an error.
* :data:`KVM_OPS` and :data:`GUEST_OPS`: the arguments of the scenario's VMM and
  guest ops inside ``vmm-op`` and ``guest-op`` (the VMM and the guest validate
  them with these tables).

Each link is a :class:`shared.wire.Client` over a stream, one direction per
stream; the guest process gets its two streams as inherited socket pairs.

Errors: as in :mod:`shared.abi` (ENOSYS unknown op, EINVAL bad argument), plus
ESRCH for a guest op when the guest is gone and ENODEV when the VM does not
exist yet.
"""

from __future__ import annotations

from shared.abi import (BACKINGS, MAX_IO, OPS, SEG_ATTRS, F, OpDef, _bool, _bytes, _enum, _hugepage_size,
                        _memslot_flags, _opt, _size, _str, _u64, _u64_pair, _u64list)
from shared.mte import TCF_MODES


def _memory(v):
    if not isinstance(v, list) or len(v) > 512:
        raise ValueError("must be a list of at most 512 memslots")
    out = []
    for m in v:
        if not isinstance(m, dict):
            raise ValueError("each memslot must be a map")
        extra = set(m) - {"ipa", "size", "backing", "object", "prot_mte", "hugepage_size"}
        if extra:
            raise ValueError(f"memslot has unknown key {min(map(repr, extra))[:40]}")
        out.append({
            "ipa": _u64(m.get("ipa")), "size": _u64(m.get("size")),
            "backing": _enum(*BACKINGS)(m.get("backing", "anon")),
            "object": _opt(_str)(m.get("object")), "prot_mte": _bool(m.get("prot_mte", False)),
            "hugepage_size": _hugepage_size(m.get("hugepage_size", 2 << 20)),
        })
    return out


def _args(v):
    if not isinstance(v, dict):
        raise ValueError("must be a map")
    return v


_VMM_CONTROL = [
    OpDef("vm-create", "any", (F("name", _str), F("ipa_bits", _u64, 40)),
          "KVM_CREATE_VM only: the scenario builds the rest with VMM ops (setup = \"manual\")."),
    OpDef("vm-setup", "any", (
        F("name", _str), F("ipa_bits", _u64, 40), F("mte", _bool, True), F("vcpus", _u64, 1),
        F("memory", _memory, ()),
    ), "Build the whole VM as a VMM would at start: create, enable the cap, map RAM, memslots, vCPUs, guest."),
    OpDef("vmm-op", "any", (F("op", _str), F("args", _args, {})),
          "Run one VMM op of the scenario contract (its own address space, or a KVM ioctl)."),
    OpDef("guest-op", "any", (F("vcpu", _u64, 0), F("op", _str), F("args", _args, {})),
          "Run one guest op on a vCPU (ENODEV until the VM has a vCPU, ESRCH once the guest died)."),
    OpDef("ipa-to-hva", "any", (F("ipa", _u64),), "The VMM's pid and the address it maps ``ipa`` at."),
    OpDef("status", "any", (), "{pid, vm, guest: {state, detail}, exits: [...]}."),
    OpDef("kill-guest", "any", (), "SIGKILL the guest process (supervision tests)."),
    OpDef("shutdown", "any", (), "Tear the VM down and exit."),
]

_GUEST_CHANNEL = [
    OpDef("vcpu-add", "any", (F("index", _u64), F("token", _str)), "Run this vCPU from now on."),
    OpDef("guest-op", "any", (F("vcpu", _u64, 0), F("op", _str), F("args", _args, {})),
          "One guest op of the scenario contract on one vCPU."),
]

_EXIT_CHANNEL = [
    OpDef("exit-mmio", "any", (
        F("vcpu", _u64), F("ipa", _u64), F("size", _u64), F("write", _bool),
        F("data", _bytes, b""),
    ), "KVM_EXIT_MMIO: emulate the access; a read returns the bytes."),
    OpDef("exit-error", "any", (F("vcpu", _u64), F("errno", _u64), F("message", _str, "")),
          "KVM_RUN failed (EFAULT from user_mem_abort ...): the VMM records it."),
]

VMM_CONTROL: dict[str, OpDef] = {d.name: d for d in _VMM_CONTROL}
GUEST_CHANNEL: dict[str, OpDef] = {d.name: d for d in _GUEST_CHANNEL}
EXIT_CHANNEL: dict[str, OpDef] = {d.name: d for d in _EXIT_CHANNEL}



# ---- the arguments of the scenario's VMM and guest ops, as the runner sends them ----------

def _tag_buffer(v):
    """A to-guest tag buffer: a list of byte values, or one int for every granule."""
    if isinstance(v, bool):
        raise ValueError("must be a list of tags or one tag")
    if isinstance(v, int):
        if not 0 <= v <= 255:
            raise ValueError("must be a tag (0..255, the low nibble is used)")
        return v
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 255 for t in v):
        return bytes(v)
    raise ValueError("must be a list of tags (0..255) or one tag")


def _data(v):
    """DMA data: bytes, or a string of hex digits."""
    if isinstance(v, str):
        try:
            v = bytes.fromhex(v)
        except ValueError:
            raise ValueError("must be bytes or hex digits") from None
    if not isinstance(v, (bytes, bytearray)):
        raise ValueError("must be bytes or hex digits")
    if len(v) > MAX_IO:
        raise OverflowError(f"{len(v)} bytes is more than the {MAX_IO} a request may carry")
    return bytes(v)


def _byte(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
        raise ValueError("must be a byte 0..255")
    return v


#: The KVM and device ops of a ``vmm:VM`` actor, with their arguments in the scenario's form.
KVM_OPS: dict[str, OpDef] = {d.name: d for d in [
    OpDef("check-extension", "any", (F("cap", _str),), "KVM_CHECK_EXTENSION."),
    OpDef("enable-cap", "any", (F("cap", _str), F("flags", _u64, 0), F("args", _u64list, (0,))),
          "KVM_ENABLE_CAP (args: cap->args; manual-dirty-log-protect2 reads args[0])."),
    OpDef("create-vcpu", "any", (F("aarch32", _bool, False),), "KVM_CREATE_VCPU; returns the index."),
    OpDef("set-memory-region", "any", (
        F("slot", _u64), F("ipa", _u64), F("size", _u64), F("addr", _u64), F("flags", _memslot_flags, ()),
    ), "KVM_SET_USER_MEMORY_REGION."),
    OpDef("copy-tags", "any", (
        F("ipa", _u64), F("length", _u64), F("direction", _enum("from-guest", "to-guest")),
        F("tags", _opt(_tag_buffer), None), F("flags", _opt(_u64), None), F("reserved", _u64_pair, (0, 0)),
    ), "KVM_ARM_MTE_COPY_TAGS."),
    OpDef("dirty-log", "any", (
        F("slot", _u64), F("action", _enum("enable", "disable", "get", "clear")),
        F("first", _u64, 0, "clear: first page"), F("count", _opt(_u64), None, "clear: pages (default: to the end)"),
    ), "Dirty logging of one memslot."),
    OpDef("dma-write", "any", (
        F("ipa", _u64), F("data", _opt(_data), None), F("fill", _opt(_byte), None), F("size", _opt(_size), None),
    ), "Device DMA write through the VMM's mapping."),
    OpDef("dma-read", "any", (F("ipa", _u64), F("size", _size)), "Device DMA read through the VMM's mapping."),
]}


def _mask16(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise ValueError("must be a 16-bit mask")
    return v


def _process_op(name: str) -> OpDef:
    """A guest op with the same arguments as the host-process op of that name."""
    return OpDef(name, "any", OPS[name].fields, OPS[name].doc)


#: The guest ops of SCENARIOS.md and their arguments, as the runner normalises them.
GUEST_OPS: dict[str, OpDef] = {d.name: d for d in [
    OpDef("enable-mte", "any", (F("tcf", _enum(*TCF_MODES)), F("include", _mask16, 0xFFFF)),
          "SCTLR_EL1.ATA=1, SCTLR_EL1.TCF, GCR_EL1.Exclude = ~include."),
    OpDef("map", "any", (F("va", _u64), F("ipa", _u64), F("size", _u64), F("attr", _enum(*SEG_ATTRS))),
          "Map a VA range to an IPA range at stage 1."),
    *(_process_op(n) for n in ("store", "load", "stg", "ldg", "irg", "tco")),
    OpDef("read-tfsr", "any", (), "TFSR_EL1 as an integer."),
    OpDef("clear-tfsr", "any", (), "Clear TFSR_EL1."),
]}
