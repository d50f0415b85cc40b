"""Lower the CPU scheduling priority (Linux nice) of a whole process.

Why: on one machine the reranker shares the CPUs with the query ingress. When a
reranker replica dies, Serve starts another, and that start (a Python process that
imports torch and open_clip and loads a model) competed for the CPUs with the
recall-only searches the breaker was answering meanwhile: the slowest of them took
2-3x the usual time (docs/benchmarks/faults.md). A replica at a higher nice value
than the ingress yields the CPUs to the query path whenever both want them, and
costs nothing when the machine is idle or the reranker has its own nodes. (Ray's
raylet starts every worker process at nice 15, ``RAY_worker_niceness``, so the
reranker's value must be above that to rank below the ingress.)

Linux keeps the nice value per thread, and ``os.nice`` changes only the calling one,
so :func:`lower_process_priority` sets every thread of the process; threads started
later inherit the value of the thread that starts them. A process cannot raise its
priority again without CAP_SYS_NICE, so the value only ever goes up here.
"""
from __future__ import annotations

import os

# Set in a worker process's environment (its Ray runtime_env): the nice value the
# stack's worker setup hook applies before the process imports anything heavy.
NICENESS_ENV = "_VIDSEARCH_NICENESS"
MAX_NICENESS = 19


def thread_ids() -> list[int]:
    """The native ids of this process's threads (just this one where /proc is missing)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def lower_process_priority(niceness: int) -> int:
    """Make every thread of this process at least ``niceness`` nice (0-19); never raises
    a thread's priority. Returns the calling thread's nice value afterwards."""
    if not 0 <= niceness <= MAX_NICENESS:
        raise ValueError(f"niceness must be between 0 and {MAX_NICENESS} (got {niceness})")
    for tid in thread_ids():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (OSError, AttributeError):
            continue  # the thread ended meanwhile, or a platform without setpriority
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (OSError, AttributeError):
        return 0


def apply_niceness_from_env() -> int | None:
    """Apply ``$_VIDSEARCH_NICENESS`` if set (a worker setup hook); the value, or None."""
    raw = os.environ.get(NICENESS_ENV)
    if not raw:
        return None
    try:
        niceness = int(raw)
    except ValueError:
        raise ValueError(f"{NICENESS_ENV} must be an integer between 0 and {MAX_NICENESS} (got {raw!r})") from None
    lower_process_priority(niceness)
    return niceness
