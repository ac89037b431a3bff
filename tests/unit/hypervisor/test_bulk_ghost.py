"""ghost-export's compact form (runs of pages) for a large record, and ghost-import of it."""

from __future__ import annotations

import msgpack
import pytest
from support import RWM, Vm, expect_errno, invariants

from hypervisor import ghost as ghost_mod
from hypervisor.kernel import Kernel

PAGE = 4096
IPA = 0x4000_0000
GFN = IPA >> 12


def _record(k: Kernel, vm: Vm) -> dict:
    """The VM's ghost entries as plain values, by gfn."""
    return {gfn: (e.tags, e.data) for gfn, e in k.oracle.ghost.vm_entries(vm.kvm).items()}


async def _mixed_vm(k: Kernel, name: str = "vmm:vm0", *, backing: str = "anon") -> Vm:
    """An MTE VM of 16 pages: uniform tags with data (0-3), data only (5, 6), mixed tags (8), a hole, tags only (12)."""
    vm = await Vm.create(k, name=name)
    await vm.ram(0, IPA, 16 * PAGE, backing=backing, prot=RWM)
    for i in range(4):
        await vm.store(IPA + i * PAGE, bytes([i + 1]) * 64)
        await vm.stg(IPA + i * PAGE, PAGE, tag=i + 3)
    for i in (5, 6):
        await vm.store(IPA + i * PAGE, bytes([9]) * 10)
    await vm.stg(IPA + 8 * PAGE, PAGE, tag=2)
    await vm.stg(IPA + 8 * PAGE, 32, tag=7)
    await vm.stg(IPA + 12 * PAGE, PAGE, tag=1)
    return vm


@pytest.fixture
def small_keyed_max(monkeypatch):
    """Records of more than two entries export as runs."""
    monkeypatch.setattr(ghost_mod, "KEYED_MAX", 2)


@pytest.mark.usefixtures("small_keyed_max")
class TestCompactForm:
    @pytest.mark.parametrize("backing", ["anon", "memfd"])
    async def test_runs_round_trip_into_another_kernel(self, backing):
        """A record larger than KEYED_MAX exports as a few msgpack-encodable runs, and importing them into
        another kernel's VM gives exactly the source's entries (tags, uniform or not, and data hashes)."""
        src = Kernel()
        svm = await _mixed_vm(src, backing=backing)
        out = (await svm("ghost-export"))["entries"]
        assert list(out) == ["runs"]
        assert [r[:2] for r in out["runs"]] == [[GFN, 4], [GFN + 5, 2], [GFN + 8, 1], [GFN + 12, 1]]
        out = msgpack.unpackb(msgpack.packb(out, use_bin_type=True), raw=False)
        dst = Kernel()
        dvm = await _mixed_vm(dst, backing=backing)
        await dvm.stg(IPA + 14 * PAGE, PAGE, tag=4)  # an entry the source does not have: dropped
        await dvm("ghost-import", entries=out)
        assert _record(dst, dvm) == _record(src, svm)
        assert (await dvm("ghost-export"))["entries"] == out

    async def test_a_run_is_checked_by_the_first_reads(self):
        """After a runs import, a read of tags that differ from the imported record is TAGS-AS-WRITTEN."""
        k = Kernel()
        vm = await _mixed_vm(k)
        out = (await vm("ghost-export"))["entries"]
        first = out["runs"][0]
        first[2] = bytes([5, 4, 5, 6])  # page 0's tags were 3
        await vm("ghost-import", entries=out)
        k.oracle.violations.clear()
        assert await vm.ldg(IPA + PAGE, 16) == [4]
        assert k.oracle.violations == []
        assert await vm.ldg(IPA, 16) == [3]
        assert invariants(k) == ["TAGS-AS-WRITTEN"]
        assert "read tags" in k.oracle.violations[0].message  # seen by the read, before the state check

    @pytest.mark.parametrize("runs", [
        [[GFN, 1 << 40, None, None]],  # more pages than the memslots hold
        [[GFN, 2, b"\x01\x02\x03", None]],  # tags neither a byte nor 256 bytes a page
        [[GFN, 2, None, b"\x00" * 15]],  # hashes not 8 bytes a page
        [[GFN + 15, 2, None, None]],  # runs off the memslot
        [[5, 1, None, None]],  # not RAM of the VM
        [[GFN, 0, None, None]],  # an empty run
        [[GFN, 1, None]],  # three fields
        "runs",  # not a list
    ])
    async def test_a_bad_run_is_einval_and_changes_nothing(self, runs):
        """A malformed run or one reaching outside the memslots is EINVAL and the record stays as it was."""
        k = Kernel()
        vm = await _mixed_vm(k)
        before = _record(k, vm)
        await expect_errno("EINVAL", vm("ghost-import", entries={"runs": runs}))
        await expect_errno("EINVAL", vm("ghost-import", entries={"runs": [], str(GFN): [None, None]}))
        assert _record(k, vm) == before


async def test_a_small_record_keeps_the_keyed_form():
    """A record of at most KEYED_MAX entries exports keyed by str(gfn), as before."""
    k = Kernel()
    vm = await _mixed_vm(k)
    out = (await vm("ghost-export"))["entries"]
    assert sorted(out) == sorted(str(GFN + i) for i in (0, 1, 2, 3, 5, 6, 8, 12))
    assert out[str(GFN + 5)][0] is None and out[str(GFN + 12)][1] is None
