"""Stress: random KVM interleavings judged by the TAGS-AS-WRITTEN ghost and every other oracle.

Each generated run has one VM with three pages of guest RAM (private anonymous,
memfd with a second PROT_MTE view, or, in the hugetlb campaign, a private or
shared hugetlb folio) and four contexts running three random operations each,
under a random schedule: the guest (STG, store, LDG, load), the VMM
(COPY_TAGS both ways, STG through its tagged view), a tracer (ptrace poke and
peek, fork with a store in the child, mprotect) and the host (swap-out,
migration, KSM, MADV_DONTNEED). Outcomes are not predicted; the oracles judge,
and the frames' bookkeeping must stay sound. The default run is small;
``MTEKVM_SLOW=1`` runs the long campaign (opt-in).

This campaign found, with the ghost on, the last four rows of the table in
docs/concurrency.md (CoW copy vs reuse, hugetlb migration, private hugetlb
after fork, MADV_DONTNEED on hugetlb).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from support import RWM, Proc, Vm, frame_problems, invariants, run_once  # noqa: E402

from hypervisor.syscalls import host_ksm_merge, host_migrate_pages, host_swap_out
from shared.errno import KernelError  # noqa: E402

SLOW = os.environ.get("MTEKVM_SLOW") == "1"
SEEDS = 1000 if SLOW else 24
PAGE = 4096
RAM = 0x4000_0000
N = 3


def scenario(seed: int, hugetlb: bool):
    """A run's setup and context bodies, all drawn from ``seed``."""
    rng = random.Random(seed)
    memfd = rng.random() < 0.5
    huge = hugetlb and rng.random() < 0.7

    def guest_ops():
        return [(rng.choice(["stg", "store", "ldg", "load", "stg"]), RAM + rng.randrange(N) * PAGE, rng.randrange(16))
                for _ in range(3)]

    g, v = guest_ops(), guest_ops()
    h = [(rng.choice(["swap", "migrate", "ksm", "swap", "migrate", "dontneed"]), rng.randrange(N)) for _ in range(3)]
    t = [(rng.choice(["poke", "peek", "fork", "mprotect"]), rng.randrange(N), rng.randrange(16)) for _ in range(3)]

    async def setup(k):
        vm = await Vm.create(k)
        if huge:
            hva = await vm.ram(0, RAM, 2 << 20, backing="hugetlb", object="hram" if memfd else None,
                               share="shared" if memfd else "private", prot=RWM)
            view = hva
        elif memfd:
            hva = await vm.ram(0, RAM, N * PAGE, backing="memfd", object="ram")
            view = await vm.map(N * PAGE, backing="memfd", object="ram", prot=RWM)
        else:
            hva = view = await vm.ram(0, RAM, N * PAGE, prot=RWM)
        tracer_proc = Proc.new(k, "T", session=vm.vmm.task.session)
        st = {"vm": vm}

        async def guest(k, st):
            for c, ipa, tag in g:
                try:
                    if c == "stg":
                        await vm.stg(ipa, PAGE, tag)
                    elif c == "store":
                        await vm.store(ipa + 16 * tag, bytes([tag + 1]) * 16)
                    elif c == "ldg":
                        await vm.ldg(ipa, 64)
                    else:
                        await vm.load(ipa, 32)
                except KernelError:
                    pass

        async def vmm(k, st):
            for c, ipa, tag in v:
                try:
                    if c in ("stg", "store"):
                        await vm.copy_tags(ipa, PAGE, from_guest=False, tags=bytes([tag]) * 256)
                    elif c == "ldg":
                        await vm.copy_tags(ipa, PAGE, from_guest=True)
                    else:
                        await vm.vmm("stg", addr=view + (ipa - RAM), tag=tag, size=PAGE)
                except KernelError:
                    pass

        async def host(k, st):
            for c, pg in h:
                addr = hva + pg * PAGE
                try:
                    if c == "swap":
                        await host_swap_out(k, vm.vmm.pid, addr, PAGE)
                    elif c == "migrate":
                        await host_migrate_pages(k, vm.vmm.pid, addr, PAGE)
                    elif c == "ksm":
                        await host_ksm_merge(k, vm.vmm.pid, hva, N * PAGE)
                    else:
                        await vm.vmm("madvise", addr=addr, size=PAGE, advice="dontneed")
                except KernelError:
                    pass

        async def tracer(k, st):
            for c, pg, tag in t:
                addr = view + pg * PAGE
                try:
                    if c == "poke":
                        await tracer_proc("ptrace-poke-tags", target=vm.vmm.pid, addr=addr, tags=[tag] * 256)
                    elif c == "peek":
                        await tracer_proc("ptrace-peek-tags", target=vm.vmm.pid, addr=addr, count=256)
                    elif c == "fork":
                        child = await vm.vmm.fork("child")
                        await child("stg", addr=addr, tag=tag, size=PAGE)
                    else:
                        await vm.vmm("mprotect", addr=view, size=N * PAGE, prot=RWM)
                except KernelError:
                    pass

        return st, {"g": guest, "v": vmm, "h": host, "t": tracer}

    return setup


@pytest.mark.parametrize("hugetlb", [False, True])
async def test_campaign(hugetlb):
    """Random KVM interleavings break no invariant (TAGS-AS-WRITTEN included) and leak no frame."""
    for seed in range(SEEDS):
        prng = random.Random(seed * 7 + 1)
        run, _ = await run_once(scenario(seed, hugetlb), policy=lambda runnable, prng=prng: prng.choice(runnable))
        assert run.failure is None, (seed, run.failure)
        assert invariants(run.k) == [], (seed, [v.message for v in run.k.oracle.violations][:3])
        assert frame_problems(run.k) == [], seed
