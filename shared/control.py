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

import attrs

from shared.abi import (
    ACCESS_KINDS,
    ADDR,
    BACKINGS,
    BOOL,
    BYTES,
    IO_SIZE,
    MAP,
    MASK16,
    MAX_IO,
    MEMSLOT_FLAGS,
    NAME,
    OPS,
    SEG_ATTRS,
    SIZE,
    STRLIST,
    U64,
    U64_PAIR,
    U64LIST,
    F,
    Kind,
    OpDef,
    _bool,
    _enum,
    _hugepage_size,
    _opt,
    _str,
    _u64,
    enum,
    flags,
    known_name,
    ops_of,
    opt,
)
from shared.mte import TCF_MODES
from shared.physmem import REGION_ATTRS


def _memory(v):
    if not isinstance(v, list) or len(v) > 512:
        raise ValueError("must be a list of at most 512 memslots")
    out = []
    for m in v:
        if not isinstance(m, dict):
            raise ValueError("each memslot must be a map")
        extra = set(m) - {"ipa", "size", "backing", "object", "prot_mte", "hugepage_size", "node", "region", "attr"}
        if extra:
            raise ValueError(f"memslot has unknown key {min(map(repr, extra))[:40]}")
        out.append({
            "ipa": _u64(m.get("ipa")), "size": _u64(m.get("size")),
            "backing": _enum(*BACKINGS)(m.get("backing", "anon")),
            "object": _opt(_str)(m.get("object")), "prot_mte": _bool(m.get("prot_mte", False)),
            "hugepage_size": _hugepage_size(m.get("hugepage_size", 2 << 20)),
            # the physical-memory contract: a node binding, a device region, an unnamed pfnmap's attr
            "node": _opt(_str)(m.get("node")), "region": _opt(_str)(m.get("region")),
            "attr": _opt(_enum(*REGION_ATTRS))(m.get("attr")),
        })
    return out


MEMORY = Kind("list", _memory)


def _state_list(v):
    """A list (checked item by item by its user: the guest's stage 1 extents)."""
    if not isinstance(v, (list, tuple)):
        raise ValueError("must be a list")
    return list(v)


STATE_LIST = Kind("list", _state_list)

#: What ``migrate``'s ``fail`` may break (docs/scenarios.md, "Fault injection").
MIGRATION_FAILS = ("kill-destination", "kill-source", "cut")


def _fail_at(v):
    """``precopy:N`` (N >= 1), ``switchover`` or ``after-resume``."""
    if isinstance(v, str):
        if v in ("switchover", "after-resume"):
            return v
        head, _, n = v.partition(":")
        if head == "precopy" and n.isdigit() and int(n) >= 1 and n == str(int(n)):
            return v
    raise ValueError('must be "precopy:N" (N >= 1), "switchover" or "after-resume"')


FAIL_AT = Kind("name", _fail_at)


_VMM_CONTROL = [
    OpDef("vm-create", "any", (F("name", NAME), F("ipa_bits", U64, 40)),
          "KVM_CREATE_VM only: the scenario builds the rest with VMM ops (setup = \"manual\")."),
    OpDef("vm-setup", "any", (
        F("name", NAME), F("ipa_bits", U64, 40), F("mte", BOOL, True), F("vcpus", U64, 1),
        F("memory", MEMORY, ()),
    ), "Build the whole VM as a VMM would at start: create, enable the cap, map RAM, memslots, vCPUs, guest."),
    OpDef("vmm-op", "any", (F("op", NAME), F("args", MAP, {})),
          "Run one VMM op of the scenario contract (its own address space, or a KVM ioctl)."),
    OpDef("guest-op", "any", (F("vcpu", U64, 0), F("op", NAME), F("args", MAP, {})),
          "Run one guest op on a vCPU (ENODEV until the VM has a vCPU, ESRCH once the guest died)."),
    OpDef("ipa-to-hva", "any", (F("ipa", ADDR),), "The VMM's pid and the address it maps ``ipa`` at."),
    OpDef("status", "any", (), "{pid, vm, guest: {state, detail}, exits: [...]}."),
    OpDef("kill-guest", "any", (), "SIGKILL the guest process (supervision tests)."),
    OpDef("shutdown", "any", (), "Tear the VM down and exit."),
    OpDef("migrate-incoming", "any", (
        F("bugs", STRLIST, (), "VMM-side bug-zoo entries to apply (shared.bugs)"),
        F("fail", opt(enum(*MIGRATION_FAILS)), None), F("fail_at", opt(FAIL_AT), None),
        F("transport", enum("unix", "tcp"), "unix"),
    ), "Become a migration destination: listen for ONE migration connection (returns at once); "
       "returns {address}. The VM is built from the stream; the VMM exits if the migration fails."),
    OpDef("migrate-out", "any", (
        F("address", NAME), F("secret", opt(NAME), None, "the destination host's secret"),
        F("to", opt(NAME), None, "the destination host's name (for ESTALE messages)"),
        F("max_passes", U64, 8), F("fail", opt(enum(*MIGRATION_FAILS)), None), F("fail_at", opt(FAIL_AT), None),
        F("bugs", STRLIST, (), "VMM-side bug-zoo entries to apply (shared.bugs)"),
    ), "Live-migrate this VM to the destination VMM listening at address; returns "
       "{passes, pages, tagged-pages, stop-pages}."),
]

