"""Ingest benchmark and the per-folder outcome table of docs/ingest.md.

    python examples/bench_ingest.py                 # time + peak memory, covid-P001, workers 1/2/4
    python examples/bench_ingest.py --table         # outcome of load_series on every folder/file
    python examples/bench_ingest.py --phantom       # phantom write/load time per transfer syntax
    python examples/bench_ingest.py --source DIR --repeat 5 --workers 1 2
    python examples/bench_ingest.py --modes --repeat 5   # serial vs threads vs processes, side by side
    python examples/bench_ingest.py --gil               # does the decoder release the GIL?
    python examples/bench_ingest.py --modes --only default@/work/main serial threads processes
                                                        # "mode@checkout": another checkout's sdk

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

from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]
DATA = shared_data_root() / "dicom"


def _child(source: str, workers: int, chain: str, trace: bool) -> None:
    """Run one load in this process and print one JSON line."""
    sys.path.insert(0, str(REPO))
    import tracemalloc

    from sdk.io import decoders, load_series

    # put the chosen decoder at the head of the chain (the default chain has imagecodecs first for
    # the lossless syntaxes, see sdk/io/decoders.py)
    first = {"gdcm-first": "gdcm", "pylibjpeg-first": "pylibjpeg", "imagecodecs-first": "imagecodecs"}[chain]
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


def _mode_child(source: str, repo: str, mode: str, workers: int) -> None:
    """One load_series in this fresh process with ``decode=mode``; prints one JSON line."""
    sys.path.insert(0, repo)
    import numpy as np

    from sdk.io import load_series

    kwargs = {} if mode == "default" else {"decode": mode}
    timings: dict = {}
    if mode != "default":
        kwargs["timings"] = timings
    c0, t0 = _cpu(), time.perf_counter()
    vol = load_series(source, workers=workers, **kwargs)
    dt = time.perf_counter() - t0
    c1 = _cpu()
    import hashlib

    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    digest = hashlib.sha256(np.ascontiguousarray(vol.hu).data).hexdigest()   # reads every voxel, no copy

    print(json.dumps({"seconds": dt, "cpu_self": c1[0] - c0[0], "cpu_children": c1[1] - c0[1],
                      "rss_load": rss_load, "rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                      "timings": timings, "sha256": digest,
                      "shape": list(vol.shape)}))


def _cpu():
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime, b.ru_utime + b.ru_stime


def modes(source: str, repo: str, repeat: int, only, workers: int) -> None:
    """serial / threads / processes (fresh process per load, interleaved): wall, CPU, stages, RSS."""
    for f in Path(source).rglob("*"):            # warm the page cache once
        if f.is_file():
            f.read_bytes()
    print(f"source: {source}  repo: {repo}  workers: {workers}  cpu count: {os.cpu_count()}")
    print(f"load average before: {tuple(round(x, 1) for x in os.getloadavg())}")
    runs = {m: [] for m in only}
    for _ in range(repeat):
        for m in only:               # "mode" or "mode@/path/to/another/checkout"
            mode, _, where = m.partition("@")
            cmd = [sys.executable, __file__, "--mode-child", source, where or repo, mode,
                   str(workers if mode != "serial" else 1)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["seconds"] for r in runs[only[0]])
    print(f"| decode mode | workers | median wall s | ratio to {only[0]} | min-max s | median CPU s (process + workers) "
          "| scan / decode / hu / geometry ms (median) | peak RSS MiB: process after load / after reading every voxel "
          "/ largest worker | HU sha256 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, rs in runs.items():
        secs = [r["seconds"] for r in rs]
        med = statistics.median(secs)
        cpu = statistics.median(r["cpu_self"] + r["cpu_children"] for r in rs)
        cpu_p = statistics.median(r["cpu_self"] for r in rs)
        cpu_w = statistics.median(r["cpu_children"] for r in rs)
        st = " / ".join(f"{statistics.median(r['timings'].get(k, 0.0) for r in rs):.0f}"
                        for k in ("scan", "decode", "hu", "geometry")) if rs[0]["timings"] else "n/a"
        rss_l = statistics.median(r["rss_load"] for r in rs) / 2**20
        rss = statistics.median(r["rss_self"] for r in rs) / 2**20
        rss_c = statistics.median(r["rss_children"] for r in rs) / 2**20
        shas = {r["sha256"][:12] for r in rs}
        print(f"| {m} | {workers if m != 'serial' else 1} | {med:.2f} | {med / base:.2f} | {min(secs):.2f}-{max(secs):.2f} "
              f"| {cpu_p:.2f} + {cpu_w:.2f} = {cpu:.2f} | {st} | {rss_l:.0f} / {rss:.0f} / {rss_c:.0f} | {', '.join(sorted(shas))} |", flush=True)
    print(f"load average after: {tuple(round(x, 1) for x in os.getloadavg())}")


def gil(source: str, n_slices: int) -> None:
    """Does the decoder release the GIL while it decodes? A probe thread counts loop iterations
    (``count += 1; time.sleep(0)``) while the main thread decodes covid-P001's JPEG Lossless frames
    with the raw decoder call (``libjpeg.decode(frame bytes)``; python-gdcm ``Image.GetBuffer()``).
    When the main thread only sleeps (GIL free) the probe runs ~10^4 times per second even on a
    loaded machine; when the decoder holds the GIL the probe runs only at the hand-overs between
    calls (~1-2 per call). Load changes the first rate, not the per-call count."""
    sys.path.insert(0, str(REPO))
    import threading

    import gdcm
    import imagecodecs
    import pydicom
    from libjpeg import decode as lj_decode
    from pydicom.encaps import generate_frames

    files = sorted(Path(source).glob("*.dcm"))[:n_slices]
    frames = [next(generate_frames(pydicom.dcmread(f).PixelData, number_of_frames=1)) for f in files]
    readers = []
    for f in files:
        r = gdcm.ImageReader()
        r.SetFileName(str(f))
        r.Read()
        readers.append(r)

    def probed(work):
        count, done = [0], [False]

        def probe():
            while not done[0]:
                count[0] += 1
                time.sleep(0)

        t = threading.Thread(target=probe)
        t.start()
        t0, c0 = time.perf_counter(), time.thread_time()
        work()
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        done[0] = True
        t.join()
        return count[0], wall, cpu

    print(f"{len(files)} slices of {source}; load average {tuple(round(x, 1) for x in os.getloadavg())}")
    print("| main thread runs | wall s | main-thread CPU s | probe iterations | per second | per decode call "
          "| share of the wall time the probe could run |")
    print("|---|---|---|---|---|---|---|")
    free_rate = None
    for name, work in (("time.sleep(1.0) (GIL free)", lambda: time.sleep(1.0)),
                       ("pylibjpeg-libjpeg decode() x n", lambda: [lj_decode(fr) for fr in frames]),
                       ("python-gdcm Image.GetBuffer() x n", lambda: [r.GetImage().GetBuffer() for r in readers]),
                       ("imagecodecs jpeg8_decode() x n", lambda: [imagecodecs.jpeg8_decode(fr) for fr in frames])):
        c, wall, cpu = probed(work)
        free_rate = free_rate or c / wall           # the first row: the probe alone
        per_call = "-" if "sleep" in name else f"{c / len(files):.1f}"
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {c} | {c / wall:.0f} | {per_call} | {c / free_rate / wall:.1%} |",
              flush=True)


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
            hdr = v.meta.gantry_tilt_header_deg
            notes.append(f"tilt {v.meta.gantry_tilt_deg:+.2f} deg from the geometry (header {hdr:+g}) corrected"
                         if hdr is not None else f"tilt {v.meta.gantry_tilt_deg:+.2f} deg from the geometry corrected")
        grown = [w.split("grid grown from ")[1].split(" so")[0] for w in v.warnings if "grid grown from" in w]
        if grown:
            notes.append(f"grid grown {grown[0]}")
        if v.affine is None:
            notes.append("uneven z: affine None")
        elif not v.uniform_z:
            notes.append("uneven z")
        dups = sum("skipped: duplicate" in w for w in v.warnings)
        if dups:
            notes.append(f"{dups} duplicate(s) dropped")
        n_skip = sum("skipped" in w for w in v.warnings) - dups
        if n_skip:
            notes.append(f"{n_skip} file(s) skipped")
        other = sum(" not loaded " in w for w in v.warnings)
        if other:
            notes.append(f"{other} other series not loaded")
        if any("no Modality" in w for w in v.warnings):
            notes.append("no Modality (assumed CT)")
        if any("have no SOPInstanceUID" in w for w in v.warnings):
            notes.append("no SOPInstanceUID")
        if any("share SOPInstanceUID" in w for w in v.warnings):
            notes.append("shared SOPInstanceUIDs kept")
        if any("no InstanceNumber" in w for w in v.warnings):
            notes.append("no InstanceNumber")
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
    if len(sys.argv) > 1 and sys.argv[1] == "--mode-child":
        _mode_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DATA / "covid-ct-md" / "covid-P001"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chains", nargs="+", default=["imagecodecs-first", "pylibjpeg-first", "gdcm-first"])
    ap.add_argument("--table", action="store_true", help="print the per-folder outcome table instead")
    ap.add_argument("--phantom", action="store_true", help="time writing/loading a 64x128x128 phantom instead")
    ap.add_argument("--modes", action="store_true", help="serial vs threads vs processes decode, side by side")
    ap.add_argument("--only", nargs="+", default=["serial", "threads", "processes"],
                    help="decode modes for --modes: serial, threads, processes, auto, or 'default' (the "
                         "checkout's load_series without decode=); 'mode@/path' uses that checkout's sdk")
    ap.add_argument("--repo", default=str(REPO), help="checkout whose sdk --modes imports")
    ap.add_argument("--gil", action="store_true", help="does the decoder release the GIL while decoding?")
    ap.add_argument("--slices", type=int, default=148, help="slices for --gil")
    args = ap.parse_args()
    if args.modes:
        modes(args.source, args.repo, args.repeat, args.only, max(args.workers))
    elif args.gil:
        gil(args.source, args.slices)
    elif args.table:
        table()
    elif args.phantom:
        phantom_speed(args.repeat)
    else:
        bench(args.source, args.workers, args.repeat, args.chains)


if __name__ == "__main__":
    main()
