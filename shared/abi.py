"""The ABI: every op's message, defined once.

Each op is an :class:`OpDef` listing its argument :class:`Field`s. Both sides use
these definitions: the hypervisor validates every incoming request with
:func:`validate_args` at the wire boundary (a bad request gets an errno reply,
never a crash), and clients may use the same definitions to build requests.

Roles: a connection says who it is with ``hello`` first. ``process``
connections are host user processes (each with its own address space; the VMM
is one, and its KVM ioctls are ``kvm-*`` process ops on VM handles it
created); ``vcpu`` connections are guests, holding the tokens of exactly the
vCPUs they run (handed out by ``kvm-create-vcpu``, presented with
``vcpu-attach``); ``host`` connections drive
the host kernel itself (reclaim, KSM, page migration, invariant checks). Every
connection must present the hypervisor's secret when it has one.

The control channels of the VMM (orchestrator -> VMM, VMM <-> guest) are
defined the same way in :mod:`shared.control`.

Errors (Linux errno values, as the kernel would return them):
    ENOSYS: unknown op.
    EPERM: op not allowed for the connection's role, or ``hello`` missing.
    EINVAL: missing or unknown argument, wrong type, value out of range.
    E2BIG: a data argument larger than :data:`MAX_IO` (split the access).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from shared.errno import E2BIG, EINVAL, ErrnoError
from shared.mte import TCF_MODES
from shared.physmem import REGION_ATTRS

#: Largest data/tag payload one access request may carry or return.
MAX_IO = 16 * 1024 * 1024
U64_MAX = (1 << 64) - 1


class AbiError(ErrnoError):
    """A request that does not fit its op's definition (``errno``: the reply's; ``message`` names the op and
    argument)."""


def _u64(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= U64_MAX:
        raise ValueError("must be an unsigned 64-bit integer")
    return v


def _int(v):
    if isinstance(v, bool) or not isinstance(v, int) or not -(1 << 63) <= v <= U64_MAX:
        raise ValueError("must be an integer")
    return v


def _tag(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 15:
        raise ValueError("must be a tag 0..15")
    return v


def _mask16(v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFF:
        raise ValueError("must be a 16-bit mask")
    return v


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError("must be a boolean")
    return v


def _str(v):
    if not isinstance(v, str) or len(v) > 256:
        raise ValueError("must be a string of at most 256 characters")
    return v


def _bytes(v):
    if not isinstance(v, (bytes, bytearray)):
        raise ValueError("must be bytes")
    if len(v) > MAX_IO:
        raise OverflowError(f"{len(v)} bytes is more than the {MAX_IO} a request may carry")
    return bytes(v)


def _tags(v):
    """Tags travel one per byte (the ptrace/COPY_TAGS format); a list of ints is accepted too."""
    if isinstance(v, list):
        if len(v) > MAX_IO:
            raise OverflowError(f"{len(v)} tags is more than the {MAX_IO} a request may carry")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 255 for t in v):
            raise ValueError("must be a list of byte values")
        return bytes(v)
    return _bytes(v)


def _enum(*choices: str) -> Callable[[Any], str]:
    def check(v):
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v

    check.__doc__ = "|".join(choices)
    return check


def _flag_list(*choices: str) -> Callable[[Any], tuple]:
    def check(v):
        if not isinstance(v, list) or not all(p in choices for p in v):
            raise ValueError(f"must be a list of {', '.join(choices)}")
        return tuple(v)

    return check


def _strlist(v):
    if not isinstance(v, list) or len(v) > 64 or not all(isinstance(s, str) for s in v):
        raise ValueError("must be a list of strings")
    return tuple(v)


def _u64list(v):
    """A short list of unsigned 64-bit integers (KVM_ENABLE_CAP's ``args[4]``)."""
    if not isinstance(v, list) or len(v) > 4:
        raise ValueError("must be a list of at most 4 integers")
    return tuple(_u64(x) for x in v)


#: arm64 hugetlb page sizes with 4 KiB base pages: contiguous PTEs, PMD, contiguous PMDs, PUD.
HUGEPAGE_SIZES = (64 << 10, 2 << 20, 32 << 20, 1 << 30)


def _hugepage_size(v):
    """One of the arm64 hugetlb sizes (bytes)."""
    v = _u64(v)
    if v not in HUGEPAGE_SIZES:
        raise ValueError("must be one of 64KiB, 2MiB, 32MiB, 1GiB (in bytes)")
    return v


def _size(v):
    v = _u64(v)
    if v > MAX_IO:
        raise OverflowError(f"{v} bytes is more than the {MAX_IO} one access may cover")
    return v


def _opt(check):
    def inner(v):
        return None if v is None else check(v)

    inner.__doc__ = check.__doc__
    return inner


def _u64_pair(v):
    if not isinstance(v, list) or len(v) != 2:
        raise ValueError("must be a list of two unsigned 64-bit integers")
    return tuple(_u64(x) for x in v)


SEG_ATTRS = ("tagged", "normal", "device")


def _segs(v):
    """A guest access after stage 1: ``[[ipa, length, attr], ...]`` in access order."""
    if not isinstance(v, list) or not 1 <= len(v) <= 4097:
        raise ValueError("must be a list of 1..4097 [ipa, length, attr] segments")
    out, total = [], 0
    for item in v:
        if not (isinstance(item, list) and len(item) == 3 and item[2] in SEG_ATTRS):
            raise ValueError("each segment must be [ipa, length, attr] with attr tagged, normal or device")
        ipa, n = _u64(item[0]), _u64(item[1])
        if n == 0 or (ipa & 0xFFF) + n > 4096:
            raise ValueError("each segment must be 1..4096 bytes within one 4 KiB page")
        total += n
        out.append((ipa, n, item[2]))
    if total > MAX_IO:
        raise OverflowError(f"{total} bytes is more than the {MAX_IO} one access may cover")
    return tuple(out)


def _batch(v):
    if not isinstance(v, list) or len(v) > 65536:
        raise ValueError("must be a list of at most 65536 [op, args] pairs")
    for item in v:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], dict)):
            raise ValueError("each item must be [op, args]")
    return v


