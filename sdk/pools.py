"""Process-wide named thread pools, created on first use (one owner for the helper threads the
pipeline overlaps work on).

    from sdk.pools import shared_pool
    future = shared_pool("side").submit(job, *args)

``prefetch``: the next batch's inputs while the runtime runs the current one
(:meth:`sdk.runtime.base.Session.infer_batched`); ``side``: work that overlaps the classifier (HU
opacity, both Triage paths); ``slices``: the per-slice lung steps (down- and up-sampling, the
left/right split, the native mask and its counts); ``lungs``: the closing of one lung while the caller closes the other
(:mod:`sdk.lungs.classical`); ``lanes``: batches run side by side (``Session.infer_batched`` with
lanes > 1); ``opacity``: runs of slices of the HU opacity (``measure_opacity(workers=k)``). A job never waits on a job of its own pool, so a pool cannot deadlock itself. The
threads are idle between calls and end with the process.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

_POOLS: Dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
#: workers per pool: 2, the cores the CPU product is measured on (concurrent ``run`` calls share them)
WORKERS = 2


def shared_pool(name: str, workers: int = WORKERS) -> ThreadPoolExecutor:
    """The pool called ``name`` (threads named ``ctsdk-<name>``), created with ``workers`` threads
    on first use; later calls return the same pool whatever ``workers`` they pass."""
    with _LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix=f"ctsdk-{name}")
        return pool


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container or ``taskset`` can allow fewer
    than ``os.cpu_count()``); ``os.cpu_count()`` where affinity is not available."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
