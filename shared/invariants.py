"""Canonical names of every invariant the oracles check.

A scenario's ``expect-violations`` and every report use these names. The names
of the kernel reference's invariants are their titles in capitals, spaces as
hyphens and "=>" as "-IMPLIES-"; the rest are the project's own end-to-end and
KVM checks. :data:`ALIASES` maps the older spellings reports used before the
names were settled, so old schedules and JSON stay readable.
"""

from __future__ import annotations

#: Invariants of the kernel reference, section 6 (numbered as there).
REFERENCE: tuple[str, ...] = (
    "INIT-ONCE",
    "NO-PUBLISH-BEFORE-VALID",
    "EXCLUSIVE-INIT",
    "LOCK-LIVENESS",
    "USER-VISIBLE-IMPLIES-TAGGED",
    "GUEST-VISIBLE-IMPLIES-TAGGED",
    "MTE-VM-MEMORY-IS-TAG-CAPABLE",
    "VM_MTE-IMPLIES-VM_MTE_ALLOWED",
    "PRESERVE-ON-MAP",
    "PRESERVE-ON-COPY",
    "SWAP-ROUND-TRIP",
    "SWAP-OUT-FAILS-CLOSED",
    "HIBERNATION-ROUND-TRIP",
    "NO-KSM-MERGE-OF-TAGGED-PAGES",
    "COPY_TAGS-WRITE-IMPLIES-TAGGED",
    "COPY_TAGS-READ-OF-UNTAGGED-=-ZEROS",
    "CAP-BEFORE-VCPUS",
    "TAGS-NOT-EXPOSED-THROUGH-PTRACE-UNLESS-VM_MTE",
    "HUGETLB-FLAGS-ON-HEAD-ONLY",
    "ZERO-PAGE-NEVER-FLAGGED",
)

#: The project's own checks.
PROJECT: tuple[str, ...] = (
    "TAGS-AS-WRITTEN",  # the end-to-end ghost: what each actor last wrote, keyed by what it sees
    "LAST-TAG-WRITTEN",  # the per-frame shadow
    "DIRTY-LOG-COMPLETE",
    "VMA-USE-AFTER-FREE",
    "STAGE-2-COHERENT",
    "PTE-ATTRS-MATCH-VMA",  # at rest, a present PTE is Normal-Tagged exactly where its VMA has VM_MTE
)

#: The physical-memory part's invariants (the contract's table: static carve-out, RFC v3 dynamic
#: tag storage, memory types).
PHYSMEM: tuple[str, ...] = (
    "TAG-CARVE-OUT-HIDDEN",
    "TAGGED-IMPLIES-STORAGE",
    "TAG-STORAGE-NEVER-TAGGED",
    "TAG-BLOCK-REFCOUNT",
    "NO-SLEEP-IN-ATOMIC",
    "PARKED-RESTORE-BEFORE-PUBLISH",
    "PARKED-TAGS-CONSUMED-ONCE",
    "TAG-STORAGE-NOT-CLOBBERED",
    "ZERO-PAGE-HAS-STORAGE",
    "FAULT-FORWARD-PROGRESS",
    "VM-MTE-KVM-FLAG",
    "TAGGED-PTE-IS-TAG-CAPABLE",
    "STAGE2-MEMTYPE",
)

#: Every name a scenario may list in ``expect-violations``.
ALL: frozenset[str] = frozenset(REFERENCE + PROJECT + PHYSMEM)

#: Older spellings -> canonical names.
ALIASES: dict[str, str] = {
    "GUEST-VISIBLE=>TAGGED": "GUEST-VISIBLE-IMPLIES-TAGGED",
    "USER-VISIBLE=>TAGGED": "USER-VISIBLE-IMPLIES-TAGGED",
    "VM_MTE=>VM_MTE_ALLOWED": "VM_MTE-IMPLIES-VM_MTE_ALLOWED",
    "COPY_TAGS-WRITE=>TAGGED": "COPY_TAGS-WRITE-IMPLIES-TAGGED",
    "COPY_TAGS-READ-IS-PURE": "COPY_TAGS-READ-OF-UNTAGGED-=-ZEROS",
    "NO-KSM-MERGE-OF-TAGGED": "NO-KSM-MERGE-OF-TAGGED-PAGES",
}


def canonical(name: str) -> str:
    """The canonical spelling of an invariant name (unknown names are returned unchanged)."""
    return ALIASES.get(name, name)


def is_known(name: str) -> bool:
    """Whether the model checks an invariant of this name."""
    return canonical(name) in ALL
