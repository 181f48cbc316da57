"""How busy the cores are in each stage of a warm CPU triage (issue 15): wall time and process CPU
time per stage, and their ratio (cores busy, at most the core count).

``sdk.triage``'s per-run stage timer is wrapped for this run only, so each stage it times with a
context manager also records ``time.process_time`` (every thread of the process) around it;
stages the product records without the context manager (the parts of ``load``, ``resample``,
``classification``) show wall time only, and ``rest`` is the run's CPU outside the timed stages.
The run-level line gives the floor: process CPU / cores = the wall time with perfect packing.

    .venv/bin/python examples/stage_cpu.py [SERIES] [--runs 7] [--precision auto]   # idle machine
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np

from sdk.paths import shared_data_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("series", nargs="?", type=Path, default=shared_data_root() / "dicom" / "covid-ct-md" / "covid-P001")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    import sdk
    import sdk.triage as triage_mod
    from sdk.pools import usable_cores

    timers: List[triage_mod._Timer] = []

    class CpuTimer(triage_mod._Timer):
        def __init__(self) -> None:
            super().__init__()
            self.cpu: Dict[str, float] = {}
            timers.append(self)

        @contextlib.contextmanager
        def __call__(self, stage: str) -> Iterator[None]:
            c0 = time.process_time()
            with super().__call__(stage):
                yield
            self.cpu[stage] = self.cpu.get(stage, 0.0) + (time.process_time() - c0) * 1e3

    original = triage_mod._Timer
    triage_mod._Timer = CpuTimer
    try:
        engine = sdk.Triage(heatmaps=False, precision=args.precision)
        engine.run(args.series)
        wall: Dict[str, List[float]] = {}
        cpu: Dict[str, List[float]] = {}
        for _ in range(args.runs):
            c0, w0 = time.process_time(), time.perf_counter()
            engine.run(args.series)
            run_wall, run_cpu = (time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3
            t = timers[-1]
            for k, v in t.ms.items():
                wall.setdefault(k, []).append(v)
            for k, v in t.cpu.items():
                cpu.setdefault(k, []).append(v)
            wall.setdefault("run", []).append(run_wall)
            cpu.setdefault("run", []).append(run_cpu)
            cpu.setdefault("rest", []).append(run_cpu - sum(t.cpu.values()))
    finally:
        triage_mod._Timer = original
    cores = usable_cores()
    print(f"{args.series.name}, {engine.runtime.get('precision')} on {cores} core(s), {args.runs} warm runs, "
          f"load {os.getloadavg()[0]:.2f}; medians, ms")
    print(f"{'stage':22s} {'wall':>8s} {'cpu':>8s} {'cores busy':>10s}")
    for k in wall:
        w = float(np.median(wall[k]))
        c = float(np.median(cpu[k])) if k in cpu else None
        busy = f"{c / w:10.2f}" if c is not None and w > 0.5 else f"{'-':>10s}"
        print(f"{k:22s} {w:8.1f} {c if c is not None else float('nan'):8.1f} {busy}")
    print(f"{'rest (untimed CPU)':22s} {'':8s} {float(np.median(cpu['rest'])):8.1f}")
    floor = float(np.median(cpu["run"])) / cores
    print(f"run: process CPU / {cores} cores = {floor:.0f} ms, the wall time with perfect packing "
          f"(measured {float(np.median(wall['run'])):.0f} ms)")


if __name__ == "__main__":
    main()
