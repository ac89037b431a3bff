"""The scenario's ops, derived from the ABI's op tables, and the sugar a scenario file adds.

Every op a step may run is declared once, in :mod:`shared.abi` (host processes, the host kernel)
or :mod:`shared.control` (a VMM's KVM and device ops, a guest's ops), with its fields and their
kinds; :data:`shared.control.ACTOR_OPS` says which actor runs which. This module turns a step's
keys into the op's normalised arguments from that declaration:

- a field's scenario key is its name with hyphens (``hugepage_size`` -> ``hugepage-size``);
- its written form comes from its kind (:func:`form`): ``size`` and ``addr`` take units
  (``"16MiB"``), ``bytes`` a string of hex byte pairs, ``tag`` 0..15, ``tags`` a list of tags,
  ``enum``/``list``/``name`` their options, ``int`` its range, ``pid`` a process name;
- its default is the declaration's.

The sugar, and nothing else, is written here (:data:`SUGAR` lists it for the vocabulary test):

- ``data``: hex, or ``fill`` (a byte) + ``size``; both become ``data`` bytes.
- ``pid`` fields: ``target`` names a process or ``vmm:VM`` (kept as a name: the runner knows
  the pids); the host ops' ``pid`` + ``addr`` is written ``process`` + ``addr`` or ``vm`` +
  ``ipa`` and normalised to ``{process, vm, addr, size}`` (``size`` None when the op has none).
- ``child``: the new process's name, required, unique; it becomes an actor from the next step.
- ``backing`` ops (mmap): ``share`` defaults to ``private`` for ``anon``/``hugetlb`` and
  ``shared`` otherwise; ``anon-shared`` may not be private; an ``object`` keeps one backing;
  ``hugepage-size`` is for ``hugetlb`` only and also takes ``"2MiB"``-style names.
- an op whose fields are all optional needs at least one of them (prctl).
- ``copy-tags``: ``tags`` only ``to-guest`` (a list, or one tag meaning ``length // 16`` copies).
- ``dirty-log``: ``first`` and ``count`` only for ``action = "clear"``.
- fields in :data:`ONLY_WHEN_GIVEN` are left out of the args unless the step gives them, so a
  peer that does not know them yet still serves every other step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from mtekvm.scenario.model import GRANULE, ScenarioError, Where
from shared.abi import U64_MAX, Field, Kind, OpDef
from shared.control import ACTOR_OPS, FAIL_AT, MIGRATION_FAILS

_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE_RE = re.compile(r"([0-9]+) ?(B|KiB|MiB|GiB|TiB)?")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})*")

#: The ops each actor kind may run, as in the contract's tables (derived from shared.control).
OPS_BY_KIND: dict[str, tuple[str, ...]] = {kind: tuple(table) for kind, table in ACTOR_OPS.items()}
PROCESS_OPS = OPS_BY_KIND["process"]
VMM_OPS = OPS_BY_KIND["vmm"]
GUEST_OPS = OPS_BY_KIND["guest"]
HOST_OPS = OPS_BY_KIND["host"]

#: ``op.field`` (or a bare field name, for every op) sent only when a step gives it.
ONLY_WHEN_GIVEN = ("hugepage_size", "enable-cap.args", "dirty-log.first", "dirty-log.count", "mmap.node",
                   "mmap.region", "mmap.attr", "migrate-pages.to")
#: The scenario keys that are not a field of their op, and the field they stand for.
SUGAR: dict[str, str] = {
    "fill": "data", "size": "data",  # fill + size: the data bytes
    "process": "pid", "vm": "pid", "ipa": "addr",  # host ops: process + addr or vm + ipa
}
_PRIVATE_BY_DEFAULT = ("anon", "hugetlb")
_HUGEPAGE_NAMES = {"64KiB": 64 << 10, "2MiB": 2 << 20, "32MiB": 32 << 20, "1GiB": 1 << 30}
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


# ---- converters: (value, where, key) -> normalised value ---------------------------------

Conv = Callable[[Any, Where, str], Any]


def size(v: Any, w: Where, k: str) -> int:
    return parse_size(v, path=w.path, step=w.step, key=w.key(k))


def integer(lo: int, hi: int) -> Conv:
    def conv(v: Any, w: Where, k: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise w.error(k, f"must be an integer in {lo:#x}..{hi:#x} (got {v!r})"
                          if hi > 255 else f"must be an integer in {lo}..{hi} (got {v!r})")
        return v
    return conv


tag = integer(0, 15)
u64 = integer(0, U64_MAX)


def count(v: Any, w: Where, k: str) -> int | str:
    """A number of pages, or ``"all"``."""
    if v == "all":
        return v
    return u64(v, w, k)


def boolean(v: Any, w: Where, k: str) -> bool:
    if not isinstance(v, bool):
        raise w.error(k, f"must be true or false (got {v!r})")
    return v


def string(v: Any, w: Where, k: str) -> str:
    if not isinstance(v, str) or not v:
        raise w.error(k, f"must be a non-empty string (got {v!r})")
    return v


def name(v: Any, w: Where, k: str) -> str:
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise w.error(k, f"must be a name of letters, digits, '_', '.', '-' (got {v!r})")
    return v


def choice(*options: str) -> Conv:
    def conv(v: Any, w: Where, k: str) -> str:
        if v not in options:
            raise w.error(k, f"must be one of {', '.join(options)} (got {v!r})")
        return v
    return conv


def list_of(options: tuple[str, ...]) -> Conv:
    def conv(v: Any, w: Where, k: str) -> tuple[str, ...]:
        if not isinstance(v, list):
            raise w.error(k, f"must be a list of {', '.join(options)} (got {v!r})")
        for item in v:
            if item not in options:
                raise w.error(k, f"unknown {item!r}; allowed: {', '.join(options)}")
        if len(set(v)) != len(v):
            raise w.error(k, f"lists an item twice ({v!r})")
        return tuple(v)
    return conv


def int_list(v: Any, w: Where, k: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise w.error(k, f"must be a list of integers (got {v!r})")
    return tuple(u64(x, w, k) for x in v)


def tag_list(v: Any, w: Where, k: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise w.error(k, f"must be a list of tags 0..15 (got {v!r})")
    return tuple(tag(t, w, k) for t in v)


def hex_bytes(v: Any, w: Where, k: str) -> bytes:
    if not isinstance(v, str) or not _HEX_RE.fullmatch(v):
        raise w.error(k, f"must be a string of hex byte pairs such as \"00ff\" (got {v!r})")
    return bytes.fromhex(v)


def hugepage_size(v: Any, w: Where, k: str) -> int:
    """``hugepage-size``: one of the arm64 hugetlb sizes, as a string or in bytes."""
    for label, n in _HUGEPAGE_NAMES.items():
        if v == label or (v == n and isinstance(v, int) and not isinstance(v, bool)):
            return n
    raise w.error(k, f"must be one of {', '.join(f'{n!r}' for n in _HUGEPAGE_NAMES)} (got {v!r})")


def int_tuple(n: int) -> Conv:
    """A list of exactly ``n`` unsigned integers."""
    def conv(v: Any, w: Where, k: str) -> tuple[int, ...]:
        if not isinstance(v, list) or len(v) != n:
            raise w.error(k, f"must be a list of {n} integers (got {v!r})")
        return tuple(u64(r, w, k) for r in v)
    return conv


def form(kind: Kind) -> Conv:
    """The written form of a field of ``kind`` in a scenario file."""
    k = kind.name
    if k in ("size", "addr"):
        return hugepage_size if kind.options else size
    if k == "tag":
        return tag
    if k == "tags":
        return tag_list
    if k == "bytes":
        return hex_bytes
    if k in ("enum",) or (k == "name" and kind.options):
        return choice(*kind.options)
    if k == "list":
        if kind.options:
            return list_of(kind.options)
        return int_tuple(kind.lo) if kind.lo == kind.hi else int_list
    if k == "name":
        return name
    if k == "pid":
        return string
    if k == "bool":
        return boolean
    if k == "int":
        return integer(kind.lo, kind.hi)
    if k == "count":
        return count
    raise TypeError(f"a field of kind {k!r} has no scenario form")


# ---- one step's arguments --------------------------------------------------------------

class Args:
    """The argument keys of one step, consumed by :func:`normalise`."""

    def __init__(self, op: str, raw: dict, where: Where):
        self.op, self.raw, self.where = op, raw, where

    def allow(self, *keys: str) -> None:
        for k in self.raw:
            if k not in keys:
                allowed = ", ".join(keys) if keys else "none"
                raise self.where.error(k, f"unknown argument for op '{self.op}' "
                                       f"(arguments: {allowed})")

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str, conv: Conv, default: Any = _REQUIRED) -> Any:
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
            return self.get("data", hex_bytes)
        return bytes([self.get("fill", integer(0, 255))]) * self.get("size", size)


def _only_when_given(op: str, f: Field) -> bool:
    return f.name in ONLY_WHEN_GIVEN or f"{op}.{f.name}" in ONLY_WHEN_GIVEN


def _keys(d: OpDef) -> list[str]:
    """The scenario keys of an op: its fields' keys, with the sugar in place of what it stands for."""
    names = [f.name for f in d.fields]
    keys = [f.key for f in d.fields if f.kind.name != "pid" or f.name != "pid"]
    if "data" in names:
        keys += [k for k in ("fill", "size") if k not in keys]
    if "pid" in names:
        keys = ["process", "vm", *keys, "ipa"]
    return keys


