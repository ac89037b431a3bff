"""The hypervisor's ops for live migration: meminfo, kill, mincore, ghost-export and ghost-import."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest
import trio
import trio.testing
from support import RW, RWM, Proc, Vm, expect_errno, invariants

from hypervisor.ghost import data_hash
from hypervisor.kernel import Kernel
from hypervisor.server import Hypervisor
from hypervisor.syscalls import HOST_OPS, PROCESS_OPS
from hypervisor.syscalls import host_swap_out as swap_out
from shared import wire
from shared.abi import validate_args

PAGE = 4096
IPA = 0x4000_0000


async def host(k: Kernel, op: str, **args):
    """One host op, validated as the server does."""
    return await HOST_OPS[op](k, validate_args(op, args))


async def written_vm(k: Kernel, name: str = "vmm:vm0", *, backing: str = "anon", size: int = 16 * PAGE) -> Vm:
    """An MTE VM with one memslot of ``size`` bytes whose first four pages the guest wrote (data and tags)."""
    vm = await Vm.create(k, name=name)
    await vm.ram(0, IPA, size, backing=backing, prot=RWM)
    for i in range(4):
        await vm.store(IPA + i * PAGE, bytes([i + 1]) * 64)
        await vm.stg(IPA + i * PAGE, PAGE, tag=i + 3)
    return vm


class TestMeminfo:
    async def test_lists_running_vms_by_their_vmm_name(self):
        """meminfo names each VM after its VMM process (vmm:NAME owns NAME), sorted, and leaves destroyed VMs out."""
        k = Kernel()
        b = await Vm.create(k, name="vmm:b")
        await Vm.create(k, name="vmm:a")
        info = await host(k, "meminfo")
        assert info["vms"] == ["a", "b"]
        assert info["ram-pages"] == (256 << 20) // PAGE
        await b("kvm-destroy-vm")
        assert (await host(k, "meminfo"))["vms"] == ["a"]

    @pytest.mark.parametrize("backing", ["anon", "memfd", "hugetlb"])
    async def test_destroy_and_unmap_gives_every_page_back(self, backing):
        """After the VM is destroyed and its RAM unmapped, free-pages is what it was before the VM was built."""
        k = Kernel()
        before = (await host(k, "meminfo"))["free-pages"]
        vm = await written_vm(k, backing=backing, size=2 << 20)
        during = (await host(k, "meminfo"))["free-pages"]
        assert during < before
        hva = vm.kvm.memslots[0].userspace_addr
        await vm("kvm-destroy-vm")
        await vm.vmm("munmap", addr=hva, size=2 << 20)
        assert (await host(k, "meminfo"))["free-pages"] == before


class TestKill:
    async def test_kill_destroys_the_vm_and_frees_its_memory(self):
        """kill returns once the process is gone: its VM is off meminfo and its pages are free again."""
        k = Kernel()
        before = (await host(k, "meminfo"))["free-pages"]
        vm = await written_vm(k)
        assert await host(k, "kill", pid=vm.vmm.pid) is None
        info = await host(k, "meminfo")
        assert info["vms"] == [] and info["free-pages"] == before
        assert vm.vmm.pid not in k.tasks and vm.vmm.task.dead
        assert invariants(k) == []

    async def test_kill_of_no_such_pid_is_esrch(self):
        """kill of a pid that does not exist (or has exited) fails with ESRCH."""
        k = Kernel()
        p = Proc.new(k, "p")
        await host(k, "kill", pid=p.pid)
        await expect_errno("ESRCH", host(k, "kill", pid=p.pid))
        await expect_errno("ESRCH", host(k, "kill", pid=9999))

    async def test_kill_during_an_exit_waits_for_it(self):
        """A kill racing an exit in progress returns only once that exit has finished."""
        k = Kernel()
        vm = await written_vm(k)
        mm = vm.vmm.task.mm
        done = []
        async with trio.open_nursery() as nursery:
            await mm.mmap_lock.read_lock()  # holds exit_mmap() up once the exit began

            async def exit_first():
                from hypervisor.fork import do_exit
                await do_exit(k, vm.vmm.task)

            async def kill_then_look():
                await host(k, "kill", pid=vm.vmm.pid)
                done.append(vm.vmm.pid in k.tasks)

            nursery.start_soon(exit_first)
            await trio.testing.wait_all_tasks_blocked()
            assert vm.vmm.task.exiting and not vm.vmm.task.dead
            nursery.start_soon(kill_then_look)
            await trio.testing.wait_all_tasks_blocked()
            assert done == []  # still waiting for the exit
            mm.mmap_lock.read_unlock()
        assert done == [False] and vm.vmm.task.dead

    async def test_kill_closes_the_process_connection(self):
        """Killing a process served over a connection closes that connection, and the host is idle afterwards."""
        hv = Hypervisor(Kernel())
        a, b = trio.testing.memory_stream_pair()
        c, d = trio.testing.memory_stream_pair()
        client, admin = wire.FramedStream(a), wire.FramedStream(c)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hv.serve, b)
                nursery.start_soon(hv.serve, d)
                await client.send(wire.request(1, "hello", {"role": "process", "name": "vmm:x"}))
                pid = (await client.receive())["value"]["pid"]
                await client.send(wire.request(2, "kvm-create-vm", {}))
                assert (await client.receive())["ok"]
                await admin.send(wire.request(1, "hello", {"role": "host"}))
                await admin.receive()
                await admin.send(wire.request(2, "kill", {"pid": pid}))
                assert (await admin.receive())["ok"]
                await admin.send(wire.request(3, "meminfo", {}))
                assert (await admin.receive())["value"]["vms"] == []
                with pytest.raises(wire.ConnectionClosed):
                    await client.receive()
                await admin.send(wire.request(4, "kill", {"pid": pid}))
                assert (await admin.receive())["err"] == "ESRCH"
                await c.aclose()
                await hv.wait_idle()
                nursery.cancel_scope.cancel()


class TestMincore:
    async def test_resident_pages_are_ones(self):
        """Faulted, zero-page, and swapped pages read 1, untouched anonymous pages 0."""
        k = Kernel()
        p = Proc.new(k, "p")
        addr = await p("mmap", size=8 * PAGE, prot=RWM)
        await p("store", addr=addr, data=b"x")
        await p("load", addr=addr + 2 * PAGE, tag=0, size=1)  # the zero page
        await p("store", addr=addr + 5 * PAGE, data=b"y")
        await swap_out(k, p.pid, addr + 5 * PAGE, PAGE)
        assert await p("mincore", addr=addr, size=8 * PAGE) == bytes([1, 0, 1, 0, 0, 1, 0, 0])

    async def test_page_cache_counts_without_a_pte(self):
        """A shared object's page another process faulted in is resident for a process with no PTE for it."""
        k = Kernel()
        p, q = Proc.new(k, "p"), Proc.new(k, "q", session=None)
        q.task.session = p.task.session
        q.task.mm.session = p.task.mm.session
        a = await p("mmap", size=4 * PAGE, prot=RW, share="shared", backing="memfd", object="m")
        b = await q("mmap", size=4 * PAGE, prot=RW, share="shared", backing="memfd", object="m")
        await p("store", addr=a + 3 * PAGE, data=b"z")
        assert q.pte(b + 3 * PAGE) is None
        assert await q("mincore", addr=b, size=4 * PAGE) == bytes([0, 0, 0, 1])

    async def test_hugetlb_page_counts_whole(self):
        """One touched byte of a 2 MiB hugetlb page makes its 512 pages resident, and nothing beyond."""
        k = Kernel()
        p = Proc.new(k, "p")
        addr = await p("mmap", size=4 << 20, prot=RW, share="shared", backing="hugetlb", object="h",
                       hugepage_size=2 << 20)
        await p("store", addr=addr + (2 << 20) + 5, data=b"h")
        vec = await p("mincore", addr=addr, size=4 << 20)
        assert vec == bytes(512) + b"\x01" * 512

    async def test_errors(self):
        """An unaligned address is EINVAL and a range with a hole is ENOMEM (mincore(2))."""
        k = Kernel()
        p = Proc.new(k, "p")
        addr = await p("mmap", size=4 * PAGE, prot=RW)
        await p("munmap", addr=addr + PAGE, size=PAGE)
        await expect_errno("EINVAL", p("mincore", addr=addr + 8, size=PAGE))
        await expect_errno("ENOMEM", p("mincore", addr=addr, size=3 * PAGE))
        assert await p("mincore", addr=addr + 2 * PAGE, size=2 * PAGE) == b"\x00\x00"

    async def test_no_scheduling_point_per_page(self):
        """mincore of a 1 GiB mapping with a few pages touched takes a fixed number of scheduling points."""
        k = Kernel()
        p = Proc.new(k, "p")
        addr = await p("mmap", size=1 << 30, prot=RW)
        for i in range(0, 1 << 30, 64 << 20):
            await p("store", addr=addr + i, data=b"t")
        before = k.sched.points
        vec = await p("mincore", addr=addr, size=1 << 30)
        assert k.sched.points - before <= 2
        assert sum(vec) == 16 and len(vec) == (1 << 30) // PAGE