def _count(v):
    if v == "all":
        return v
    return _u64(v)


def _map(v):
    if not isinstance(v, dict):
        raise ValueError("must be a map")
    return v


# ---- field kinds: what a field holds, for the wire check and for the scenario form ----------

#: Every kind a field may have. The scenario layer (``mtekvm.scenario.ops``) gives each kind its
#: written form: ``size``/``addr`` take units (``"16MiB"``), ``bytes`` hex strings, ``tag`` 0..15,
#: ``tags`` a list of tags, ``enum`` and ``list`` their options, ``name`` a name (its known
#: values when it lists any), ``pid`` a process named by the scenario, ``int`` its range.
KIND_NAMES = ("size", "addr", "tag", "tags", "bytes", "enum", "name", "bool", "int", "list", "pid", "map", "count")


@attrs.frozen
class Kind:
    """What one field holds: a kind of :data:`KIND_NAMES`, its wire checker, and its options.

    Attributes:
        name: the kind.
        check: ``check(value) -> normalised value``; raises ValueError (EINVAL) or OverflowError
            (E2BIG).
        options: ``enum`` and ``list``: the allowed values; ``name``: the known names (the wire
            accepts others; a scenario may name only these); ``size``: the allowed sizes when
            only some are.
        lo, hi: ``int``, ``tag`` and ``size``: the range a value must be in (a scenario's; the
            wire checker may take more, so that the kernel answers with its own errno); a ``list``
            whose ``lo == hi`` has exactly that many items.
        optional: nil is accepted (the field's default is nil).
    """

    name: str
    check: Callable[[Any], Any] = attrs.field(eq=False)
    options: tuple = ()
    lo: int = 0
    hi: int = U64_MAX
    optional: bool = False


