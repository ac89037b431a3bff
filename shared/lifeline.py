"""Nothing outlives its run: a child process ends when its parent goes away, whatever killed the parent.

The parent opens one pipe for its whole life (:func:`child_fd`), keeps the
write end and never writes to it; every child it starts inherits the read end
(``pass_fds``) and is told its number with ``--lifeline-fd N``. The kernel
closes the write end when the parent dies, by any signal including SIGKILL,
and the child's read returns end-of-file: the parent's death is delivered
without any cooperation from the parent. :func:`watch` (in the child) then
asks the program to stop cleanly (destroy its VM, close its connections,
remove its folder), and exits hard after a grace period if that has not
happened, so a wedged event loop cannot keep the process alive.

Each level has its own pipe: the harness's children (the embedded
hypervisor, the VMMs) watch the harness's, the guests watch their VMM's, so a
chain of deaths walks down the tree.

Why not ``prctl(PR_SET_PDEATHSIG)``: it fires when the *thread* that forked
the child exits, not the process, and ``trio.lowlevel.open_process`` forks
from a worker thread that idles out seconds later (the child would be killed
mid-run); it kills without letting the child clean up (a temp folder stays
behind); and it is Linux-only. The pipe has none of these problems, works
across ``exec`` and needs no polling.
"""

from __future__ import annotations

import argparse
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable

#: Seconds a child whose parent died may take to stop cleanly before it exits hard.
GRACE = 3.0
#: The exit status of a process that exited hard because its parent went away.
PARENT_GONE_STATUS = 1

_pipe: tuple[int, int] | None = None
_pipe_pid: int | None = None
_lock = threading.Lock()


def child_fd() -> int:
    """The read end to hand to a child (``pass_fds=(fd,)``, ``--lifeline-fd fd``).

    One pipe per process, made on first use; the write end stays open (and
    unwritten) until this process dies. Both ends are close-on-exec here:
    only children it is passed to explicitly inherit the read end.
    """
    global _pipe, _pipe_pid
    with _lock:
        if _pipe is None or _pipe_pid != os.getpid():  # a forked copy makes its own
            _pipe = os.pipe()
            _pipe_pid = os.getpid()
        return _pipe[0]


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--lifeline-fd N`` to a program's command line."""
    parser.add_argument("--lifeline-fd", type=int, default=None, metavar="N",
                        help="exit when this inherited pipe reaches end-of-file (the parent has gone)")


def check_fd(fd: int) -> None:
    """Raise ``ValueError`` unless ``fd`` is an open pipe (a lifeline) in this process."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ValueError(f"--lifeline-fd {fd}: not an open descriptor ({exc.strerror})") from None
    if not stat.S_ISFIFO(mode):
        raise ValueError(f"--lifeline-fd {fd}: not a pipe")


def watch(fd: int, on_gone: Callable[[], object], *, grace: float = GRACE,
          cleanup: Iterable[Callable[[], object]] = (), status: int = PARENT_GONE_STATUS) -> threading.Thread:
    """Watch the lifeline ``fd`` from a daemon thread; act when the parent dies.

    On end-of-file: call ``on_gone()`` (from the watcher thread: it must be
    thread-safe, e.g. ``TrioToken.run_sync_soon``), wait ``grace`` seconds for
    the program to finish by itself, then run ``cleanup`` and ``os._exit(status)``.
    A program that ends first simply takes the daemon thread with it.

    Args:
        fd: the inherited read end (made close-on-exec here, so our own children do not hold it).
        on_gone: asks the program to stop cleanly; exceptions are ignored.
        grace: seconds to wait for that before exiting hard.
        cleanup: run (exceptions ignored) just before the hard exit, e.g. removing a folder.
        status: the hard exit's status.

    Returns:
        The started watcher thread.
    """
    os.set_inheritable(fd, False)

    def run() -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except InterruptedError:
                continue
            except OSError:
                break
            if not data:
                break  # nobody holds the write end: the parent is gone
        try:
            on_gone()
        except Exception:  # noqa: BLE001 - the program may be finishing already
            pass
        time.sleep(grace)
        for fn in cleanup:
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort before a hard exit
                pass
        os._exit(status)

    thread = threading.Thread(target=run, name="lifeline", daemon=True)
    thread.start()
    return thread
