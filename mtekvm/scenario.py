"""Scenario files: parse and validate them (the format is described in ``docs/scenarios.md``).

A scenario declares hosts, host processes and VMs, then lists steps; each step is an actor, an
op, the op's arguments and an optional expectation. :func:`load_scenario` reads a file and
:func:`parse_scenario` validates an already-decoded table; both return a :class:`Scenario` made
of frozen value classes, normalised so that the runner never looks at a string twice:

- sizes, addresses, offsets and counts are ints (``"16MiB"`` -> ``16777216``);
- omitted arguments are filled in with their defaults (``tag = 0``, mmap ``prot``, ``share``
  and ``backing``, ...), so every op's ``args`` has a fixed set of keys, except the optional
  wire fields that are present only when the step gives them (mmap ``hugepage_size`` in
  bytes, enable-cap ``args``, dirty-log ``first`` and ``count``), so that a peer that does
  not know them yet still serves every other step;
- ``expect-violations`` names are checked against ``shared.invariants`` and kept in their
  canonical spelling;
- ``prot``, memslot ``flags`` and tag lists become tuples, ``data``/``fill`` become ``bytes``;
- actors are split into kind (``process``, ``vmm``, ``guest``, ``host``), target and vCPU;
- steps are numbered from 1 as the user counts ``[[steps]]``; the sub-steps of a ``parallel``
  step share its number and carry their 1-based position in ``path_in_parallel``.

The rule for what is an error here: types and vocabulary are the parser's job, values the
kernel would refuse are the kernel's. An unaligned ``mmap`` address, a ``munmap`` size that is
not a page multiple, an ``stg`` size that is not a granule multiple or a ``copy-tags`` with odd
flags all parse, so that scenarios can expect the kernel's errno. Unknown keys, wrong types,
negative sizes, tags outside 0..15 and unknown names are :class:`ScenarioError`, whose message
names the file, the step and the key.

Decisions where the contract is silent:

- ``[scheduler]``: ``kind = "random"`` without ``seed`` uses seed 0; ``replay`` requires a
  non-empty ``schedule``; ``schedule`` with another kind and ``seed`` with ``free`` are errors.
- The default host (for bare ``host`` actors and for processes/VMs without ``host``) is the host
  named ``host`` if there is one, else the first declared.
- Names of hosts, processes and VMs are ``[A-Za-z0-9_][A-Za-z0-9_.-]*``; a process may not be
  called ``host``. A ``fork`` child takes its parent's host and becomes an actor from the next
  step on (not for its siblings in the same ``parallel``).
- ``ptrace-*`` ``target`` and the host ops' ``process`` accept a process name or ``vmm:VM``.
  The host ops' process or VM must live on the acting host. Their args are normalised to
  ``{process, vm, addr, size}`` where ``addr`` is the ``ipa`` for a VM and ``size`` is ``None``
  for ``page-flags``.
- ``ptrace-poke-tags`` needs a list of tags (with no count, a single integer is ambiguous);
  ``copy-tags`` to-guest takes a list or one integer meaning ``length // 16`` copies, and its
  ``flags`` is ``None`` unless given raw (the runner derives it from ``direction``).
- ``store`` and ``dma-write`` take ``data`` or ``fill`` + ``size``; both end up as ``data``.
- A ``parallel`` step needs at least one sub-step and may not nest another ``parallel``.
- ``guest:VM:N`` needs ``N < vcpus``; a ``setup = "manual"`` VM creates its vCPUs in steps, so
  any index up to 511 parses (a vCPU that was never created is ENODEV when the step runs).
- Memslots: ``backing`` defaults to ``anon``; ``ipa`` and ``size`` are page aligned (for
  ``hugetlb``, aligned to its ``hugepage-size``, 2 MiB by default), ``size > 0``, slots do not overlap and fit in ``ipa_bits``. ``object`` is only
  for ``memfd``, ``shmem`` and ``file``, and one object keeps one backing everywhere.
- mmap ``share`` defaults to ``private`` for ``anon`` and ``hugetlb``, ``shared`` otherwise.
- ``expect`` values are kept as written, except that hex strings expected from ``load`` and
  ``dma-read`` are lowercased.
"""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any, Callable

import attrs

from shared.bugs import check_bug_names, check_kernel_fix_names
from shared.invariants import ALL as INVARIANTS, canonical

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
GRANULE = 16
_U64 = 1 << 64

_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"([0-9]+) ?(B|KiB|MiB|GiB|TiB)?")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})*")

try:  # the project's shared table, when it has one
    from shared.errno import ERRNO_BY_NAME as _ERRNO_BY_NAME  # type: ignore[import-not-found]
