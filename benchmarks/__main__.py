"""``python -m benchmarks``: print each figure beside its same-run baseline (see benchmarks/__init__.py)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import attrs
import msgpack
import trio

from mtekvm.links import ProcessHost, start_listening_process, stop_process
from shared.transport import open_connection

MiB = 1 << 20
GRANULE = 16
RW_MTE = ["read", "write", "mte"]


@attrs.frozen
class Row:
    """One line of the table: a figure and the baseline it is read against."""

    group: str
    figure: str
    unit: str
    value: float
    baseline: str
    baseline_value: float

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else float("nan")


async def _timed(fn, units_per_call: float, seconds: float) -> float:
    calls = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        await fn()
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls * units_per_call / (now - t0)


async def compare(a, units_a: float, b, units_b: float, seconds: float, rounds: int = 5) -> tuple[float, float]:
    """Units per second of ``await a()`` and of ``await b()``.

    The two are measured in alternating slices (a, b, a, b, ...), ``rounds``
    of each, about ``seconds`` in all, and each figure is the median of its
    slices: drift in the machine's load hits both sides alike.
    """
    await a()  # warm up both
    await b()
    ra, rb = [], []
    for _ in range(rounds):
        ra.append(await _timed(a, units_a, seconds / (2 * rounds)))
        rb.append(await _timed(b, units_b, seconds / (2 * rounds)))
    return statistics.median(ra), statistics.median(rb)


class LeanClient:
    """The smallest msgpack request/response client: used for both sides of every comparison.

    (:class:`shared.wire.Client` matches concurrent replies with events and
    tasks; its own cost would blur the difference between the two servers.)
    """

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=128 << 20)
        self.packer = msgpack.Packer(use_bin_type=True)
        self.ids = 0

    @classmethod
    async def open(cls, address: str, hello: dict | None = None) -> LeanClient:
        c = cls(await open_connection(address))
        if hello is not None:
            await c.call("hello", hello)
        return c

    async def _next(self) -> dict:
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                data = await self.stream.receive_some(256 * 1024)
                if not data:
                    raise ConnectionError("connection closed") from None
                self.unpacker.feed(data)

    async def call(self, op: str, args: dict | None = None) -> dict:
        """One request, one response; raises on an error reply."""
        self.ids += 1
        await self.stream.send_all(self.packer.pack({"t": "req", "id": self.ids, "op": op, "args": args or {}}))
        msg = await self._next()
        if not msg.get("ok"):
            raise RuntimeError(f"{op}: {msg.get('err')} {msg.get('msg')}")
        return msg

    async def pipeline(self, op: str, args: dict, n: int) -> None:
        """``n`` requests written at once, then their ``n`` responses read."""
        first = self.ids + 1
        self.ids += n
        await self.stream.send_all(b"".join(self.packer.pack({"t": "req", "id": i, "op": op, "args": args})
                                            for i in range(first, first + n)))
        for _ in range(n):
            msg = await self._next()
            if not msg.get("ok"):
                raise RuntimeError(f"{op}: {msg.get('err')} {msg.get('msg')}")

    async def aclose(self) -> None:
        await self.stream.aclose()


def vm_rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class EchoServer:
    """The baseline peer process (benchmarks/echo_server.py)."""

    def __init__(self, nursery: trio.Nursery):
        self.nursery = nursery
        self.process: trio.Process | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="mtekvm-bench-")
        self.address = f"unix:{os.path.join(self._tmp.name, 'echo.sock')}"

    async def start(self) -> None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.process, _ = await start_listening_process(
            [sys.executable, "-m", "benchmarks.echo_server", self.address], env, timeout=20)

    async def connect(self) -> LeanClient:
        return await LeanClient.open(self.address)

    async def stop(self) -> None:
        if self.process is not None:
            await stop_process(self.process)
        self._tmp.cleanup()


# ---- figure 1: small-op round trips ------------------------------------------------

async def _process(hv: ProcessHost, name: str) -> LeanClient:
    return await LeanClient.open(hv.address, {"role": "process", "name": name, "secret": hv.secret})


async def bench_rpc(hv: ProcessHost, echo: EchoServer, seconds: float) -> list[Row]:
    proc = await _process(hv, "bench-rpc")
    raw = await echo.connect()

    async def hv_one():
        await proc.call("getpid")

    async def echo_one():
        await raw.call("getpid")

    async def hv_16():
        await proc.pipeline("getpid", {}, 16)

    async def echo_16():
        await raw.pipeline("getpid", {}, 16)

    hv_seq, echo_seq = await compare(hv_one, 1, echo_one, 1, seconds)
    hv_par, echo_par = await compare(hv_16, 16, echo_16, 16, seconds)
    await proc.aclose()
    await raw.aclose()
    return [
        Row("rpc", "getpid round trips, 1 in flight", "req/s", hv_seq, "raw msgpack echo", echo_seq),
        Row("rpc", "getpid round trips, 16 in flight", "req/s", hv_par, "raw msgpack echo", echo_par),
    ]


# ---- figure 2: tagged access throughput -----------------------------------------------

async def _tagged_process(hv: ProcessHost, tcf: str, tag: int) -> tuple[LeanClient, int]:
    """A process with TCF ``tcf`` and a 4 MiB VM_MTE mapping whose first 3 MiB carry ``tag``, pages present."""
    proc = await _process(hv, f"bench-access-{tcf}")
    addr = (await proc.call("mmap", {"size": 4 * MiB, "prot": RW_MTE}))["value"]
    await proc.call("stg", {"addr": addr, "tag": tag, "size": 3 * MiB})
    await proc.call("store", {"addr": addr, "tag": tag, "data": b"\x01" * (3 * MiB)})
    await proc.call("prctl", {"tcf": tcf})
    return proc, addr


async def bench_access(hv: ProcessHost, echo: EchoServer, seconds: float) -> list[Row]:
    tag = 5
    size = MiB
    checked_p, checked_addr = await _tagged_process(hv, "sync", tag)
    plain_p, plain_addr = await _tagged_process(hv, "none", tag)
    raw = await echo.connect()
    payload = bytes(range(256)) * (size // 256)

    def store_load(proc, addr):
        async def run():
            r = await proc.call("store", {"addr": addr, "tag": tag, "data": payload})
            assert r["fault"] is None, r["fault"]
            r = await proc.call("load", {"addr": addr, "tag": tag, "size": size})
            assert r["fault"] is None and len(r["value"]) == size
        return run

    async def raw_bulk():
        await raw.call("store", {"addr": 0, "tag": tag, "data": payload})
        r = await raw.call("load", {"addr": 0, "tag": tag, "size": size})
        assert len(r["value"]) == size

    granules = 2 * size // GRANULE
    checked, unchecked = await compare(store_load(checked_p, checked_addr), granules,
                                       store_load(plain_p, plain_addr), granules, seconds)
    checked2, bulk = await compare(store_load(checked_p, checked_addr), granules, raw_bulk, granules, seconds)

    n = 1024
    small = bytes(range(64))

    def small_ops(addr):
        base = addr + 2 * MiB
        return [["store", {"addr": base + i * 64, "tag": tag, "data": small}] if i % 2 == 0 else
                ["load", {"addr": base + (i - 1) * 64, "tag": tag, "size": 64}] for i in range(n)]

    def batch(proc, addr):
        ops = small_ops(addr)

        async def run():
            out = (await proc.call("batch", {"ops": ops}))["value"]
            assert all(r[0] and r[2] is None for r in out), out[:3]
        return run

    def one_by_one(proc, addr, count=256):
        ops = small_ops(addr)[:count]

        async def run():
            for op, args in ops:
                r = await proc.call(op, args)
                assert r["fault"] is None
        return run

    small_granules = n * 64 // GRANULE
    batch_checked, batch_unchecked = await compare(batch(checked_p, checked_addr), small_granules,
                                                   batch(plain_p, plain_addr), small_granules, seconds)
    batch_checked2, single_checked = await compare(batch(checked_p, checked_addr), small_granules,
                                                   one_by_one(checked_p, checked_addr), 256 * 64 // GRANULE,
                                                   seconds)
    for c in (checked_p, plain_p, raw):
        await c.aclose()
    return [
        Row("access", "1MiB store+load, tcf sync", "granules/s", checked, "same, tcf none", unchecked),
        Row("access", "1MiB store+load, tcf sync", "granules/s", checked2, "raw bulk 1MiB out+back", bulk),
        Row("access", "batch of 1024 x 64B, tcf sync", "granules/s", batch_checked, "same, tcf none",
            batch_unchecked),
        Row("access", "batch of 1024 x 64B, tcf sync", "granules/s", batch_checked2, "1 request per access",
            single_checked),
    ]


# ---- figure 3: memory per MiB touched ---------------------------------------------------

async def bench_memory(touch_mib: int) -> list[Row]:
    rows = []
    for how in ("store", "stg", "load"):
        async with trio.open_nursery() as nursery:
            hv = ProcessHost(nursery, ram=max(256, 2 * touch_mib) * MiB)
            await hv.start()
            try:
                proc = await _process(hv, f"bench-mem-{how}")
                span = 16 * touch_mib * MiB  # a mapping much larger than what is touched
                addr = (await proc.call("mmap", {"size": span, "prot": RW_MTE}))["value"]
                chunk = bytes([0xA5]) * MiB
                # warm up the allocator and the code paths on a region we do not count
                warm = (await proc.call("mmap", {"size": 4 * MiB, "prot": RW_MTE}))["value"]
                for i in range(4):
                    await proc.call("store", {"addr": warm + i * MiB, "tag": 0, "data": chunk})
                    await proc.call("load", {"addr": warm + i * MiB, "size": MiB})
                before = vm_rss_mib(hv.process.pid)
                stride = span // touch_mib
                for i in range(touch_mib):
                    at = addr + i * stride
                    if how == "store":
                        await proc.call("store", {"addr": at, "tag": 0, "data": chunk})
                    elif how == "stg":
                        await proc.call("stg", {"addr": at, "tag": 7, "size": MiB})
                    else:
                        await proc.call("load", {"addr": at, "size": MiB})
                after = vm_rss_mib(hv.process.pid)
                await proc.aclose()
            finally:
                await hv.stop()
                nursery.cancel_scope.cancel()
        what = {"store": "written (data+tags)", "stg": "tagged by STG only", "load": "read only (zero page)"}[how]
        rows.append(Row("memory", f"{touch_mib} MiB {what}", "RSS MiB/MiB", (after - before) / touch_mib,
                        "raw bytes", 1.0))
    return rows


# ---- figures 4 and 5: KVM -----------------------------------------------------------------

PAGE = 4096
GUEST_IPA = 0x4000_0000  # where guest RAM starts (the arm "virt" machine's RAM base)
GUEST_TAG = 5
DUMP_CHUNK = 256 * MiB  # guest bytes per KVM_ARM_MTE_COPY_TAGS call: 16 MiB of tags = shared.abi.MAX_IO


@attrs.define
class BenchGuest:
    """A VM set up by a VMM-like process, with one vCPU run from a guest connection."""

    vmm: LeanClient  # hello role "process": issues the kvm-* ioctls
    guest: LeanClient  # hello role "vcpu": runs vCPU ``vcpu``
    vm: int
    vcpu: int

    async def access(self, kind: str, segs: list, *, tag: int = GUEST_TAG, check: str = "none") -> dict:
        return await self.guest.call("vcpu-access", {"vcpu": self.vcpu, "kind": kind, "segs": segs, "tag": tag,
                                                     "check": check, "ata": True})

    async def aclose(self) -> None:
        await self.guest.aclose()
        await self.vmm.aclose()


def _segs(ipa: int, length: int, attr: str = "tagged") -> list:
    """``length`` bytes at ``ipa`` as the guest's stage 1 hands them over: one segment per 4 KiB page."""
    out = []
    while length:
        n = min(length, PAGE - (ipa & (PAGE - 1)))
        out.append([ipa, n, attr])
        ipa += n
        length -= n
    return out


