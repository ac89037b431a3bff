"""The scenario generator of ``mtekvm stress``: a seed in, a scenario file out.

A generated scenario is a small world aimed at collisions: a host, up to two
host processes (``p0``, ``p1``) and a forked child (``c0``), and a VM
(``vm0``, built with VMM steps so its addresses are known) whose guest RAM is
anonymous, a MAP_SHARED memfd the processes map too, or hugetlb (64 KiB
folios). A set-up part maps, touches, forks and tags; then one or two
``parallel`` blocks of 2-4 operations drawn from the op families, all aimed at
the same one or two pages (so they share pages, VMAs and folios); then reads
of those pages by every actor, so the oracles see what each one observes.
Steps carry no ``expect``: a generated scenario fails only when an oracle
(an invariant, the ghost) breaks.

The generator writes TOML text and loads it with the project's parser
(:func:`load`), so what ``--out`` receives replays with ``mtekvm run``.
"""

from __future__ import annotations

import json
import random
import tomllib
from typing import Any

import attrs

from mtekvm.scenario import Scenario, parse_scenario

PAGE = 4096
GUEST_IPA = 0x4000_0000  # guest RAM (slot 0), mapped 1:1 by the guest's stage 1
VMM_RAM = 0x1000_0000  # where the VMM maps guest RAM
SHARED = 0x2000_0000  # p0's MAP_SHARED window onto the shared object
PEER = 0x2800_0000  # p1's window onto the same object
PRIVATE = 0x3000_0000  # p0's private anonymous pages (CoW after fork, KSM)

#: Op families and their default weights (``--ops``, ``--weights``).
FAMILIES: dict[str, int] = {
    "fault": 3,  # host-process loads and stores: page faults, CoW breaks, first touches
    "tags": 3,  # stg / ldg by processes and the VMM: tag initialisation
    "vma": 2,  # mmap MAP_FIXED over live pages, mprotect(PROT_MTE) on and off, munmap
    "fork": 2,  # fork before the race; parent and child race on the CoW pages
    "ptrace": 1,  # PTRACE_PEEKMTETAGS / POKEMTETAGS by a peer on a target's pages
    "swap": 1,  # host reclaim: swap out (and in, on the next access)
    "ksm": 1,  # madvise(MADV_MERGEABLE) then a KSM pass
    "migrate": 1,  # host page migration
    "guest": 4,  # guest loads, stores, STG and LDG: stage-2 faults, sanitise_mte_tags
    "memslot": 1,  # memslot delete / re-add, a VMM MAP_FIXED over guest RAM
    "copy-tags": 2,  # KVM_ARM_MTE_COPY_TAGS both ways
    "dirty-log": 2,  # dirty logging on / get / clear / off
    "dma": 1,  # device DMA through the VMM's mapping (no tag checks)
    "migration": 2,  # live migration of the VM to a second host, racing guest stores, STG, LDG and loads
    "physmem": 2,  # dynamic tag storage: pages moved into tag storage, mprotect(PROT_MTE), pressure, pins,
    # injected allocation failures, swap-in through an untagged mapping, fork of pinned pages, an MTE guest
}
VM_FAMILIES = ("guest", "memslot", "copy-tags", "dirty-log", "dma")
PROCESS_FAMILIES = ("fault", "vma", "fork", "ptrace", "ksm")
#: Backings of guest RAM; "hugetlb" is also a family-like switch (``--ops`` may leave it out).
VM_BACKINGS = ("anon", "memfd", "hugetlb")
#: The physical-memory world: a host with dynamic tag storage and RAM of PHYSMEM_RAM (a 2 MiB tag region).
PHYSMEM_RAM = "64MiB"
PHYSMEM_PAGES = 4  # p0's PROT_MTE-able pages and the shared memfd's, each
#: Injected failures that the fixed kernel survives without breaking an invariant. Left out, as
#: they break one by design (docs/findings.md): ``tag-buf-atomic`` (copy_highpage loses the tags:
#: PRESERVE-ON-COPY), ``reserve-tag-storage`` every time (the fault livelocks), and pinned pages
#: in tag storage (reservations of their blocks fail until unpinned: FAULT-FORWARD-PROGRESS).
PHYSMEM_FAULTS = (("reserve-tag-storage", 1), ("reserve-tag-storage", 2), ("tag-buf", 1), ("tag-buf", -1))
#: The migration world: a VM of MIGRATION_PAGES anonymous pages and two vCPUs on host ``src``, moved to ``dst``.
MIGRATION_PAGES = 8
MIGRATION_FAULTS = ("kill-destination", "cut")
MIGRATION_FAULT_POINTS = ("precopy:1", "precopy:2", "switchover", "after-resume")


def parse_ops(text: str | None) -> tuple[str, ...]:
    """``--ops``: a comma list of families (``all``, or ``-NAME`` to drop one from all).

    Raises:
        ValueError: an unknown family.
    """
    if not text or text == "all":
        return tuple(FAMILIES)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all(p.startswith("-") for p in parts):
        chosen = list(FAMILIES)
        for p in parts:
            _known(p[1:])
            chosen.remove(p[1:])
    else:
        chosen = []
        for p in parts:
            _known(p)
            if p not in chosen:
                chosen.append(p)
    if not chosen:
        raise ValueError("--ops leaves no op family")
    return tuple(chosen)


