"""The hypervisor package's root exception: a kernel path failed with an errno."""

from __future__ import annotations

from shared.errno import ERRNO_BY_NAME, errno_name


class KernelError(Exception):
    """A modelled kernel path returned ``-errno``.

    Raised by model code where Linux returns a negative errno; the server turns
    it into an error reply. Architectural events (tag check faults) are data,
    not KernelErrors.

    Attributes:
        errno: the Linux errno number.
        message: what happened, in the words of the path that failed.
    """

    def __init__(self, name_or_number: str | int, message: str = ""):
        self.errno = ERRNO_BY_NAME[name_or_number] if isinstance(name_or_number, str) else name_or_number
        self.message = message
        super().__init__(f"{errno_name(self.errno)}: {message}")

    @property
    def name(self) -> str:
        """The symbolic errno name."""
        return errno_name(self.errno)


class ScheduleDivergence(Exception):
    """A replayed schedule does not apply to this run (its target actor was not runnable)."""


class Deadlock(Exception):
    """Every live context is blocked on a model lock: nobody can make progress."""
