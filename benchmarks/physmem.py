"""Figure 9: what dynamic tag storage costs a first tagged touch, against the static path.

Each measurement boots an in-process host kernel (no wire: the kernel's own cost), maps
``PAGES`` anonymous PROT_MTE pages in one process and times the first STG of each page, the fault
that allocates it, reserves its tag storage (dynamic hosts) and initialises its tags.

* **static**: a default host (the static carve-out); the baseline of every row.
* **dynamic, free storage**: ``tag-storage = "dynamic"``, nothing else running: each tag block
  (32 data pages with 4 KiB blocks) is claimed from the free CMA list by the first page that needs
  it, the other 31 take a reference.
* **dynamic, pressured**: the same after ``alloc-pages from = "tag-storage" count = "all"`` filled
  the tag storage with movable data: every claim first migrates that data away (``cma_alloc_range``),
  the cost the issue asks for.

The three are measured in alternating rounds (static, free, pressured, static, ...) and each figure is
the median of its rounds, so drift in the machine's load hits them alike. Ratio = the figure's pages/s
over the static path's (below 1: slower).
"""

from __future__ import annotations

import statistics
import time

from hypervisor.kernel import Kernel
from hypervisor.syscalls import HOST_OPS, PROCESS_OPS
from shared.abi import validate_args

PAGE = 4096
PAGES = 2048
BASE = 0x1000_0000


async def _call(k: Kernel, task, op: str, **args):
    return await PROCESS_OPS[op](k, task, validate_args(op, args))


async def first_touch(physmem: dict | None, *, pressure: bool) -> float:
    """Seconds for the first STG of each of PAGES fresh PROT_MTE pages on a host booted with ``physmem``."""
    k = Kernel(physmem=physmem)
    if pressure:
        await HOST_OPS["alloc-pages"](k, validate_args("alloc-pages", {"name": "filler", "count": "all",
                                                                       "from": "tag-storage"}))
    task = k.create_task("bench")
    await _call(k, task, "mmap", addr=BASE, size=PAGES * PAGE, prot=["read", "write", "mte"])
    t0 = time.perf_counter()
    for i in range(PAGES):
        await _call(k, task, "stg", addr=BASE + i * PAGE, tag=5, size=16)
    dt = time.perf_counter() - t0
    assert not k.oracle.violations, k.oracle.violations
    return dt


async def bench_tag_storage(rounds: int = 5) -> list[dict]:
    """Figure 9's rows (as dicts of benchmarks.__main__.Row's fields)."""
    dynamic = {"tag_storage": "dynamic"}
    times: dict[str, list[float]] = {"static": [], "free": [], "pressured": []}
    for _ in range(rounds):
        times["static"].append(await first_touch(None, pressure=False))
        times["free"].append(await first_touch(dynamic, pressure=False))
        times["pressured"].append(await first_touch(dynamic, pressure=True))
    rate = {name: PAGES / statistics.median(ts) for name, ts in times.items()}
    base = "first tagged touch, static host"
    return [
        {"group": "tag storage", "figure": "first tagged touch, dynamic host, free tag storage", "unit": "pages/s",
         "value": rate["free"], "baseline": base, "baseline_value": rate["static"]},
        {"group": "tag storage", "figure": "first tagged touch, dynamic host, tag storage full of data",
         "unit": "pages/s", "value": rate["pressured"], "baseline": base, "baseline_value": rate["static"]},
    ]
