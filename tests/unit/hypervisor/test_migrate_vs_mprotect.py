"""mprotect(PROT_MTE) while a page is under migration: the restored PTE takes the VMA's attributes now.

remove_migration_pte() builds the new PTE with ``mk_pte(new, READ_ONCE(vma->vm_page_prot))``, so
a page migrated while its VMA became PROT_MTE comes back Normal-Tagged (and synced). The model
once restored the attributes the PTE had at the unmap: the page came back untagged in a VM_MTE
VMA and the owner's next STG was silently dropped (RAZ/WI through an untagged PTE), with no
oracle noticing.
"""

from __future__ import annotations

from support import Proc, explore_bounded, invariants, run_once, run_until_then

from hypervisor.syscalls import host_migrate_pages

PAGE = 4096
RW = ["read", "write"]
RWM = ["read", "write", "mte"]


def migrate_vs_mprotect():
    async def setup(k):
        p = Proc.new(k, "P")
        addr = await p("mmap", size=PAGE, prot=RW)
        await p("store", addr=addr, data=b"payload")

        async def migrate(k, st):
            await host_migrate_pages(k, p.pid, addr, PAGE)

        async def owner(k, st):
            await p("mprotect", addr=addr, size=PAGE, prot=RWM)
            await p("stg", addr=addr, tag=5, size=16)

        return {"p": p, "addr": addr}, {"m": migrate, "o": owner}

    return setup


class TestMigrateVsMprotect:
    """A page restored after migration is mapped as its VMA says at the restore."""

    async def test_mprotect_while_unmapped_restores_a_tagged_pte(self):
        """mprotect(PROT_MTE) between the unmap and remove_migration_ptes: the PTE comes back tagged, the STG sticks."""
        run, _ = await run_once(migrate_vs_mprotect(), policy=run_until_then("m", "remove_migration_ptes", "o"))
        st = run.state
        pte = st["p"].pte(st["addr"])
        assert pte.tagged and pte.present
        assert await st["p"].tags(st["addr"], 16) == [5]
        assert invariants(run.k) == []

    async def test_every_interleaving_keeps_the_tag(self):
        """Under every interleaving with up to two preemptions the STG's tag is what LDG reads."""
        runs = await explore_bounded(migrate_vs_mprotect(), preemptions=2)
        assert len(runs) > 3
        for run in runs:
            assert run.failure is None
            st = run.state
            assert st["p"].pte(st["addr"]).tagged
            assert await st["p"].tags(st["addr"], 16) == [5]
            assert invariants(run.k) == []


async def test_a_pte_lagging_its_vma_is_reported():
    """PTE-ATTRS-MATCH-VMA: at rest, a present PTE mapped untagged in a VM_MTE VMA is a violation."""
    from hypervisor.kernel import Kernel

    k = Kernel()
    p = Proc.new(k, "P")
    addr = await p("mmap", size=PAGE, prot=RWM)
    await p("store", addr=addr, data=b"x")
    assert invariants(k) == []
    p.pte(addr).tagged = False  # what the restore used to leave behind
    assert "PTE-ATTRS-MATCH-VMA" in invariants(k)