_GUEST_CHANNEL = [
    OpDef("vcpu-add", "any", (F("index", U64), F("token", NAME)), "Run this vCPU from now on."),
    OpDef("guest-op", "any", (F("vcpu", U64, 0), F("op", NAME), F("args", MAP, {})),
          "One guest op of the scenario contract on one vCPU."),
    OpDef("vcpu-state-get", "any", (),
          "{vcpus: {str(index): registers}, stage1: [[va, size, ipa, attr], ...]} (migration, snapshots)."),
    OpDef("vcpu-state-set", "any", (F("vcpus", MAP), F("stage1", STATE_LIST, ())),
          "Install a vcpu-state-get result (the vCPUs must already be added)."),
]

_EXIT_CHANNEL = [
    OpDef("exit-mmio", "any", (
        F("vcpu", U64), F("ipa", ADDR), F("size", SIZE), F("write", BOOL),
        F("data", BYTES, b""),
    ), "KVM_EXIT_MMIO: emulate the access; a read returns the bytes."),
    OpDef("exit-error", "any", (F("vcpu", U64), F("errno", U64), F("message", NAME, "")),
          "KVM_RUN failed (EFAULT from user_mem_abort ...): the VMM records it."),
]

VMM_CONTROL: dict[str, OpDef] = {d.name: d for d in _VMM_CONTROL}
GUEST_CHANNEL: dict[str, OpDef] = {d.name: d for d in _GUEST_CHANNEL}
EXIT_CHANNEL: dict[str, OpDef] = {d.name: d for d in _EXIT_CHANNEL}


# ---- the scenario's VMM and guest ops, as the runner sends them ----------------------------

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


