"""Turn a bench report dict into markdown tables and PNG charts (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .stages import STAGE_LABELS, STAGES

PathLike = Union[str, Path]
#: one colour per stage (tab10), stable across charts
STAGE_COLOURS = {s: c for s, c in zip(list(STAGES) + ["other"], [
    "#1f77b4", "#aec7e8", "#7f7f7f", "#ff7f0e", "#2ca02c", "#bcbd22", "#d62728", "#9467bd", "#c7c7c7"])}


def _ok(series: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {k: v for k, v in series["runtimes"].items() if v.get("status") == "ok"}


def _fmt(v: Optional[float], nd: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{nd}f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.1f}x"


# --- markdown ----------------------------------------------------------------------------------
#: the baselines speed-ups are taken against: (runtime, key in a runtime's report, what it is)
BASELINES = (("naive-paper", "speedup_vs_naive_paper", "issue 15's naive pipeline: paper 000 done naively"),
             ("naive", "speedup_vs_naive", "the light naive baseline: the product's own models in PyTorch eager"))
#: below this many calls a p95 is an interpolation between the slowest calls, not a tail estimate
FEW_CALLS = 20


def _default(series: Dict[str, Any]) -> Optional[str]:
    return (series.get("goal") or {}).get("default_runtime")


def _name(n: str, series: Dict[str, Any]) -> str:
    return f"{n} (CPU default)" if n == _default(series) else n


def _baselines(ok: Dict[str, Dict[str, Any]]) -> List[tuple]:
    return [b for b in BASELINES if b[0] in ok]


def percentile_note(series: Dict[str, Any]) -> str:
    """How many calls the percentiles are over, and what a p95 of few calls means."""
    ns = sorted({int(r["warm"]["total"].get("n") or 0) for r in _ok(series).values()})
    n = ns[0] if len(ns) == 1 else None
    text = (f"p50 / p95 over {n} measured call{'s' if n != 1 else ''} per runtime"
            if n is not None else f"p50 / p95 over {'/'.join(map(str, ns))} measured calls")
    if min(ns or [0]) < FEW_CALLS:
        text += (f" (NumPy's linear percentile): with fewer than {FEW_CALLS} calls the p95 is interpolated between the "
                 "slowest calls (with 1 call it equals the p50), so read it as 'about the slowest seen', not as a tail "
                 "latency; run --repeat 20 or more for a tail")
    return text + ". Stage p50s need not add up to the total p50: each row is the median of its own column."


def stage_table(series: Dict[str, Any]) -> str:
    """Warm per-stage p50 / p95 (ms) per runtime, with the total and the speed-up over each naive
    baseline that ran."""
    ok = _ok(series)
    names = list(ok)
    head = "| stage | " + " | ".join(f"{_name(n, series)} p50 / p95 (ms)" for n in names) + " |"
    sep = "|---|" + "---:|" * len(names)
    rows = [head, sep]
    stages = list(STAGES) + (["other"] if any("other" in ok[n]["warm"] for n in names) else [])
    for s in stages + ["total"]:
        cells = []
        for n in names:
            st = ok[n]["warm"].get(s)
            cells.append("-" if st is None else f"{_fmt(st['p50'], 1)} / {_fmt(st['p95'], 1)}")
        label = f"**{STAGE_LABELS.get(s, s)}**" if s == "total" else STAGE_LABELS.get(s, s)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    for base, key, _ in _baselines(ok) or [("naive", "speedup_vs_naive", "")]:
        rows.append(f"| **speed-up vs {base} (p50 total)** | " + " | ".join(
            "1.0x (baseline)" if n == base else _x((ok[n].get(key) or {}).get("total_p50")) for n in names) + " |")
    return "\n".join(rows)


def speedup_table(series: Dict[str, Any]) -> str:
    """Per-stage speed-up of each runtime over each naive baseline that ran (p50 / p50)."""
    ok = _ok(series)
    out: List[str] = []
    for base, key, what in _baselines(ok):
        have = {k: v for k, v in ok.items() if v.get(key)}
        if not have:
            continue
        names = list(have)
        rows = [f"Against **{base}** ({what}):", "",
                "| stage | " + " | ".join(_name(n, series) for n in names) + " |", "|---|" + "---:|" * len(names)]
        for s in STAGES:
            rows.append(f"| {STAGE_LABELS[s]} | " + " | ".join(_x(have[n][key]["stages_p50"].get(s)) for n in names) + " |")
        rows.append("| **total (warm p50)** | " + " | ".join(_x(have[n][key]["total_p50"]) for n in names) + " |")
        rows.append("| cold (setup + first call) | " + " | ".join(_x(have[n][key]["cold"]) for n in names) + " |")
        out.append("\n".join(rows))
    if not out:
        return "_no naive baseline in this run (add naive-paper, issue 15's reference, or naive to --runtimes), so no speed-ups._"
    return "\n\n".join(out)


def cold_memory_table(series: Dict[str, Any]) -> str:
    """Cold start (fresh process and in-process) and memory per runtime."""
    ok = _ok(series)
    rows = ["| runtime | cold, fresh process (ms) | of which setup (ms) | peak RSS alone, fresh process (MiB) | "
            "cold in the bench process (ms) | warm p50 (ms) | call's own RSS growth, warm (MiB) | process peak RSS (MiB) | GPU peak (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in ok.items():
        c, m = r["cold"], r["memory"]
        f = c.get("fresh_process") or {}
        fresh = (_fmt(f.get("total_ms")), _fmt(f.get("setup_ms")), _fmt(f.get("max_rss_mb"))) if "total_ms" in f else \
            ((f"error: {f['error'][:60]}" if f.get("error") else "-"), "-", "-")
        rows.append(f"| {n} | {fresh[0]} | {fresh[1]} | {fresh[2]} | {_fmt(c['total_ms'])} | "
                    f"{_fmt(r['warm']['total']['p50'])} | {_fmt(m['delta_rss_mb'])} | "
                    f"{_fmt(max(m['peak_rss_mb'], c.get('peak_rss_mb') or 0))} | {_fmt(m.get('gpu_peak_mb'))} |")
    rows += ["", "The process peak RSS is the bench process's, with every runtime of the run loaded (so about the same "
             "for all of them), not one runtime's footprint; a runtime's own peak is the fresh-process column (what "
             "the goal uses)."]
    return "\n".join(rows)


def cpu_table(series: Dict[str, Any]) -> str:
    """Process CPU per warm call, cores busy and the packing floor per runtime."""
    ok = {n: r for n, r in _ok(series).items() if r.get("cpu")}
    if not ok:
        return "_not measured in this report._"
    rows = ["| runtime | warm p50 wall (ms) | process CPU per call, p50 (ms) | cores busy, p50 | floor: CPU / usable cores (ms) |",
            "|---|---:|---:|---:|---:|"]
    for n, r in ok.items():
        c = r["cpu"]
        rows.append(f"| {_name(n, series)} | {_fmt(r['warm']['total']['p50'])} | {_fmt(c['per_call_p50_ms'])} | "
                    f"{c['cores_busy_p50']:.2f} of {c['cores']:.0f} | {_fmt(c['floor_ms'])} |")
    rows += ["", "CPU time is the whole bench process's (every thread) around each measured call. The floor is that work "
             "spread perfectly over the usable cores: a scheduling change cannot take a call below it, only less work "
             "(fewer or cheaper operations) can."]
    return "\n".join(rows)


def throughput_table(series: Dict[str, Any], batch_sizes: Sequence[int], batch_repeat: Optional[int] = None) -> str:
    """Series per minute at each classifier batch size."""
    if not batch_sizes:
        return "_not measured (--batch-sizes none)._"
    ok = _ok(series)
    rows = ["| runtime | " + " | ".join(f"batch {b}: series/min (total p50 ms)" for b in batch_sizes) + " |",
            "|---|" + "---:|" * len(batch_sizes)]
    defaults = []
    for n, r in ok.items():
        tp = r.get("throughput", {})
        cells = []
        for b in batch_sizes:
            t = tp.get(str(b))
            cells.append("-" if not t else f"{t['series_per_min']:.2f} ({_fmt(t['total_p50_ms'])})")
        rows.append(f"| {_name(n, series)} | " + " | ".join(cells) + " |")
        if r.get("default_batch") is not None:
            defaults.append(f"{n} {r['default_batch']}")
    calls = f"p50 of {batch_repeat} call{'s' if batch_repeat != 1 else ''} per cell" if batch_repeat else "p50 per cell"
    rows += ["", f"One series at a time, {calls} (series/min = 60,000 / total p50 ms); the naive baselines classify one "
             "slice at a time, so they have no batch column. The tables above ran each product runtime at its own "
             "default classifier batch" + (f" ({', '.join(defaults)})" if defaults else "") + "."]
    return "\n".join(rows)


def skipped_list(series: Dict[str, Any]) -> str:
    sk = {k: v for k, v in series["runtimes"].items() if v.get("status") != "ok"}
    if not sk:
        return "_none_"
    return "\n".join(f"- **{k}**" + (f" ({v['status']})" if v.get("status") not in (None, "skipped") else "")
                     + f": {v.get('reason', '')}" for k, v in sk.items())


#: a series' section keys (sdk.bench.harness.SECTIONS) as the reader knows them
SECTION_NAMES = {"cold": "cold starts in the bench process", "cold_fresh": "fresh-process cold starts",
                 "rounds": "measured rounds", "batches": "batch sizes", "scaling": "scaling"}


def interrupted_text(report: Dict[str, Any]) -> Optional[str]:
    """The first lines of an interrupted run's report (None for a complete run)."""
    intr = report.get("interrupted")
    if not intr:
        return None
    text = (f"Interrupted during {intr.get('at')}: partial results; percentiles are over the calls completed (the "
            f"call in flight was dropped), and the goal is not judged. Stopped by {intr.get('signal')}.")
    if intr.get("series_not_run"):
        text += " Series not run: " + ", ".join(f"`{p}`" for p in intr["series_not_run"]) + "."
    return text


