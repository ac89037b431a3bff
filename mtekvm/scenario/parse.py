"""Scenario files: parse and validate them (the format is described in ``docs/scenarios.md``).

A scenario declares hosts, host processes and VMs, then lists steps; each step is an actor, an
op, the op's arguments and an optional expectation. Which ops an actor runs and what their
arguments are comes from the shared op tables, through :mod:`mtekvm.scenario.ops` (which adds the
written sugar); this module reads files, tables and steps. :func:`load_scenario` reads a file and
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
  The host ops' process must live on the acting host; a VM (and its ``vmm:VM``) may move between hosts
  (``migrate``), so a host op on a VM that is not on the acting host when the step runs is
  ESRCH, not a file error. Their args are normalised to ``{process, vm, addr, size}`` where
  ``addr`` is the ``ipa`` for a VM and ``size`` is ``None`` for ``page-flags``; ``kill`` to
  ``{process, host}`` and ``meminfo`` to ``{}``.
- ``migrate``: ``to`` must be a declared host (whether it is the VM's own is the op's EINVAL
  when the step runs); ``fail`` and ``fail-at`` go together. ``snapshot``/``restore`` take
  exactly one of ``name`` and ``path``.
- ``ptrace-poke-tags`` needs a list of tags (with no count, a single integer is ambiguous);
  ``copy-tags`` to-guest takes a list or one integer meaning ``length // 16`` copies, and its
  ``flags`` is ``None`` unless given raw (the runner derives it from ``direction``).
- ``store`` and ``dma-write`` take ``data`` or ``fill`` + ``size``; both end up as ``data``.
- A ``parallel`` step needs at least one sub-step and may not nest another ``parallel``.
- ``guest:VM:N`` needs ``N < vcpus``; a ``setup = "manual"`` VM creates its vCPUs in steps, so
  any index up to 511 parses (a vCPU that was never created is ENODEV when the step runs).
- Memslots: ``backing`` defaults to ``anon``; ``ipa`` and ``size`` are page aligned (for
  ``hugetlb`` too, as KVM asks), ``size > 0``, slots do not
  overlap and fit in ``ipa_bits``. ``object`` is only
  for ``memfd``, ``shmem`` and ``file``, and one object keeps one backing everywhere.
- mmap ``share`` defaults to ``private`` for ``anon`` and ``hugetlb``, ``shared`` otherwise.
- ``expect`` values are kept as written, except that hex strings expected from ``load`` and
  ``dma-read`` are lowercased.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

from mtekvm.scenario import ops
from mtekvm.scenario.model import (
    FAULT_REPLAY_LIMIT,
    PAGE_SIZE,
    Expect,
    HostSpec,
    MemslotSpec,
    Parallel,
    ProcessSpec,
    Scenario,
    ScenarioError,
    SchedulerSpec,
    Step,
    VmSpec,
)
from mtekvm.scenario.model import Where as _Where
from mtekvm.scenario.ops import OPS_BY_KIND
from mtekvm.scenario.ops import boolean as _bool
from mtekvm.scenario.ops import choice as _choice
from mtekvm.scenario.ops import hugepage_size as _hugepage_size
from mtekvm.scenario.ops import integer as _int
from mtekvm.scenario.ops import name as _name
from mtekvm.scenario.ops import size as _size
from mtekvm.scenario.ops import string as _str
from mtekvm.scenario.ops import u64 as _u64
from shared.abi import BACKINGS
from shared.bugs import check_bug_names, check_kernel_fix_names
from shared.control import ACTOR_OPS
from shared.errno import ERRNO_BY_NAME
from shared.invariants import ALL as INVARIANTS
from shared.invariants import canonical
from shared.physmem import (
    KVM_TAG_STORAGE,
    NODE_KINDS,
    NODE_TAG_STORAGE,
    NODE_ZONES,
    REGION_ATTRS,
    REGION_TYPES,
    TAG_STORAGE_MODES,
    TWO_MIB,
    NodeConfig,
    PhysConfig,
    RegionConfig,
    check_names,
    default_node_zone,
)

#: Every errno name an ``expect`` may use.
ERRNO_NAMES: frozenset[str] = frozenset(ERRNO_BY_NAME)
#: Outcomes other than errno names.
OUTCOMES: tuple[str, ...] = ("ok", "tag-check-fault", "async-tag-check-fault", "livelock")
#: The CPUs' ``mte_tcf_preferred`` a host boots with (``tcf-preferred``).
TCF_PREFERRED = ("async", "sync", "asymm")
_OBJECT_BACKINGS = ("memfd", "shmem", "file")

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


def _outcome(v: Any, w: _Where, k: str) -> str:
    if v in OUTCOMES or (isinstance(v, str) and v in ERRNO_NAMES):
        return v
    raise w.error(k, f"unknown outcome {v!r}; expected one of {', '.join(OUTCOMES)} "
                  "or an errno name such as \"EINVAL\"")


def _parse_expect(raw: Any, returns: str, w: _Where) -> Expect:
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
    if returns == "bytes" and isinstance(value, str):  # hex data, compared lowercased
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
    norm = ops.normalise(kind, op, args, st, who, w)
    expect = _parse_expect(raw["expect"], ACTOR_OPS[kind][op].returns, w) if "expect" in raw else None
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
        _check_keys(t, ("mte", "ram", "swap", "tcf-preferred", "kernel-fixes", "fault-replay-limit",
                        *PHYSMEM_HOST_KEYS), w, f"{where}.")
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
                                                f"{where}.fault-replay-limit"),
            physmem=_parse_physmem(t, w, where))
        for key in ("ram", "swap"):
            value = getattr(hosts[name], key)
            if value % PAGE_SIZE or (key == "ram" and not value):
                raise w.error(f"{where}.{key}", f"must be a{' non-zero' * (key == 'ram')} "
                              f"multiple of {PAGE_SIZE} (got {value})")
    default = "host" if "host" in hosts else next(iter(hosts))
    return hosts, default


#: The physical-memory keys of a host table (docs/scenarios.md, "Physical memory").
PHYSMEM_HOST_KEYS = ("tag-storage", "tag-block-size", "kvm-tag-storage", "stage2-fwb", "cache-dic", "nodes",
                     "regions")


def _sized_tables(t: dict, key: str, keys: tuple[str, ...], unit: int, w: _Where, where: str):
    """``(name, table, path, size)`` of each ``[WHERE.KEY.NAME]`` table: only ``keys``, the first of
    them and ``size`` required, ``size`` a non-zero multiple of ``unit``."""
    for name, sub in _table(t.get(key, {}), w, f"{where}.{key}").items():
        p = f"{where}.{key}.{name}"
        _name(name, w, p)
        _table(sub, w, p)
        _check_keys(sub, keys, w, f"{p}.")
        for req in (keys[0], "size"):
            if req not in sub:
                raise w.error(f"{p}.{req}", "missing")
        size = _size(sub["size"], w, f"{p}.size")
        if not size or size % unit:
            raise w.error(f"{p}.size", f"must be a non-zero multiple of "
                          f"{f'{unit >> 20} MiB' if unit >= 1 << 20 else f'{unit >> 10} KiB'} (got {size})")
        yield name, sub, p, size


def _parse_physmem(t: dict, w: _Where, where: str) -> PhysConfig:
    """A host's tag storage mode, CPU features, hot-plugged nodes and device regions."""
    nodes, regions = [], []
    for name, n, p, size in _sized_tables(t, "nodes", ("kind", "size", "zone", "tag-storage"), TWO_MIB, w, where):
        kind = _choice(*NODE_KINDS)(n["kind"], w, f"{p}.kind")
        ts = n.get("tag-storage")
        nodes.append(NodeConfig(name, kind, size, _choice(*NODE_ZONES)(n.get("zone", default_node_zone(kind)), w,
                                                                        f"{p}.zone"),
                                None if ts is None else _choice(*NODE_TAG_STORAGE)(ts, w, f"{p}.tag-storage")))
    for name, r, p, size in _sized_tables(t, "regions", ("type", "size", "attr", "allow-any-uncached"), PAGE_SIZE,
                                          w, where):
        rtype = _choice(*REGION_TYPES)(r["type"], w, f"{p}.type")
        for key, types in (("attr", ("pfnmap", "pci-p2pdma")), ("allow-any-uncached", ("pfnmap",))):
            if key in r and rtype not in types:
                raise w.error(f"{p}.{key}", f"only for a region of type {' or '.join(types)} (got {rtype!r})")
        regions.append(RegionConfig(name, rtype, size, _choice(*REGION_ATTRS)(r.get("attr", "device"), w, f"{p}.attr"),
                                    _bool(r.get("allow-any-uncached", True), w, f"{p}.allow-any-uncached")))
    try:
        check_names([n.name for n in nodes] + [r.name for r in regions])
    except ValueError as exc:
        raise w.error(f"{where}.nodes", str(exc)) from None
    return PhysConfig(
        tag_storage=_choice(*TAG_STORAGE_MODES)(t.get("tag-storage", "static"), w, f"{where}.tag-storage"),
        tag_block_size=_size(t.get("tag-block-size", PAGE_SIZE), w, f"{where}.tag-block-size"),
        kvm_tag_storage=_choice(*KVM_TAG_STORAGE)(t.get("kvm-tag-storage", "reserve"), w,
                                                  f"{where}.kvm-tag-storage"),
        stage2_fwb=_bool(t.get("stage2-fwb", True), w, f"{where}.stage2-fwb"),
        cache_dic=_bool(t.get("cache-dic", True), w, f"{where}.cache-dic"),
        nodes=tuple(nodes), regions=tuple(regions))


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
        _check_keys(t, ("ipa", "size", "backing", "object", "prot_mte", "hugepage-size", "node", "region", "attr"),
                    w, f"{p}.")
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
        # physical memory: checked by the host's mmap (a bad name fails the VM's setup with its errno)
        node = _name(t["node"], w, f"{p}.node") if "node" in t else None
        region = _name(t["region"], w, f"{p}.region") if "region" in t else None
        attr = _choice(*REGION_ATTRS)(t["attr"], w, f"{p}.attr") if "attr" in t else None
        slot = MemslotSpec(i, _size(t["ipa"], w, f"{p}.ipa"), _size(t["size"], w, f"{p}.size"),
                           backing, obj, _bool(t.get("prot_mte", False), w, f"{p}.prot_mte"), huge,
                           node, region, attr)
        # KVM needs page alignment only; a hugetlb slot off its huge page size maps
        # 4 KiB at stage 2 (user_mem_abort), and the VMM's mmap rounds its length up.
        for k in ("ipa", "size"):
            if getattr(slot, k) % PAGE_SIZE:
                raise w.error(f"{p}.{k}", f"must be a multiple of {PAGE_SIZE:#x} (got {getattr(slot, k):#x})")
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
