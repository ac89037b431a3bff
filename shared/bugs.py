"""The bug zoo: historical races that can be switched back on by name.

Each name reintroduces one race that Linux fixed; scenarios name them in
``bugs = [...]`` and the CLI in ``--bug NAME``. The fixed model is the default.
See DESIGN.md, "The bug zoo".
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Bug:
    """One switchable historical race."""

    name: str
    reintroduces: str
    fixed_by: str
    issue: int  # the issue that modelled it (2: host kernel, 3: KVM, 9: the VMM's live migration, 11: tag storage)


BUGS: dict[str, Bug] = {
    b.name: b
    for b in (
        Bug(
            "flag-before-init",
            "PG_mte_tagged set before the tags are cleared: CoW, ptrace or "
            "COPY_TAGS read stale tags",
            "e059853d14ca (v6.2)",
            2,
        ),
        Bug(
            "no-tag-lock",
            "tag init without PG_mte_lock: two initialisers of a MAP_SHARED page "
            "zero tags already written",
            "d77e59a8fccd (v6.2)",
            2,
        ),
        Bug(
            "mte-allowed-outside-lock",
            "user_mem_abort reads VM_MTE_ALLOWED after dropping mmap_lock",
            "8c2e8ac8ad4b (v6.3)",
            3,
        ),
        Bug(
            "copy-tags-during-dirty-log",
            "KVM_ARM_MTE_COPY_TAGS TO_GUEST allowed while dirty logging",
            "EBUSY check (v6.13)",
            3,
        ),
        Bug(
            "kvm-tags-zero-page",
            "sanitise_mte_tags() initialises the shared zero page when a stage-2 "
            "read fault maps it: ZERO_PAGE gets PG_mte_tagged",
            "2986a6257400 (2026)",
            3,
        ),
        Bug(
            "migration-zero-page-drops-tags",
            "the migration source sends a page whose data is all zero as a zero-page marker "
            "without its tags (QEMU's zero-page shortcut), so an MTE guest loses the tags of zeroed memory",
            "VMM rule: an MTE VM's zero pages carry their tags (only a page whose data and tags are both "
            "zero may be skipped)",
            9,
        ),
        Bug(
            "migration-tags-before-final-sync",
            "the stop-and-copy reads the tags of the pages it will send before pausing the vCPUs and "
            "syncing the dirty log a last time, so a tag store in between is lost",
            "VMM rule: pause, then sync the dirty log, then read data and tags together",
            9,
        ),
        Bug(
            "migration-resume-before-tags",
            "the migration destination resumes the vCPUs (and acks) before it writes the tags, so the "
            "guest sees zero tags for a moment",
            "VMM rule: every page's data and tags are in before the destination resumes",
            9,
        ),
        Bug(
            "restore-into-unreserved-storage",
            "swap-in restores tags into a page without tag storage, so they are written into a block "
            "that may hold someone's data (RFC v3 without patch 28)",
            "RFC v3 patch 28: mte_try_transfer_swap_tags() parks them by pfn (seed 002)",
            11,
        ),
        Bug(
            "tag-storage-publish-before-restore",
            "reserve_tag_storage() sets PG_tag_storage_reserved, then writes the parked tags (v2's order)",
            "RFC v3: the parked tags are restored before PG_tag_storage_reserved is set",
            11,
        ),
        Bug(
            "tag-park-gfp-kernel",
            "copy_highpage() parks tags with xa_reserve(GFP_KERNEL) and a GFP_KERNEL buffer, as v3 was "
            "posted, although fork's copy_present_page() runs it under the page-table locks",
            "GFP_ATOMIC buffers and xarray stores (Alexandru Elisei's first option, seed 002)",
            11,
        ),
        Bug(
            "free-keyed-on-tagged",
            "arch_free_pages_prepare() frees tag storage only for PG_mte_tagged pages, so a page "
            "reserved but never tagged leaks its block references",
            "RFC v3 patch 32: free keyed on PG_tag_storage_reserved",
            11,
        ),
    )
}

#: The bug-zoo entries the VMM applies (its live migration); the hypervisor ignores them.
VMM_BUGS = frozenset(n for n, b in BUGS.items() if b.issue == 9)


def check_bug_names(names) -> tuple[str, ...]:
    """Return ``names`` as a tuple, or raise ValueError naming the unknown one."""
    out = []
    for n in names:
        if n not in BUGS:
            raise ValueError(f"unknown bug {n!r}; known: {', '.join(sorted(BUGS))}")
        out.append(n)
    return tuple(out)


@attrs.frozen
class KernelFix:
    """A proposed kernel fix a host can apply (``kernel-fixes`` in a scenario's host table)."""

    name: str
    fixes: str


KERNEL_FIXES: dict[str, KernelFix] = {
    f.name: f
    for f in (
        KernelFix(
            "sanitise-whole-hugetlb-folio",
            "sanitise_mte_tags() and COPY_TAGS TO_GUEST clear every page of a hugetlb folio "
            "when they win its tag lock, not only the pages they were asked for "
            "(docs/findings.md, finding 3)",
        ),
        KernelFix(
            "tag-park-prepare",
            "seed 002's second option for dynamic tag storage: a copy into a page without tag storage "
            "that must run under spinlocks (fork's copy_present_page) prepares its tag buffer "
            "beforehand with GFP_KERNEL, outside the locks; when that fails the fork fails with ENOMEM "
            "instead of losing the tags (docs/findings.md)",
        ),
    )
}


def check_kernel_fix_names(names) -> tuple[str, ...]:
    """Return ``names`` as a tuple, or raise ValueError naming the unknown one."""
    out = []
    for n in names:
        if n not in KERNEL_FIXES:
            raise ValueError(f"unknown kernel fix {n!r}; known: {', '.join(sorted(KERNEL_FIXES))}")
        out.append(n)
    return tuple(out)