def normalise(actor_kind: str, op: str, raw: dict, st: Any, who: str, w: Where) -> dict:
    """A step's keys as the op's normalised arguments.

    Args:
        actor_kind: ``process``, ``vmm``, ``guest`` or ``host``.
        op: an op of that actor (the caller checked it is one).
        raw: the step's keys other than ``actor``, ``op`` and ``expect``.
        st: the parser's state (processes, VMs, objects seen so far).
        who: the acting process (a name or ``vmm:VM``), or the host for host ops.
        w: where the step is, for errors.

    Raises:
        ScenarioError: a key the op does not take, a missing one, or a value of the wrong form.
    """
    d = ACTOR_OPS[actor_kind][op]
    a = Args(op, raw, w)
    if actor_kind == "host" and op == "kill":
        return _kill(a, st, who)
    a.allow(*_keys(d))
    names = {f.name for f in d.fields}
    if actor_kind == "vmm" and op in _VMM_SPECIAL:
        return _VMM_SPECIAL[op](a, d, st, w)
    if "pid" in names:
        return _host_op(a, d, st, who)
    if actor_kind == "host" and "vm" in names and "vm" in a:  # stage2-entry: a VM of the scenario, by name
        vm = a.get("vm", string)
        if vm not in st.vms:
            raise w.error("vm", f"unknown VM {vm!r}; VMs: {', '.join(st.vms) or 'none'}")
    if len(d.fields) > 1 and all(f.default is None for f in d.fields) and not any(f.key in a for f in d.fields):
        raise w.error(d.fields[0].key, f"op '{op}' needs "
                      f"{', '.join(repr(f.key) for f in d.fields[:-1])}, {d.fields[-1].key!r} or both")
    out: dict[str, Any] = {}
    for f in d.fields:
        if f.name == "data":
            out["data"] = a.data()
        elif f.name in ("fill", "size") and "data" in names:
            continue  # sugar of data
        elif f.kind.name == "tags" and "direction" in names:
            out[f.name] = None  # copy-tags: by direction, below
        elif _only_when_given(op, f):
            if f.key in a:
                out[f.name] = a.get(f.key, form(f.kind))
        elif f.name == "child":
            out["child"] = _child(a, st, who)
        elif f.kind.name == "pid":
            out[f.name] = a.get(f.key, string)
            st.process_host(out[f.name], w, f.key)
        else:
            default = _REQUIRED if f.required else f.default
            out[f.name] = a.get(f.key, form(f.kind), default)
    if "backing" in names:
        _backing(a, out, st)
    if op == "copy-tags":
        _copy_tags(a, out)
    if op == "dirty-log":
        for key in ("first", "count"):
            if key in a and out["action"] != "clear":
                raise w.error(key, "only for action 'clear'")
    return out


