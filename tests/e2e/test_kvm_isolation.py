"""End-to-end: who may touch a VM, through a real hypervisor process and real sockets.

A VM belongs to the process that created it (its handle is private, as an fd);
a vCPU is reached only with its token, from the one guest connection that
attached it; roles keep processes, guests and the host apart; a VMM that dies
takes its VMs and guest RAM with it while the hypervisor keeps serving.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest

from shared import wire
from shared.errno import EBADF, EBUSY, EPERM, ESRCH

RW = ["read", "write"]
IPA = 0x4000_0000
SIZE = 1 << 20


async def expect_errno(client: wire.Client, errno: int, op: str, args: dict | None = None) -> wire.RemoteError:
    """Call ``op`` and insist it fails with ``errno``."""
    with pytest.raises(wire.RemoteError) as info:
        await client.call(op, args or {})
    assert info.value.errno == errno, f"{op}: wanted errno {errno}, got {info.value}"
    return info.value


async def build_vm(vmm: wire.Client, vcpus: int = 1) -> tuple[int, list[str]]:
    """An MTE VM with 1 MiB of memfd RAM at IPA 1 GiB; returns its handle and the vCPU tokens."""
    vm = (await vmm.call("kvm-create-vm", {})).value
    await vmm.call("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"})
    hva = (await vmm.call("mmap", {"size": SIZE, "prot": RW, "share": "shared", "backing": "memfd"})).value
    await vmm.call("kvm-set-memory-region", {"vm": vm, "slot": 0, "ipa": IPA, "size": SIZE, "addr": hva})
    tokens = [(await vmm.call("kvm-create-vcpu", {"vm": vm})).value["token"] for _ in range(vcpus)]
    return vm, tokens


def stg(vcpu: int, tag: int = 3) -> dict:
    return {"vcpu": vcpu, "kind": "stg", "segs": [[IPA, 16, "tagged"]], "tag": tag, "ata": True}


@asynccontextmanager
async def guest(hypervisor, *tokens: str):
    """A vcpu-role connection that attached ``tokens``."""
    async with hypervisor.client("vcpu") as g:
        for t in tokens:
            await g.call("vcpu-attach", {"token": t})
        yield g


class TestVmHandles:
    async def test_another_process_cannot_use_a_vm_handle(self, hypervisor):
        """A VM handle names nothing in another process: every KVM ioctl there is EBADF."""
        async with hypervisor.client() as vmm, hypervisor.client() as other:
            vm, _ = await build_vm(vmm)
            for op, args in [("kvm-enable-cap", {"vm": vm, "cap": "arm-mte"}), ("kvm-create-vcpu", {"vm": vm}),
                             ("kvm-copy-tags", {"vm": vm, "guest_ipa": IPA, "length": 4096, "flags": 1}),
                             ("kvm-get-dirty-log", {"vm": vm, "slot": 0}), ("kvm-destroy-vm", {"vm": vm})]:
                await expect_errno(other, EBADF, op, args)
            assert (await vmm.call("kvm-copy-tags", {"vm": vm, "guest_ipa": IPA, "length": 4096,
                                                     "flags": 1})).value["length"] == 4096

    async def test_guest_ram_is_not_reachable_from_another_process(self, hypervisor):
        """Guest RAM named "ram" in the VMM's session is a different object in another session: no data leaks."""
        async with hypervisor.client(session="vm-a") as vmm, hypervisor.client(session="vm-b") as other:
            vm = (await vmm.call("kvm-create-vm", {})).value
            await vmm.call("mmap", {"addr": 0x1000_0000, "size": SIZE, "prot": RW, "share": "shared",
                                    "backing": "memfd", "object": "ram"})
            await vmm.call("kvm-set-memory-region", {"vm": vm, "slot": 0, "ipa": IPA, "size": SIZE,
                                                     "addr": 0x1000_0000})
            token = (await vmm.call("kvm-create-vcpu", {"vm": vm})).value["token"]
            async with guest(hypervisor, token) as g:
                await g.call("vcpu-access", {"vcpu": 0, "kind": "store", "segs": [[IPA, 4, "normal"]],
                                             "data": b"\x01\x02\x03\x04"})
            with pytest.raises(wire.RemoteError) as info:
                await other.call("load", {"addr": 0x1000_0000, "size": 4})
            assert info.value.name == "EFAULT"  # nothing mapped there in the other process
            await other.call("mmap", {"addr": 0x1000_0000, "size": SIZE, "prot": RW, "share": "shared",
                                      "backing": "memfd", "object": "ram"})
            assert (await other.call("load", {"addr": 0x1000_0000, "size": 4})).value == bytes(4)
            assert (await vmm.call("load", {"addr": 0x1000_0000, "size": 4})).value == b"\x01\x02\x03\x04"


