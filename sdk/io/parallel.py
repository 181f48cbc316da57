"""Run one small job per slice: serially, in threads, or in forked worker processes.

Why processes: the JPEG decoders behind pydicom hold the GIL while they decode. Neither
python-gdcm's SWIG module (``_gdcm/_gdcmswig.so``) nor pylibjpeg-libjpeg's Cython module
(``_libjpeg*.so``) calls ``PyEval_SaveThread`` (``nm -D`` lists no such symbol), and measured on
covid-P001 another Python thread runs only 2-9 % of the time it runs when the GIL is free
(``examples/bench_ingest.py --gil``, docs/benchmarks/ingest.md). So threads cannot decode in
parallel; forked processes can.

How: the output array lives in an anonymous shared mapping (:func:`shared_empty`) created before
the fork, so each worker writes its slices straight into the caller's array (no pickling of pixels,
no copy afterwards). Workers take the next index from a shared counter (dynamic balance on a busy
machine), the calling process works too, and each worker sends back only its small per-index
results. Forking is used only where ``os.fork`` exists (Linux, macOS); elsewhere, or when a worker
cannot be started, :func:`map_indices` falls back to threads and says so in its return value.
"""
from __future__ import annotations

import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

MODES = ("serial", "threads", "processes")


def can_fork() -> bool:
    """True where worker processes can be forked (POSIX with ``os.fork``)."""
    return hasattr(os, "fork")


def shared_empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """An uninitialised array in an anonymous MAP_SHARED mapping: forked children that write into it
    write into the parent's array. The mapping lives as long as the array (it is the array's base)."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    buf = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    return np.frombuffer(buf, dtype=dt, count=int(np.prod(shape))).reshape(tuple(shape))


def map_indices(n: int, fn: Callable[[int], Any], *, mode: str, workers: int,
                on_done: Optional[Callable[[int], None]] = None) -> Tuple[List[Any], str]:
    """``[fn(k) for k in range(n)]`` run in ``mode`` with ``workers`` workers in all.

    ``fn`` must not raise (return an error value instead) and, for ``processes``, must return a
    small picklable value; anything it writes must go to memory made by :func:`shared_empty`.
    ``on_done(count)`` is called in the calling process as results arrive (for progress bars).

    Returns (results in index order, the mode actually used: ``processes`` falls back to
    ``threads`` where forking is impossible).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    workers = max(1, int(workers))
    if mode == "serial" or workers == 1 or n < 2:
        out = []
        for k in range(n):
            out.append(fn(k))
            if on_done is not None:
                on_done(1)
        return out, "serial"
    if mode == "processes" and can_fork():
        try:
            return _map_forked(n, fn, workers, on_done), "processes"
        except (OSError, AssertionError, ValueError):   # e.g. a daemonic process may not fork children
            pass
    with ThreadPoolExecutor(max_workers=workers) as pool:
        out = []
        for r in pool.map(fn, range(n)):
            out.append(r)
            if on_done is not None:
                on_done(1)
    return out, "threads"


def _map_forked(n: int, fn: Callable[[int], Any], workers: int,
                on_done: Optional[Callable[[int], None]]) -> List[Any]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    counter = ctx.Value("l", 0)                    # next index to take, shared by every worker
    lock = threading.Lock()                        # (the calling process is one worker)

    def take() -> int:
        with counter.get_lock():
            k = counter.value
            counter.value = k + 1
        return k

    def loop(send: Optional[Callable[[Any], None]]) -> List[Tuple[int, Any]]:
        done = []
        while True:
            k = take()
            if k >= n:
                break
            done.append((k, fn(k)))
            if send is None and on_done is not None:
                with lock:
                    on_done(1)
        return done

    def child(conn) -> None:
        import gc

        gc.disable()   # short-lived: a collection would touch (copy-on-write) every inherited object
        try:
            conn.send(loop(send=conn.send))
        finally:
            conn.close()

    procs, conns = [], []
    try:
        for _ in range(workers - 1):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=child, args=(send,), daemon=True)
            p.start()
            send.close()
            procs.append(p)
            conns.append(recv)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    results: List[Any] = [None] * n
    got = [False] * n
    for k, r in loop(send=None):
        results[k], got[k] = r, True
    for conn, p in zip(conns, procs):
        try:
            part = conn.recv()
        except EOFError:          # the worker died (killed, out of memory): its indices are redone here
            part = []
        for k, r in part:
            results[k], got[k] = r, True
        if on_done is not None:
            on_done(len(part))
        p.join()
    for k in range(n):            # indices a dead worker took but never reported
        if not got[k]:
            results[k] = fn(k)
    return results
