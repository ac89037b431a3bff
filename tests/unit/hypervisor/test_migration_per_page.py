"""The destination's and source's per-page paths of a live migration (ghost-import of runs, bulk zap,
fresh-page stores): the same state as the general paths, the oracles as exact."""

from __future__ import annotations

import msgpack
from support import RWM, Vm, invariants

from hypervisor import ghost as ghost_mod
from hypervisor.kernel import Kernel

PAGE = 4096
IPA = 0x4000_0000


async def _stored_vm(k: Kernel, pages: int = 8, name: str = "vmm:vm0") -> Vm:
    """An MTE VM whose ``pages`` pages each hold data (page i: byte i + 1) and tag 5."""
    vm = await Vm.create(k, name=name)
    await vm.ram(0, IPA, 2 * pages * PAGE, prot=RWM)
    for i in range(pages):
        await vm.store(IPA + i * PAGE, bytes([i + 1]) * PAGE)
        await vm.stg(IPA + i * PAGE, PAGE, tag=5)
    return vm


class TestGhostImportOfRuns:
    async def test_dropped_entries_let_go_of_their_pages(self, monkeypatch):
        """ghost-import of runs over pages the destination stored gives each page a new entry holding the
        source's digest, and the dropped entries no longer point at the pages (a later write takes no
        digest for them); a page changed behind the ghost afterwards is still reported."""
        monkeypatch.setattr(ghost_mod, "KEYED_MAX", 2)
        src, dst = Kernel(), Kernel()
        svm, dvm = await _stored_vm(src), await _stored_vm(dst)
        old = dict(dst.oracle.ghost.vm_entries(dvm.kvm))
        assert all(e._src is not None for e in old.values())  # the stores' entries point at their pages
        out = msgpack.unpackb(msgpack.packb((await svm("ghost-export"))["entries"], use_bin_type=True), raw=False)
        await dvm("ghost-import", entries=out)
        new = dst.oracle.ghost.vm_entries(dvm.kvm)
        assert {g: (e.tags, e.data) for g, e in new.items()} == \
            {g: (e.tags, e.data) for g, e in src.oracle.ghost.vm_entries(svm.kvm).items()}
        assert all(new[g] is not old[g] and old[g]._src is None for g in old)
        assert invariants(dst) == []
        dvm.page(IPA + 3 * PAGE).write(0, b"lost")  # behind the ghost's back
        assert "TAGS-AS-WRITTEN" in invariants(dst)
