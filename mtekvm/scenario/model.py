"""The scenario's value classes: what :func:`mtekvm.scenario.load_scenario` returns.

Every class is frozen and already normalised (sizes are ints, defaults filled in, names
resolved to their kind), so the runner never looks at a string twice. :class:`ScenarioError`
is the one error of the parser; it names the file, the step and the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from shared.physmem import PhysConfig

if TYPE_CHECKING:
    from hypervisor.sched import SchedulingPolicy

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
GRANULE = 16
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


class Where:
    """Where in the file we are, to build errors: path, step and a key prefix."""

    def __init__(self, path: str, step: int | None = None, prefix: str = ""):
        self.path, self.step, self.prefix = path, step, prefix

    def at(self, prefix: str) -> Where:
        return Where(self.path, self.step, self.key(prefix) or "")

    def key(self, key: str | None) -> str | None:
        if key is None:
            return self.prefix or None
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str | None, message: str) -> ScenarioError:
        return ScenarioError(self.path, self.step, self.key(key), message)


@attrs.frozen
class SchedulerSpec:
    """How concurrent contexts interleave: ``free``, ``random`` or ``pct`` (seeded), ``replay``, or
    (from the command line and :func:`mtekvm.hunt`) ``dfs`` and ``bounded`` (``depth`` = N preemptions).

    ``policy``: a :class:`hypervisor.sched.SchedulingPolicy` object to use as is; a hunt passes the
    one object that spans its executions (an exhaustive search, a lenient replay while shrinking).
    """

    kind: str = "free"
    seed: int | None = None
    schedule: str | None = None
    depth: int = 3  # pct: the bug depth hunted for; bounded: the preemption bound
    policy: SchedulingPolicy | None = attrs.field(default=None, eq=False, repr=False)


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
    physmem: PhysConfig = PhysConfig()


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
    node: str | None = None  # physical memory: bind the pages to this node
    region: str | None = None  # physical memory: the device region behind pfnmap, dax, p2pmem
    attr: str | None = None  # physical memory: an unnamed pfnmap region's attr


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
