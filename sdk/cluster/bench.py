"""Scaling measurements for docs/benchmarks/scale.md (``python -m sdk.cluster.bench``).

Runs the same archive through the local engine (``ctsdk triage-batch``, 1 and 2 worker processes,
each a fresh process) and through :func:`sdk.cluster.run_batch_ray` on a simulated cluster
(``ray.cluster_utils.Cluster``: 1 or 2 raylets on this machine, 2 logical CPUs each, one actor
of 1 CPU per logical-CPU pair), then measures Ray's own per-series cost with the model-free
:func:`sdk.cluster.probe.paths_check` hook over many tiny series. Writes one JSON file and prints
a Markdown table. Every raylet shares this machine's cores: more nodes here add scheduling, not
compute.

    python -m sdk.cluster.bench --root runs/cluster/bench_archive --tiny 60 --out runs/cluster/bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["main"]

#: the local engine running what a 1-CPU Ray actor runs (1 thread, no heat maps)
LEAN = "sdk.cluster.batch:single_thread_triage"


def _load_avg() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _local(root: Path, out: Path, workers: int, triage_fn: Optional[str]) -> Dict[str, Any]:
    cmd = [sys.executable, "-c", "from sdk.cli import main; main()", "triage-batch", str(root), "--out", str(out),
           "--overwrite", "--workers", str(workers), "--no-progress", "--json"]
    if triage_fn:
        cmd += ["--triage-fn", triage_fn]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"local run failed: {r.stderr[-2000:]}")
    s = json.loads(r.stdout)
    return {"wall_s": wall, "summary": s}


def _ray(root: Path, out: Path, nodes: int, workers: int, triage_fn: Optional[str]) -> Dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from ..integration.batch import BatchOptions
    from .batch import RayOptions, run_batch_ray

    node_args = {"num_cpus": 2, "object_store_memory": 128 * 1024 * 1024}
    t0 = time.perf_counter()
    c = Cluster(initialize_head=True, head_node_args=dict(node_args))
    for _ in range(nodes - 1):
        c.add_node(**node_args)
    c.wait_for_nodes()
    t_cluster = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        s = run_batch_ray(root, out, BatchOptions(overwrite=True, triage_fn=triage_fn, progress=False),
                          RayOptions(address=c.address, workers=workers))
        wall = time.perf_counter() - t1
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
    return {"wall_s": wall, "cluster_start_s": t_cluster, "summary": s.to_dict()}


def _tiny_archive(root: Path, n: int) -> Path:
    from ..phantom import write_phantom_series

    if root.exists() and len(list(root.iterdir())) == n:
        return root
    for i in range(n):
        write_phantom_series(root / f"s{i:04d}", n_slices=2, size=16, series_uid=f"1.2.826.0.1.3680043.79.{i}")
    return root


def _stages(out: Path) -> Dict[str, float]:
    """Median per-stage timings_ms over the eligible series of a results file."""
    from ..integration.batch import JsonlWriter

    per: Dict[str, List[float]] = {}
    for r in JsonlWriter.read(out):
        if r.get("error") or not r.get("eligible"):
            continue
        for k, v in (r.get("timings_ms") or {}).items():
            per.setdefault(k, []).append(float(v))
    return {k: round(statistics.median(v), 1) for k, v in per.items()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="archive to triage (real Triage)")
    ap.add_argument("--tiny", type=int, default=60, help="tiny series for the per-series overhead run (0: skip)")
    ap.add_argument("--configs", default="local1,local1-lean,local2-lean,ray1,ray2",
                    help="comma list of local1, local2 (default Triage hook), local1-lean, local2-lean (1 thread, no "
                         "heat maps: what an actor runs), ray1, ray2 (nodes; 2 actors of 1 CPU)")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    args = ap.parse_args(argv)
    work = args.out.parent / (args.out.stem + "-work")
    work.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"root": str(args.root), "cpu_count": os.cpu_count(), "runs": {}}
    try:
        import ray

        results["ray_version"] = ray.__version__
    except ImportError:
        results["ray_version"] = None
    for name in args.configs.split(","):
        load0 = _load_avg()
        out = work / f"{name}.jsonl"
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        if name.startswith("local"):
            lean = name.endswith("-lean")
            r = _local(args.root, out, int(name[5:].replace("-lean", "")), LEAN if lean else None)
        else:
            r = _ray(args.root, out, int(name[3:]), 2, None)
        n = r["summary"]["processed"]
        r.update(series=n, series_per_min=round(60.0 * n / r["wall_s"], 2), load_before=load0, load_after=_load_avg(),
                 stages_median_ms=_stages(out))
        results["runs"][name] = r
        print(f"[bench] {name}: {n} series in {r['wall_s']:.1f} s = {r['series_per_min']} series/min "
              f"(load {load0} -> {r['load_after']})", file=sys.stderr, flush=True)
    if args.tiny:
        tiny = _tiny_archive(work / "tiny", args.tiny)
        for name in ("local1", "ray2"):
            load0 = _load_avg()
            out = work / f"tiny-{name}.jsonl"
            if name == "local1":
                r = _local(tiny, out, 1, "sdk.cluster.probe:paths_check")
            else:
                r = _ray(tiny, out, 2, 2, "sdk.cluster.probe:paths_check")
                s = r["summary"]
                span = (s["last_result_s"] - s["first_result_s"]) if s.get("first_result_s") is not None else None
                if span is not None and args.tiny > 1:
                    actors = len(s["actor_peak_rss_mb"]) or 2
                    r["steady_s_per_series"] = span / (args.tiny - 1)
                    r["ray_overhead_ms_per_series_per_actor"] = round(1000.0 * span / (args.tiny - 1) * actors, 1)
            r.update(series=r["summary"]["processed"], load_before=load0, load_after=_load_avg())
            results["runs"][f"tiny-{name}"] = r
            print(f"[bench] tiny-{name}: {r['series']} series in {r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    return 0


def table(results: Dict[str, Any]) -> str:
    rows = ["| run | series | wall s | series/min | time to first Ray result s | peak RSS per actor MiB "
            "| load avg before -> after |",
            "|---|---|---|---|---|---|---|"]
    for name, r in results["runs"].items():
        s = r["summary"]
        rss = s.get("actor_peak_rss_mb") or {}
        rows.append(f"| {name} | {r['series']} | {r['wall_s']:.1f} | {r.get('series_per_min', '-')} | "
                    f"{s.get('first_result_s', '-')} | {max(rss.values()) if rss else '-'} | "
                    f"{r['load_before'][:1]} -> {r['load_after'][:1]} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
