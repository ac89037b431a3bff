"""Linux errno names and numbers (asm-generic/errno-base.h and errno.h, arm64), and :class:`ErrnoError`.

The model speaks Linux errno values on the wire whatever the host running it, so
the table is written out here instead of borrowed from Python's ``errno`` module
(whose numbers follow the platform running Python). Every exception that
carries an errno (a kernel path's ``-errno``, a far side's error reply, a bad
argument) subclasses :class:`ErrnoError`, so a server turns any of them into an
error reply the same way.
"""

from __future__ import annotations

EPERM = 1
ENOENT = 2
ESRCH = 3
EINTR = 4
EIO = 5
ENXIO = 6
E2BIG = 7
ENOEXEC = 8
EBADF = 9
ECHILD = 10
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
ENOTBLK = 15
EBUSY = 16
EEXIST = 17
EXDEV = 18
ENODEV = 19
ENOTDIR = 20
EISDIR = 21
EINVAL = 22
ENFILE = 23
EMFILE = 24
ENOTTY = 25
ETXTBSY = 26
EFBIG = 27
ENOSPC = 28
ESPIPE = 29
EROFS = 30
EMLINK = 31
EPIPE = 32
EDOM = 33
ERANGE = 34
EDEADLK = 35
ENAMETOOLONG = 36
ENOLCK = 37
ENOSYS = 38
ENOTEMPTY = 39
ELOOP = 40
ENOMSG = 42
EIDRM = 43
ENODATA = 61
ETIME = 62
EPROTO = 71
EBADMSG = 74
EOVERFLOW = 75
EILSEQ = 84
EUSERS = 87
ENOTSOCK = 88
EMSGSIZE = 90
EPROTONOSUPPORT = 93
EOPNOTSUPP = 95
EADDRINUSE = 98
EADDRNOTAVAIL = 99
ENETDOWN = 100
ECONNRESET = 104
ENOBUFS = 105
ETIMEDOUT = 110
ECONNREFUSED = 111
EALREADY = 114
EINPROGRESS = 115
ESTALE = 116
ECANCELED = 125
EOWNERDEAD = 130
EHWPOISON = 133

ERRNO_BY_NAME: dict[str, int] = {
    'EPERM': EPERM,
    'ENOENT': ENOENT,
    'ESRCH': ESRCH,
    'EINTR': EINTR,
    'EIO': EIO,
    'ENXIO': ENXIO,
    'E2BIG': E2BIG,
    'ENOEXEC': ENOEXEC,
    'EBADF': EBADF,
    'ECHILD': ECHILD,
    'EAGAIN': EAGAIN,
    'ENOMEM': ENOMEM,
    'EACCES': EACCES,
    'EFAULT': EFAULT,
    'ENOTBLK': ENOTBLK,
    'EBUSY': EBUSY,
    'EEXIST': EEXIST,
    'EXDEV': EXDEV,
    'ENODEV': ENODEV,
    'ENOTDIR': ENOTDIR,
    'EISDIR': EISDIR,
    'EINVAL': EINVAL,
    'ENFILE': ENFILE,
    'EMFILE': EMFILE,
    'ENOTTY': ENOTTY,
    'ETXTBSY': ETXTBSY,
    'EFBIG': EFBIG,
    'ENOSPC': ENOSPC,
    'ESPIPE': ESPIPE,
    'EROFS': EROFS,
    'EMLINK': EMLINK,
    'EPIPE': EPIPE,
    'EDOM': EDOM,
    'ERANGE': ERANGE,
    'EDEADLK': EDEADLK,
    'ENAMETOOLONG': ENAMETOOLONG,
    'ENOLCK': ENOLCK,
    'ENOSYS': ENOSYS,
    'ENOTEMPTY': ENOTEMPTY,
    'ELOOP': ELOOP,
    'ENOMSG': ENOMSG,
    'EIDRM': EIDRM,
    'ENODATA': ENODATA,
    'ETIME': ETIME,
    'EPROTO': EPROTO,
    'EBADMSG': EBADMSG,
    'EOVERFLOW': EOVERFLOW,
    'EILSEQ': EILSEQ,
    'EUSERS': EUSERS,
    'ENOTSOCK': ENOTSOCK,
    'EMSGSIZE': EMSGSIZE,
    'EPROTONOSUPPORT': EPROTONOSUPPORT,
    'EOPNOTSUPP': EOPNOTSUPP,
    'EADDRINUSE': EADDRINUSE,
    'EADDRNOTAVAIL': EADDRNOTAVAIL,
    'ENETDOWN': ENETDOWN,
    'ECONNRESET': ECONNRESET,
    'ENOBUFS': ENOBUFS,
    'ETIMEDOUT': ETIMEDOUT,
    'ECONNREFUSED': ECONNREFUSED,
    'EALREADY': EALREADY,
    'EINPROGRESS': EINPROGRESS,
    'ESTALE': ESTALE,
    'ECANCELED': ECANCELED,
    'EOWNERDEAD': EOWNERDEAD,
    'EHWPOISON': EHWPOISON,
}

NAME_BY_ERRNO: dict[int, str] = {v: k for k, v in ERRNO_BY_NAME.items()}


def errno_name(number: int) -> str:
    """Return the symbolic name of a Linux errno number (``"E?123"`` if unknown)."""
    return NAME_BY_ERRNO.get(number, f"E?{number}")


def errno_number(name: str) -> int:
    """Return the Linux number for ``name``.

    Raises:
        KeyError: ``name`` is not a Linux errno name.
    """
    return ERRNO_BY_NAME[name]


class ErrnoError(Exception):
    """Something failed with a Linux errno: the base of every errno-carrying exception.

    ``str()`` is ``"EINVAL: message"`` (just the name when there is no message).

    Args:
        errno: the Linux errno number, or its name (``"EINVAL"``).
        message: what happened, in the words of the code that failed.

    Attributes:
        errno: the Linux errno number.
        message: the message.
    """

    def __init__(self, errno: int | str, message: str = ""):
        self.errno: int = ERRNO_BY_NAME[errno] if isinstance(errno, str) else errno
        self.message = message
        super().__init__(f"{errno_name(self.errno)}: {message}" if message else errno_name(self.errno))

    @property
    def name(self) -> str:
        """The symbolic errno name (``"EINVAL"``)."""
        return errno_name(self.errno)


class KernelError(ErrnoError):
    """A modelled kernel path returned ``-errno``.

    Raised by model code where Linux returns a negative errno; the server turns
    it into an error reply. Architectural events (tag check faults) are data,
    not KernelErrors.
    """


class ScheduleDivergence(Exception):
    """A replayed schedule does not apply to this run (its target actor was not runnable).

    Not an errno error: a failure of the controlled scheduler, which the hypervisor records
    and replies EDEADLK for.
    """


class Deadlock(Exception):
    """Every live context is blocked on a model lock: nobody can make progress (replied EDEADLK)."""
