"""The vmm package's errno-carrying error, in a module of its own so that the machine
(vmm/machine.py) and the DMA device (vmm/dma.py) both import it without importing each other."""

from __future__ import annotations

from shared.errno import ErrnoError


class VmmError(ErrnoError):
    """A VMM request failed with a Linux errno (the root of the vmm package's errors).

    Args:
        errno: the errno number, or its name (``"ESRCH"``).
        message: what went wrong.
    """