class TestGhostExportImport:
    async def test_export_is_keyed_by_gfn(self):
        """ghost-export gives each written guest page's tags and data hash under str(gfn)."""
        k = Kernel()
        vm = await written_vm(k)
        out = (await vm("ghost-export"))["entries"]
        assert sorted(out) == [str((IPA >> 12) + i) for i in range(4)]
        tags, digest = out[str((IPA >> 12) + 1)]
        assert tags == bytes([4]) and digest == data_hash(bytes([2]) * 64 + bytes(PAGE - 64))  # uniform: 1 byte
        msgpack.unpackb(msgpack.packb(out, use_bin_type=True), raw=False)  # msgpack-encodable as it is

    async def test_only_the_owner_may_ask(self):
        """Another process naming the VM's handle gets EBADF for both ops."""
        k = Kernel()
        vm = await written_vm(k)
        other = Proc.new(k, "other")
        await expect_errno("EBADF", other("ghost-export", vm=vm.handle))
        await expect_errno("EBADF", other("ghost-import", vm=vm.handle, entries={}))

    @pytest.mark.parametrize("backing", ["anon", "memfd"])
    async def test_import_into_another_kernel_checks_the_first_reads(self, backing):
        """After an import, a guest read of tags that differ from the source's record is TAGS-AS-WRITTEN and a
        matching one is not."""
        src = Kernel()
        record = (await (await written_vm(src, backing=backing))("ghost-export"))["entries"]
        dst = Kernel()
        Proc.new(dst, "padding")  # another pid layout
        await (await Vm.create(dst, name="other")).ram(0, 0, 16 * PAGE)  # other VMM addresses
        vm = await Vm.create(dst, name="vmm:vm0")
        await vm.map(PAGE)
        await vm.ram(0, IPA, 16 * PAGE, backing=backing, prot=RWM)
        for i in range(4):  # the migration's copy: data and tags of pages 0-3
            await vm.vmm("store", addr=vm.kvm.memslots[0].userspace_addr + i * PAGE, tag=0,
                         data=bytes([i + 1]) * 64)
            await vm.copy_tags(IPA + i * PAGE, PAGE, from_guest=False, tags=bytes([i + 3]) * 256)
        await vm("ghost-import", entries=record)
        dst.oracle.violations.clear()
        assert await vm.ldg(IPA + PAGE, 16) == [4]
        assert (await vm.load(IPA, 64, tag=3)).value == bytes([1]) * 64
        assert invariants(dst) == []
        gfn2 = str((IPA >> 12) + 2)
        await vm("ghost-import", entries=dict(record, **{gfn2: [bytes([8]) * 256, record[gfn2][1]]}))
        assert await vm.ldg(IPA + 2 * PAGE, 16) == [5]
        assert invariants(dst) == ["TAGS-AS-WRITTEN"]
        assert "read tags" in dst.oracle.violations[-1].message  # seen by the read, before the state check

    async def test_pages_not_listed_lose_their_entry(self):
        """An import replaces the whole record of the VM's memory: a page it does not list reads fresh."""
        k = Kernel()
        vm = await written_vm(k)
        await vm("ghost-import", entries={str((IPA >> 12) + 1): [bytes([9]) * 256, None]})
        out = (await vm("ghost-export"))["entries"]
        assert out == {str((IPA >> 12) + 1): [bytes([9]), None]}

    async def test_mixed_tags_export_whole_and_one_byte_imports_as_a_uniform_page(self):
        """A page with mixed tags exports all 256; a one-byte import stands for 256 granules of that tag."""
        k = Kernel()
        vm = await written_vm(k)
        await vm.stg(IPA, 16, tag=9)
        gfn = str(IPA >> 12)
        assert (await vm("ghost-export"))["entries"][gfn][0] == bytes([9]) + bytes([3]) * 255
        await vm("ghost-import", entries={gfn: [b"\x05", None]})
        hva = vm.kvm.memslots[0].userspace_addr
        ghost = k.oracle.ghost
        assert ghost.lookup(ghost.run_loc(vm.vmm.task.mm, vm.vmm.vma(hva), hva >> 12)).tags == bytes([5]) * 256

    async def test_bad_entries_are_einval_and_change_nothing(self):
        """A gfn outside the memslots or tags of the wrong size is EINVAL and the record stays as it was."""
        k = Kernel()
        vm = await written_vm(k)
        before = (await vm("ghost-export"))["entries"]
        await expect_errno("EINVAL", vm("ghost-import", entries={"5": [None, None]}))
        await expect_errno("EINVAL", vm("ghost-import", entries={str(IPA >> 12): [b"\x01\x02", None]}))
        assert (await vm("ghost-export"))["entries"] == before

    def test_data_hash_is_the_same_in_another_process(self):
        """data_hash gives the same digest in a process with another PYTHONHASHSEED (it is not hash())."""
        page = bytes(range(256)) * 16
        code = ("import sys; from hypervisor.ghost import data_hash; "
                "print(data_hash(bytes(range(256)) * 16))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": "12345", "PYTHONPATH": ":".join(sys.path)})
        assert int(out.stdout) == data_hash(page) and data_hash(bytearray(page)) == data_hash(page)


def test_every_new_op_has_a_handler():
    """The five migration ops are bound in the hypervisor's op tables."""
    assert {"mincore", "ghost-export", "ghost-import"} <= set(PROCESS_OPS)
    assert {"meminfo", "kill"} <= set(HOST_OPS)