def fail_at(v: Any, w: Where, k: str) -> str:
    """``fail-at``: ``precopy:N`` (N >= 1), ``switchover`` or ``after-resume``."""
    try:
        return FAIL_AT.check(v)
    except (ValueError, TypeError):
        raise w.error(k, f'must be "precopy:N" (N >= 1), "switchover" or "after-resume" (got {v!r})') from None


def _migrate(a: Args, d: OpDef, st: Any, w: Where) -> dict:
    """``migrate``: ``to`` a declared host; ``fail`` and ``fail-at`` both or neither.

    Whether ``to`` is the VM's own host is known only when the step runs (the VM may have
    moved): that is the op's EINVAL, not a file error.
    """
    to = a.get("to", name)
    if to not in st.hosts:
        raise w.error("to", f"unknown host {to!r}; hosts: {', '.join(st.hosts)}")
    if ("fail" in a) != ("fail-at" in a):
        given, missing = ("fail", "fail-at") if "fail" in a else ("fail-at", "fail")
        raise w.error(missing, f"missing; '{given}' and '{missing}' go together (fault injection)")
    return {"to": to, "max_passes": a.get("max-passes", integer(0, 1 << 20), d.field("max_passes").default),
            "fail": a.get("fail", choice(*MIGRATION_FAILS), None), "fail_at": a.get("fail-at", fail_at, None)}


def _snapshot_file(a: Args, d: OpDef, st: Any, w: Where) -> dict:
    """``snapshot``/``restore``: exactly one of ``name`` (kept by the run) or ``path`` (a file)."""
    if ("name" in a) == ("path" in a):
        raise w.error("name", f"op '{a.op}' needs exactly one of 'name' (kept until the scenario ends) "
                      "or 'path' (a file, relative to the scenario's folder)")
    if "name" in a:
        return {"name": a.get("name", name), "path": None}
    path = a.get("path", string)
    if "\0" in path:
        raise w.error("path", "must not contain a NUL character")
    return {"name": None, "path": path}