ADDR = Kind("addr", _u64)                      # an address, IPA or offset
SIZE = Kind("size", _u64)                      # a length in bytes (or a count)
IO_SIZE = Kind("size", _size, hi=MAX_IO)       # the length of one access: over MAX_IO is E2BIG
HUGEPAGE_SIZE = Kind("size", _hugepage_size, HUGEPAGE_SIZES)
U64 = Kind("int", _u64)
INT = Kind("int", _int, lo=-(1 << 63))
MASK16 = Kind("int", _mask16, hi=0xFFFF)
INCLUDE_MASK = Kind("int", _int, hi=0xFFFF)  # prctl: the wire takes any integer, the kernel refuses bits above 15
TAG = Kind("tag", _tag, hi=15)
TAGS = Kind("tags", _tags)                     # one tag per byte (a list of ints is accepted)
BYTES = Kind("bytes", _bytes)
BOOL = Kind("bool", _bool)
NAME = Kind("name", _str)
PID = Kind("pid", _u64)                        # a process (a scenario names it)
U64LIST = Kind("list", _u64list)
U64_PAIR = Kind("list", _u64_pair, lo=2, hi=2)
STRLIST = Kind("list", _strlist)
SEGS = Kind("list", _segs)
BATCH = Kind("list", _batch)
MAP = Kind("map", _map)
COUNT = Kind("count", _count)                  # a number of pages, or "all"


def enum(*options: str) -> Kind:
    """One of ``options``."""
    return Kind("enum", _enum(*options), options)


def flags(*options: str) -> Kind:
    """A list of some of ``options`` (mmap ``prot``, memslot ``flags``)."""
    return Kind("list", _flag_list(*options), options)


def known_name(*options: str) -> Kind:
    """A name; the wire takes any, a scenario one of ``options`` (KVM capabilities)."""
    return Kind("name", _str, options)


def opt(kind: Kind) -> Kind:
    """``kind``, or nil."""
    return attrs.evolve(kind, check=_opt(kind.check), optional=True)


_REQUIRED = object()


@attrs.frozen
class Field:
    """One argument of an op: its name, kind, and default (required when absent)."""

    name: str
    kind: Kind
    default: Any = _REQUIRED
    doc: str = ""

    @property
    def check(self) -> Callable[[Any], Any]:
        """The wire checker of the field's kind."""
        return self.kind.check

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @property
    def key(self) -> str:
        """The field's spelling in a scenario file (hyphens: ``hugepage_size`` -> ``hugepage-size``)."""
        return self.name.replace("_", "-")


#: The scenario actors (docs/scenarios.md): a host process, a VM's VMM, a guest, the host kernel.
ACTORS = ("process", "vmm", "guest", "host")


@attrs.frozen
class OpDef:
    """One op of a channel: who may send it, its arguments, and which scenario actors use it.

    Attributes:
        name: the op.
        role: the connection role that may send it (``any``, ``process``, ``host``, ``vcpu``).
        fields: its arguments.
        doc: one line.
        actors: the scenario actors (:data:`ACTORS`) that run it as a step of this name.
        calls: ops of the hypervisor's ABI the op is built from (a VMM or guest op).
        returns: what its value is, when a scenario writes it in another form: ``bytes`` (hex
            in a scenario), ``tags`` (a list, one per granule), ``process`` (a new process).
        stores_tags: the op is a tag store instruction (STG): RAZ/WI on a vCPU without
            SCTLR_EL1.ATA, so a report can say it did nothing.
    """

    name: str
    role: str
    fields: tuple[Field, ...]
    doc: str
    actors: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()
    returns: str = ""
    stores_tags: bool = False

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)


def F(name: str, kind: Kind, default: Any = _REQUIRED, doc: str = "") -> Field:
    return Field(name, kind, default, doc)


BACKINGS = ("anon", "anon-shared", "memfd", "shmem", "file", "hugetlb", "device", "pfnmap", "dax", "p2pmem")
PROTS = ("read", "write", "exec", "mte")
MEMSLOT_FLAGS = ("log-dirty-pages", "readonly")

#: A host process's op that a guest runs the same way on its vCPU (guest virtual addresses).
_P, _PG = ("process", "vmm"), ("process", "vmm", "guest")

