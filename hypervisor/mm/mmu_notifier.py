"""MMU notifiers (mm/mmu_notifier.c): secondary MMUs hear when host PTEs change.

KVM registers one per VM on the VMM's mm so that stage 2 never maps a frame the
host has taken away: munmap, MADV_DONTNEED, exit, swap-out, migration and
copy-on-write all call :func:`mmu_notifier_invalidate_range` for the range whose
PTEs they remove or replace, and mprotect does so for the VMAs it changes. The
model calls subscribers synchronously at the point where the host PTE changes
(Linux brackets it with range_start/range_end; nothing can fault in between in
the model because no scheduling point separates the call from the change).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from hypervisor.mm_types import MM

#: enum mmu_notifier_event, the ones the model raises
EVENTS = ("unmap", "clear", "protection_vma", "protection_page", "migrate", "swap", "release")


@attrs.frozen
class MmuNotifierRange:
    """struct mmu_notifier_range: [start, end) of ``mm`` and why."""

    start: int
    end: int
    event: str


Subscriber = Callable[[MmuNotifierRange], None]


def mmu_notifier_register(mm: MM, subscriber: Subscriber) -> None:
    """mmu_notifier_register(): ``subscriber`` hears every later invalidation of ``mm``."""
    mm.notifiers.append(subscriber)


def mmu_notifier_unregister(mm: MM, subscriber: Subscriber) -> None:
    """mmu_notifier_unregister()."""
    if subscriber in mm.notifiers:
        mm.notifiers.remove(subscriber)


def mmu_notifier_invalidate_range(mm: MM, start: int, end: int, event: str) -> None:
    """mmu_notifier_invalidate_range_start()/_end(): tell every subscriber of ``mm``."""
    if mm.notifiers:
        r = MmuNotifierRange(start, end, event)
        for sub in list(mm.notifiers):
            sub(r)
