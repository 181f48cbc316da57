"""Write docs/benchmarks/cpu.md from docs/benchmarks/cpu/bench.json (a real `ctsdk bench` run).

Every number in the doc comes from that JSON; the generated tables follow the summary.
"""
import json
from pathlib import Path

from sdk.bench.report import to_markdown

ROOT = Path("docs/benchmarks")
r = json.loads((ROOT / "cpu" / "bench.json").read_text())
s = r["series"][0]
rts = {k: v for k, v in s["runtimes"].items() if v["status"] == "ok"}
naive = rts["naive"]
goal = s["goal"]
best = rts[goal["best_runtime"]]
fp32 = rts.get("ort-fp32")
int8 = rts.get("ort-int8")
W = lambda rt, st: rt["warm"][st]["p50"]  # noqa: E731
load_b = r["load"]["before"]["loadavg_1_5_15"]
load_a = r["load"]["after"]["loadavg_1_5_15"]
busy = r["load"]["before"]["busy_processes"] + r["load"]["after"]["busy_processes"]
idle = not busy and max(load_b[0], load_a[0]) < 2.5

best_total = W(best, "total")
ingest = W(best, "decode") + W(best, "hu")
fixed = sum(W(best, k) for k in ("decode", "hu", "eligibility", "resample", "select", "aggregate"))
nets = W(best, "lungs") + W(best, "classify")
need = W(naive, "total") / goal["target_speedup"]
order = sorted(((W(best, k), k) for k in r["stages"]), reverse=True)
lab = {"decode": "decode", "hu": "HU", "eligibility": "eligibility", "resample": "resample", "lungs": "lung segmentation",
       "select": "slice selection", "classify": "classification", "aggregate": "aggregation"}
sc = s["scaling"]["runtimes"]


def pt(name, n):
    return next(p for p in sc[name] if p["n_slices"] == n)


late = json.loads((ROOT / "cpu" / "bench-0115-under-load.json").read_text())
ls = late["series"][0]["runtimes"]
lt = lambda n: ls[n]["warm"]["total"]["p50"]  # noqa: E731
late_note = (
    f"This is the idle run. The brief asked for the final run as late as possible; a second, identical run at "
    f"{late['started_utc'][11:16]} UTC had other jobs (a pytest run at ~200% CPU when it started, load average "
    f"{late['load']['before']['loadavg_1_5_15'][0]} → {late['load']['after']['loadavg_1_5_15'][0]}) competing for the 2 cores: "
    f"warm p50 ort-int8 {lt('ort-int8'):,.0f} ms, ort-fp32 {lt('ort-fp32'):,.0f} ms, naive {lt('naive'):,.0f} ms with naive calls "
    f"between {min(ls['naive']['warm_totals_ms']):,.0f} and {max(ls['naive']['warm_totals_ms']):,.0f} ms (PyTorch's default 2 threads "
    "slow down badly under contention; see Reproduce), so its ratios say more about the neighbours than about ctsdk. Its JSON is kept as "
    "[cpu/bench-0115-under-load.json](cpu/bench-0115-under-load.json); every number below is from the idle run."
)

if fixed >= need:
    amdahl = (f"Even with free networks the product's other stages ({fixed:,.0f} ms) exceed the {need:,.0f} ms that 5× "
              "allows (Amdahl).")
else:
    amdahl = (f"The product's non-network stages alone ({fixed:,.0f} ms) use {fixed / need:.0%} of the {need:,.0f} ms that 5× "
              f"allows, leaving {need - fixed:,.0f} ms for both networks, which take {nets:,.0f} ms now (Amdahl).")