def unfinished_text(series: Dict[str, Any]) -> Optional[str]:
    """Which sections of an interrupted series did not finish (None when all did)."""
    left = series.get("unfinished")
    if not left:
        return None
    return ("Unfinished when the run was interrupted: " + ", ".join(SECTION_NAMES.get(s, s) for s in left)
            + "; their tables hold the calls that finished, or nothing.")


def scaling_points(pts: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One point per slice count: the p50 of its calls' totals, the largest RSS figures, the
    number of calls; a count whose every call failed keeps the first error."""
    from .stats import percentile

    counts: Dict[int, List[Dict[str, Any]]] = {}
    for q in pts:
        counts.setdefault(int(q["n_slices"]), []).append(q)
    out = []
    for c in sorted(counts):
        good = [q for q in counts[c] if "error" not in q]
        if not good:
            out.append({"n_slices": c, "error": counts[c][0]["error"]})
            continue
        out.append({"n_slices": c, "n": len(good), "total_ms": percentile([q["total_ms"] for q in good], 50.0),
                    "delta_rss_mb": max(q["delta_rss_mb"] for q in good),
                    "peak_rss_mb": max(q["peak_rss_mb"] for q in good)})
    return out


def scaling_table(scaling: Dict[str, Any]) -> str:
    """One row per slice count: total latency (p50 of the calls at that count), the call's RSS
    growth and the process peak RSS per runtime."""
    counts = scaling["slice_counts"]
    rts = {n: scaling_points(pts) for n, pts in scaling["runtimes"].items()}
    names = list(rts)
    reps = scaling.get("repeat") or 1
    total = "total (ms)" if reps == 1 else f"total p50 of {reps} (ms)"
    head = "| slices | " + " | ".join(f"{n}: {total} | {n}: RSS growth / process peak (MiB)" for n in names) + " |"
    rows = [head, "|---:|" + "---:|---:|" * len(names)]
    for c in counts:
        cells = []
        for n in names:
            p = next((q for q in rts[n] if q["n_slices"] == c), None)
            if p is None:
                cells += ["-", "-"]
            elif "error" in p:
                cells += [f"error: {p['error'][:60]}", "-"]
            else:
                cells += [_fmt(p["total_ms"]), f"{_fmt(p['delta_rss_mb'])} / {_fmt(p['peak_rss_mb'])}"]
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def runtime_text(rt: Dict[str, Any]) -> str:
    """``onnxruntime CPUExecutionProvider fp32 on cpu`` from a runtime dict."""
    return " ".join(str(rt.get(k, "")) for k in ("backend", "provider", "precision")).strip() + f" on {rt.get('device', '?')}"


def _one_verdict(name: str, v: Dict[str, Any], goal: Dict[str, Any]) -> str:
    sp, ref = v.get("speedup"), v.get("naive_reference")
    if sp is None:
        speed = "speed-up not measured (no naive baseline ran: add naive-paper to --runtimes)"
    else:
        speed = (f"speed-up over {ref} **{_x(sp)}** ({'meets' if v['fast_enough'] else 'misses'} the "
                 f"{goal['target_speedup']:.0f}x target)")
        if ref == "naive":
            speed += " - against the light baseline; issue 15's reference is naive-paper (add it to --runtimes)"
    parts = [f"warm p50 total **{v['total_p50_ms']:,.0f} ms** ({'under' if v['under_time'] else 'over'} the "
             f"{goal['target_total_ms']:,.0f} ms target" + (f"; {v['n_calls']} call{'s' if v['n_calls'] != 1 else ''})" if v.get("n_calls") else ")"), speed]
    if goal.get("target_peak_rss_mb") is not None:
        rss = v.get("peak_rss_mb")
        parts.append("fresh-process peak RSS not measured (--no-cold-fresh)" if rss is None else
                     f"fresh-process peak RSS **{rss:,.0f} MiB** ({'within' if v['small_enough'] else 'over'} "
                     f"the {goal['target_peak_rss_mb']:,.0f} MiB target)")
    parts.append(f"dominant stage: **{STAGE_LABELS.get(v.get('dominant_stage') or '', v.get('dominant_stage'))}**")
    if v.get("floor_ms") is not None:
        # two decimals: 9.96 must not read as "10.0x" beside a 10x target
        best = f", at most {v['floor_speedup']:.2f}x the baseline" if v.get("floor_speedup") is not None else ""
        parts.append(f"process CPU {v['cpu_p50_ms']:,.0f} ms per call ({v['cores_busy']:.2f} of {v['cores']} cores busy): "
                     f"with perfect packing {v['floor_ms']:,.0f} ms{best}")
    if v.get("met"):
        verdict = "**met**"
    elif not goal.get("comparable", True):
        verdict = "**not met** (the runtimes' results are not comparable; see the warnings)"
    elif v.get("fast_enough") is None and v.get("under_time") and v.get("small_enough") is not False:
        verdict = "**not assessed** (no speed-up without a naive baseline)"
    else:
        verdict = "**not met**"
    return f"**{name}**: " + "; ".join(parts) + f". Goal {verdict}."


def goal_text(goal: Dict[str, Any]) -> str:
    """The goal block: the product's CPU default first, then the fastest CPU runtime if it is another.
    A goal that is not judged (an interrupted run, :func:`sdk.bench.harness.goal_not_judged`) says
    so and gives no verdict."""
    if goal.get("judged") is False:
        return (f"Goal {goal.get('status', 'not judged')}: the numbers are partial, so no verdict (met or not) "
                "is given; rerun the bench to the end to judge it.")
    if "best_runtime" not in goal:
        return f"Goal not assessed: {goal.get('status', 'no CPU runtime ran')}."
    by = goal.get("by_runtime") or {goal["best_runtime"]: goal}
    default, best = goal.get("default_runtime"), goal["best_runtime"]
    lines = []
    if goal.get("source_kind") == "phantom":
        lines.append("(A synthetic phantom: issue 15's targets are for covid-P001, 148 slices, on 2 cores; the verdicts "
                     "below only apply the thresholds to this run.)")
    if default in by:
        lines.append("Product CPU default (`Triage(device=\"cpu\")`, precision auto) - " + _one_verdict(default, by[default], goal))
    elif default:
        lines.append(f"The product's CPU default, {default}, did not run here, so the default is not assessed.")
    if best != default:
        lines.append("Fastest CPU runtime" + (" (not the default)" if default else "") + " - " + _one_verdict(best, by[best], goal))
    return "\n\n".join(lines)


def machine_text(m: Dict[str, Any]) -> str:
    gpus = ", ".join(f"{g['name']} ({_fmt(g.get('memory_mb'))} MiB, driver {g.get('driver')})" for g in m.get("gpus", [])) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in sorted(m.get("libraries", {}).items()))
    return (f"- CPU: {m['cpu_model']} ({m.get('usable_cores')} usable cores, {m.get('physical_cores')} physical, "
            f"flags {' '.join(m.get('cpu_flags', [])) or '-'}), RAM {m['ram_gb']} GiB\n"
            f"- GPU: {gpus}\n- OS: {m['os']}, Python {m['python']}\n- libraries: {libs}"
            + (f"\n- thread variables: {', '.join(f'{k}={v}' for k, v in m['threads_env'].items())}" if m.get("threads_env") else ""))


def load_text(load: Dict[str, Any]) -> str:
    def one(d: Dict[str, Any]) -> str:
        busy = ", ".join(f"{p['name']} ({p['cpu_percent']:.0f}% CPU)" for p in d.get("busy_processes", [])) or "none above 5% CPU"
        return f"load average {d.get('loadavg_1_5_15')}; other busy processes: {busy}"
    return f"- before: {one(load.get('before', {}))}\n- after: {one(load.get('after', {}))}"


def to_markdown(report: Dict[str, Any], charts: Optional[Dict[str, str]] = None) -> str:
    """The whole report as markdown (charts referenced by relative path when given)."""
    charts = charts or {}
    cfg = report["config"]
    out: List[str] = [f"# ctsdk bench - {report['started_utc']}", ""]
    intr = interrupted_text(report)
    if intr:
        out += [f"**{intr}**", ""]
    if report.get("command"):
        out += ["Command:", "", "```", report["command"], "```", ""]
    planned = " planned (see above: the run was interrupted)" if intr else ""
    out += [f"Schema `{report['schema']}`; {cfg['repeat']} measured calls per runtime{planned} after {cfg['warmup']} warm-up call(s), "
            f"runtimes interleaved round-robin in one process; wall time of the whole bench {report['wall_s']:.0f} s.", "",
            "## Machine", "", machine_text(report["machine"]), "", "Machine load during the run:", "", load_text(report["load"]), ""]
    threads = cfg.get("threads")
    out += ["Threads: " + (f"`--threads {threads}`: every ORT session and torch on {threads} intra-op thread(s), the "
                            "product one batch at a time (not its default lanes)" if threads else
                            "each library's default (`--threads` not given): the product runs its CPU sessions in "
                            "lanes, one per usable core (see What ran); torch its own default") + ".", ""]
    b = report.get("bundle") or {}
    if b.get("name"):
        files = ", ".join(f"{v['path']} ({v['sha256']})" for v in b.get("files", {}).values())
        out += [f"Bundle: {b['name']} {b['version']} ({b['root']}): {files}; INT8 calibration passed: "
                f"{b.get('int8_calibration_passed')}.", ""]
    d = report.get("product_default_cpu") or {}
    if d.get("runtime"):
        out += [f"Product CPU default with this bundle (`Triage(device=\"cpu\")`, precision auto): **{d['runtime']}** "
                f"({d.get('reason')}).", ""]
    for i, s in enumerate(report["series"]):
        src = s["source"]
        title = src.get("path", "phantom")
        n_series = src.get("n_series") or 1
        out += [f"## Series {i + 1}: `{title}`", "",
                f"{src.get('n_files', '?')} files"
                + (f" holding {n_series} series (described: the one the product chose)" if n_series > 1 else "")
                + f", {src.get('rows', '?')}x{src.get('columns', '?')}, "
                f"{src.get('transfer_syntax_name') or src.get('transfer_syntax', '?')}, "
                f"{(src.get('bytes') or 0) / 2**20:.1f} MiB on disk ({src.get('kind', 'dicom')}).", "",
                "### Goal", "", goal_text(s["goal"]), ""]
        left = unfinished_text(s)
        if left:
            out += [f"**{left}**", ""]
        if s.get("warnings"):
            out += ["**Warnings:**", ""] + [f"- {w}" for w in s["warnings"]] + [""]
        ok = _ok(s)
        if ok:
            out += ["### Warm per-stage latency", "", stage_table(s), "", percentile_note(s), ""]
            if f"stages_{i}" in charts:
                out += [f"![per-stage latency]({charts[f'stages_{i}']})", ""]
            out += ["### Speed-up over the naive baselines", "", speedup_table(s), "",
                    "### Cold start and memory", "", cold_memory_table(s), "",
                    "### CPU use", "", cpu_table(s), "",
                    "### Throughput by classifier batch size", "",
                    throughput_table(s, cfg["batch_sizes"], cfg.get("batch_repeat")), ""]
        else:
            out += ["_No runtime finished a measured call before the run was interrupted: no warm numbers._", ""]
        out += ["### Skipped runtimes", "", skipped_list(s), ""]
        out += ["### What ran", ""]
        for n, r in ok.items():
            rt = r.get("runtime") or {}
            bits = [runtime_text(rt)]
            if rt.get("cpu_lanes"):
                bits.append(f"CPU lanes {rt['cpu_lanes']}")
            if isinstance(rt.get("stages"), dict) and rt["stages"]:
                bits.append(", ".join(f"{k} {v}" for k, v in rt["stages"].items()))
            if r.get("default_batch") is not None:
                bits.append(f"classifier batch {r['default_batch']}")
            if r.get("torch_threads"):
                bits.append(f"torch threads {r['torch_threads']}")
            for key in ("classifier", "segmenter", "aggregator"):
                val = r.get(key)
                if isinstance(val, dict):
                    val = ", ".join(f"{k} {v}" for k, v in val.items())
                if val:
                    bits.append(f"{key}: {val}")
            res = r.get("result", {})
            bits.append(f"label {res.get('label')}, {res.get('n_classified')} of {res.get('n_slices')} slices classified")
            out.append(f"- **{_name(n, s)}**: " + "; ".join(str(b) for b in bits))
        out.append("")
        if s.get("scaling"):
            out += ["### Scaling with slice count", "", s["scaling"]["method"] + ".", "", scaling_table(s["scaling"]), ""]
            if "scaling" in charts:
                out += [f"![scaling]({charts['scaling']})", ""]
    return "\n".join(out)


# --- charts ------------------------------------------------------------------------------------
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_chart(series: Dict[str, Any], path: PathLike) -> Path:
    """Stacked per-stage bars (warm p50) per runtime, a tick at each runtime's total p50, and a
    second panel without the naive baselines (zoom) when any ran."""
    plt = _plt()
    ok = _ok(series)
    names = list(ok)
    naive = {n for n in names if n.startswith("naive")}
    panels = [names]
    if naive and len(naive) < len(names):
        panels.append([n for n in names if n not in naive])
    phantom = series.get("source", {}).get("kind") == "phantom"
    target_s = (series.get("goal") or {}).get("target_total_ms")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 0.6 * len(names) + 2.8), squeeze=False)
    stages = list(STAGES) + ["other"]
    for ax, group in zip(axes[0], panels):
        left = [0.0] * len(group)
        for s in stages:
            vals = [ok[n]["warm"].get(s, {}).get("p50", 0.0) / 1000.0 for n in group]
            if not any(vals):
                continue
            ax.barh(group, vals, left=left, color=STAGE_COLOURS[s], label=STAGE_LABELS[s], edgecolor="white", linewidth=0.4)
            left = [a + b for a, b in zip(left, vals)]
        totals = [ok[n]["warm"]["total"]["p50"] / 1000.0 for n in group]
        ax.plot(totals, range(len(group)), linestyle="none", marker="|", markersize=18, markeredgewidth=2, color="black",
                label="total p50 (wall)")
        for y, (end, tot) in enumerate(zip(left, totals)):
            ax.text(max(end, tot), y, f"   {tot:.2f} s", va="center", fontsize=8)
        right = max(left + totals) if group else 0.0
        if target_s and not phantom and (group is not panels[0] or len(panels) == 1):
            ax.axvline(target_s / 1000.0, color="black", linestyle="--", linewidth=0.8)
            ax.text(target_s / 1000.0, -0.6, f" {target_s / 1000:.1f} s goal", fontsize=7, va="bottom")
            right = max(right, target_s / 1000.0)
        ax.set_xlabel("warm p50 latency per series (s)")
        ax.set_yticks(range(len(group)), [_name(n, series).replace(" (", "\n(") for n in group])
        ax.invert_yaxis()
        ax.set_xlim(0, right * 1.25 if right > 0 else 1)
        if len(panels) > 1:
            ax.set_title("all runtimes" if group is panels[0] else "product runtimes only (zoom)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    order = [i for i, lb in enumerate(labels) if not lb.startswith("total")] + [i for i, lb in enumerate(labels) if lb.startswith("total")]
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    ns = sorted({int(ok[n]["warm"]["total"].get("n") or 0) for n in names})
    calls = "/".join(map(str, ns))
    fig.suptitle(f"ctsdk bench: {Path(series['source'].get('path', 'phantom')).name}\nwarm p50 per stage over "
                 f"{calls} measured call{'s' if ns != [1] else ''} per runtime; tick = total p50", fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 5 else 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_chart(scaling: Dict[str, Any], path: PathLike, title: Optional[str] = None) -> Path:
    """Total latency and memory (peak RSS and the call's RSS growth) vs slice count."""
    plt = _plt()
    from matplotlib.lines import Line2D

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for i, (name, pts) in enumerate(scaling["runtimes"].items()):
        good = [p for p in scaling_points(pts) if "error" not in p]
        if not good:
            continue
        colour = colours[i % len(colours)]  # by position in the run, so both panels agree
        xs = [p["n_slices"] for p in good]
        a1.plot(xs, [p["total_ms"] / 1000.0 for p in good], marker="o", color=colour, label=name)
        a2.plot(xs, [p["delta_rss_mb"] for p in good], marker="o", color=colour)
        a2.plot(xs, [p["peak_rss_mb"] for p in good], marker="x", linestyle="--", color=colour)
    a1.set_xlabel("slices in the series")
    a1.set_ylabel("total latency (s)")
    a1.set_ylim(bottom=0)
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=8, title="runtime", title_fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=min(4, max(1, len(scaling["runtimes"]))), frameon=False)
    a1.set_title("latency vs slice count")
    a2.set_xlabel("slices in the series")
    a2.set_ylabel("RSS (MiB)")
    a2.set_ylim(bottom=0)
    a2.grid(True, alpha=0.3)
    a2.legend(handles=[Line2D([], [], color="grey", marker="o", label="the call's own RSS growth"),
                       Line2D([], [], color="grey", marker="x", linestyle="--",
                              label="process peak RSS (every runtime loaded)")],
              fontsize=8, title="colour = runtime, as left", title_fontsize=8, loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    a2.set_title("memory vs slice count")
    reps = scaling.get("repeat")
    fig.suptitle((title or "ctsdk bench: scaling") + " - the series z-resampled and written uncompressed, "
                 + (f"{reps} call(s) per point" if reps else "one call per point per runtime"), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: Dict[str, Any], out_dir: PathLike) -> Dict[str, str]:
    """Write ``bench.json``, ``bench.md`` and the PNG charts into ``out_dir``; returns their paths.

    The markdown references the charts by file name, so the folder can move as a whole.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts: Dict[str, str] = {}
    for i, s in enumerate(report["series"]):
        if _ok(s):
            p = stage_chart(s, out / f"stages_{i}.png")
            charts[f"stages_{i}"] = p.name
        if s.get("scaling") and any(s["scaling"]["runtimes"].values()):
            p = scaling_chart(s["scaling"], out / "scaling.png",
                              title=f"ctsdk bench: {Path(s['source'].get('path', 'phantom')).name}")
            charts["scaling"] = p.name
    paths = {"json": str(out / "bench.json"), "markdown": str(out / "bench.md"),
             "charts": [str(out / c) for c in charts.values()]}
    report["outputs"] = paths
    _write_atomic(out / "bench.md", to_markdown(report, charts) + "\n")
    _write_atomic(out / "bench.json", json.dumps(report, indent=1) + "\n")
    return paths


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a reader
    (or a run killed mid-write) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # open(): the usual permissions, as the file had
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


__all__ = ["to_markdown", "stage_table", "speedup_table", "cold_memory_table", "throughput_table", "scaling_table",
           "stage_chart", "scaling_chart", "write_outputs", "goal_text", "runtime_text", "percentile_note",
           "scaling_points", "interrupted_text", "unfinished_text"]