_OPS = [
    OpDef("hello", "any", (
        F("role", enum("process", "host", "vcpu")),
        F("name", NAME, None, "a label for traces"),
        F("session", NAME, None, "processes of one session may ptrace each other"),
        F("attach", NAME, None, "become the forked child holding this token"),
        F("secret", NAME, None, "the hypervisor's secret, when it has one"),
    ), "Introduce the connection; must come first."),
    # ---- host user processes: their own address space -----------------
    OpDef("mmap", "process", (
        F("addr", opt(ADDR), None, "MAP_FIXED address"),
        F("size", SIZE), F("prot", flags(*PROTS), ("read", "write")),
        F("share", enum("private", "shared"), "private"),
        F("backing", enum(*BACKINGS), "anon"),
        F("object", opt(NAME), None),
        F("offset", ADDR, 0),
        F("hugepage_size", HUGEPAGE_SIZE, 2 << 20, "hugetlb backing only: the huge page size (MAP_HUGE_*)"),
        F("node", opt(NAME), None, "anon, anon-shared, shmem, memfd: bind the pages to this node (MPOL_BIND)"),
        F("region", opt(NAME), None, "pfnmap, dax, p2pmem: the device memory region behind the mapping"),
        F("attr", opt(enum(*REGION_ATTRS)), None, "pfnmap without region: an unnamed region with this attribute"),
    ), "mmap(2); returns the address.", _P),
    OpDef("mprotect", "process", (F("addr", ADDR), F("size", SIZE), F("prot", flags(*PROTS))), "mprotect(2).", _P),
    OpDef("munmap", "process", (F("addr", ADDR), F("size", SIZE)), "munmap(2).", _P),
    OpDef("madvise", "process", (
        F("addr", ADDR), F("size", SIZE), F("advice", enum("dontneed", "free", "mergeable")),
    ), "madvise(2).", _P),
    OpDef("prctl", "process", (
        F("tcf", opt(enum(*TCF_MODES)), None), F("include", opt(INCLUDE_MASK), None, "the tag include mask"),
    ), "prctl(PR_SET_TAGGED_ADDR_CTRL).", _P),
    OpDef("prctl-get", "process", (), "prctl(PR_GET_TAGGED_ADDR_CTRL).", _P),
    OpDef("tco", "process", (F("on", BOOL),), "MSR TCO, #on.", _PG),
    OpDef("store", "process", (F("addr", ADDR), F("tag", TAG, 0), F("data", BYTES)),
          "A store through a tagged pointer.", _PG),
    OpDef("load", "process", (F("addr", ADDR), F("tag", TAG, 0), F("size", IO_SIZE)), "A load; returns bytes.",
          _PG, returns="bytes"),
    OpDef("stg", "process", (F("addr", ADDR), F("tag", TAG, 0), F("size", IO_SIZE)), "STG over a range.",
          _PG, stores_tags=True),
    OpDef("ldg", "process", (F("addr", ADDR), F("size", IO_SIZE)), "LDG over a range; one tag per granule.",
          _PG, returns="tags"),
    OpDef("irg", "process", (), "IRG: a random tag allowed by the include mask.", _PG),
    OpDef("fork", "process", (F("child", opt(NAME), None, "the child's name"),),
          "fork(2); returns {pid, token}.", _P, returns="process"),
    OpDef("ptrace-peek-tags", "process", (F("target", PID), F("addr", ADDR), F("count", IO_SIZE)),
          "PTRACE_PEEKMTETAGS.", _P, returns="tags"),
    OpDef("ptrace-poke-tags", "process", (F("target", PID), F("addr", ADDR), F("tags", TAGS)),
          "PTRACE_POKEMTETAGS.", _P),
    OpDef("batch", "process", (F("ops", BATCH),), "Run several process ops in order in one round trip."),
    OpDef("getpid", "process", (), "getpid(2)."),
    OpDef("mincore", "process", (F("addr", ADDR), F("size", SIZE)),
          "mincore(2): one byte per page, 1 where the page is resident (mapped, in the object's page cache, or "
          "in swap: the model counts swapped pages, so a VMM never skips memory that holds data)."),
    OpDef("ghost-export", "process", (F("vm", U64),),
          "Oracle equipment, not a kernel interface: the TAGS-AS-WRITTEN record of the VM's memory, by guest page."),
    OpDef("ghost-import", "process", (F("vm", U64), F("entries", MAP)),
          "Oracle equipment: replace the TAGS-AS-WRITTEN record of the VM's memory with ``entries`` "
          "(a ghost-export of the VM's source, installed just before a migrated VM resumes)."),
    # ---- KVM: ioctls of a process (the VMM) on the VMs it created -----------
]
#: The memory accesses a guest's vCPU makes (``vcpu-access`` ``kind``): the guest ops with an address.
ACCESS_KINDS = tuple(d.name for d in _OPS if "guest" in d.actors and any(f.name == "addr" for f in d.fields))
_OPS += [
    OpDef("kvm-create-vm", "process", (F("ipa_bits", U64, 40),),
          "KVM_CREATE_VM (type KVM_VM_TYPE_ARM_IPA_SIZE(ipa_bits)); returns the VM's handle."),
    OpDef("kvm-check-extension", "process", (F("vm", opt(U64), None), F("cap", NAME)),
          "KVM_CHECK_EXTENSION on /dev/kvm (vm nil) or a VM; returns an integer (0: unsupported)."),
    OpDef("kvm-enable-cap", "process", (F("vm", U64), F("cap", NAME), F("flags", U64, 0),
                                        F("args", U64LIST, (0,), "cap->args (up to 4)")),
          "KVM_ENABLE_CAP on a VM."),
    OpDef("kvm-create-vcpu", "process", (F("vm", U64), F("aarch32", BOOL, False)),
          "KVM_CREATE_VCPU + KVM_ARM_VCPU_INIT (EL1_32BIT if aarch32); returns {index, token}."),
    OpDef("kvm-set-memory-region", "process", (
        F("vm", U64), F("slot", U64), F("ipa", ADDR), F("size", SIZE), F("addr", ADDR),
        F("flags", flags(*MEMSLOT_FLAGS), ()),
    ), "KVM_SET_USER_MEMORY_REGION: create, change flags, or delete (size 0) a memslot."),
    OpDef("kvm-get-dirty-log", "process", (F("vm", U64), F("slot", U64)),
          "KVM_GET_DIRTY_LOG (manual protect): the slot's dirty page indexes; the log is not cleared."),
    OpDef("kvm-clear-dirty-log", "process", (
        F("vm", U64), F("slot", U64), F("first", U64, 0), F("num", opt(U64), None),
    ), "KVM_CLEAR_DIRTY_LOG: clear and write-protect again pages [first, first+num) of the slot."),
    OpDef("kvm-copy-tags", "process", (
        F("vm", U64), F("guest_ipa", ADDR), F("length", SIZE), F("flags", U64, 0),
        F("reserved", U64_PAIR, (0, 0)), F("tags", TAGS, b"", "TO_GUEST: the user buffer (1 tag per byte)"),
    ), "KVM_ARM_MTE_COPY_TAGS; returns {length: guest bytes done, tags: bytes (FROM_GUEST)}."),
    OpDef("kvm-destroy-vm", "process", (F("vm", U64),), "close() the VM's last fd: tear the VM down."),
    # ---- a guest running on its vCPUs ------------------------------------
    OpDef("vcpu-attach", "vcpu", (F("token", NAME),),
          "Run the vCPU this token names from this connection; returns {vcpu, vm, mte} "
          "(mte: ID_AA64PFR1_EL1.MTE as KVM exposes it)."),
    OpDef("vcpu-access", "vcpu", (
        F("vcpu", U64), F("kind", enum(*ACCESS_KINDS)), F("segs", SEGS),
        F("tag", TAG, 0, "the pointer's logical tag"), F("data", BYTES, b"", "store: the bytes"),
        F("check", enum("none", "sync", "async", "asymm"), "none",
          "SCTLR_EL1.TCF as it applies (none when PSTATE.TCO is set)"),
        F("ata", BOOL, False, "SCTLR_EL1.ATA: allocation tag access enabled"),
    ), "One guest memory access after stage-1 translation (KVM_RUN until it retires or exits)."),
    OpDef("vcpu-batch", "vcpu", (F("vcpu", U64), F("ops", BATCH)),
          "Run several vcpu-access ops on one vCPU in one round trip; each result is [ok, value or errno, fault]."),
    # ---- the host kernel itself ------------------------------------------
    OpDef("boot", "host", (
        F("mte", BOOL, True), F("ram", SIZE, 256 << 20), F("swap", SIZE, 64 << 20),
        F("bugs", STRLIST, ()), F("tcf_preferred", enum("async", "sync", "asymm"), "async"),
        F("kernel_fixes", STRLIST, (), "proposed kernel fixes to apply (shared.bugs.KERNEL_FIXES)"),
        F("fault_replay_limit", U64, 64, "replays of one access's fault before it ends livelock"),
        F("physmem", opt(MAP), None, "tag storage, nodes and regions (shared.physmem.PhysConfig.to_wire)"),
    ), "Replace the host kernel with a freshly booted one (no process may be attached)."),
    OpDef("swap-out", "host", (F("pid", PID), F("addr", ADDR), F("size", SIZE)), "Reclaim pages to swap.",
          ("host",)),
    OpDef("ksm-merge", "host", (F("pid", PID), F("addr", ADDR), F("size", SIZE)), "One KSM scan of a range.",
          ("host",)),
    OpDef("migrate-pages", "host", (F("pid", PID), F("addr", ADDR), F("size", SIZE),
                                    F("to", opt(NAME), None, "a node, a coherent region or tag-storage")),
          "Move pages to new frames; returns pages moved.", ("host",)),
    OpDef("alloc-pages", "host", (
        F("name", NAME, doc="a handle for free-pages"), F("count", COUNT, doc="pages, or 'all' the request may use"),
        F("gfp", enum("movable", "tagged", "kernel"), "movable"), F("from", enum("any", "tag-storage"), "any"),
        F("node", opt(NAME), None, "omitted: node0, then the other nodes in declared order"),
        F("pin", BOOL, False, "hold an extra reference, as pages under I/O do"),
    ), "Allocate pages as a kernel user would; returns {pages, tag-storage-pages}.", ("host",)),
    OpDef("free-pages", "host", (F("name", NAME), F("count", opt(U64), None, "default: all of them")),
          "Free pages of an alloc-pages handle; returns pages freed.", ("host",)),
    OpDef("pin-pages", "host", (F("pid", PID), F("addr", ADDR), F("size", SIZE),
                                F("on", BOOL, True, "false unpins")),
          "FOLL_PIN a range (faulting it in), or unpin it; returns pages pinned or unpinned.", ("host",)),
    OpDef("inject-fault", "host", (F("site", NAME, doc="reserve-tag-storage, tag-buf or tag-buf-atomic"),
                                   F("times", INT, 1, "-1: every call until set again; 0 stops")),
          "Make the next calls of an allocation site fail.", ("host",)),
    OpDef("vma-flags", "host", (F("pid", PID), F("addr", ADDR)),
          "The VM_* flags of the VMA at addr as booleans, and its memtype.", ("host",)),
    OpDef("stage2-entry", "host", (F("vm", NAME, doc="the VM's name"), F("ipa", ADDR)),
          "The stage-2 leaf entry of an IPA: {mapped, pfn, memtype, writable}; faults nothing in.", ("host",)),
    OpDef("page-flags", "host", (F("pid", PID), F("addr", ADDR)), "PG_mte_tagged/PG_mte_lock of the page at addr.",
          ("host",)),
    OpDef("meminfo", "host", (), "{ram-pages, free-pages, vms}: the host's RAM and the VMs it runs now, by name.",
          ("host",)),
    OpDef("kill", "host", (F("pid", PID),),
          "SIGKILL a host process: it exits at once (its VMs destroyed, its memory freed); ESRCH when it is gone.",
          ("host",)),
    OpDef("check-invariants", "host", (
        F("since", U64, 0, "how many the caller has already: the first since of them are left out"),
    ), "Run every oracle now; returns the violations found so far (in the order found), from index since on."),
    OpDef("stats", "host", (), "Memory and object counts."),
]

