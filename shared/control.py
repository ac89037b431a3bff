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

Each link is a :class:`shared.wire.Client` over a stream, one direction per
stream; the guest process gets its two streams as inherited socket pairs.

Errors: as in :mod:`shared.abi` (ENOSYS unknown op, EINVAL bad argument), plus
ESRCH for a guest op when the guest is gone and ENODEV when the VM does not
exist yet.
"""

from __future__ import annotations

from shared.abi import BACKINGS, MAX_IO, F, OpDef, _bool, _bytes, _enum, _opt, _str, _u64


def _memory(v):
    if not isinstance(v, list) or len(v) > 512:
        raise ValueError("must be a list of at most 512 memslots")
    out = []
    for m in v:
        if not isinstance(m, dict):
            raise ValueError("each memslot must be a map")
        extra = set(m) - {"ipa", "size", "backing", "object", "prot_mte"}
        if extra:
            raise ValueError(f"memslot has unknown key {sorted(extra)[0]!r}")
        out.append({
            "ipa": _u64(m.get("ipa")), "size": _u64(m.get("size")),
            "backing": _enum(*BACKINGS)(m.get("backing", "anon")),
            "object": _opt(_str)(m.get("object")), "prot_mte": _bool(m.get("prot_mte", False)),
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

__all__ = ["VMM_CONTROL", "GUEST_CHANNEL", "EXIT_CHANNEL", "MAX_IO"]