class TestVcpuTokens:
    async def test_guest_runs_only_the_vcpus_it_attached(self, hypervisor):
        """A guest connection that attached vCPU 0 gets EPERM on vCPU 1, which another guest may attach."""
        async with hypervisor.client() as vmm:
            _, tokens = await build_vm(vmm, vcpus=2)
            async with guest(hypervisor, tokens[0]) as g0, guest(hypervisor, tokens[1]) as g1:
                await g0.call("vcpu-access", stg(0))
                await expect_errno(g0, EPERM, "vcpu-access", stg(1))
                await g1.call("vcpu-access", stg(1))

    async def test_a_vcpu_runs_on_one_connection(self, hypervisor):
        """A second guest connection presenting an attached vCPU's token gets EBUSY."""
        async with hypervisor.client() as vmm:
            _, tokens = await build_vm(vmm)
            async with guest(hypervisor, tokens[0]), hypervisor.client("vcpu") as thief:
                await expect_errno(thief, EBUSY, "vcpu-attach", {"token": tokens[0]})

    async def test_a_guessed_token_is_refused(self, hypervisor):
        """An unknown token attaches nothing (ESRCH), and without a vCPU nothing runs (EPERM)."""
        async with hypervisor.client("vcpu") as g:
            await expect_errno(g, ESRCH, "vcpu-attach", {"token": "0" * 32})
            await expect_errno(g, EPERM, "vcpu-access", stg(0))

    async def test_roles_are_kept_apart(self, hypervisor):
        """A guest cannot make syscalls or KVM ioctls, and a process cannot run vCPU accesses."""
        async with hypervisor.client() as vmm:
            vm, tokens = await build_vm(vmm)
            async with guest(hypervisor, tokens[0]) as g:
                await expect_errno(g, EPERM, "mmap", {"size": 4096})
                await expect_errno(g, EPERM, "kvm-create-vcpu", {"vm": vm})
                await expect_errno(vmm, EPERM, "vcpu-access", stg(0))
                await expect_errno(vmm, EPERM, "vcpu-attach", {"token": tokens[0]})


class TestVmmDeath:
    async def test_vm_torn_down_when_its_vmm_disconnects(self, hypervisor):
        """When the VMM's connection closes its VMs are destroyed: the guest gets ESRCH and the frames are freed."""
        before = await hypervisor.stats()
        async with guest_after_vmm_exit(hypervisor) as g:
            after = await hypervisor.wait_stats(lambda s: s["vms"] == before["vms"] and s["tasks"] == before["tasks"])
            await expect_errno(g, ESRCH, "vcpu-access", stg(0))
        assert after["frames_allocated"] == before["frames_allocated"]
        await hypervisor.assert_healthy()


@asynccontextmanager
async def guest_after_vmm_exit(hypervisor):
    """A guest attached to a VM whose VMM then disconnected (after the guest touched a page)."""
    async with hypervisor.client("vcpu") as g:
        async with hypervisor.client() as vmm:
            _, tokens = await build_vm(vmm)
            await g.call("vcpu-attach", {"token": tokens[0]})
            await g.call("vcpu-access", stg(0))
        yield g
