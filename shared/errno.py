"""Linux errno names and numbers (asm-generic/errno-base.h and errno.h, arm64).

The model speaks Linux errno values on the wire whatever the host running it, so
the table is written out here instead of borrowed from Python's ``errno`` module
(whose numbers follow the platform running Python).
"""

from __future__ import annotations

ERRNO_BY_NAME: dict[str, int] = {
    "EPERM": 1, "ENOENT": 2, "ESRCH": 3, "EINTR": 4, "EIO": 5, "ENXIO": 6,
    "E2BIG": 7, "ENOEXEC": 8, "EBADF": 9, "ECHILD": 10, "EAGAIN": 11,
    "ENOMEM": 12, "EACCES": 13, "EFAULT": 14, "ENOTBLK": 15, "EBUSY": 16,
    "EEXIST": 17, "EXDEV": 18, "ENODEV": 19, "ENOTDIR": 20, "EISDIR": 21,
    "EINVAL": 22, "ENFILE": 23, "EMFILE": 24, "ENOTTY": 25, "ETXTBSY": 26,
    "EFBIG": 27, "ENOSPC": 28, "ESPIPE": 29, "EROFS": 30, "EMLINK": 31,
    "EPIPE": 32, "EDOM": 33, "ERANGE": 34, "EDEADLK": 35, "ENAMETOOLONG": 36,
    "ENOLCK": 37, "ENOSYS": 38, "ENOTEMPTY": 39, "ELOOP": 40, "ENOMSG": 42,
    "EIDRM": 43, "ENODATA": 61, "ETIME": 62, "EPROTO": 71, "EBADMSG": 74,
    "EOVERFLOW": 75, "EILSEQ": 84, "EUSERS": 87, "ENOTSOCK": 88,
    "EMSGSIZE": 90, "EPROTONOSUPPORT": 93, "EOPNOTSUPP": 95,
    "EADDRINUSE": 98, "EADDRNOTAVAIL": 99, "ENETDOWN": 100,
    "ECONNRESET": 104, "ENOBUFS": 105, "ETIMEDOUT": 110, "ECONNREFUSED": 111,
    "EALREADY": 114, "EINPROGRESS": 115, "ECANCELED": 125, "EOWNERDEAD": 130,
    "EHWPOISON": 133,
}

NAME_BY_ERRNO: dict[int, str] = {v: k for k, v in ERRNO_BY_NAME.items()}

globals().update(ERRNO_BY_NAME)  # shared.errno.EINVAL == 22, as in <errno.h>


def errno_name(number: int) -> str:
    """Return the symbolic name of a Linux errno number (``"E?123"`` if unknown)."""
    return NAME_BY_ERRNO.get(number, f"E?{number}")


def errno_number(name: str) -> int:
    """Return the Linux number for ``name``.

    Raises:
        KeyError: ``name`` is not a Linux errno name.
    """
    return ERRNO_BY_NAME[name]
