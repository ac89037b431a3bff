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

from typing import Any, Callable

import attrs

from shared.errno import E2BIG, EINVAL
from shared.mte import TCF_MODES

#: Largest data/tag payload one access request may carry or return.
MAX_IO = 16 * 1024 * 1024
U64_MAX = (1 << 64) - 1


class AbiError(Exception):
    """A request that does not fit its op's definition.

    Attributes:
        errno: the Linux errno to reply with.
        message: what is wrong, naming the op and the argument.
    """

    def __init__(self, errno: int, message: str):
        self.errno = errno
        self.message = message
        super().__init__(message)


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


def _prot(v):
    if not isinstance(v, list) or not all(p in ("read", "write", "exec", "mte") for p in v):
        raise ValueError("must be a list of read, write, exec, mte")
    return tuple(v)


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


def _memslot_flags(v):
    if not isinstance(v, list) or not all(f in ("log-dirty-pages", "readonly") for f in v):
        raise ValueError("must be a list of log-dirty-pages, readonly")
    return tuple(v)


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


_REQUIRED = object()


@attrs.frozen
class Field:
    """One argument of an op: its name, checker, and default (required when absent)."""

    name: str
    check: Callable[[Any], Any]
    default: Any = _REQUIRED
    doc: str = ""


@attrs.frozen
class OpDef:
    """One op of the ABI: who may send it and its arguments."""

    name: str
    role: str  # "any", "process" or "host"
    fields: tuple[Field, ...]
    doc: str


def F(name, check, default=_REQUIRED, doc=""):
    return Field(name, check, default, doc)


BACKINGS = ("anon", "anon-shared", "memfd", "shmem", "file", "hugetlb", "device")