except ImportError:
    # Mirrors Linux's include/uapi/asm-generic/errno-base.h and errno.h (arm64 uses these).
    _ERRNO_BY_NAME = {
        name: int(num)
        for num, name in (item.split(":") for item in """
        1:EPERM 2:ENOENT 3:ESRCH 4:EINTR 5:EIO 6:ENXIO 7:E2BIG 8:ENOEXEC 9:EBADF 10:ECHILD
        11:EAGAIN 11:EWOULDBLOCK 12:ENOMEM 13:EACCES 14:EFAULT 15:ENOTBLK 16:EBUSY 17:EEXIST
        18:EXDEV 19:ENODEV 20:ENOTDIR 21:EISDIR 22:EINVAL 23:ENFILE 24:EMFILE 25:ENOTTY
        26:ETXTBSY 27:EFBIG 28:ENOSPC 29:ESPIPE 30:EROFS 31:EMLINK 32:EPIPE 33:EDOM 34:ERANGE
        35:EDEADLK 35:EDEADLOCK 36:ENAMETOOLONG 37:ENOLCK 38:ENOSYS 39:ENOTEMPTY 40:ELOOP
        42:ENOMSG 43:EIDRM 44:ECHRNG 45:EL2NSYNC 46:EL3HLT 47:EL3RST 48:ELNRNG 49:EUNATCH
        50:ENOCSI 51:EL2HLT 52:EBADE 53:EBADR 54:EXFULL 55:ENOANO 56:EBADRQC 57:EBADSLT
        59:EBFONT 60:ENOSTR 61:ENODATA 62:ETIME 63:ENOSR 64:ENONET 65:ENOPKG 66:EREMOTE
        67:ENOLINK 68:EADV 69:ESRMNT 70:ECOMM 71:EPROTO 72:EMULTIHOP 73:EDOTDOT 74:EBADMSG
        75:EOVERFLOW 76:ENOTUNIQ 77:EBADFD 78:EREMCHG 79:ELIBACC 80:ELIBBAD 81:ELIBSCN
        82:ELIBMAX 83:ELIBEXEC 84:EILSEQ 85:ERESTART 86:ESTRPIPE 87:EUSERS 88:ENOTSOCK
        89:EDESTADDRREQ 90:EMSGSIZE 91:EPROTOTYPE 92:ENOPROTOOPT 93:EPROTONOSUPPORT
        94:ESOCKTNOSUPPORT 95:EOPNOTSUPP 95:ENOTSUP 96:EPFNOSUPPORT 97:EAFNOSUPPORT
        98:EADDRINUSE 99:EADDRNOTAVAIL 100:ENETDOWN 101:ENETUNREACH 102:ENETRESET
        103:ECONNABORTED 104:ECONNRESET 105:ENOBUFS 106:EISCONN 107:ENOTCONN 108:ESHUTDOWN
        109:ETOOMANYREFS 110:ETIMEDOUT 111:ECONNREFUSED 112:EHOSTDOWN 113:EHOSTUNREACH
        114:EALREADY 115:EINPROGRESS 116:ESTALE 117:EUCLEAN 118:ENOTNAM 119:ENAVAIL 120:EISNAM
        121:EREMOTEIO 122:EDQUOT 123:ENOMEDIUM 124:EMEDIUMTYPE 125:ECANCELED 126:ENOKEY
        127:EKEYEXPIRED 128:EKEYREVOKED 129:EKEYREJECTED 130:EOWNERDEAD 131:ENOTRECOVERABLE
        132:ERFKILL 133:EHWPOISON""".split())
    }

#: Every errno name an ``expect`` may use.
ERRNO_NAMES: frozenset[str] = frozenset(_ERRNO_BY_NAME)
#: Outcomes other than errno names.
OUTCOMES: tuple[str, ...] = ("ok", "tag-check-fault", "async-tag-check-fault", "livelock")

PROCESS_OPS = ("mmap", "mprotect", "munmap", "madvise", "prctl", "prctl-get", "tco", "store",
               "load", "stg", "ldg", "irg", "fork", "ptrace-peek-tags", "ptrace-poke-tags")
VMM_OPS = PROCESS_OPS + ("check-extension", "enable-cap", "create-vcpu", "set-memory-region",
                         "copy-tags", "dirty-log", "dma-write", "dma-read")
GUEST_OPS = ("enable-mte", "map", "store", "load", "stg", "ldg", "irg", "tco", "read-tfsr",
             "clear-tfsr")
HOST_OPS = ("swap-out", "ksm-merge", "migrate-pages", "page-flags")
#: The ops each actor kind may run, as in the contract's tables.
OPS_BY_KIND: dict[str, tuple[str, ...]] = {
    "process": PROCESS_OPS, "vmm": VMM_OPS, "guest": GUEST_OPS, "host": HOST_OPS}

BACKINGS = ("anon", "anon-shared", "memfd", "shmem", "file", "hugetlb", "device")
_OBJECT_BACKINGS = ("memfd", "shmem", "file")
_PRIVATE_BY_DEFAULT = ("anon", "hugetlb")
PROTS = ("read", "write", "exec", "mte")
TCF_MODES = ("none", "sync", "async", "asymm")
#: The CPUs' ``mte_tcf_preferred`` a host boots with (``tcf-preferred``).
TCF_PREFERRED = ("async", "sync", "asymm")
#: arm64 hugetlb page sizes with 4 KiB base pages (64 KiB and 32 MiB are contiguous-bit mappings).
HUGEPAGE_SIZES = {"64KiB": 64 << 10, "2MiB": 2 << 20, "32MiB": 32 << 20, "1GiB": 1 << 30}
#: KVM capabilities a VMM step may name.
KVM_CAPS = ("arm-mte", "manual-dirty-log-protect2")
#: Default of the host key ``fault-replay-limit``.
FAULT_REPLAY_LIMIT = 64


class ScenarioError(Exception):
    """A file that is not a valid scenario (the CLI exits with status 2).

    Attributes:
        path: the scenario file.
        step: 1-based step number as the user counts ``[[steps]]``, or None outside steps.
        key: the offending key (dotted inside tables, e.g. ``parallel[2].tag``), or None.
        message: what is wrong.
    """

    def __init__(self, path: str, step: int | None, key: str | None, message: str):
        self.path, self.step, self.key, self.message = path, step, key, message
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [self.path]
        if self.step is not None:
            parts.append(f"step {self.step}")
        if self.key is not None:
            parts.append(f"key '{self.key}'")
        return ": ".join(parts + [self.message])

    def __reduce__(self):
        return type(self), (self.path, self.step, self.key, self.message)


