"""Summary statistics of repeated timings (milliseconds) and memory samples.

Percentiles use linear interpolation between order statistics (NumPy's default ``"linear"``
method, Hyndman & Fan type 7), so ``percentile(xs, 50) == numpy.percentile(xs, 50)``.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from ..errors import ConfigError


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 <= q <= 100) of ``values`` by linear interpolation.

    Written without NumPy so the test can hold it to ``numpy.percentile`` independently.

    Raises:
        ConfigError: when ``values`` is empty or ``q`` is outside [0, 100].
    """
    if not 0.0 <= q <= 100.0:
        raise ConfigError(f"percentile q must be in [0, 100], not {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ConfigError("percentile of an empty list of timings: run at least one repeat (--repeat >= 1)")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """``{"n", "p50", "p95", "mean", "min", "max"}`` of a list of timings (ms)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ConfigError("no timings to summarise: run at least one repeat (--repeat >= 1)")
    return {
        "n": len(xs),
        "p50": percentile(xs, 50.0),
        "p95": percentile(xs, 95.0),
        "mean": sum(xs) / len(xs),
        "min": min(xs),
        "max": max(xs),
    }


def summarize_stages(runs: Sequence[Mapping[str, float]], stages: Iterable[str]) -> Dict[str, Dict[str, float]]:
    """Per-stage summaries over several runs; a stage missing from a run counts as 0 ms there
    only if it is present in at least one run (a stage absent from every run is left out)."""
    out: Dict[str, Dict[str, float]] = {}
    for stage in stages:
        if not any(stage in r for r in runs):
            continue
        out[stage] = summarize([float(r.get(stage, 0.0)) for r in runs])
    return out


def speedup(baseline_ms: Optional[float], candidate_ms: Optional[float]) -> Optional[float]:
    """``baseline / candidate`` (how many times faster), or None when either is missing or 0."""
    if baseline_ms is None or candidate_ms is None or candidate_ms <= 0.0 or baseline_ms <= 0.0:
        return None
    return baseline_ms / candidate_ms


def series_per_minute(total_ms: Optional[float]) -> Optional[float]:
    """Throughput of one series taking ``total_ms``: 60 000 / total_ms."""
    if total_ms is None or total_ms <= 0.0:
        return None
    return 60000.0 / total_ms


def dominant(stages_ms: Mapping[str, float], exclude: Sequence[str] = ("total",)) -> Optional[str]:
    """Name of the largest stage (ties: first in mapping order)."""
    best: Optional[str] = None
    best_ms = -1.0
    for name, ms in stages_ms.items():
        if name in exclude:
            continue
        if ms > best_ms:
            best, best_ms = name, float(ms)
    return best


def cpu_use(cpu_ms: Sequence[float], wall_ms: Sequence[float], cores: int) -> Dict[str, float]:
    """How busy the cores were during the measured calls, and the floor that leaves.

    ``cpu_ms[i]`` is the process CPU time (every thread) of call ``i``, ``wall_ms[i]`` its wall
    time. Returns the p50 CPU per call, the p50 of the calls' cores busy (CPU / wall), the usable
    ``cores`` and ``floor_ms`` = p50 CPU / cores: the wall time of the same work spread perfectly
    over every core - no scheduling change gets a call below it, only less CPU work does.

    Raises:
        ConfigError: no calls, lists of different lengths, or fewer than one core.
    """
    if len(cpu_ms) != len(wall_ms):
        raise ConfigError(f"cpu_use: {len(cpu_ms)} CPU times for {len(wall_ms)} calls")
    if cores < 1:
        raise ConfigError(f"cpu_use: cores must be >= 1, not {cores}")
    cpu50 = percentile(cpu_ms, 50.0)
    busy = [c / w for c, w in zip(cpu_ms, wall_ms) if w > 0]
    return {"per_call_p50_ms": cpu50, "cores_busy_p50": percentile(busy, 50.0) if busy else 0.0,
            "cores": float(cores), "floor_ms": cpu50 / cores}


__all__: List[str] = ["percentile", "summarize", "summarize_stages", "speedup", "series_per_minute", "dominant", "cpu_use"]
