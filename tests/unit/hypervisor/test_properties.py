"""Hypothesis: random sequences of host operations keep the oracles quiet and agree with a reference model.

The reference model is deliberately simple: it knows, for every page of every
mapping, the tags the last STG/POKE through a VM_MTE mapping wrote (zeros
otherwise) and the bytes the last stores wrote (zeros otherwise):

* private anonymous pages are keyed by (pid, virtual page): fork copies them,
  munmap and MADV_DONTNEED forget them (the next touch gets a fresh zero page);
* MAP_SHARED memfd pages are keyed by (object, page index): every mapping in
  every process sees the same page, and neither munmap nor MADV_DONTNEED
  loses them (the object is a named tmpfs file);
* swap-out, page migration and KSM merging change nothing a process can observe.

LDG and PEEKMTETAGS through a VM_MTE mapping must return the expected tags,
through any other mapping zeros (RAZ); every process runs with TCF sync and
all tags included, so a store through a pointer with the expected tag must
never fault and one with a wrong tag must fault without being performed.
After every step ``k.oracle.check_state()`` must be empty and the frames'
bookkeeping sound (``support.frame_problems``).
"""

from __future__ import annotations

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Proc, frame_problems

from hypervisor.kernel import Kernel
from hypervisor.syscalls import host_ksm_merge, host_migrate_pages, host_swap_out
from shared.errno import KernelError
from shared.mte import tagged_pointer

PAGE = 4096
MAX_TASKS = 4


@attrs.define
class Region:
    """One mapping of one process."""

    proc: Proc
    addr: int
    npages: int
    obj: str | None  # memfd object name, None for private anonymous
    mte: bool

    def key(self, i: int):
        """The reference model's identity of page ``i`` of this mapping."""
        if self.obj is None:
            return ("anon", self.proc.pid, (self.addr >> 12) + i)
        return ("obj", self.obj, i)


