"""Ingest benchmark and the per-folder outcome table of docs/ingest.md.

    python examples/bench_ingest.py                 # time + peak memory, covid-P001, workers 1/2/4
    python examples/bench_ingest.py --table         # outcome of load_series on every folder/file
    python examples/bench_ingest.py --phantom       # phantom write/load time per transfer syntax
    python examples/bench_ingest.py --source DIR --repeat 5 --workers 1 2

Each timing runs in a fresh child process (so peak RSS is that load's own) after one warm-up read
of the files (page cache); the report gives the median of ``--repeat`` runs. The machine is shared:
say so when you quote the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CTSDK_SHARED_DATA", REPO.parent / "shared" / "data")) / "dicom"


def _child(source: str, workers: int, chain: str, trace: bool) -> None:
    """Run one load in this process and print one JSON line."""
    sys.path.insert(0, str(REPO))
    import tracemalloc

    from sdk.io import decoders, load_series

    # put the chosen decoder at the head of the chain (the default chain has gdcm first for JPEG
    # Lossless only, see sdk/io/decoders.py)
    first = {"gdcm-first": "gdcm", "pylibjpeg-first": "pylibjpeg"}[chain]
    decoders.register_decoder(decoders._PLUGINS[first], first=True)
    if trace:
        tracemalloc.start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    vol = load_series(source, workers=workers)
    dt = time.perf_counter() - t0
    peak_traced = tracemalloc.get_traced_memory()[1] if trace else None
    ru = resource.getrusage(resource.RUSAGE_SELF)
    rss = ru.ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"seconds": dt, "cpu_seconds": time.process_time() - cpu0, "peak_rss_bytes": rss, "peak_traced_bytes": peak_traced,
                      "shape": list(vol.shape), "hu_bytes": int(vol.hu.nbytes)}))


def _run_child(source: str, workers: int, chain: str, trace: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", source, str(workers), chain, "1" if trace else "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(source: str, workers_list, repeat: int, chains) -> None:
    for f in Path(source).rglob("*"):           # warm the page cache once
        if f.is_file():
            f.read_bytes()
    print(f"source: {source}")
    print(f"cpu count: {os.cpu_count()}, load average before: {os.getloadavg()}")
    print("| decoder order | workers | median wall s | min s | max s | median CPU s (all threads) | "
          "peak RSS MiB | peak traced MiB (numpy+python) |")
    print("|---|---|---|---|---|---|---|---|")
    configs = [(c, w) for c in chains for w in workers_list]
    runs = {cfg: [] for cfg in configs}
    for _ in range(repeat):                      # interleave configs so load changes hit all alike
        for cfg in configs:
            runs[cfg].append(_run_child(source, cfg[1], cfg[0]))
    for (chain, w), rs in runs.items():
        secs = [r["seconds"] for r in rs]
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        traced = _run_child(source, w, chain, trace=True)["peak_traced_bytes"]
        rss = statistics.median(r["peak_rss_bytes"] for r in rs)
        print(f"| {chain} | {w} | {statistics.median(secs):.2f} | {min(secs):.2f} | {max(secs):.2f} | {cpu:.2f} | "
              f"{rss / 2**20:.0f} | {traced / 2**20:.0f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


def table() -> None:
    """Outcome of load_series on every leaf folder and on each file of the per-file folders."""
    sys.path.insert(0, str(REPO))
    import warnings

    from sdk.errors import SeriesError
    from sdk.io import load_series

    warnings.simplefilter("ignore")
    targets = []
    for d in sorted(p for p in DATA.rglob("*") if p.is_dir()):
        if not any(c.is_dir() for c in d.iterdir()):
            targets.append(d)
    for name in ("bad-inputs", "dicom-ts-zoo", "notzaki"):
        targets += [f for f in sorted((DATA / name).iterdir()) if f.is_file()]
    print("| input | outcome | shape (z, y, x) / error | detail |")
    print("|---|---|---|---|")
    for t in targets:
        rel = t.relative_to(DATA)
        try:
            v = load_series(t)
        except SeriesError as exc:
            msg = exc.problem.replace("|", "/").replace(str(t) + "/", "")
            if len(msg) > 140:
                msg = msg[:137] + "..."
            print(f"| `{rel}` | **{type(exc).__name__}** | {msg} | |")
            continue
        except Exception as exc:  # must never happen; shown loudly if it does
            print(f"| `{rel}` | GENERIC {type(exc).__name__} | {exc} | |")
            continue
        notes = []
        if v.meta.gantry_tilt_deg:
            notes.append(f"tilt {v.meta.gantry_tilt_deg:g} deg corrected")
        if not v.uniform_z:
            notes.append("uneven z")
        n_skip = sum("skipped" in w for w in v.warnings)
        if n_skip:
            notes.append(f"{n_skip} file(s) skipped")
        other = sum(" not loaded " in w for w in v.warnings)
        if other:
            notes.append(f"{other} other series not loaded")
        if any("no Modality" in w for w in v.warnings):
            notes.append("no Modality (assumed CT)")
        if any("ACR-NEMA" in w for w in v.warnings):
            notes.append("ACR-NEMA headless, read with force")
        sp = ", ".join(f"{s:.3g}" for s in v.spacing)
        print(f"| `{rel}` | loads | {v.shape} {v.hu.dtype}, spacing ({sp}) mm | {'; '.join(notes)} |")


def phantom_speed(repeat: int) -> None:
    """Median time to write and to load a 64x128x128 phantom series in every syntax it writes."""
    sys.path.insert(0, str(REPO))
    import tempfile

    from sdk.io import load_series
    from sdk.phantom import PHANTOM_SYNTAXES, write_phantom_series

    print("| transfer syntax | write s (median) | load s (median) |")
    print("|---|---|---|")
    for uid, alias in PHANTOM_SYNTAXES.items():
        w, r = [], []
        for i in range(repeat):
            with tempfile.TemporaryDirectory() as d:
                t0 = time.perf_counter()
                write_phantom_series(d, n_slices=64, size=128, transfer_syntax=uid, seed=i)
                w.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                load_series(d)
                r.append(time.perf_counter() - t0)
        print(f"| {alias} ({uid}) | {statistics.median(w):.3f} | {statistics.median(r):.3f} |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DATA / "covid-ct-md" / "covid-P001"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chains", nargs="+", default=["pylibjpeg-first", "gdcm-first"])
    ap.add_argument("--table", action="store_true", help="print the per-folder outcome table instead")
    ap.add_argument("--phantom", action="store_true", help="time writing/loading a 64x128x128 phantom instead")
    args = ap.parse_args()
    if args.table:
        table()
    elif args.phantom:
        phantom_speed(args.repeat)
    else:
        bench(args.source, args.workers, args.repeat, args.chains)


if __name__ == "__main__":
    main()