_VMM_SPECIAL: dict[str, Callable[[Args, OpDef, Any, Where], dict]] = {
    "migrate": _migrate, "snapshot": _snapshot_file, "restore": _snapshot_file,
}


def _kill(a: Args, st: Any, host: str) -> dict:
    """Host op ``kill``: ``process`` (a process name or ``vmm:VM``) and optionally ``host`` (the host
    it runs on, instead of the actor's). A process must live on that host; whether a VM runs there
    is known only when the step runs (it may have moved: ESRCH otherwise)."""
    a.allow("process", "host")
    process = a.get("process", string)
    if "host" in a:
        host = a.get("host", name)
        if host not in st.hosts:
            raise a.where.error("host", f"unknown host {host!r}; hosts: {', '.join(st.hosts)}")
    owner = st.process_host(process, a.where, "process")
    if not process.startswith("vmm:") and owner != host:
        raise a.where.error("process", f"{process!r} runs on host {owner!r}, not {host!r}")
    return {"process": process, "host": host}


def _child(a: Args, st: Any, who: str) -> str:
    child = a.get("child", name)
    if child == "host" or child in st.process_hosts or child in st.pending:
        raise a.where.error("child", f"process {child!r} already exists")
    st.pending[child] = st.process_host(who, a.where, "child")
    return child


def _backing(a: Args, out: dict, st: Any) -> None:
    """mmap's ``share`` default, ``object`` and ``hugepage-size`` rules."""
    backing = out["backing"]
    if "share" not in a:
        out["share"] = "private" if backing in _PRIVATE_BY_DEFAULT else "shared"
    if backing == "anon-shared" and out["share"] == "private":
        raise a.where.error("share", "backing 'anon-shared' is MAP_SHARED; use 'anon' for "
                            "a private anonymous mapping")
    st.check_object(out["object"], backing, a.where, "object")
    if "hugepage-size" in a and backing != "hugetlb":
        raise a.where.error("hugepage-size", f"only for backing 'hugetlb' (got {backing!r})")


def _copy_tags(a: Args, out: dict) -> None:
    """``tags`` only to-guest: a list, or one tag for every granule of ``length``."""
    if out["direction"] == "to-guest":
        raw = a.raw.get("tags")
        if isinstance(raw, int) and not isinstance(raw, bool):
            out["tags"] = (tag(raw, a.where, "tags"),) * (out["length"] // GRANULE)
        else:
            out["tags"] = a.get("tags", tag_list)
    elif "tags" in a:
        raise a.where.error("tags", "only for direction 'to-guest'")


def _host_op(a: Args, d: OpDef, st: Any, host: str) -> dict:
    """A host op on ``process`` + ``addr`` or ``vm`` + ``ipa``: ``{process, vm, addr, size}``."""
    sized = any(f.name == "size" for f in d.fields)
    if ("process" in a) == ("vm" in a):
        raise a.where.error("process", f"op '{a.op}' needs exactly one of 'process' (with "
                            "'addr') or 'vm' (with 'ipa')")
    if "process" in a:
        if "ipa" in a:
            raise a.where.error("ipa", "goes with 'vm'; a process takes 'addr'")
        process, vm = a.get("process", string), None
        owner, addr = st.process_host(process, a.where, "process"), a.get("addr", size)
    else:
        if "addr" in a:
            raise a.where.error("addr", "goes with 'process'; a VM takes 'ipa'")
        process, vm = None, a.get("vm", string)
        if vm not in st.vms:
            raise a.where.error("vm", f"unknown VM {vm!r}; VMs: {', '.join(st.vms) or 'none'}")
        owner, addr = st.vms[vm].host, a.get("ipa", size)
    if process and not process.startswith("vmm:") and owner != host:  # a VM (and its VMM) may move: ESRCH then
        raise a.where.error("process", f"{process!r} runs on host {owner!r}, not {host!r}")
    out = {"process": process, "vm": vm, "addr": addr, "size": a.get("size", size) if sized else None}
    for f in d.fields:  # the op's other fields (migrate-pages to, pin-pages on, ...) pass through
        if f.name in ("pid", "addr", "size"):
            continue
        if _only_when_given(a.op, f):
            if f.key in a:
                out[f.name] = a.get(f.key, form(f.kind))
        else:
            out[f.name] = a.get(f.key, form(f.kind), _REQUIRED if f.required else f.default)
    return out