async def _kvm_guest(hv: ProcessHost, size: int, *, backing: str, share: str, name: str) -> BenchGuest:
    """KVM_CREATE_VM, ENABLE_CAP(ARM_MTE), mmap ``size`` of guest RAM, one memslot at GUEST_IPA, one vCPU."""
    vmm = await _process(hv, name)
    vm = (await vmm.call("kvm-create-vm"))["value"]
    await vmm.call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"})
    hva = (await vmm.call("mmap", {"size": size, "prot": ["read", "write"], "share": share,
                                   "backing": backing}))["value"]
    await vmm.call("kvm-set-memory-region", {"vm": vm, "slot": 0, "ipa": GUEST_IPA, "size": size, "addr": hva})
    vcpu = (await vmm.call("kvm-create-vcpu", {"vm": vm}))["value"]
    guest = await LeanClient.open(hv.address, {"role": "vcpu", "name": f"{name}-guest", "secret": hv.secret})
    attached = (await guest.call("vcpu-attach", {"token": vcpu["token"]}))["value"]
    assert attached["mte"], attached
    return BenchGuest(vmm, guest, vm, vcpu["index"])


async def bench_kvm_access(hv: ProcessHost, seconds: float) -> list[Row]:
    size = 16 * MiB
    g = await _kvm_guest(hv, size, backing="memfd", share="shared", name="bench-kvm-vmm")
    for at in range(0, size, 4 * MiB):  # the guest tags all of its RAM (STG with SCTLR_EL1.ATA)
        await g.access("stg", _segs(GUEST_IPA + at, 4 * MiB))
    # the check is really made: a wrong pointer tag faults, synchronously
    bad = await g.access("load", _segs(GUEST_IPA, 64), tag=GUEST_TAG + 1, check="sync")
    assert bad["fault"] and bad["fault"]["kind"] == "tag-check-fault", bad
    host_p, host_addr = await _tagged_process(hv, "sync", GUEST_TAG)

    n, small = 1024, 64
    base = GUEST_IPA + 2 * MiB
    loads = [{"kind": "load", "segs": [[base + i * small, small, "tagged"]], "tag": GUEST_TAG, "check": "sync",
              "ata": True} for i in range(n)]
    batch_ops = [["vcpu-access", a] for a in loads]
    host_ops = [["load", {"addr": host_addr + 2 * MiB + i * small, "tag": GUEST_TAG, "size": small}]
                for i in range(n)]

    async def guest_batch():
        out = (await g.guest.call("vcpu-batch", {"vcpu": g.vcpu, "ops": batch_ops}))["value"]
        assert len(out) == n and all(r[0] and r[2] is None and len(r[1]) == small for r in out), out[:3]

    async def guest_one_by_one():
        for a in loads:
            r = await g.guest.call("vcpu-access", {"vcpu": g.vcpu, **a})
            assert r["fault"] is None and len(r["value"]) == small

    async def host_batch():
        out = (await host_p.call("batch", {"ops": host_ops}))["value"]
        assert len(out) == n and all(r[0] and r[2] is None and len(r[1]) == small for r in out), out[:3]

    big = _segs(GUEST_IPA + 4 * MiB, MiB)  # 256 segments of 4 KiB

    def guest_big(check):
        async def run():
            r = await g.access("load", big, check=check)
            assert r["fault"] is None and len(r["value"]) == MiB
        return run

    async def host_big():
        r = await host_p.call("load", {"addr": host_addr, "tag": GUEST_TAG, "size": MiB})
        assert r["fault"] is None and len(r["value"]) == MiB

    small_granules = n * small // GRANULE
    big_granules = MiB // GRANULE
    batched, single = await compare(guest_batch, small_granules, guest_one_by_one, small_granules, seconds)
    batched2, host_batched = await compare(guest_batch, small_granules, host_batch, small_granules, seconds)
    checked, unchecked = await compare(guest_big("sync"), big_granules, guest_big("none"), big_granules, seconds)
    checked2, host_checked = await compare(guest_big("sync"), big_granules, host_big, big_granules, seconds)
    await g.aclose()
    await host_p.aclose()
    return [
        Row("kvm", "vcpu-batch of 1024 x 64B guest loads, sync", "granules/s", batched,
            "1 vcpu-access per load", single),
        Row("kvm", "vcpu-batch of 1024 x 64B guest loads, sync", "granules/s", batched2,
            "host process batch, same loads", host_batched),
        Row("kvm", "1MiB guest load (256 segs), check sync", "granules/s", checked, "same, check none", unchecked),
        Row("kvm", "1MiB guest load (256 segs), check sync", "granules/s", checked2,
            "host process 1MiB load, tcf sync", host_checked),
    ]