def _u32(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
        raise ValueError("must be an unsigned 32-bit integer")
    return v




#: KVM capabilities a VMM op may name (KVM_CAP_ARM_MTE, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
KVM_CAPS = ("arm-mte", "manual-dirty-log-protect2", "arm-cacheable-pfnmap-supported")
SLOT = Kind("int", _u32, hi=0xFFFFFFFF)        # a memslot id (struct kvm_userspace_memory_region.slot)
TAG_BUFFER = Kind("tags", _tag_buffer)          # tags, or one tag meaning "this tag for every granule"
DMA_DATA = Kind("bytes", _data)
BYTE = Kind("int", _byte, hi=255)
_VMM = ("vmm",)

#: The KVM and device ops of a ``vmm:VM`` actor (``vmm-op``); the VMM validates them with this table.
KVM_OPS: dict[str, OpDef] = {d.name: d for d in [
    OpDef("check-extension", "any", (F("cap", known_name(*KVM_CAPS)),), "KVM_CHECK_EXTENSION.",
          _VMM, ("kvm-check-extension",)),
    OpDef("enable-cap", "any", (F("cap", known_name(*KVM_CAPS)), F("flags", U64, 0), F("args", U64LIST, (0,))),
          "KVM_ENABLE_CAP (args: cap->args; manual-dirty-log-protect2 reads args[0]).",
          _VMM, ("kvm-enable-cap",)),
    OpDef("create-vcpu", "any", (F("aarch32", BOOL, False),), "KVM_CREATE_VCPU; returns the index.",
          _VMM, ("kvm-create-vcpu",)),
    OpDef("set-memory-region", "any", (
        F("slot", SLOT), F("ipa", ADDR), F("size", SIZE), F("addr", ADDR), F("flags", flags(*MEMSLOT_FLAGS), ()),
    ), "KVM_SET_USER_MEMORY_REGION.", _VMM, ("kvm-set-memory-region",)),
    OpDef("copy-tags", "any", (
        F("ipa", ADDR), F("length", SIZE), F("direction", enum("from-guest", "to-guest")),
        F("tags", opt(TAG_BUFFER), None), F("flags", opt(U64), None), F("reserved", U64_PAIR, (0, 0)),
    ), "KVM_ARM_MTE_COPY_TAGS.", _VMM, ("kvm-copy-tags",)),
    OpDef("dirty-log", "any", (
        F("slot", SLOT), F("action", enum("enable", "disable", "get", "clear")),
        F("first", SIZE, 0, "clear: first page"), F("count", opt(SIZE), None, "clear: pages (default: to the end)"),
    ), "Dirty logging of one memslot.", _VMM, ("kvm-get-dirty-log", "kvm-clear-dirty-log", "kvm-set-memory-region")),
    OpDef("dma-write", "any", (
        F("ipa", ADDR), F("data", opt(DMA_DATA), None), F("fill", opt(BYTE), None), F("size", opt(IO_SIZE), None),
    ), "Device DMA write through the VMM's mapping.", _VMM),
    OpDef("dma-read", "any", (F("ipa", ADDR), F("size", IO_SIZE)), "Device DMA read through the VMM's mapping.",
          _VMM, returns="bytes"),
    OpDef("migrate", "any", (
        F("to", NAME), F("max_passes", U64, 8, "pre-copy passes before stop-and-copy (0: stop-and-copy only)"),
        F("fail", opt(enum(*MIGRATION_FAILS)), None, "fault injection: what to break"),
        F("fail_at", opt(FAIL_AT), None, "fault injection: precopy:N, switchover or after-resume"),
    ), "Live-migrate the VM to host ``to`` (the orchestrator starts the destination VMM); returns "
       "{passes, pages, tagged-pages, stop-pages}.", _VMM, ("kvm-copy-tags", "kvm-get-dirty-log",
                                                           "kvm-clear-dirty-log", "kvm-set-memory-region",
                                                           "mincore", "ghost-export", "ghost-import")),
    OpDef("snapshot", "any", (F("name", opt(NAME), None), F("path", opt(NAME), None)),
          "Pause, save memory, tags and vCPU state to a named snapshot or a file, resume; returns "
          "{pages, tagged-pages}.", _VMM, ("kvm-copy-tags", "mincore")),
    OpDef("restore", "any", (F("name", opt(NAME), None), F("path", opt(NAME), None)),
          "Load a snapshot into this VM (same layout); returns {pages, tagged-pages}.", _VMM, ("kvm-copy-tags",)),
]}


def _on_a_vcpu(d: OpDef) -> OpDef:
    """A host-process op a guest runs the same way on one vCPU (same arguments, guest VAs)."""
    calls = ("vcpu-access",) if d.name in ACCESS_KINDS else ()  # irg and tco only touch registers
    return attrs.evolve(d, role="any", actors=("guest",), calls=calls)


#: The guest ops of docs/scenarios.md and their arguments; the guest validates them with this table.
GUEST_OPS: dict[str, OpDef] = {d.name: d for d in [
    OpDef("enable-mte", "any", (F("tcf", enum(*TCF_MODES)), F("include", MASK16, 0xFFFF)),
          "SCTLR_EL1.ATA=1, SCTLR_EL1.TCF, GCR_EL1.Exclude = ~include.", ("guest",)),
    OpDef("map", "any", (F("va", ADDR), F("ipa", ADDR), F("size", SIZE), F("attr", enum(*SEG_ATTRS))),
          "Map a VA range to an IPA range at stage 1.", ("guest",)),
    *(_on_a_vcpu(d) for d in ops_of(OPS, "guest").values()),
    OpDef("read-tfsr", "any", (), "TFSR_EL1 as an integer.", ("guest",)),
    OpDef("clear-tfsr", "any", (), "Clear TFSR_EL1.", ("guest",)),
]}

#: Each scenario actor's ops, by name: the one table a step's op is looked up in. A ``vmm:VM``
#: runs every host-process op on its own address space (forwarded unchanged) and the KVM ops.
ACTOR_OPS: dict[str, dict[str, OpDef]] = {
    "process": ops_of(OPS, "process"),
    "vmm": {**ops_of(OPS, "vmm"), **KVM_OPS},
    "guest": GUEST_OPS,
    "host": ops_of(OPS, "host"),
}
#: Which channel serves each actor's ops: the hypervisor itself, or a VMM's ``vmm-op``/``guest-op``.
ACTOR_CHANNEL = {"process": "hypervisor", "host": "hypervisor", "vmm": "vmm-op", "guest": "guest-op"}