@attrs.frozen
class SchedulerSpec:
    """How concurrent contexts interleave: ``free``, ``random`` or ``pct`` (seeded) or ``replay``."""

    kind: str = "free"
    seed: int | None = None
    schedule: str | None = None
    depth: int = 3  # pct only: the bug depth hunted for


@attrs.frozen
class HostSpec:
    """A modelled host machine."""

    name: str
    mte: bool = True
    ram: int = 256 << 20
    swap: int = 64 << 20
    tcf_preferred: str = "async"
    kernel_fixes: tuple[str, ...] = ()
    fault_replay_limit: int = FAULT_REPLAY_LIMIT


@attrs.frozen
class ProcessSpec:
    """A declared host user process."""

    name: str
    host: str


@attrs.frozen
class MemslotSpec:
    """One memslot of a VM, backed by a mapping in its VMM process."""

    slot: int
    ipa: int
    size: int
    backing: str = "anon"
    object: str | None = None
    prot_mte: bool = False
    hugepage_size: int | None = None  # bytes; None: the default 2 MiB (hugetlb only)


@attrs.frozen
class VmSpec:
    """A VM and its VMM process."""

    name: str
    host: str
    mte: bool = True
    vcpus: int = 1
    ipa_bits: int = 40
    memory: tuple[MemslotSpec, ...] = ()
    setup: str = "auto"


@attrs.frozen
class Expect:
    """An expectation: an outcome, and a value when ``has_value``."""

    outcome: str
    value: object | None = None
    has_value: bool = False


@attrs.frozen
class Step:
    """One op run by one actor, with normalised ``args``."""

    number: int
    actor: str
    actor_kind: str
    actor_target: str
    vcpu: int | None
    op: str
    args: dict
    expect: Expect | None = None
    path_in_parallel: int | None = None


@attrs.frozen
class Parallel:
    """Sub-steps run concurrently; they share ``number``."""

    number: int
    steps: tuple[Step, ...]


@attrs.frozen
class Scenario:
    """A whole validated scenario."""

    name: str
    description: str
    bugs: tuple[str, ...]
    scheduler: SchedulerSpec
    hosts: dict[str, HostSpec]
    processes: dict[str, ProcessSpec]
    vms: dict[str, VmSpec]
    steps: tuple[Step | Parallel, ...]
    path: str
    expect_violations: tuple[str, ...] = ()  # canonical invariant names


class _Where:
    """Where in the file we are, to build errors: path, step and a key prefix."""

    def __init__(self, path: str, step: int | None = None, prefix: str = ""):
        self.path, self.step, self.prefix = path, step, prefix

    def at(self, prefix: str) -> _Where:
        return _Where(self.path, self.step, self._key(prefix))

    def _key(self, key: str | None) -> str | None:
        if key is None:
            return self.prefix or None
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str | None, message: str) -> ScenarioError:
        return ScenarioError(self.path, self.step, self._key(key), message)


_REQUIRED = object()