OPS: dict[str, OpDef] = {op.name: op for op in _OPS}


def ops_of(table: dict[str, OpDef], actor: str) -> dict[str, OpDef]:
    """The ops of ``table`` that the scenario actor ``actor`` runs under their own name."""
    return {name: d for name, d in table.items() if actor in d.actors}


#: The host-process ops (a VMM runs them on its own address space too), by name.
PROCESS_OPS: dict[str, OpDef] = ops_of(OPS, "process")
#: The host kernel's own ops a scenario's ``host`` actor runs.
HOST_OPS: dict[str, OpDef] = ops_of(OPS, "host")


def bind(table: dict[str, OpDef], **handlers: Any) -> dict[str, Any]:
    """Map every op of ``table`` to its handler, given as ``op_name=handler`` (``-`` spelled ``_``).

    A server builds its dispatch table with it, so that op names are written only here.

    Raises:
        KeyError: a handler for an op ``table`` does not have, or an op without a handler.
    """
    out = {name.replace("_", "-"): h for name, h in handlers.items()}
    unknown = set(out) - set(table)
    missing = set(table) - set(out)
    if unknown or missing:
        raise KeyError(f"handlers do not match the op table: unknown {sorted(unknown)}, missing {sorted(missing)}")
    return out


#: per op definition (by identity): the definition, its field names, and (name, checker, default) per field
_PLANS: dict[int, tuple[OpDef, frozenset[str], tuple[tuple[str, Callable[[Any], Any], Any], ...]]] = {}