class Model:
    """The host under test plus the reference model."""

    def __init__(self):
        self.k = Kernel()
        a = Proc.new(self.k, "A")
        b = Proc.new(self.k, "B", session=a.task.session)
        self.procs = [a, b]
        self.regions: list[Region] = []
        self.objects: dict[str, int] = {}  # name -> pages
        self.tags: dict = {}  # page key -> bytearray(256); absent = zeros
        self.data: dict = {}  # page key -> {offset: byte}; absent = zeros
        self.log: list = []

    # ---- the reference model ---------------------------------------------------

    def expected_tags(self, r: Region, i: int) -> list[int]:
        if not r.mte:
            return [0] * 256
        return list(self.tags.get(r.key(i), bytes(256)))

    def expected_data(self, r: Region, i: int) -> bytes:
        page = bytearray(PAGE)
        for off, b in self.data.get(r.key(i), {}).items():
            page[off] = b
        return bytes(page)

    def forget_anon(self, r: Region) -> None:
        if r.obj is None:
            for i in range(r.npages):
                self.tags.pop(r.key(i), None)
                self.data.pop(r.key(i), None)

    def pick(self, sel: int) -> Region | None:
        return self.regions[sel % len(self.regions)] if self.regions else None

    # ---- operations ---------------------------------------------------------------

    async def op_mmap(self, tsel, memfd, mte, npages):
        p = self.procs[tsel % len(self.procs)]
        prot = ["read", "write"] + (["mte"] if mte else [])
        if memfd:
            name = f"obj{len(self.objects)}"
            addr = await p("mmap", size=npages * PAGE, prot=prot, share="shared", backing="memfd", object=name)
            self.objects[name] = npages
        else:
            name = None
            addr = await p("mmap", size=npages * PAGE, prot=prot)
        self.regions.append(Region(p, addr, npages, name, mte))

    async def op_map_obj(self, tsel, osel, mte):
        if not self.objects:
            return
        name = sorted(self.objects)[osel % len(self.objects)]
        npages = self.objects[name]
        p = self.procs[tsel % len(self.procs)]
        prot = ["read", "write"] + (["mte"] if mte else [])
        addr = await p("mmap", size=npages * PAGE, prot=prot, share="shared", backing="memfd", object=name)
        self.regions.append(Region(p, addr, npages, name, mte))

    async def op_stg(self, rsel, page, g0, n, tag):
        r = self.pick(rsel)
        if r is None:
            return
        i = page % r.npages
        g0 = g0 % 256
        n = min(n, 256 - g0)
        await r.proc("stg", addr=tagged_pointer(r.addr + i * PAGE + g0 * 16, tag), size=n * 16)
        if r.mte:
            t = self.tags.setdefault(r.key(i), bytearray(256))
            t[g0:g0 + n] = bytes([tag]) * n

    async def op_poke(self, rsel, page, g0, tags):
        r = self.pick(rsel)
        if r is None:
            return
        i = page % r.npages
        g0 = g0 % 256
        tags = tags[:256 - g0]
        tracer = self.procs[0]
        addr = r.addr + i * PAGE + g0 * 16
        try:
            n = await tracer("ptrace-poke-tags", target=r.proc.pid, addr=addr, tags=tags)
        except KernelError as exc:
            assert not r.mte and exc.name == "EIO", exc
            return
        assert r.mte and n == len(tags)
        t = self.tags.setdefault(r.key(i), bytearray(256))
        t[g0:g0 + n] = bytes(tags)

    async def op_store(self, rsel, page, off, byte, wrong_tag):
        r = self.pick(rsel)
        if r is None:
            return
        i = page % r.npages
        want = self.expected_tags(r, i)[off // 16]
        tag = (want + 1) % 16 if wrong_tag else want
        res = await r.proc("store", addr=tagged_pointer(r.addr + i * PAGE + off, tag), data=bytes([byte]))
        if wrong_tag and r.mte:
            assert res.fault is not None and res.fault["kind"] == "tag-check-fault", res
            assert res.fault["addr"] == r.addr + i * PAGE + off
            return
        assert res.fault is None, res
        self.data.setdefault(r.key(i), {})[off] = byte

    async def op_ldg(self, rsel, page):
        r = self.pick(rsel)
        if r is not None:
            await self.check_page(r, page % r.npages, data=False)

    async def op_peek(self, rsel, page):
        r = self.pick(rsel)
        if r is None:
            return
        i = page % r.npages
        try:
            got = await self.procs[0]("ptrace-peek-tags", target=r.proc.pid, addr=r.addr + i * PAGE, count=256)
        except KernelError as exc:
            assert not r.mte and exc.name == "EIO", exc
            return
        assert r.mte and got == self.expected_tags(r, i)

    async def op_mprotect_mte(self, rsel):
        r = self.pick(rsel)
        if r is None:
            return
        await r.proc("mprotect", addr=r.addr, size=r.npages * PAGE, prot=["read", "write", "mte"])
        r.mte = True

    async def op_fork(self, tsel):
        if len(self.procs) >= MAX_TASKS:
            return
        parent = self.procs[tsel % len(self.procs)]
        child = await parent.fork()
        self.procs.append(child)
        for r in [r for r in self.regions if r.proc is parent]:
            c = Region(child, r.addr, r.npages, r.obj, r.mte)
            self.regions.append(c)
            if r.obj is None:
                for i in range(r.npages):
                    if r.key(i) in self.tags:
                        self.tags[c.key(i)] = bytearray(self.tags[r.key(i)])
                    if r.key(i) in self.data:
                        self.data[c.key(i)] = dict(self.data[r.key(i)])

    async def op_swap_out(self, rsel):
        r = self.pick(rsel)
        if r is not None:
            await host_swap_out(self.k, r.proc.pid, r.addr, r.npages * PAGE)

    async def op_migrate(self, rsel):
        r = self.pick(rsel)
        if r is not None:
            await host_migrate_pages(self.k, r.proc.pid, r.addr, r.npages * PAGE)

    async def op_mergeable(self, rsel):
        r = self.pick(rsel)
        if r is not None:
            await r.proc("madvise", addr=r.addr, size=r.npages * PAGE, advice="mergeable")

    async def op_ksm(self, rsel):
        r = self.pick(rsel)
        if r is not None:
            await host_ksm_merge(self.k, r.proc.pid, r.addr, r.npages * PAGE)

    async def op_munmap(self, rsel):
        r = self.pick(rsel)
        if r is None:
            return
        await r.proc("munmap", addr=r.addr, size=r.npages * PAGE)
        self.regions.remove(r)
        self.forget_anon(r)

    async def op_dontneed(self, rsel):
        r = self.pick(rsel)
        if r is None:
            return
        await r.proc("madvise", addr=r.addr, size=r.npages * PAGE, advice="dontneed")
        self.forget_anon(r)

    # ---- checks -------------------------------------------------------------------------

    async def check_page(self, r: Region, i: int, data: bool = True) -> None:
        got = await r.proc.tags(r.addr + i * PAGE, PAGE)
        assert got == self.expected_tags(r, i), f"tags of {r} page {i}"
        if data:
            await r.proc("tco", on=True)
            value = (await r.proc("load", addr=r.addr + i * PAGE, size=PAGE)).value
            await r.proc("tco", on=False)
            assert value == self.expected_data(r, i), f"data of {r} page {i}"

    def check_oracles(self) -> None:
        assert self.k.oracle.check_state() == [], self.log
        assert frame_problems(self.k) == [], self.log

    async def check_all(self) -> None:
        for r in self.regions:
            for i in range(r.npages):
                await self.check_page(r, i)
        self.check_oracles()


# ---- strategies ------------------------------------------------------------------------

sel = st.integers(0, 7)
page = st.integers(0, 2)
tag = st.integers(0, 15)
offset = st.sampled_from([0, 15, 16, 100, 2048, 4095])

OPS = st.one_of(
    st.tuples(st.just("mmap"), sel, st.booleans(), st.booleans(), st.integers(1, 3)),
    st.tuples(st.just("map_obj"), sel, sel, st.booleans()),
    st.tuples(st.just("stg"), sel, page, st.integers(0, 255), st.integers(1, 64), tag),
    st.tuples(st.just("poke"), sel, page, st.integers(0, 255), st.lists(tag, min_size=1, max_size=8)),
    st.tuples(st.just("store"), sel, page, offset, st.integers(1, 255), st.booleans()),
    st.tuples(st.just("ldg"), sel, page),
    st.tuples(st.just("peek"), sel, page),
    st.tuples(st.just("mprotect_mte"), sel),
    st.tuples(st.just("fork"), sel),
    st.tuples(st.just("swap_out"), sel),
    st.tuples(st.just("migrate"), sel),
    st.tuples(st.just("mergeable"), sel),
    st.tuples(st.just("ksm"), sel),
    st.tuples(st.just("munmap"), sel),
    st.tuples(st.just("dontneed"), sel),
)

# every sequence starts with a few mappings so the other ops have something to act on
PREFIX = st.lists(st.tuples(st.just("mmap"), sel, st.booleans(), st.booleans(), st.integers(1, 3)),
                  min_size=1, max_size=3)


async def run_ops(ops) -> Model:
    m = Model()
    for p in m.procs:
        await p("prctl", tcf="sync", include=0xFFFF)
    for op in ops:
        m.log.append(op)
        await getattr(m, f"op_{op[0]}")(*op[1:])
        m.check_oracles()
    await m.check_all()
    return m


class TestRandomHostOps:
    """Random sequences of host operations on up to four processes."""

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(prefix=PREFIX, ops=st.lists(OPS, min_size=10, max_size=40))
    def test_oracles_quiet_and_reference_model_agrees(self, prefix, ops):
        """After every step the oracles are quiet; LDG, PEEK, loads and tag checks match the reference model."""
        trio.run(run_ops, prefix + ops)

    def test_the_reference_model_can_disagree(self):
        """Sanity: a tag changed behind the model's back is caught by the final check."""

        async def main():
            m = await run_ops([("mmap", 0, False, True, 1), ("stg", 0, 0, 0, 4, 9)])
            r = m.regions[0]
            m.tags[r.key(0)][0] = 3  # the reference model now disagrees with the kernel
            try:
                await m.check_page(r, 0)
            except AssertionError:
                return
            raise AssertionError("the reference-model check did not notice")

        trio.run(main)

    def test_a_known_sequence(self):
        """A fixed sequence through every operation kind (shared memfd, fork, swap, migrate, dontneed) agrees."""
        ops = [
            ("mmap", 0, True, True, 2), ("mmap", 0, False, True, 2), ("map_obj", 1, 0, False),
            ("stg", 0, 0, 3, 10, 6), ("stg", 1, 1, 0, 256, 2), ("store", 2, 0, 100, 7, False),
            ("poke", 1, 0, 8, [1, 2, 3]), ("fork", 0), ("store", 3, 1, 16, 9, False),
            ("store", 4, 1, 15, 5, True), ("swap_out", 2), ("peek", 0, 0), ("migrate", 0), ("migrate", 1),
            ("mprotect_mte", 2), ("ldg", 2, 0), ("dontneed", 1), ("dontneed", 0), ("munmap", 3),
            ("swap_out", 4), ("ldg", 4, 1), ("mmap", 1, False, False, 2), ("store", 4, 0, 0, 1, False),
            ("store", 4, 1, 0, 1, False), ("mergeable", 4), ("ksm", 4), ("store", 4, 1, 100, 2, False),
        ]
        m = trio.run(run_ops, ops)
        assert len(m.procs) == 3 and len(m.regions) == 5
        assert any(p.ksm for p in m.k.alloc.live_pages())  # the KSM pass really merged