async def bench_vmm_bulk(hv: ProcessHost, echo: EchoServer, seconds: float) -> list[Row]:
    """A 16 MiB store then load (shared.abi.MAX_IO each) through a VMM's mapping of guest RAM, against raw bulk.

    What a migrating VMM does with each 16 MiB of guest RAM: ``load`` on the source,
    ``store`` on the destination, tag 0 and TCF none (the VMM checks no tags). The
    mapping is a VM's memslot; the pages are present after the warm-up.
    """
    size = 16 * MiB
    vmm = await _process(hv, "bench-bulk-vmm")
    vm = (await vmm.call("kvm-create-vm"))["value"]
    await vmm.call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"})
    hva = (await vmm.call("mmap", {"size": size, "prot": ["read", "write"], "share": "private",
                                   "backing": "anon"}))["value"]
    await vmm.call("kvm-set-memory-region", {"vm": vm, "slot": 0, "ipa": GUEST_IPA, "size": size, "addr": hva})
    raw = await echo.connect()
    payload = bytes(range(256)) * (size // 256)

    async def through_vmm():
        await vmm.call("store", {"addr": hva, "tag": 0, "data": payload})
        r = await vmm.call("load", {"addr": hva, "tag": 0, "size": size})
        assert r["fault"] is None and len(r["value"]) == size

    async def raw_bulk():
        await raw.call("store", {"addr": 0, "tag": 0, "data": payload})
        r = await raw.call("load", {"addr": 0, "tag": 0, "size": size})
        assert len(r["value"]) == size

    mib = 2 * size / MiB
    value, baseline = await compare(through_vmm, mib, raw_bulk, mib, seconds)
    await raw.aclose()
    await vmm.aclose()
    return [Row("kvm-bulk", "16MiB store+load via VMM mapping", "MiB/s", value, "raw bulk 16MiB out+back",
                baseline)]


async def bench_copy_tags(echo: EchoServer, guest_mib: int) -> list[Row]:
    """KVM_ARM_MTE_COPY_TAGS FROM_GUEST over all of a ``guest_mib`` guest, against a raw bulk of as many tag bytes."""
    size = guest_mib * MiB
    tags_per_dump = size // GRANULE
    gb = size / 1e9
    async with trio.open_nursery() as nursery:
        hv = ProcessHost(nursery, ram=max(4 << 30, 2 * size))
        await hv.start()
        try:
            g = await _kvm_guest(hv, size, backing="anon", share="private", name="bench-dump-vmm")
            # the guest tags a few pages (one every 16 MiB); the rest it never touched
            tagged = range(GUEST_IPA, GUEST_IPA + size, 16 * MiB)
            for ipa in tagged:
                await g.access("stg", _segs(ipa, PAGE))
            raw = await echo.connect()

            async def dump() -> float:
                t0 = time.perf_counter()
                nonzero = 0
                for at in range(0, size, DUMP_CHUNK):
                    n = min(DUMP_CHUNK, size - at)
                    v = (await g.vmm.call("kvm-copy-tags", {"vm": g.vm, "guest_ipa": GUEST_IPA + at, "length": n,
                                                            "flags": 1}))["value"]
                    assert v["length"] == n and len(v["tags"]) == n // GRANULE, (v["length"], len(v["tags"]))
                    nonzero += len(v["tags"]) - v["tags"].count(0)
                elapsed = time.perf_counter() - t0
                assert nonzero == len(tagged) * PAGE // GRANULE, nonzero
                return gb / elapsed

            async def bulk() -> float:
                t0 = time.perf_counter()
                for at in range(0, size, DUMP_CHUNK):
                    want = min(DUMP_CHUNK, size - at) // GRANULE
                    r = await raw.call("load", {"size": want})
                    assert len(r["value"]) == want
                return gb / (time.perf_counter() - t0)  # in GB of guest RAM those tags cover

            await bulk()  # warm up the baseline peer
            bulks = [await bulk()]
            rss0 = vm_rss_mib(hv.process.pid)
            cold = await dump()
            rss1 = vm_rss_mib(hv.process.pid)
            bulks.append(await bulk())
            warm = await dump()
            rss2 = vm_rss_mib(hv.process.pid)
            bulks.append(await bulk())
            await raw.aclose()
            await g.aclose()
        finally:
            await hv.stop()
            nursery.cancel_scope.cancel()
    baseline = statistics.median(bulks)
    tag_mib = tags_per_dump // MiB
    what = f"{guest_mib // 1024} GiB" if guest_mib % 1024 == 0 else f"{guest_mib} MiB"
    return [
        Row("kvm-dump", f"COPY_TAGS FROM_GUEST of {what}, 1st", "guest GB/s", cold,
            f"raw bulk {tag_mib}MiB of tag bytes", baseline),
        Row("kvm-dump", f"COPY_TAGS FROM_GUEST of {what}, 2nd", "guest GB/s", warm,
            f"raw bulk {tag_mib}MiB of tag bytes", baseline),
        Row("kvm-dump", f"RSS after 1st dump (+{rss1 - rss0:.0f} MiB)", "RSS MiB/MiB", (rss1 - rss0) / guest_mib,
            "raw bytes", 1.0),
        Row("kvm-dump", f"RSS after 2nd dump (+{rss2 - rss0:.0f} MiB)", "RSS MiB/MiB", (rss2 - rss0) / guest_mib,
            "raw bytes", 1.0),
    ]


# ---- driver ------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    if v != v:  # nan
        return "-"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.1f}k"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3f}"


