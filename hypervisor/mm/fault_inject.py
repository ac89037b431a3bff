"""Fault injection at the tag storage allocation sites (``inject-fault``; lib/fault-inject.c in spirit).

``site`` names an allocation the host may fail (see
:data:`hypervisor.arm64.mte_tag_storage.FAULT_SITES`): ``reserve-tag-storage`` (a block claim),
``tag-buf`` (the GFP_KERNEL tag buffers of swap-in parking and swap-out tag saving) and
``tag-buf-atomic`` (copy_highpage's GFP_ATOMIC parking). ``times`` calls of the site fail next:
-1 every call until set again, 0 stops. A site the host never reaches injects nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.mte_tag_storage import FAULT_SITES
from shared.errno import KernelError

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel


def should_fail(k: Kernel, site: str) -> bool:
    """should_fail(): whether this call of ``site`` fails, counting it down."""
    return k.tag_storage.should_fail(site)


async def host_inject_fault(k: Kernel, a: dict) -> None:
    """``inject-fault``: make the next ``times`` calls of ``site`` fail.

    Raises:
        KernelError: EINVAL for an unknown site or a ``times`` below -1.
    """
    site, times = a["site"], a["times"]
    if site not in FAULT_SITES:
        raise KernelError("EINVAL", f"inject-fault: unknown site {site!r} (sites: {', '.join(FAULT_SITES)})")
    if times < -1:
        raise KernelError("EINVAL", f"inject-fault: times must be -1 or more (got {times})")
    k.tag_storage.inject[site] = times