def _known(name: str) -> None:
    if name not in FAMILIES:
        raise ValueError(f"unknown op family {name!r}; known: {', '.join(FAMILIES)}")


def parse_weights(text: str | None) -> dict[str, int]:
    """``--weights``: ``family=N,...`` over the defaults (N >= 0; 0 drops the family).

    Raises:
        ValueError: an unknown family or a bad weight.
    """
    out = dict(FAMILIES)
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, eq, n = part.partition("=")
        _known(name.strip())
        if not eq or not n.strip().isdigit():
            raise ValueError(f"--weights entry {part!r} is not family=N (N >= 0)")
        out[name.strip()] = int(n)
    return out


@attrs.frozen
class GenConfig:
    """What the generator may use: families, their weights, guest RAM backings, hugetlb."""

    ops: tuple[str, ...] = tuple(FAMILIES)
    weights: dict[str, int] = attrs.field(factory=lambda: dict(FAMILIES))
    hugetlb: bool = True
    #: proposed kernel fixes the generated host applies: by default the one for finding 3
    #: (docs/findings.md), so that campaigns hunt races rather than that known hugetlb behaviour
    kernel_fixes: tuple[str, ...] = ("sanitise-whole-hugetlb-folio",)
    blocks: tuple[int, int] = (1, 2)  # parallel blocks per scenario (min, max)
    width: tuple[int, int] = (2, 4)  # operations per block


@attrs.define
class Generated:
    """A generated scenario as data: header tables and a list of steps (a step is a dict, or
    ``{"parallel": [dicts]}``); :func:`to_toml` writes it, :func:`load` parses it."""

    seed: int
    name: str
    processes: list[str]
    vm: dict | None  # {"backing", "size", "prot_mte", "hugepage"} or None
    steps: list[dict]
    bugs: tuple[str, ...] = ()
    description: str = ""
    kernel_fixes: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()  # declared hosts ([hosts.NAME]); empty: the one default host
    host_keys: dict = attrs.Factory(dict)  # more keys of the host table (the physmem world's tag storage)

    def with_steps(self, steps: list[dict]) -> Generated:
        """The same world with other steps (for shrinking)."""
        return attrs.evolve(self, steps=[dict(s) for s in steps])

    def step_count(self) -> int:
        """Steps, counting each operation of a parallel block."""
        return sum(len(s["parallel"]) if "parallel" in s else 1 for s in self.steps)

    def actors(self) -> set[str]:
        """Every actor a step names."""
        out = set()
        for s in self.steps:
            for sub in s.get("parallel", [s]):
                out.add(sub["actor"])
        return out