def _fmt_ratio(v: float) -> str:
    if v != v:
        return "-"
    return f"{v:.2f}x" if abs(v) >= 0.1 else f"{v:.2g}x"  # two significant digits for small ratios


def print_table(rows: list[Row], out=sys.stdout) -> None:
    head = ("figure", "unit", "value", "baseline", "baseline value", "ratio")
    body = [(f"[{r.group}] {r.figure}", r.unit, _fmt(r.value), r.baseline, _fmt(r.baseline_value),
             _fmt_ratio(r.ratio)) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)), file=out)
    print(line, file=out)
    for b in body:
        cells = enumerate(zip(b, widths, strict=False))
        print("  ".join((c.rjust(w) if i in (2, 4, 5) else c.ljust(w)) for i, (c, w) in cells), file=out)


async def run(args) -> list[Row]:
    rows: list[Row] = []
    kvm_rows: list[Row] = []
    async with trio.open_nursery() as nursery:
        hv = ProcessHost(nursery)
        echo = EchoServer(nursery)
        await hv.start()
        await echo.start()
        try:
            print("figure 1: small-op round trips ...", file=sys.stderr, flush=True)
            rows += await bench_rpc(hv, echo, args.seconds)
            print("figure 2: tagged access throughput ...", file=sys.stderr, flush=True)
            rows += await bench_access(hv, echo, args.seconds)
            print("figure 4: KVM guest tagged access throughput ...", file=sys.stderr, flush=True)
            kvm_rows += await bench_kvm_access(hv, args.seconds)
            print("figure 4b: 16 MiB store+load through a VMM mapping ...", file=sys.stderr, flush=True)
            kvm_rows += await bench_vmm_bulk(hv, echo, args.seconds)
            if args.dump_mib:
                print(f"figure 5: KVM_ARM_MTE_COPY_TAGS dump of a {args.dump_mib} MiB guest ...", file=sys.stderr,
                      flush=True)
                kvm_rows += await bench_copy_tags(echo, args.dump_mib)
            if args.migrate_mib:
                from benchmarks.migration import bench_migration

                print(f"figures 6 and 7: live migration and snapshot of a {args.migrate_mib} MiB guest "
                      f"({args.migrate_mib // 4} MiB tagged) ...", file=sys.stderr, flush=True)
                kvm_rows += [Row(**r) for r in await bench_migration(echo, args.migrate_mib, args.migrate_mib // 4)]
        finally:
            await hv.stop()
            await echo.stop()
            nursery.cancel_scope.cancel()
    print("figure 3: hypervisor memory per MiB touched ...", file=sys.stderr, flush=True)
    rows += await bench_memory(args.touch)
    from benchmarks.runs import bench_runs

    print("figure 8: controlled runs per second (today's path against the old one) ...", file=sys.stderr, flush=True)
    rows += [Row(**r) for r in await bench_runs(2 * args.seconds)]
    from benchmarks.physmem import bench_tag_storage

    print("figure 9: first tagged touch with dynamic tag storage, against the static path ...", file=sys.stderr,
          flush=True)
    rows += [Row(**r) for r in await bench_tag_storage()]
    return rows + kvm_rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--seconds", type=float, default=2.0, help="time per figure/baseline pair (default 2)")
    p.add_argument("--touch", type=int, default=64, help="MiB touched by the memory figure (default 64)")
    p.add_argument("--dump-mib", type=int, default=1024,
                   help="guest RAM dumped by the COPY_TAGS figure, in MiB (default 1024; 0 skips it)")
    p.add_argument("--migrate-mib", type=int, default=1024,
                   help="guest RAM of the migration and snapshot figures, in MiB, a quarter of it touched and "
                        "tagged (default 1024; 0 skips them)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.migrate_mib < 0 or args.migrate_mib % 64:
        p.error("--migrate-mib must be 0 or a multiple of 64")
    if args.dump_mib < 0:
        p.error("--dump-mib must be 0 or more")
    t0 = time.perf_counter()
    rows = trio.run(run, args)
    print()
    print_table(rows)
    print(f"\n(ratio = value / baseline, both measured in this run; {time.perf_counter() - t0:.0f} s; "
          "see benchmarks/__init__.py for how to read each figure)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**attrs.asdict(r), "ratio": r.ratio} for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