def _plan(d: OpDef) -> tuple[OpDef, frozenset[str], tuple[tuple[str, Callable[[Any], Any], Any], ...]]:
    entry = _PLANS.get(id(d))
    if entry is None or entry[0] is not d:
        entry = _PLANS[id(d)] = (d, frozenset(f.name for f in d.fields),
                                 tuple((f.name, f.kind.check, f.default) for f in d.fields))
    return entry


def validate_args(op: str, args: Any, table: dict[str, OpDef] | None = None) -> dict:
    """Check ``args`` against ``op``'s definition and return them normalised.

    Args:
        op: the op name.
        args: the request's ``args`` map.
        table: the op table (default: the hypervisor's :data:`OPS`).

    Returns:
        A dict with every field of the op, defaults filled in.

    Raises:
        AbiError: ENOSYS for an unknown op, EINVAL for a bad argument, E2BIG
            for a payload over :data:`MAX_IO`. Nothing else, whatever ``op`` and
            ``args`` are (a checker's TypeError is a wrong shape: EINVAL), and
            error text quotes what the peer sent only briefly.
    """
    d = (OPS if table is None else table).get(op) if isinstance(op, str) else None
    if d is None:
        from shared.errno import ENOSYS
        from shared.wire import brief

        raise AbiError(ENOSYS, f"unknown op {brief(op)}")
    if not isinstance(args, dict):
        raise AbiError(EINVAL, f"{op}: args must be a map")
    _d, known, plan = _plan(d)
    for k in args:
        if k not in known:
            from shared.wire import brief

            raise AbiError(EINVAL, f"{op}: unknown argument {brief(k)}")
    out: dict[str, Any] = {}
    for name, check, default in plan:
        if name in args:
            value = args[name]
            if value is None and default is None:
                out[name] = None  # an optional argument given as nil
                continue
            try:
                out[name] = check(value)
            except OverflowError as exc:
                raise AbiError(E2BIG, f"{op}: argument {name!r}: {exc}") from None
            except ValueError as exc:
                raise AbiError(EINVAL, f"{op}: argument {name!r} {exc}") from None
            except TypeError as exc:  # a checker met a shape it did not expect
                raise AbiError(EINVAL, f"{op}: argument {name!r} has the wrong shape ({exc})") from None
        elif default is _REQUIRED:
            raise AbiError(EINVAL, f"{op}: missing argument {name!r}")
        else:
            out[name] = default
    return out