class _World:
    """The generator's state while it draws one scenario."""

    def __init__(self, seed: int, cfg: GenConfig):
        self.rng = random.Random(seed)
        self.cfg = cfg
        self.fams = [f for f in cfg.ops if cfg.weights.get(f, 0) > 0]
        if not self.fams:
            raise ValueError("every chosen op family has weight 0")
        self.steps: list[dict] = []
        self.procs: list[str] = []
        self.vm: dict | None = None
        self.child: str | None = None
        self.shared_pages = 2
        self.object = "obj"
        self.focus = "shared"  # the region the current parallel block aims at
        self.hosts: tuple[str, ...] = ()
        self.touched: set[int] = set()
        self.block_page = 0
        self.host_keys: dict[str, Any] = {}
        self.phys_tagged: set[int] = set()
        self.phys_pins = False

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def tag(self) -> int:
        return self.rng.randrange(1, 16)

    def page(self) -> int:
        """The page a block's operation aims at: mostly the block's own (collisions)."""
        return self.block_page if self.chance(0.85) else 1 - self.block_page

    def _regions(self) -> list[str]:
        """What a block can focus on: the shared object (processes and, for a memfd, guest RAM),
        the private CoW pages, guest RAM."""
        out = []
        if self.procs:
            out += ["shared", "private"]
        if self.vm is not None:
            out.append("guest")
        return out

    def _pick(self, options: list[tuple[str, str, int]]) -> tuple[str, int]:
        """One (actor, address) of ``options`` (region, actor, address), the block's region preferred."""
        focused = [o for o in options if o[0] == self.focus]
        _region, who, addr = self.rng.choice(focused if focused and self.chance(0.85) else options)
        return who, addr

    def build(self) -> None:
        r = self.rng
        if "physmem" in self.fams and self._wants_world("physmem"):
            self._build_physmem()
            return
        if "migration" in self.fams and self._wants_world("migration"):
            self._build_migration()
            return
        want_vm = any(f in VM_FAMILIES for f in self.fams)
        want_proc = any(f in PROCESS_FAMILIES for f in self.fams) or not want_vm
        if want_vm and want_proc:
            want_vm, want_proc = (True, True) if self.chance(0.5) else ((True, False) if self.chance(0.6)
                                                                        else (False, True))
        if want_vm:
            backings = ["anon", "memfd"] + (["hugetlb"] if self.cfg.hugetlb else [])
            backing = r.choice(backings)
            size = 16 * PAGE if backing == "hugetlb" else 4 * PAGE
            self.vm = {"backing": backing, "size": size, "prot_mte": self.chance(0.6)}
            if backing == "memfd":
                self.object = "ram"
        shares = self.vm is not None and self.vm["backing"] == "memfd" and any(f not in VM_FAMILIES for f in self.fams)
        if want_proc or (shares and self.chance(0.5)):  # a process sharing guest RAM with the guest
            self.procs.append("p0")
            if self.chance(0.5) or "ptrace" in self.fams:
                self.procs.append("p1")
        self._setup_vm()
        self._setup_procs()
        fams = self._usable()
        weights = [self.cfg.weights.get(f, 1) for f in fams]
        for _ in range(r.randint(*self.cfg.blocks)):
            self.focus = r.choice(self._regions() or ["guest"])
            self.block_page = 0 if self.chance(0.75) else 1
            block = []
            for _ in range(r.randint(*self.cfg.width)):
                fam = r.choices(fams, weights)[0]
                op = getattr(self, "op_" + fam.replace("-", "_"))()
                if op is not None:
                    block.append(op)
            if len(block) >= 2:
                self.steps.append({"parallel": block})
            elif block:
                self.steps.append(block[0])
        self._finish()

    def _wants_world(self, family: str) -> bool:
        """Whether this scenario is a world of its own (``migration``, ``physmem``): always when no
        other family but the guest's is asked for; otherwise in proportion to the family's weight (at
        least a quarter)."""
        others = [f for f in self.fams if f not in (family, "guest")]
        if not others:
            return True
        w = self.cfg.weights.get(family, 0)
        total = sum(self.cfg.weights.get(f, 0) for f in self.fams)
        return self.chance(max(0.25, 2 * w / max(total, 1)))

    def _build_migration(self) -> None:
        """Two hosts, a small anonymous VM with two vCPUs on ``src``; a set-up that tags pages with
        and without data (all-zero pages included) and leaves others untouched; one or two
        parallel blocks that race a ``migrate`` against guest stores, STGs, LDGs and loads on those
        pages; then the guest reads back every page it touched (TAGS-AS-WRITTEN judges)."""
        r = self.rng
        self.hosts = ("src", "dst")
        size = MIGRATION_PAGES * PAGE
        self.vm = {"backing": "anon", "size": size, "prot_mte": True, "setup": "auto", "host": "src", "vcpus": 2,
                   "memory": [{"ipa": GUEST_IPA, "size": size, "backing": "anon"}]}
        tcf = r.choice(["sync", "none", "async"])
        self.steps += [{"actor": "guest:vm0", "op": "enable-mte", "tcf": tcf},
                       {"actor": "guest:vm0:1", "op": "enable-mte", "tcf": tcf},
                       {"actor": "guest:vm0", "op": "map", "va": GUEST_IPA, "ipa": GUEST_IPA, "size": size,
                        "attr": "tagged"}]
        self.touched = set()
        for pg in range(MIGRATION_PAGES // 2):  # the upper half stays untouched until the race
            kind = r.choice(["zero-tagged", "zero-tagged", "data-tagged", "data", "none"])
            addr = GUEST_IPA + pg * PAGE
            if kind in ("zero-tagged", "data-tagged"):
                self.steps.append({"actor": "guest:vm0", "op": "stg", "addr": addr, "tag": self.tag(),
                                   "size": r.choice([64, PAGE, PAGE])})
            if kind in ("data-tagged", "data"):
                self.steps.append({"actor": "guest:vm0", "op": "store", "addr": addr, "data": "5a5a",
                                   "tag": self.steps[-1]["tag"] if kind == "data-tagged" else 0})
            if kind != "none":
                self.touched.add(pg)
        here, there = "src", "dst"
        for _ in range(1 if self.chance(0.7) else 2):
            block = [self._migrate_step(there)]
            if "guest" in self.fams or self.chance(0.5):
                block += [self._migration_guest_op() for _ in range(r.randint(1, 3))]
            else:
                block.append(self._migration_guest_op())
            r.shuffle(block)
            self.steps.append({"parallel": block})
            here, there = there, here
        for pg in sorted(self.touched):
            self.steps.append({"actor": r.choice(["guest:vm0", "guest:vm0:1"]), "op": "ldg",
                               "addr": GUEST_IPA + pg * PAGE, "size": PAGE})

    def _build_physmem(self) -> None:
        """A host with dynamic tag storage. ``p0`` maps private anonymous pages (some PROT_MTE) and a
        shared memfd that ``p1`` maps untagged; sometimes an MTE VM with anonymous RAM. The set-up
        writes and tags pages, moves some into tag storage (as compaction may), fills tag storage
        with other data (pinned or not), pins pages, forks. Then one or two parallel blocks race
        mprotect(PROT_MTE), accesses, swap-out and swap-in through the untagged mapping, page
        migration, allocation pressure, injected allocation failures, fork of pinned pages, ptrace
        and guest accesses on the same pages; last, every actor reads its pages back."""
        r = self.rng
        self.host_keys = {"ram": PHYSMEM_RAM, "tag-storage": "dynamic"}
        if self.chance(0.2):
            self.host_keys["tag-block-size"] = r.choice(["8KiB", "16KiB"])
        self.procs = ["p0", "p1"]
        size = PHYSMEM_PAGES * PAGE
        tagged = [pg for pg in range(PHYSMEM_PAGES) if self.chance(0.5)]
        self.phys_tagged = set(tagged)
        self.steps += [
            {"actor": "p0", "op": "mmap", "addr": PRIVATE, "size": size, "prot": ["read", "write"]},
            {"actor": "p0", "op": "mmap", "addr": SHARED, "size": 2 * PAGE, "prot": ["read", "write", "mte"],
             "backing": "memfd", "object": self.object},
            {"actor": "p1", "op": "mmap", "addr": PEER, "size": 2 * PAGE, "prot": ["read", "write"],
             "backing": "memfd", "object": self.object},
        ]
        for pg in range(PHYSMEM_PAGES):
            self.steps.append({"actor": "p0", "op": "store", "addr": PRIVATE + pg * PAGE, "fill": 0x20 + pg,
                               "size": 64})
        for pg in range(2):
            self.steps.append({"actor": "p0", "op": "stg", "addr": SHARED + pg * PAGE, "tag": self.tag(), "size": 64})
        # Pins and tag storage do not meet: a pinned page inside tag storage blocks every reservation
        # of its block until unpinned, and a model pin is never released (docs/findings.md)
        self.phys_pins = self.chance(0.4)
        if not self.phys_pins and self.chance(0.6):  # as compaction may: untagged data pages into free tag storage
            first = r.randrange(PHYSMEM_PAGES)
            self.steps.append({"actor": "host", "op": "migrate-pages", "process": "p0", "addr": PRIVATE + first * PAGE,
                               "size": PAGE * r.randint(1, PHYSMEM_PAGES - first), "to": "tag-storage"})
        for pg in tagged:
            if self.chance(0.5):
                self.steps.append({"actor": "p0", "op": "mprotect", "addr": PRIVATE + pg * PAGE, "size": PAGE,
                                   "prot": ["read", "write", "mte"]})
                self.steps.append({"actor": "p0", "op": "stg", "addr": PRIVATE + pg * PAGE, "tag": self.tag(),
                                   "size": r.choice([16, 64, PAGE])})
        if self.chance(0.5):  # other users' data in tag storage: block claims migrate it, or fail on pins
            self.steps.append({"actor": "host", "op": "alloc-pages", "name": "ts", "from": "tag-storage",
                               "count": r.choice([8, 64, "all"])})
        if self.chance(0.3):
            self.steps.append({"actor": "host", "op": "swap-out", "process": "p0", "addr": SHARED, "size": 2 * PAGE})
        pinned = None
        if self.phys_pins and self.chance(0.6):  # fork copies a pinned page at once, under the PTLs
            pinned = r.choice(tagged) if tagged and self.chance(0.7) else r.randrange(PHYSMEM_PAGES)
            self.steps.append({"actor": "host", "op": "pin-pages", "process": "p0",
                               "addr": PRIVATE + pinned * PAGE, "size": PAGE})
        if self.chance(0.35):  # an MTE VM whose RAM the VMM maps at VMM_RAM (KVM reserves at stage-2 faults)
            self.vm = {"backing": "anon", "size": size, "prot_mte": False}
            self._setup_vm()
        if self.chance(0.5 if pinned is not None else 0.3):
            if pinned is not None and self.chance(0.5):  # the child's copy gets no storage: its tags are parked
                self.steps.append({"actor": "host", "op": "inject-fault", "site": "reserve-tag-storage",
                                   "times": 1})
            self.steps.append({"actor": "p0", "op": "fork", "child": "c0"})
            self.child = "c0"
        for _ in range(1 if self.chance(0.6) else 2):
            self.block_page = r.randrange(PHYSMEM_PAGES)
            block = [self._physmem_op() for _ in range(r.randint(2, 4))]
            self.steps.append({"parallel": block})
        for pg in range(PHYSMEM_PAGES):
            self.steps.append({"actor": "p0", "op": "ldg", "addr": PRIVATE + pg * PAGE, "size": 64})
            if self.child and self.chance(0.5):
                self.steps.append({"actor": self.child, "op": "ldg", "addr": PRIVATE + pg * PAGE, "size": 64})
        for pg in range(2):
            self.steps += [{"actor": "p0", "op": "ldg", "addr": SHARED + pg * PAGE, "size": 64},
                           {"actor": "p1", "op": "load", "addr": PEER + pg * PAGE, "size": 16}]
        if self.vm is not None:
            self.steps.append({"actor": "guest:vm0", "op": "ldg", "addr": GUEST_IPA, "size": 64})

    def _physmem_op(self) -> dict:
        """One operation of a physmem race, mostly on the block's page; with a VM, half of the
        operations are the guest's first accesses and the VMM dropping the same RAM."""
        r = self.rng
        pg = self.block_page if self.chance(0.8) else r.randrange(PHYSMEM_PAGES)
        if self.vm is not None and self.chance(0.5):
            return self._physmem_vm_op(pg)
        addr = PRIVATE + pg * PAGE
        shared = SHARED + (pg % 2) * PAGE
        procs = ["p0"] + ([self.child] if self.child else [])
        x = r.random()
        if x < 0.12:
            return {"actor": r.choice(procs), "op": "mprotect", "addr": addr, "size": PAGE,
                    "prot": ["read", "write", "mte"]}
        if x < 0.27:
            who = r.choice(procs)
            if self.chance(0.5):
                return {"actor": who, "op": "stg", "addr": addr, "tag": self.tag(), "size": r.choice([16, PAGE])}
            return {"actor": who, "op": r.choice(["ldg", "load"]), "addr": addr, "size": 16}
        if x < 0.37:
            return {"actor": "host", "op": "migrate-pages", "process": "p0", "addr": r.choice([addr, shared]),
                    "size": PAGE, **({"to": "tag-storage"} if not self.phys_pins and self.chance(0.5) else {})}
        if x < 0.47:
            return {"actor": "host", "op": "swap-out", "process": "p0", "addr": r.choice([addr, shared]),
                    "size": PAGE}
        if x < 0.57:  # swap-in (or a plain access) through the untagged mapping of the shared page
            if self.chance(0.7):
                return {"actor": "p1", "op": "load", "addr": PEER + (pg % 2) * PAGE, "size": 16}
            return {"actor": "p1", "op": "store", "addr": PEER + (pg % 2) * PAGE, "fill": 0x5A, "size": 16}
        if x < 0.67:
            if self.chance(0.5):
                src = r.choice(["any", "tag-storage"])
                return {"actor": "host", "op": "alloc-pages", "name": f"h{r.randrange(1 << 16)}",
                        "count": r.choice([1, 16, "all" if src == "tag-storage" else 64]), "from": src,
                        "pin": src == "any" and self.phys_pins and self.chance(0.3)}
            return {"actor": "host", "op": "free-pages", "name": "ts"}
        if x < 0.74:
            site, times = r.choice(PHYSMEM_FAULTS)
            return {"actor": "host", "op": "inject-fault", "site": site, "times": times}
        if x < 0.80:
            if self.phys_pins:
                return {"actor": "host", "op": "pin-pages", "process": "p0", "addr": addr, "size": PAGE}
            return {"actor": "host", "op": "migrate-pages", "process": "p0", "addr": addr, "size": PAGE}
        if x < 0.86:
            if self.chance(0.5):
                return {"actor": "p1", "op": "ptrace-peek-tags", "target": "p0", "addr": addr, "count": 4}
            return {"actor": "p1", "op": "ptrace-poke-tags", "target": "p0", "addr": addr, "tags": [self.tag()] * 2}
        return {"actor": "p0", "op": "stg", "addr": addr, "tag": self.tag(), "size": 16}

    def _physmem_vm_op(self, pg: int) -> dict:
        """A guest access to guest page ``pg`` (a stage-2 fault that reserves tag storage, on first
        touch), or the VMM dropping or migrating that page meanwhile."""
        r = self.rng
        gaddr = GUEST_IPA + pg * PAGE
        y = r.random()
        if y < 0.3:  # KVM reserved the page's storage, then the VMM freed it before sanitise tagged it
            return {"actor": "vmm:vm0", "op": "madvise", "addr": VMM_RAM + pg * PAGE, "size": PAGE,
                    "advice": "dontneed"}
        if y < 0.4:
            return {"actor": "host", "op": "migrate-pages", "vm": "vm0", "ipa": gaddr, "size": PAGE}
        if y < 0.7:
            return {"actor": "guest:vm0", "op": "stg", "addr": gaddr, "tag": self.tag(), "size": 64}
        return {"actor": "guest:vm0", "op": r.choice(["ldg", "load"]), "addr": gaddr, "size": 16}

    def _migrate_step(self, to: str) -> dict:
        """A ``migrate`` to ``to`` with 0-3 pre-copy passes, sometimes with an injected fault (its
        outcome is left unchecked, like every generated step's)."""
        step: dict[str, Any] = {"actor": "vmm:vm0", "op": "migrate", "to": to,
                                "max-passes": self.rng.randint(0, 3)}
        if self.chance(0.15):
            step["fail"] = self.rng.choice(MIGRATION_FAULTS)
            step["fail-at"] = self.rng.choice(MIGRATION_FAULT_POINTS)
        return step

    def _migration_guest_op(self) -> dict:
        """A guest operation racing the migration: mostly on a page the set-up touched, else on an
        untouched one (a stage-2 fault during the pre-copy)."""
        r = self.rng
        if self.touched and self.chance(0.6):
            pg = r.choice(sorted(self.touched))
        else:
            pg = r.randrange(MIGRATION_PAGES)
        addr = GUEST_IPA + pg * PAGE
        who = r.choice(["guest:vm0", "guest:vm0:1"])
        x = r.random()
        if x < 0.4:
            if self.chance(0.35):  # a span over untouched pages: a stage-2 fault each, a long race window
                first = r.randrange(MIGRATION_PAGES // 2, MIGRATION_PAGES - 1)
                n = r.randint(2, MIGRATION_PAGES - first)
                self.touched.update(range(first, first + n))
                return {"actor": who, "op": "stg", "addr": GUEST_IPA + first * PAGE, "tag": self.tag(),
                        "size": n * PAGE}
            self.touched.add(pg)
            return {"actor": who, "op": "stg", "addr": addr, "tag": self.tag(), "size": r.choice([16, 64, PAGE])}
        if x < 0.7:
            return {"actor": who, "op": "ldg", "addr": addr, "size": r.choice([16, 64])}
        if x < 0.85:
            return {"actor": who, "op": "load", "addr": addr, "size": 8}
        self.touched.add(pg)
        return {"actor": who, "op": "store", "addr": addr, "data": "01"}

    def _usable(self) -> list[str]:
        out = []
        for f in self.fams:
            if f in ("migration", "physmem"):  # worlds of their own (_build_migration, _build_physmem)
                continue
            if f in VM_FAMILIES and self.vm is None:
                continue
            if f in ("fault", "vma", "ptrace", "ksm") and not self.procs and self.vm is None:
                continue
            if f == "fork" and self.child is None:
                continue
            out.append(f)
        return out or ["tags"]

    # -- set-up ----------------------------------------------------------------------------------

    def _setup_vm(self) -> None:
        vm = self.vm
        if vm is None:
            return
        prot = ["read", "write"] + (["mte"] if vm["prot_mte"] else [])
        mm: dict[str, Any] = {"actor": "vmm:vm0", "op": "mmap", "addr": VMM_RAM, "size": vm["size"], "prot": prot,
                              "backing": vm["backing"]}
        if vm["backing"] == "memfd":
            mm["object"] = "ram"
        if vm["backing"] == "hugetlb":
            mm["hugepage-size"] = "64KiB"
        self.steps += [
            mm,
            {"actor": "vmm:vm0", "op": "enable-cap", "cap": "arm-mte"},
            {"actor": "vmm:vm0", "op": "set-memory-region", "slot": 0, "ipa": GUEST_IPA, "size": vm["size"],
             "addr": VMM_RAM},
            {"actor": "vmm:vm0", "op": "create-vcpu"},
            {"actor": "guest:vm0", "op": "enable-mte", "tcf": self.rng.choice(["sync", "none", "async"])},
            {"actor": "guest:vm0", "op": "map", "va": GUEST_IPA, "ipa": GUEST_IPA, "size": vm["size"],
             "attr": "tagged"},
        ]
        if "dirty-log" in self.fams and self.chance(0.3):
            self.steps.append({"actor": "vmm:vm0", "op": "dirty-log", "slot": 0, "action": "enable"})
        for pg in range(2):
            if self.chance(0.35):
                self.steps.append(self._guest_write(pg))

    def _setup_procs(self) -> None:
        if not self.procs:
            return
        mte = self.chance(0.6)
        prot = ["read", "write"] + (["mte"] if mte else [])
        self.steps.append({"actor": "p0", "op": "mmap", "addr": SHARED, "size": self.shared_pages * PAGE,
                           "prot": prot, "backing": "memfd", "object": self.object})
        if "p1" in self.procs:
            prot1 = ["read", "write"] + (["mte"] if self.chance(0.5) else [])
            self.steps.append({"actor": "p1", "op": "mmap", "addr": PEER, "size": self.shared_pages * PAGE,
                               "prot": prot1, "backing": "memfd", "object": self.object})
        hugetlb = self.cfg.hugetlb and self.chance(0.15)
        priv: dict[str, Any] = {"actor": "p0", "op": "mmap", "addr": PRIVATE, "size": (16 if hugetlb else 2) * PAGE,
                                "prot": ["read", "write"] + (["mte"] if self.chance(0.3) else [])}
        if hugetlb:
            priv.update(backing="hugetlb")
            priv["hugepage-size"] = "64KiB"
        self.steps.append(priv)
        for pg in range(2):
            if self.chance(0.5):
                self.steps.append({"actor": "p0", "op": "store", "addr": PRIVATE + pg * PAGE, "fill": 0xAA,
                                   "size": 64})
            if self.chance(0.3):
                self.steps.append({"actor": self.rng.choice(self.procs), "op": "store",
                                   "addr": self._shared_addr("p0", pg), "fill": 0x5A, "size": 64})
        if "ksm" in self.fams:
            self.steps.append({"actor": "p0", "op": "madvise", "addr": PRIVATE, "size": 2 * PAGE,
                               "advice": "mergeable"})
        if "fork" in self.fams and self.chance(0.7):
            self.steps.append({"actor": "p0", "op": "fork", "child": "c0"})
            self.child = "c0"

    def _shared_addr(self, proc: str, pg: int) -> int:
        return (PEER if proc == "p1" else SHARED) + pg * PAGE

    def _guest_write(self, pg: int) -> dict:
        if self.chance(0.5):
            return {"actor": "guest:vm0", "op": "stg", "addr": GUEST_IPA + pg * PAGE, "tag": self.tag(),
                    "size": self.rng.choice([16, 64, PAGE])}
        return {"actor": "guest:vm0", "op": "store", "addr": GUEST_IPA + pg * PAGE, "fill": 0x11, "size": 16}

    # -- op families: each returns one step aimed at page 0 or 1 of something shared -------------

    def _proc_target(self) -> tuple[str, int]:
        """A process actor and an address it maps: the shared window, the private pages, or
        (as the VMM) guest RAM."""
        pg = self.page()
        guest_ram = "shared" if self.object == "ram" else "guest"  # a memfd guest RAM is the shared object
        options: list[tuple[str, str, int]] = []
        for p in self.procs:
            options.append(("shared", p, self._shared_addr(p, pg)))
        if self.procs:
            options.append(("private", "p0", PRIVATE + pg * PAGE))
        if self.child:
            options += [("private", self.child, PRIVATE + pg * PAGE), ("shared", self.child, SHARED + pg * PAGE)]
        if self.vm is not None:
            options.append((guest_ram, "vmm:vm0", VMM_RAM + pg * PAGE))
            if guest_ram == "shared":
                options.append(("guest", "vmm:vm0", VMM_RAM + pg * PAGE))
        return self._pick(options)

    def op_fault(self) -> dict | None:
        if not self.procs and self.vm is None:
            return None
        who, addr = self._proc_target()
        if self.chance(0.6):
            return {"actor": who, "op": "store", "addr": addr, "fill": self.rng.choice([0xBB, 0xCC]), "size": 16}
        return {"actor": who, "op": "load", "addr": addr, "size": 16}

    def op_tags(self) -> dict | None:
        if not self.procs and self.vm is None:
            return None
        who, addr = self._proc_target()
        if self.chance(0.6):
            return {"actor": who, "op": "stg", "addr": addr, "tag": self.tag(),
                    "size": self.rng.choice([16, 64, PAGE])}
        return {"actor": who, "op": "ldg", "addr": addr, "size": 64}

    def op_vma(self) -> dict | None:
        who, addr = self._proc_target()
        r = self.rng.random()
        if r < 0.45:
            prot = ["read", "write"] + (["mte"] if self.chance(0.75) else [])
            return {"actor": who, "op": "mprotect", "addr": addr, "size": PAGE, "prot": prot}
        if r < 0.85:
            backing = self.rng.choice(["anon", "memfd", "file"])
            step: dict[str, Any] = {"actor": who, "op": "mmap", "addr": addr, "size": PAGE,
                                    "prot": ["read", "write"] + (["mte"] if self.chance(0.5) else []),
                                    "backing": backing}
            if backing == "memfd":
                step["object"] = self.object
                step["offset"] = self.page() * PAGE
            elif backing == "file":
                step["object"] = "img"
            return step
        return {"actor": who, "op": "munmap", "addr": addr, "size": PAGE}

    def op_fork(self) -> dict | None:
        if self.child is None:
            return None
        pg = self.page()
        who = self.rng.choice(["p0", self.child])
        r = self.rng.random()
        if r < 0.4:
            return {"actor": who, "op": "store", "addr": PRIVATE + pg * PAGE, "fill": 0xBB, "size": 16}
        if r < 0.75:
            return {"actor": who, "op": "mprotect", "addr": PRIVATE + pg * PAGE, "size": PAGE,
                    "prot": ["read", "write", "mte"]}
        return {"actor": who, "op": "stg", "addr": PRIVATE + pg * PAGE, "tag": self.tag(), "size": 64}

    def op_ptrace(self) -> dict | None:
        tracers = [p for p in self.procs if p != "p0"] + ([self.child] if self.child else [])
        if not tracers:
            return None
        targets: list[tuple[str, str, int]] = []
        pg = self.page()
        if self.procs:
            targets += [("shared", "p0", SHARED + pg * PAGE), ("private", "p0", PRIVATE + pg * PAGE)]
        if self.vm is not None:
            targets.append(("guest", "vmm:vm0", VMM_RAM + pg * PAGE))
        target, addr = self._pick(targets)
        who = self.rng.choice(tracers)
        if self.chance(0.5):
            return {"actor": who, "op": "ptrace-peek-tags", "target": target, "addr": addr, "count": 4}
        return {"actor": who, "op": "ptrace-poke-tags", "target": target, "addr": addr,
                "tags": [self.tag()] * 4}

    def _host_target(self) -> dict:
        pg = self.page()
        options: list[tuple[str, str, int]] = []
        if self.vm is not None:
            options.append(("shared" if self.object == "ram" else "guest", "vm0", GUEST_IPA + pg * PAGE))
        if self.procs:
            options += [("shared", "p0", SHARED + pg * PAGE), ("private", self.child or "p0", PRIVATE + pg * PAGE)]
        who, addr = self._pick(options)
        return {"vm": who, "ipa": addr} if who == "vm0" else {"process": who, "addr": addr}

    def op_swap(self) -> dict | None:
        return {"actor": "host", "op": "swap-out", **self._host_target(), "size": PAGE}

    def op_ksm(self) -> dict | None:
        if self.procs and self.chance(0.6):
            return {"actor": "host", "op": "ksm-merge", "process": "p0", "addr": PRIVATE, "size": 2 * PAGE}
        return {"actor": "host", "op": "ksm-merge", **self._host_target(), "size": PAGE}

    def op_migrate(self) -> dict | None:
        return {"actor": "host", "op": "migrate-pages", **self._host_target(), "size": PAGE}

    def op_guest(self) -> dict | None:
        pg = self.page()
        addr = GUEST_IPA + pg * PAGE
        r = self.rng.random()
        if r < 0.3:
            return {"actor": "guest:vm0", "op": "ldg", "addr": addr, "size": 16}
        if r < 0.5:
            return {"actor": "guest:vm0", "op": "load", "addr": addr, "size": 8}
        if r < 0.8:
            return {"actor": "guest:vm0", "op": "stg", "addr": addr, "tag": self.tag(),
                    "size": self.rng.choice([16, 64, PAGE])}
        return {"actor": "guest:vm0", "op": "store", "addr": addr, "data": "01"}

    def op_memslot(self) -> dict | None:
        assert self.vm is not None
        r = self.rng.random()
        if r < 0.4:
            return {"actor": "vmm:vm0", "op": "mmap", "addr": VMM_RAM + self.page() * PAGE, "size": PAGE,
                    "backing": "file", "object": "img"}
        if r < 0.7:
            return {"actor": "vmm:vm0", "op": "set-memory-region", "slot": 0, "ipa": GUEST_IPA, "size": 0,
                    "addr": VMM_RAM}
        return {"actor": "vmm:vm0", "op": "set-memory-region", "slot": 1, "ipa": GUEST_IPA + 0x100_0000,
                "size": PAGE, "addr": VMM_RAM + self.page() * PAGE}

    def op_copy_tags(self) -> dict | None:
        addr = GUEST_IPA + self.page() * PAGE
        if self.chance(0.5):
            return {"actor": "vmm:vm0", "op": "copy-tags", "ipa": addr, "length": PAGE, "direction": "to-guest",
                    "tags": self.tag()}
        return {"actor": "vmm:vm0", "op": "copy-tags", "ipa": addr, "length": PAGE, "direction": "from-guest"}

    def op_dirty_log(self) -> dict | None:
        action = self.rng.choice(["enable", "enable", "get", "clear", "disable"])
        return {"actor": "vmm:vm0", "op": "dirty-log", "slot": 0, "action": action}

    def op_dma(self) -> dict | None:
        addr = GUEST_IPA + self.page() * PAGE
        if self.chance(0.6):
            return {"actor": "vmm:vm0", "op": "dma-write", "ipa": addr, "fill": 0x77, "size": 64}
        return {"actor": "vmm:vm0", "op": "dma-read", "ipa": addr, "size": 64}

    def _finish(self) -> None:
        """Read back what the race touched, as each actor sees it (the oracles judge it)."""
        for pg in range(2):
            if pg != self.block_page and self.chance(0.7):
                continue
            if self.vm is not None:
                self.steps.append({"actor": "guest:vm0", "op": "ldg", "addr": GUEST_IPA + pg * PAGE, "size": 64})
            for p in self.procs:
                self.steps.append({"actor": p, "op": "ldg", "addr": self._shared_addr(p, pg), "size": 64})
            if self.child:
                self.steps.append({"actor": self.child, "op": "ldg", "addr": PRIVATE + pg * PAGE, "size": 64})
        if self.vm is not None and self.chance(0.3):
            self.steps.append({"actor": "vmm:vm0", "op": "dirty-log", "slot": 0, "action": "get"})


def generate(seed: int, cfg: GenConfig | None = None, bugs: tuple[str, ...] = ()) -> Generated:
    """The scenario of ``seed`` under ``cfg`` (deterministic: the same seed, the same scenario)."""
    w = _World(seed, cfg or GenConfig())
    w.build()
    procs = list(w.procs)
    return Generated(seed, f"stress seed {seed}", procs, w.vm, w.steps, tuple(bugs),
                     f"generated by mtekvm stress from seed {seed} (families: {', '.join(w.fams)})",
                     tuple(w.cfg.kernel_fixes), w.hosts, w.host_keys)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return hex(v) if v >= 0x10000 else str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def _key(k: str) -> str:
    return k if all(c.isalnum() or c in "-_" for c in k) else json.dumps(k)


def to_toml(g: Generated, *, scheduler: dict | None = None, note: str = "") -> str:
    """The scenario as a TOML scenario file (docs/scenarios.md)."""
    lines = [f"name = {_value(g.name)}", f'description = """\n{g.description}{note}\n"""']
    if g.bugs:
        lines.append(f"bugs = {_value(list(g.bugs))}")
    lines.append("")
    for host in g.hosts or ("host",):
        table = f"hosts.{host}" if g.hosts else "host"
        keys = ([f"kernel-fixes = {_value(list(g.kernel_fixes))}"] if g.kernel_fixes else []) + \
            [f"{_key(k)} = {_value(v)}" for k, v in g.host_keys.items()]
        if keys or g.hosts:
            lines += [f"[{table}]", *keys, ""]
    if scheduler:
        lines.append("[scheduler]")
        lines += [f"{_key(k)} = {_value(v)}" for k, v in scheduler.items()]
        lines.append("")
    used = g.actors() | {s[k] for s in _flat(g.steps) for k in ("target", "process", "vm") if k in s}
    for p in g.processes:
        if p in used:
            lines += [f"[processes.{p}]", ""]
    if g.vm is not None and g.vm.get("setup") == "auto":  # a migration world's VM (its steps need it)
        lines += ["[vms.vm0]", f"host = {_value(g.vm['host'])}", f"vcpus = {g.vm['vcpus']}",
                  f"memory = {_value(g.vm['memory'])}", ""]
    elif g.vm is not None and used & {"vmm:vm0", "guest:vm0", "vm0"}:
        lines += ["[vms.vm0]", 'setup = "manual"', ""]
    for s in g.steps:
        lines.append("[[steps]]")
        if "parallel" in s:
            lines.append("parallel = [")
            lines += [f"  {_value(sub)}," for sub in s["parallel"]]
            lines.append("]")
        else:
            lines += [f"{_key(k)} = {_value(v)}" for k, v in s.items()]
        lines.append("")
    return "\n".join(lines)


def _flat(steps: list[dict]) -> list[dict]:
    return [sub for s in steps for sub in s.get("parallel", [s])]


def load(g: Generated, path: str = "<generated>") -> Scenario:
    """Parse the generated scenario's TOML with the project's parser (``ScenarioError`` if invalid)."""
    return parse_scenario(tomllib.loads(to_toml(g)), path)