_OPS = [
    OpDef("hello", "any", (
        F("role", _enum("process", "host", "vcpu")),
        F("name", _str, None, "a label for traces"),
        F("session", _str, None, "processes of one session may ptrace each other"),
        F("attach", _str, None, "become the forked child holding this token"),
        F("secret", _str, None, "the hypervisor's secret, when it has one"),
    ), "Introduce the connection; must come first."),
    # ---- host user processes: their own address space -----------------
    OpDef("mmap", "process", (
        F("addr", lambda v: None if v is None else _u64(v), None, "MAP_FIXED address"),
        F("size", _u64), F("prot", _prot, ("read", "write")),
        F("share", _enum("private", "shared"), "private"),
        F("backing", _enum(*BACKINGS), "anon"),
        F("object", lambda v: None if v is None else _str(v), None),
        F("offset", _u64, 0),
        F("hugepage_size", _hugepage_size, 2 << 20, "hugetlb backing only: the huge page size (MAP_HUGE_*)"),
    ), "mmap(2); returns the address."),
    OpDef("mprotect", "process", (F("addr", _u64), F("size", _u64), F("prot", _prot)), "mprotect(2)."),
    OpDef("munmap", "process", (F("addr", _u64), F("size", _u64)), "munmap(2)."),
    OpDef("madvise", "process", (
        F("addr", _u64), F("size", _u64), F("advice", _enum("dontneed", "free", "mergeable")),
    ), "madvise(2)."),
    OpDef("prctl", "process", (
        F("tcf", lambda v: None if v is None else _enum(*TCF_MODES)(v), None),
        F("include", lambda v: None if v is None else _int(v), None),
    ), "prctl(PR_SET_TAGGED_ADDR_CTRL)."),
    OpDef("prctl-get", "process", (), "prctl(PR_GET_TAGGED_ADDR_CTRL)."),
    OpDef("tco", "process", (F("on", _bool),), "MSR TCO, #on."),
    OpDef("store", "process", (F("addr", _u64), F("tag", _tag, 0), F("data", _bytes)), "A store through a tagged pointer."),
    OpDef("load", "process", (F("addr", _u64), F("tag", _tag, 0), F("size", _size)), "A load; returns bytes."),
    OpDef("stg", "process", (F("addr", _u64), F("tag", _tag, 0), F("size", _size)), "STG over a range."),
    OpDef("ldg", "process", (F("addr", _u64), F("size", _size)), "LDG over a range; one tag per granule."),
    OpDef("irg", "process", (), "IRG: a random tag allowed by the include mask."),
    OpDef("fork", "process", (F("child", _str, None),), "fork(2); returns {pid, token}."),
    OpDef("ptrace-peek-tags", "process", (F("target", _u64), F("addr", _u64), F("count", _size)), "PTRACE_PEEKMTETAGS."),
    OpDef("ptrace-poke-tags", "process", (F("target", _u64), F("addr", _u64), F("tags", _tags)), "PTRACE_POKEMTETAGS."),
    OpDef("batch", "process", (F("ops", _batch),), "Run several process ops in order in one round trip."),
    OpDef("getpid", "process", (), "getpid(2)."),
    # ---- KVM: ioctls of a process (the VMM) on the VMs it created -----------
    OpDef("kvm-create-vm", "process", (F("ipa_bits", _u64, 40),),
          "KVM_CREATE_VM (type KVM_VM_TYPE_ARM_IPA_SIZE(ipa_bits)); returns the VM's handle."),
    OpDef("kvm-check-extension", "process", (F("vm", _opt(_u64), None), F("cap", _str)),
          "KVM_CHECK_EXTENSION on /dev/kvm (vm nil) or a VM; returns an integer (0: unsupported)."),
    OpDef("kvm-enable-cap", "process", (F("vm", _u64), F("cap", _str), F("flags", _u64, 0),
                                        F("args", _u64list, (0,), "cap->args (up to 4)")),
          "KVM_ENABLE_CAP on a VM."),
    OpDef("kvm-create-vcpu", "process", (F("vm", _u64), F("aarch32", _bool, False)),
          "KVM_CREATE_VCPU + KVM_ARM_VCPU_INIT (EL1_32BIT if aarch32); returns {index, token}."),
    OpDef("kvm-set-memory-region", "process", (
        F("vm", _u64), F("slot", _u64), F("ipa", _u64), F("size", _u64), F("addr", _u64),
        F("flags", _memslot_flags, ()),
    ), "KVM_SET_USER_MEMORY_REGION: create, change flags, or delete (size 0) a memslot."),
    OpDef("kvm-get-dirty-log", "process", (F("vm", _u64), F("slot", _u64)),
          "KVM_GET_DIRTY_LOG (manual protect): the slot's dirty page indexes; the log is not cleared."),
    OpDef("kvm-clear-dirty-log", "process", (
        F("vm", _u64), F("slot", _u64), F("first", _u64, 0), F("num", _opt(_u64), None),
    ), "KVM_CLEAR_DIRTY_LOG: clear and write-protect again pages [first, first+num) of the slot."),
    OpDef("kvm-copy-tags", "process", (
        F("vm", _u64), F("guest_ipa", _u64), F("length", _u64), F("flags", _u64, 0),
        F("reserved", _u64_pair, (0, 0)), F("tags", _tags, b"", "TO_GUEST: the user buffer (1 tag per byte)"),
    ), "KVM_ARM_MTE_COPY_TAGS; returns {length: guest bytes done, tags: bytes (FROM_GUEST)}."),
    OpDef("kvm-destroy-vm", "process", (F("vm", _u64),), "close() the VM's last fd: tear the VM down."),
    # ---- a guest running on its vCPUs ------------------------------------
    OpDef("vcpu-attach", "vcpu", (F("token", _str),),
          "Run the vCPU this token names from this connection; returns {vcpu, vm, mte} "
          "(mte: ID_AA64PFR1_EL1.MTE as KVM exposes it)."),
    OpDef("vcpu-access", "vcpu", (
        F("vcpu", _u64), F("kind", _enum("load", "store", "stg", "ldg")), F("segs", _segs),
        F("tag", _tag, 0, "the pointer's logical tag"), F("data", _bytes, b"", "store: the bytes"),
        F("check", _enum("none", "sync", "async", "asymm"), "none",
          "SCTLR_EL1.TCF as it applies (none when PSTATE.TCO is set)"),
        F("ata", _bool, False, "SCTLR_EL1.ATA: allocation tag access enabled"),
    ), "One guest memory access after stage-1 translation (KVM_RUN until it retires or exits)."),
    OpDef("vcpu-batch", "vcpu", (F("vcpu", _u64), F("ops", _batch)),
          "Run several vcpu-access ops on one vCPU in one round trip; each result is [ok, value or errno, fault]."),
    # ---- the host kernel itself ------------------------------------------
    OpDef("boot", "host", (
        F("mte", _bool, True), F("ram", _u64, 256 << 20), F("swap", _u64, 64 << 20),
        F("bugs", _strlist, ()), F("tcf_preferred", _enum("async", "sync", "asymm"), "async"),
        F("kernel_fixes", _strlist, (), "proposed kernel fixes to apply (shared.bugs.KERNEL_FIXES)"),
    ), "Replace the host kernel with a freshly booted one (no process may be attached)."),
    OpDef("swap-out", "host", (F("pid", _u64), F("addr", _u64), F("size", _u64)), "Reclaim pages to swap."),
    OpDef("ksm-merge", "host", (F("pid", _u64), F("addr", _u64), F("size", _u64)), "One KSM scan of a range."),
    OpDef("migrate-pages", "host", (F("pid", _u64), F("addr", _u64), F("size", _u64)), "Move pages to new frames."),
    OpDef("page-flags", "host", (F("pid", _u64), F("addr", _u64)), "PG_mte_tagged/PG_mte_lock of the page at addr."),
    OpDef("check-invariants", "host", (), "Run every oracle now; returns the violations found so far."),
    OpDef("stats", "host", (), "Memory and object counts."),
]

OPS: dict[str, OpDef] = {op.name: op for op in _OPS}


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
    from shared.errno import ENOSYS
    from shared.wire import brief

    d = (OPS if table is None else table).get(op) if isinstance(op, str) else None
    if d is None:
        raise AbiError(ENOSYS, f"unknown op {brief(op)}")
    if not isinstance(args, dict):
        raise AbiError(EINVAL, f"{op}: args must be a map")
    known = {f.name for f in d.fields}
    extra = [k for k in args if k not in known]
    if extra:
        raise AbiError(EINVAL, f"{op}: unknown argument {brief(extra[0])}")
    out = {}
    for f in d.fields:
        if f.name in args and args[f.name] is None and f.default is None:
            out[f.name] = None  # an optional argument given as nil
        elif f.name in args:
            try:
                out[f.name] = f.check(args[f.name])
            except OverflowError as exc:
                raise AbiError(E2BIG, f"{op}: argument {f.name!r}: {exc}") from None
            except ValueError as exc:
                raise AbiError(EINVAL, f"{op}: argument {f.name!r} {exc}") from None
            except TypeError as exc:  # a checker met a shape it did not expect
                raise AbiError(EINVAL, f"{op}: argument {f.name!r} has the wrong shape ({exc})") from None
        elif f.default is _REQUIRED:
            raise AbiError(EINVAL, f"{op}: missing argument {f.name!r}")
        else:
            out[f.name] = f.default
    return out