def parse_size(value: Any, *, path: str = "<scenario>", step: int | None = None,
               key: str | None = None) -> int:
    """Parse a size, address, offset or count.

    Args:
        value: an int >= 0, or a string ``"N"``, ``"N B"`` or ``"N KiB"`` (also MiB, GiB, TiB;
            one optional space; units are case-sensitive).
        path, step, key: where the value came from, for the error.

    Returns:
        The value in bytes (or units, for counts).

    Raises:
        ScenarioError: booleans, floats, negative numbers or any other string ("4KB").
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2) or ""]
    raise ScenarioError(path, step, key, "must be a non-negative integer or a size such as "
                        f"\"4KiB\", \"16MiB\", \"1GiB\" (got {value!r})")


# Converters: (value, where, key) -> normalised value.

def _size(v: Any, w: _Where, k: str) -> int:
    return parse_size(v, path=w.path, step=w.step, key=w._key(k))


def _int(lo: int, hi: int) -> Callable[[Any, _Where, str], int]:
    def conv(v: Any, w: _Where, k: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise w.error(k, f"must be an integer in {lo:#x}..{hi:#x} (got {v!r})"
                          if hi > 255 else f"must be an integer in {lo}..{hi} (got {v!r})")
        return v
    return conv


_tag = _int(0, 15)
_u64 = _int(0, _U64 - 1)


def _bool(v: Any, w: _Where, k: str) -> bool:
    if not isinstance(v, bool):
        raise w.error(k, f"must be true or false (got {v!r})")
    return v


def _str(v: Any, w: _Where, k: str) -> str:
    if not isinstance(v, str) or not v:
        raise w.error(k, f"must be a non-empty string (got {v!r})")
    return v


def _name(v: Any, w: _Where, k: str) -> str:
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise w.error(k, f"must be a name of letters, digits, '_', '.', '-' (got {v!r})")
    return v


def _choice(*options: str) -> Callable[[Any, _Where, str], str]:
    def conv(v: Any, w: _Where, k: str) -> str:
        if v not in options:
            raise w.error(k, f"must be one of {', '.join(options)} (got {v!r})")
        return v
    return conv


def _list_of(options: tuple[str, ...]) -> Callable[[Any, _Where, str], tuple[str, ...]]:
    def conv(v: Any, w: _Where, k: str) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise w.error(k, f"must be a list of {', '.join(options)} (got {v!r})")
        for item in v:
            if item not in options:
                raise w.error(k, f"unknown {item!r}; allowed: {', '.join(options)}")
        if len(set(v)) != len(v):
            raise w.error(k, f"lists an item twice ({v!r})")
        return tuple(v)
    return conv


def _tag_list(v: Any, w: _Where, k: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise w.error(k, f"must be a list of tags 0..15 (got {v!r})")
    return tuple(_tag(t, w, k) for t in v)


def _hex(v: Any, w: _Where, k: str) -> bytes:
    if not isinstance(v, str) or not _HEX_RE.fullmatch(v):
        raise w.error(k, f"must be a string of hex byte pairs such as \"00ff\" (got {v!r})")
    return bytes.fromhex(v)


class _Args:
    """The argument keys of one step, consumed by an op handler."""

    def __init__(self, op: str, raw: dict, where: _Where):
        self.op, self.raw, self.where = op, raw, where

    def allow(self, *keys: str) -> None:
        for k in self.raw:
            if k not in keys:
                allowed = ", ".join(keys) if keys else "none"
                raise self.where.error(k, f"unknown argument for op '{self.op}' "
                                       f"(arguments: {allowed})")

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, conv: Callable, default: Any = _REQUIRED) -> Any:
        if key not in self.raw:
            if default is _REQUIRED:
                raise self.where.error(key, f"missing; required by op '{self.op}'")
            return default
        return conv(self.raw[key], self.where, key)

    def data(self) -> bytes:
        """``data`` or ``fill`` + ``size``, as bytes."""
        if ("data" in self) == ("fill" in self):
            raise self.where.error("data", f"op '{self.op}' needs exactly one of 'data' or "
                                   "'fill' (with 'size')")
        if "data" in self:
            if "size" in self:
                raise self.where.error("size", "goes with 'fill', not with 'data'")
            return self.get("data", _hex)
        return bytes([self.get("fill", _int(0, 255))]) * self.get("size", _size)


class _State:
    """What the steps seen so far have declared: hosts, processes, VMs, objects."""

    def __init__(self, hosts: dict[str, HostSpec], default_host: str,
                 processes: dict[str, ProcessSpec], vms: dict[str, VmSpec]):
        self.hosts, self.default_host, self.vms = hosts, default_host, vms
        self.process_hosts = {p.name: p.host for p in processes.values()}
        self.pending: dict[str, str] = {}  # fork children not yet actors
        self.objects: dict[str, str] = {}

    def process_host(self, v: Any, w: _Where, k: str) -> str:
        """Resolve a process name or ``vmm:VM`` to its host."""
        if isinstance(v, str) and v.startswith("vmm:") and v[4:] in self.vms:
            return self.vms[v[4:]].host
        if isinstance(v, str) and v in self.process_hosts:
            return self.process_hosts[v]
        known = sorted(self.process_hosts) + [f"vmm:{n}" for n in self.vms]
        raise w.error(k, f"unknown process {v!r}; known: {', '.join(known) or 'none'}")

    def check_object(self, obj: str | None, backing: str, w: _Where, k: str) -> None:
        if obj is None:
            return
        if backing not in _OBJECT_BACKINGS:
            raise w.error(k, f"an object backs only {', '.join(_OBJECT_BACKINGS)} "
                          f"mappings, not {backing!r}")
        seen = self.objects.setdefault(obj, backing)
        if seen != backing:
            raise w.error(k, f"object {obj!r} is a {seen} elsewhere, here a {backing}")


# Op handlers: (args, state, who) -> normalised args dict, where ``who`` is the acting process
# (a name or ``vmm:VM``), or the host name for host ops. Most ops are a plain table of
# ``argument: (converter, default)``; the rest have a function.

_R = _REQUIRED
_ADDR, _SIZE = ("addr", (_size, _R)), ("size", (_size, _R))
_SLOT = ("slot", (_int(0, (1 << 32) - 1), _R))
_SIMPLE_OPS: dict[str, dict[str, tuple[Callable, Any]]] = {
    "mprotect": dict([_ADDR, _SIZE, ("prot", (_list_of(PROTS), _R))]),
    "munmap": dict([_ADDR, _SIZE]),
    "madvise": dict([_ADDR, _SIZE, ("advice", (_choice("dontneed", "free", "mergeable"), _R))]),
    "prctl-get": {}, "irg": {}, "read-tfsr": {}, "clear-tfsr": {},
    "tco": {"on": (_bool, _R)},
    "load": dict([_ADDR, ("tag", (_tag, 0)), _SIZE]),
    "stg": dict([_ADDR, ("tag", (_tag, 0)), _SIZE]),
    "ldg": dict([_ADDR, _SIZE]),
    "check-extension": {"cap": (_choice(*KVM_CAPS), _R)},
    "create-vcpu": {"aarch32": (_bool, False)},
    "set-memory-region": dict([_SLOT, ("ipa", (_size, _R)), _SIZE, _ADDR, (
        "flags", (_list_of(("log-dirty-pages", "readonly")), ()))]),
    "dma-read": dict([("ipa", (_size, _R)), _SIZE]),
    "enable-mte": {"tcf": (_choice(*TCF_MODES), _R), "include": (_int(0, 0xFFFF), 0xFFFF)},
    "map": dict([("va", (_size, _R)), ("ipa", (_size, _R)), _SIZE,
                 ("attr", (_choice("tagged", "normal", "device"), _R))]),
}


def _simple(spec: dict[str, tuple[Callable, Any]]) -> Callable[[_Args, _State, str], dict]:
    def handler(a: _Args, st: _State, who: str) -> dict:
        a.allow(*spec)
        return {k: a.get(k, conv, default) for k, (conv, default) in spec.items()}
    return handler


def _hugepage_size(v: Any, w: _Where, k: str) -> int:
    """``hugepage-size``: one of the arm64 hugetlb sizes, as a string or in bytes."""
    for name, size in HUGEPAGE_SIZES.items():
        if v == name or (v == size and isinstance(v, int) and not isinstance(v, bool)):
            return size
    raise w.error(k, f"must be one of {', '.join(f'{n!r}' for n in HUGEPAGE_SIZES)} (got {v!r})")


def _optional(a: _Args, out: dict, key: str, conv: Callable, wire: str | None = None) -> dict:
    """Add ``key`` to ``out`` (as ``wire``) only when the step gives it: optional wire fields are
    sent only when asked for, so an older peer that does not know them still works."""
    if key in a:
        out[wire or key] = a.get(key, conv)
    return out


def _op_enable_cap(a: _Args, st: _State, who: str) -> dict:
    a.allow("cap", "flags", "args")
    out = {"cap": a.get("cap", _choice(*KVM_CAPS)), "flags": a.get("flags", _u64, 0)}
    if "args" in a:
        raw = a.raw["args"]
        if not isinstance(raw, list):
            raise a.where.error("args", f"must be a list of integers (got {raw!r})")
        out["args"] = tuple(_u64(x, a.where, "args") for x in raw)
    return out


def _op_dirty_log(a: _Args, st: _State, who: str) -> dict:
    a.allow("slot", "action", "first", "count")
    out = {"slot": a.get("slot", _SLOT[1][0]),
           "action": a.get("action", _choice("enable", "disable", "get", "clear"))}
    for key in ("first", "count"):
        if key in a and out["action"] != "clear":
            raise a.where.error(key, "only for action 'clear'")
        _optional(a, out, key, _size)
    return out


def _op_mmap(a: _Args, st: _State, who: str) -> dict:
    a.allow("addr", "size", "prot", "share", "backing", "object", "offset", "hugepage-size")
    backing = a.get("backing", _choice(*BACKINGS), "anon")
    share = a.get("share", _choice("private", "shared"),
                  "private" if backing in _PRIVATE_BY_DEFAULT else "shared")
    if backing == "anon-shared" and share == "private":
        raise a.where.error("share", "backing 'anon-shared' is MAP_SHARED; use 'anon' for "
                            "a private anonymous mapping")
    obj = a.get("object", _name, None)
    st.check_object(obj, backing, a.where, "object")
    out = {"addr": a.get("addr", _size, None), "size": a.get("size", _size),
           "prot": a.get("prot", _list_of(PROTS), ("read", "write")), "share": share,
           "backing": backing, "object": obj, "offset": a.get("offset", _size, 0)}
    if "hugepage-size" in a and backing != "hugetlb":
        raise a.where.error("hugepage-size", f"only for backing 'hugetlb' (got {backing!r})")
    return _optional(a, out, "hugepage-size", _hugepage_size, "hugepage_size")


def _op_prctl(a: _Args, st: _State, who: str) -> dict:
    a.allow("tcf", "include")
    if "tcf" not in a and "include" not in a:
        raise a.where.error("tcf", "op 'prctl' needs 'tcf', 'include' or both")
    return {"tcf": a.get("tcf", _choice(*TCF_MODES), None),
            "include": a.get("include", _int(0, 0xFFFF), None)}


def _op_store(a: _Args, st: _State, who: str) -> dict:
    a.allow("addr", "tag", "data", "fill", "size")
    return {"addr": a.get("addr", _size), "tag": a.get("tag", _tag, 0), "data": a.data()}


def _op_dma_write(a: _Args, st: _State, who: str) -> dict:
    a.allow("ipa", "data", "fill", "size")
    return {"ipa": a.get("ipa", _size), "data": a.data()}


def _op_fork(a: _Args, st: _State, who: str) -> dict:
    a.allow("child")
    child = a.get("child", _name)
    if child == "host" or child in st.process_hosts or child in st.pending:
        raise a.where.error("child", f"process {child!r} already exists")
    st.pending[child] = st.process_host(who, a.where, "child")
    return {"child": child}


def _op_ptrace(a: _Args, st: _State, who: str) -> dict:
    last = ("count", _size) if a.op == "ptrace-peek-tags" else ("tags", _tag_list)
    a.allow("target", "addr", last[0])
    target = a.get("target", _str)
    st.process_host(target, a.where, "target")
    return {"target": target, "addr": a.get("addr", _size), last[0]: a.get(*last)}


def _op_copy_tags(a: _Args, st: _State, who: str) -> dict:
    a.allow("ipa", "length", "direction", "tags", "flags", "reserved")
    length = a.get("length", _size)
    direction = a.get("direction", _choice("from-guest", "to-guest"))
    tags = None
    if direction == "to-guest":
        raw = a.raw.get("tags")
        if isinstance(raw, int) and not isinstance(raw, bool):
            tags = (_tag(raw, a.where, "tags"),) * (length // GRANULE)
        else:
            tags = a.get("tags", _tag_list)
    elif "tags" in a:
        raise a.where.error("tags", "only for direction 'to-guest'")
    reserved = a.raw.get("reserved", [0, 0])
    if not isinstance(reserved, list) or len(reserved) != 2:
        raise a.where.error("reserved", f"must be a list of 2 integers (got {reserved!r})")
    return {"ipa": a.get("ipa", _size), "length": length, "direction": direction,
            "tags": tags, "flags": a.get("flags", _u64, None),
            "reserved": tuple(_u64(r, a.where, "reserved") for r in reserved)}


def _op_host(a: _Args, st: _State, host: str) -> dict:
    sized = a.op != "page-flags"
    a.allow("process", "vm", "addr", "ipa", *(("size",) if sized else ()))
    if ("process" in a) == ("vm" in a):
        raise a.where.error("process", f"op '{a.op}' needs exactly one of 'process' (with "
                            "'addr') or 'vm' (with 'ipa')")
    if "process" in a:
        if "ipa" in a:
            raise a.where.error("ipa", "goes with 'vm'; a process takes 'addr'")
        process, vm = a.get("process", _str), None
        owner, addr = st.process_host(process, a.where, "process"), a.get("addr", _size)
    else:
        if "addr" in a:
            raise a.where.error("addr", "goes with 'process'; a VM takes 'ipa'")
        process, vm = None, a.get("vm", _str)
        if vm not in st.vms:
            raise a.where.error("vm", f"unknown VM {vm!r}; VMs: {', '.join(st.vms) or 'none'}")
        owner, addr = st.vms[vm].host, a.get("ipa", _size)
    if owner != host:
        raise a.where.error("process" if process else "vm",
                            f"{process or vm!r} runs on host {owner!r}, not {host!r}")
    return {"process": process, "vm": vm, "addr": addr,
            "size": a.get("size", _size) if sized else None}


_HANDLERS: dict[str, Callable[[_Args, _State, str], dict]] = {
    **{op: _simple(spec) for op, spec in _SIMPLE_OPS.items()},
    "mmap": _op_mmap, "prctl": _op_prctl, "store": _op_store, "dma-write": _op_dma_write,
    "fork": _op_fork, "ptrace-peek-tags": _op_ptrace, "ptrace-poke-tags": _op_ptrace,
    "copy-tags": _op_copy_tags, "enable-cap": _op_enable_cap, "dirty-log": _op_dirty_log,
    "swap-out": _op_host, "ksm-merge": _op_host,
    "migrate-pages": _op_host, "page-flags": _op_host,
}
assert set(_HANDLERS) == set(VMM_OPS + GUEST_OPS + HOST_OPS)


def _outcome(v: Any, w: _Where, k: str) -> str:
    if v in OUTCOMES or (isinstance(v, str) and v in ERRNO_NAMES):
        return v
    raise w.error(k, f"unknown outcome {v!r}; expected one of {', '.join(OUTCOMES)} "
                  "or an errno name such as \"EINVAL\"")


def _parse_expect(raw: Any, op: str, w: _Where) -> Expect:
    if not isinstance(raw, dict):
        return Expect(_outcome(raw, w, "expect"))
    for k in raw:
        if k not in ("outcome", "value"):
            raise w.error(f"expect.{k}", "unknown key; an expect table has 'outcome' and "
                          "optionally 'value'")
    if "outcome" not in raw:
        raise w.error("expect.outcome", "missing")
    outcome = _outcome(raw["outcome"], w, "expect.outcome")
    if "value" not in raw:
        return Expect(outcome)
    value = raw["value"]
    if op in ("load", "dma-read") and isinstance(value, str):
        value = value.lower()
    return Expect(outcome, value, True)


def _parse_actor(actor: Any, st: _State, w: _Where) -> tuple[str, str, int | None]:
    """Return (kind, target, vcpu) for an actor string."""
    if not isinstance(actor, str):
        raise w.error("actor", f"must be a string (got {actor!r})")
    parts = actor.split(":")
    head = parts[0]
    if head == "vmm" and len(parts) == 2 and parts[1] in st.vms:
        return "vmm", parts[1], None
    if head == "guest" and len(parts) in (2, 3) and parts[1] in st.vms:
        spec = st.vms[parts[1]]
        vcpus = spec.vcpus if spec.setup != "manual" else 512  # manual VMs create vCPUs in steps
        if len(parts) == 2:
            return "guest", parts[1], 0
        if parts[2].isdigit() and parts[2].isascii() and int(parts[2]) < vcpus:
            return "guest", parts[1], int(parts[2])
        raise w.error("actor", f"VM {parts[1]!r} has vCPUs 0..{vcpus - 1} (got {actor!r})")
    if actor == "host":
        return "host", st.default_host, None
    if head == "host" and len(parts) == 2 and parts[1] in st.hosts:
        return "host", parts[1], None
    if len(parts) == 1 and actor in st.process_hosts:
        return "process", actor, None
    known = sorted(st.process_hosts)
    raise w.error("actor", f"unknown actor {actor!r}; actors are a process "
                  f"({', '.join(known) or 'none declared'}), vmm:VM, guest:VM[:N], host or "
                  f"host:NAME, with VMs {', '.join(st.vms) or 'none'} and hosts "
                  f"{', '.join(st.hosts)}")


def _parse_step(raw: Any, number: int, sub: int | None, st: _State, w: _Where) -> Step:
    if not isinstance(raw, dict):
        raise w.error(None, f"a step must be a table (got {raw!r})")
    if "parallel" in raw:
        raise w.error("parallel", "parallel steps do not nest")
    if "actor" not in raw:
        raise w.error("actor", "missing")
    kind, target, vcpu = _parse_actor(raw["actor"], st, w)
    op = raw.get("op")
    allowed = OPS_BY_KIND[kind]
    if op not in allowed:
        raise w.error("op", f"{'missing' if op is None else f'unknown op {op!r}'} for a "
                      f"{kind} actor; allowed: {', '.join(allowed)}")
    args = {k: v for k, v in raw.items() if k not in ("actor", "op", "expect")}
    who = f"vmm:{target}" if kind == "vmm" else target
    norm = _HANDLERS[op](_Args(op, args, w), st, who)
    expect = _parse_expect(raw["expect"], op, w) if "expect" in raw else None
    return Step(number, raw["actor"], kind, target, vcpu, op, norm, expect, sub)


def _parse_steps(raw: Any, st: _State, path: str) -> tuple[Step | Parallel, ...]:
    if not isinstance(raw, list):
        raise ScenarioError(path, None, "steps", "must be an array of tables ([[steps]])")
    out: list[Step | Parallel] = []
    for number, item in enumerate(raw, start=1):
        w = _Where(path, number)
        if isinstance(item, dict) and "parallel" in item:
            extra = [k for k in item if k != "parallel"]
            if extra:
                raise w.error(extra[0], "a parallel step has only 'parallel' (give actor, "
                              "op and expect in each sub-step)")
            subs = item["parallel"]
            if not isinstance(subs, list) or not subs:
                raise w.error("parallel", "must be a non-empty list of step tables")
            steps = tuple(_parse_step(s, number, i, st, w.at(f"parallel[{i}]"))
                          for i, s in enumerate(subs, start=1))
            out.append(Parallel(number, steps))
        else:
            out.append(_parse_step(item, number, None, st, w))
        st.process_hosts.update(st.pending)
        st.pending.clear()
    return tuple(out)


def _table(v: Any, w: _Where, k: str) -> dict:
    if not isinstance(v, dict):
        raise w.error(k, f"must be a table (got {v!r})")
    return v


def _check_keys(table: dict, allowed: tuple[str, ...], w: _Where, prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise w.error(f"{prefix}{k}", f"unknown key; allowed: {', '.join(allowed)}")


def _parse_hosts(data: dict, w: _Where) -> tuple[dict[str, HostSpec], str]:
    if "host" in data and "hosts" in data:
        raise w.error("hosts", "give either [host] or [hosts.NAME], not both")
    if "hosts" in data:
        tables = _table(data["hosts"], w, "hosts")
        if not tables:
            raise w.error("hosts", "declares no host")
        prefix = "hosts."
    else:
        tables = {"host": _table(data.get("host", {}), w, "host")}
        prefix = ""
    hosts = {}
    for name, t in tables.items():
        where = prefix + name
        _name(name, w, where)
        _table(t, w, where)
        _check_keys(t, ("mte", "ram", "swap", "tcf-preferred", "kernel-fixes", "fault-replay-limit"),
                    w, f"{where}.")
        fixes = t.get("kernel-fixes", [])
        if not isinstance(fixes, list) or not all(isinstance(f, str) for f in fixes):
            raise w.error(f"{where}.kernel-fixes", f"must be a list of kernel fix names (got {fixes!r})")
        try:
            fixes = check_kernel_fix_names(dict.fromkeys(fixes))
        except ValueError as exc:
            raise w.error(f"{where}.kernel-fixes", str(exc)) from None
        hosts[name] = HostSpec(
            name, mte=_bool(t.get("mte", True), w, f"{where}.mte"),
            ram=_size(t.get("ram", 256 << 20), w, f"{where}.ram"),
            swap=_size(t.get("swap", 64 << 20), w, f"{where}.swap"),
            tcf_preferred=_choice(*TCF_PREFERRED)(t.get("tcf-preferred", "async"), w,
                                                  f"{where}.tcf-preferred"),
            kernel_fixes=fixes,
            fault_replay_limit=_int(1, 1 << 20)(t.get("fault-replay-limit", FAULT_REPLAY_LIMIT), w,
                                                f"{where}.fault-replay-limit"))
        for key in ("ram", "swap"):
            value = getattr(hosts[name], key)
            if value % PAGE_SIZE or (key == "ram" and not value):
                raise w.error(f"{where}.{key}", f"must be a{' non-zero' * (key == 'ram')} "
                              f"multiple of {PAGE_SIZE} (got {value})")
    default = "host" if "host" in hosts else next(iter(hosts))
    return hosts, default


def _host_ref(t: dict, hosts: dict, default: str, w: _Where, key: str) -> str:
    host = t.get("host", default)
    if host not in hosts:
        raise w.error(key, f"unknown host {host!r}; hosts: {', '.join(hosts)}")
    return host


def _parse_memslots(raw: Any, vm: str, ipa_bits: int, st: _State,
                    w: _Where) -> tuple[MemslotSpec, ...]:
    if not isinstance(raw, list):
        raise w.error(f"vms.{vm}.memory", "must be a list of memslot tables")
    slots: list[MemslotSpec] = []
    for i, t in enumerate(raw):
        p = f"vms.{vm}.memory[{i}]"
        _table(t, w, p)
        _check_keys(t, ("ipa", "size", "backing", "object", "prot_mte", "hugepage-size"), w, f"{p}.")
        for k in ("ipa", "size"):
            if k not in t:
                raise w.error(f"{p}.{k}", "missing")
        backing = _choice(*BACKINGS)(t.get("backing", "anon"), w, f"{p}.backing")
        obj = _name(t["object"], w, f"{p}.object") if "object" in t else None
        st.check_object(obj, backing, w, f"{p}.object")
        huge = None
        if "hugepage-size" in t:
            if backing != "hugetlb":
                raise w.error(f"{p}.hugepage-size", f"only for backing 'hugetlb' (got {backing!r})")
            huge = _hugepage_size(t["hugepage-size"], w, f"{p}.hugepage-size")
        slot = MemslotSpec(i, _size(t["ipa"], w, f"{p}.ipa"), _size(t["size"], w, f"{p}.size"),
                           backing, obj, _bool(t.get("prot_mte", False), w, f"{p}.prot_mte"), huge)
        align = (huge or HUGE_PAGE_SIZE) if backing == "hugetlb" else PAGE_SIZE
        for k in ("ipa", "size"):
            if getattr(slot, k) % align:
                raise w.error(f"{p}.{k}", f"must be a multiple of {align:#x} for backing "
                              f"{backing!r} (got {getattr(slot, k):#x})")
        if not slot.size:
            raise w.error(f"{p}.size", "must not be 0")
        if slot.ipa + slot.size > 1 << ipa_bits:
            raise w.error(f"{p}.size", f"ends beyond the {ipa_bits}-bit IPA space")
        for other in slots:
            if slot.ipa < other.ipa + other.size and other.ipa < slot.ipa + slot.size:
                raise w.error(f"{p}.ipa", f"overlaps memslot {other.slot}")
        slots.append(slot)
    return tuple(slots)


def parse_scenario(data: dict, path: str = "<scenario>") -> Scenario:
    """Validate and normalise a decoded scenario table.

    Args:
        data: the TOML document as ``tomllib`` decodes it.
        path: the file name used in error messages and kept in ``Scenario.path``.

    Returns:
        The normalised :class:`Scenario`.

    Raises:
        ScenarioError: anything that is not a valid scenario, naming the step and key.
    """
    w = _Where(path)
    _check_keys(data, ("name", "description", "bugs", "expect-violations", "scheduler", "host",
                       "hosts", "processes", "vms", "steps"), w, "")
    if "name" not in data:
        raise w.error("name", "missing; every scenario needs a name")
    name = _str(data["name"], w, "name")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise w.error("description", f"must be a string (got {description!r})")
    bugs_raw = data.get("bugs", [])
    if not isinstance(bugs_raw, list) or not all(isinstance(b, str) for b in bugs_raw):
        raise w.error("bugs", f"must be a list of bug names (got {bugs_raw!r})")
    try:
        bugs = check_bug_names(bugs_raw)
    except ValueError as exc:
        raise w.error("bugs", str(exc)) from None

    expect_violations = _expect_violations(data.get("expect-violations", []), w)

    sched = _table(data.get("scheduler", {}), w, "scheduler")
    _check_keys(sched, ("kind", "seed", "schedule", "depth"), w, "scheduler.")
    kind = _choice("free", "random", "pct", "replay")(sched.get("kind", "free"), w, "scheduler.kind")
    seed = _u64(sched["seed"], w, "scheduler.seed") if "seed" in sched else None
    schedule = _str(sched["schedule"], w, "scheduler.schedule") if "schedule" in sched else None
    if kind == "free" and seed is not None:
        raise w.error("scheduler.seed", "only for kind 'random', 'pct' or 'replay'")
    depth = _int(1, 16)(sched["depth"], w, "scheduler.depth") if "depth" in sched else 3
    if kind != "pct" and "depth" in sched:
        raise w.error("scheduler.depth", "only for kind 'pct'")
    if kind != "replay" and schedule is not None:
        raise w.error("scheduler.schedule", "only for kind 'replay'")
    if kind == "replay" and schedule is None:
        raise w.error("scheduler.schedule", "missing; kind 'replay' needs a schedule")
    scheduler = SchedulerSpec(kind, 0 if kind in ("random", "pct") and seed is None else seed, schedule, depth)

    hosts, default_host = _parse_hosts(data, w)
    processes: dict[str, ProcessSpec] = {}
    for pname, t in _table(data.get("processes", {}), w, "processes").items():
        _name(pname, w, f"processes.{pname}")
        if pname == "host":
            raise w.error("processes.host", "'host' is the host kernel's actor name")
        _check_keys(_table(t, w, f"processes.{pname}"), ("host",), w, f"processes.{pname}.")
        processes[pname] = ProcessSpec(
            pname, _host_ref(t, hosts, default_host, w, f"processes.{pname}.host"))

    st = _State(hosts, default_host, processes, {})
    for vname, t in _table(data.get("vms", {}), w, "vms").items():
        p = f"vms.{vname}"
        _name(vname, w, p)
        _check_keys(_table(t, w, p), ("host", "mte", "vcpus", "ipa_bits", "memory", "setup"),
                    w, f"{p}.")
        ipa_bits = _int(32, 52)(t.get("ipa_bits", 40), w, f"{p}.ipa_bits")
        st.vms[vname] = VmSpec(
            vname, _host_ref(t, hosts, default_host, w, f"{p}.host"),
            mte=_bool(t.get("mte", True), w, f"{p}.mte"),
            vcpus=_int(1, 512)(t.get("vcpus", 1), w, f"{p}.vcpus"), ipa_bits=ipa_bits,
            memory=_parse_memslots(t.get("memory", []), vname, ipa_bits, st, w),
            setup=_choice("auto", "manual")(t.get("setup", "auto"), w, f"{p}.setup"))

    steps = _parse_steps(data.get("steps", []), st, path)
    return Scenario(name, description, bugs, scheduler, hosts, processes, dict(st.vms), steps,
                    path, expect_violations)


def _expect_violations(raw: Any, w: _Where) -> tuple[str, ...]:
    """``expect-violations``: invariant names the model checks, in canonical spelling."""
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise w.error("expect-violations", f"must be a list of invariant names (got {raw!r})")
    out = []
    for n in raw:
        if canonical(n) not in INVARIANTS:
            raise w.error("expect-violations", f"the model checks no invariant {n!r}; known: "
                          f"{', '.join(sorted(INVARIANTS))}")
        out.append(canonical(n))
    return tuple(dict.fromkeys(out))


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read and parse a scenario file.

    Args:
        path: the TOML file.

    Returns:
        The normalised :class:`Scenario`.

    Raises:
        ScenarioError: the file cannot be read, is not UTF-8 TOML (the message gives the line
            and column), or is not a valid scenario.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ScenarioError(name, None, None, f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(name, None, None, f"invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(name, None, None, f"not UTF-8: {exc}") from None
    return parse_scenario(data, name)