lines = [
    "# CPU benchmark: `ctsdk bench` on a 2-core machine",
    "",
    f"Measured {r['started_utc']} – {r['finished_utc']} (UTC) on this project's shared build machine "
    f"({r['machine']['cpu_model']}, {r['machine']['usable_cores']} cores, {r['machine']['ram_gb']} GiB RAM, no GPU), "
    f"bundle {r['bundle']['name']} {r['bundle']['version']}. Command (repository root, the shared data beside it):",
    "",
    "```",
    "nice -n 10 " + (r.get("command") or "").replace("/work/shared/data", "../shared/data"),
    "```",
    "",
    ("Machine load: **idle** during the run (load average " + f"{load_b[0]} before, {load_a[0]} after; no other process above 5% CPU)."
     if idle else
     f"Machine load: **not idle** (load average {load_b[0]} before, {load_a[0]} after; other busy processes: "
     + ", ".join(f"{p['name']} {p['cpu_percent']:.0f}%" for p in busy) + "), so treat the absolute numbers as pessimistic."),
    "The full machine-generated report of this run is [cpu/bench.md](cpu/bench.md) (raw numbers: "
    "[cpu/bench.json](cpu/bench.json)); its tables are repeated below.",
    "",
    late_note,
    "",
    "## Against the goal",
    "",
    f"Goal (issue 15): end-to-end CPU triage of `covid-ct-md/covid-P001` (148 slices, 512², JPEG lossless) "
    f"**≥ {goal['target_speedup']:.0f}× faster than the naive baseline, at most {goal['target_total_ms'] / 1000:.1f} s warm p50** "
    f"and a fresh-process peak RSS of at most {goal.get('target_peak_rss_mb', 800):.0f} MiB, on 2 cores.",
    "",
    f"- **≤ {goal['target_total_ms'] / 1000:.1f} s: {'met' if goal['under_time'] else 'not met'}.** Warm p50 total: ort-int8 **{W(int8, 'total'):,.0f} ms** (p95 {int8['warm']['total']['p95']:,.0f}), "
    f"ort-fp32 **{W(fp32, 'total'):,.0f} ms** (p95 {fp32['warm']['total']['p95']:,.0f}). Cold in a fresh process "
    f"(imports, bundle, sessions, warm-up and the first series): ort-int8 {int8['cold']['fresh_process']['total_ms']:,.0f} ms, "
    f"ort-fp32 {fp32['cold']['fresh_process']['total_ms']:,.0f} ms.",
    f"- **≥ {goal['target_speedup']:.0f}× the naive baseline: {'met' if goal['fast_enough'] else 'not met'}.** The naive baseline takes **{W(naive, 'total'):,.0f} ms** (p50), so the speed-up is "
    f"**{int8['speedup_vs_naive']['total_p50']:.1f}×** (INT8) and **{fp32['speedup_vs_naive']['total_p50']:.1f}×** (FP32). "
    f"{goal['target_speedup']:.0f}× would need ≤ {need:,.0f} ms.",
    f"- **Dominant stage: {lab[order[0][1]]}** ({order[0][0]:,.0f} ms of {best_total:,.0f} ms for {goal['best_runtime']}), then "
    f"{lab[order[1][1]]} ({order[1][0]:,.0f} ms) and {lab[order[2][1]]} ({order[2][0]:,.0f} ms). Reading the JPEG-lossless files "
    f"and making HU (decode + HU) costs {ingest:,.0f} ms, and every non-network stage together {fixed:,.0f} ms, "
    f"against {nets:,.0f} ms for both networks.",
    "",
    "Why 5× is out of reach with this baseline: the networks are where ONNX Runtime wins "
    f"(lung U-Net {naive['warm']['lungs']['p50'] / W(best, 'lungs'):.1f}×, classifier "
    f"{W(naive, 'classify') / W(best, 'classify'):.1f}× with INT8), but the naive pipeline is built from the *same* light "
    f"models (EfficientNet-Lite0 and the 2D U-Net, in PyTorch eager), so it is only {W(naive, 'total') / 1000:.1f} s to begin with, "
    f"and {W(naive, 'decode') + W(naive, 'hu'):,.0f} ms of it is decode + HU, which the product does at about the same speed "
    f"(decode {naive['warm']['decode']['p50']:,.0f} ms single-threaded naive vs {W(best, 'decode'):,.0f} ms in the product's "
    "2-thread decode pool on 2 cores). " + amdahl + " The 18.4 s naive run in FIELD_NOTES (ResNet-50 on "
    "every slice, 3D U-Net) is a heavier pipeline than this product's, so it is not the baseline here. What could close "
    "part of the gap (suggestions, not measured): decode only the slices the segmenter will look at (it already restricts "
    "itself to the body z range), use more decode threads where there are more cores, and make the HU/geometry step "
    "cheaper (the product's HU stage, "
    f"{W(best, 'hu'):,.0f} ms, is slower than the naive one, {W(naive, 'hu'):,.0f} ms; it also covers slice ordering, "
    "geometry checks and canonicalisation, not timed separately).",
    "",
    f"The naive baseline and the product do not classify the same slices: the naive one classifies every slice with any lung "
    f"pixel ({naive['result']['n_classified']} of {naive['result']['n_slices']}), the product the slices its selection rule keeps "
    f"({best['result']['n_classified']}); so the naive classification does "
    f"{naive['result']['n_classified'] / best['result']['n_classified']:.2f}× the slices. Their labels also differ "
    f"(naive: {naive['result']['label']}, product: {best['result']['label']}): the baseline is a cost reference, not an "
    "accuracy one.",
    "",
    "## How it was measured",
    "",
    "- **One process, interleaved.** Every runtime is built (cold start) and run once, then warmed up once, then the "
    f"{r['config']['repeat']} measured calls per runtime are interleaved round-robin (the order rotates every round), so a "
    "noisy neighbour hits all runtimes alike. p50/p95 are over those calls (NumPy's linear-interpolation percentile).",
    "- **Runtimes.** `ort-fp32` / `ort-int8` are the product itself, `sdk.Triage(device=\"cpu\", precision=...)`, with its "
    "default threads (2) and classifier batch (16); `ort-cuda-fp16`, `trt-fp16`, `trt-int8` were skipped with the reasons "
    "shown (no GPU here; see [gpu.md](gpu.md)).",
    "- **Stages.** Triage's own `timings_ms`, regrouped: its `load` is split into *decode* (file reading and header parsing, "
    "plus pixel decoding) and *HU* (stored -> HU, slice ordering, geometry) with the reader's own split, "
    "`sdk.io.load_series(timings=...)` (Triage reports it as `load.scan`/`load.decode`/`load.hu`/`load.geometry`); "
    "*resample* = the segmenter's input preparation + the classifier "
    "inputs (window + resize to 224²).",
    "- **Naive baseline** (`sdk/bench/naive.py`): `pydicom.dcmread` + `pixel_array` one file at a time; HU by slope/intercept; "
    "the product's eligibility check; the product's 2D lung U-Net (its trained checkpoint) in PyTorch eager, one slice at a "
    "time, logits back to 512² with `scipy.ndimage.zoom`; every slice with any lung pixel classified by "
    "`effnet_lite0_mgap` in PyTorch eager FP32, one slice at a time, inputs made with `scipy.ndimage.zoom` "
    f"({naive['classifier']['weights']}); the bundle's XGBoost aggregator. No 128³ volume: the product's default segmenter "
    "works on slices, so a whole-volume zoom would be work the product does not do.",
    "- **Memory.** Decided: a psutil RSS sampler thread (5 ms) around each call in the bench process, reporting the call's own "
    "RSS growth (peak minus RSS before the call, after returning freed heap to the OS with `malloc_trim`) and the process "
    "peak (which includes every runtime loaded); plus each runtime alone in a fresh process (peak RSS = `VmHWM`). "
    "Fresh-process peaks: "
    + ", ".join(f"{k} {v['cold']['fresh_process']['max_rss_mb']:,.0f} MiB" for k, v in rts.items()) + ".",
    "- **Scaling.** The series is loaded with `sdk.io.load_series`, resampled along z only (linear, same 296 mm extent, so "
    "64 slices are 4.6 mm apart and 600 are 0.49 mm apart; `SliceThickness` = min(2 mm, spacing), so every point passes "
    "eligibility) and written as a temporary **uncompressed** DICOM series; one call per runtime and slice count. "
    "Uncompressed files decode faster than the original JPEG-lossless ones, which is why the 150-slice point "
    f"(ort-int8 {pt('ort-int8', 150)['total_ms']:,.0f} ms) is below the main table's "
    f"{W(int8, 'total'):,.0f} ms.",
    "",
    "## Scaling in one line",
    "",
    f"From 64 to 600 slices (9.4× the slices), ort-int8 goes {pt('ort-int8', 64)['total_ms']:,.0f} → "
    f"{pt('ort-int8', 600)['total_ms']:,.0f} ms ({pt('ort-int8', 600)['total_ms'] / pt('ort-int8', 64)['total_ms']:.1f}×), "
    f"ort-fp32 {pt('ort-fp32', 64)['total_ms']:,.0f} → {pt('ort-fp32', 600)['total_ms']:,.0f} ms, naive "
    f"{pt('naive', 64)['total_ms']:,.0f} → {pt('naive', 600)['total_ms']:,.0f} ms: roughly linear in the slice count. "
    f"The call's own memory grows from {pt('ort-int8', 64)['delta_rss_mb']:,.0f} to {pt('ort-int8', 600)['delta_rss_mb']:,.0f} MiB "
    f"(ort-int8) and {pt('naive', 64)['delta_rss_mb']:,.0f} to {pt('naive', 600)['delta_rss_mb']:,.0f} MiB (naive, which "
    "keeps every decoded file and a float32 HU volume).",
    "",
    "## Reproduce",
    "",
    "```",
    "nice -n 10 .venv/bin/ctsdk bench ../shared/data/dicom/covid-ct-md/covid-P001 --repeat 5 --warmup 1 \\",
    "    --batch-sizes 1,8,32 --scaling 64,150,300,600 --out docs/benchmarks/cpu --json > /tmp/bench.json",
    "```",
    "",
    "`--out` writes `bench.json`, `bench.md`, `stages_0.png` and `scaling.png`; this page's summary was written from that "
    "JSON. `ctsdk bench` with no SOURCE runs on a synthetic phantom. On a busy shared machine PyTorch's default 2 threads "
    "can become very slow (during development, at load average ~11, one EfficientNet-Lite0 224² forward took up to 1.6 s "
    "with 2 threads against 29 ms with 1); `--threads 1` then gives every runtime one thread and steadier numbers.",
    "",
]
body = to_markdown(r, {"stages_0": "cpu/stages_0.png", "scaling": "cpu/scaling.png"})
body = body.replace("# ctsdk bench - ", "# Full report of the run - ", 1)
body = "\n".join(("#" + ln if ln.startswith("#") else ln) for ln in body.splitlines())
(ROOT / "cpu.md").write_text("\n".join(lines) + "\n" + body + "\n")
print("wrote", ROOT / "cpu.md")
