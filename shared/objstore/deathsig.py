"""Tie a child process's life to its parent's (Linux ``PR_SET_PDEATHSIG``).

The durable broker's object server runs in its own session, so that a signal to the whole
process group of `vidsearch up` (Ctrl-C, ``timeout``, ``kill -- -PGID``) does not stop it
before Tansu: the stack stops it last. What keeps it, and Tansu, from outliving a SIGKILLed
`vidsearch up` is this signal. ``python -m vidsearch.objstore.deathsig PARENT_PID -- COMMAND...``
sets it and then execs COMMAND (same pid; the setting survives exec), which is how Tansu, a
binary that can't set it itself, gets it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> bool:
    """Ask for ``signum`` when the parent dies; False where the OS can't (not Linux). If the
    parent is already gone, the signal is sent now."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signum) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), signum)
    return True


def wrap(command: list[str]) -> list[str]:
    """``command`` run through this module when called from the main thread: the kernel's
    parent-death signal follows the thread that forked, and only the main thread lives as
    long as the process."""
    if threading.current_thread() is not threading.main_thread():
        return command
    return [sys.executable, "-m", "vidsearch.objstore.deathsig", str(os.getpid()), "--", *command]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m vidsearch.objstore.deathsig PARENT_PID -- COMMAND...")
    die_with_parent(int(argv[0]))
    try:
        os.execv(argv[2], argv[2:])
    except OSError as exc:
        sys.exit(f"cannot run {argv[2]}: {exc.strerror or exc}")


if __name__ == "__main__":
    main(sys.argv[1:])
