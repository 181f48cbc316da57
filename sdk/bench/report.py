"""Turn a bench report dict into markdown tables and PNG charts (matplotlib, Agg backend)."""
from __future__ import annotations

import json
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
def stage_table(series: Dict[str, Any]) -> str:
    """Warm per-stage p50 / p95 (ms) per runtime, with the total and the speed-up over naive."""
    ok = _ok(series)
    names = list(ok)
    head = "| stage | " + " | ".join(f"{n} p50 / p95 (ms)" for n in names) + " |"
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
    rows.append("| **speed-up vs naive (p50 total)** | " + " | ".join(
        "1.0x (baseline)" if n == "naive" else _x((ok[n].get("speedup_vs_naive") or {}).get("total_p50")) for n in names) + " |")
    return "\n".join(rows)


def speedup_table(series: Dict[str, Any]) -> str:
    """Per-stage speed-up of each runtime over the naive baseline (p50 / p50)."""
    ok = {k: v for k, v in _ok(series).items() if v.get("speedup_vs_naive")}
    if not ok:
        return "_no naive baseline in this run, so no speed-ups._"
    names = list(ok)
    rows = ["| stage | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for s in STAGES:
        rows.append(f"| {STAGE_LABELS[s]} | " + " | ".join(_x(ok[n]["speedup_vs_naive"]["stages_p50"].get(s)) for n in names) + " |")
    rows.append("| **total (warm p50)** | " + " | ".join(_x(ok[n]["speedup_vs_naive"]["total_p50"]) for n in names) + " |")
    rows.append("| cold (setup + first call) | " + " | ".join(_x(ok[n]["speedup_vs_naive"]["cold"]) for n in names) + " |")
    return "\n".join(rows)


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
    return "\n".join(rows)


def throughput_table(series: Dict[str, Any], batch_sizes: Sequence[int]) -> str:
    """Series per minute at each classifier batch size."""
    ok = _ok(series)
    rows = ["| runtime | " + " | ".join(f"batch {b}: series/min (total p50 ms)" for b in batch_sizes) + " |",
            "|---|" + "---:|" * len(batch_sizes)]
    for n, r in ok.items():
        tp = r.get("throughput", {})
        cells = []
        for b in batch_sizes:
            t = tp.get(str(b))
            cells.append("-" if not t else f"{t['series_per_min']:.2f} ({_fmt(t['total_p50_ms'])})")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def skipped_list(series: Dict[str, Any]) -> str:
    sk = {k: v for k, v in series["runtimes"].items() if v.get("status") != "ok"}
    if not sk:
        return "_none_"
    return "\n".join(f"- **{k}**: {v.get('reason', '')}" for k, v in sk.items())


def scaling_table(scaling: Dict[str, Any]) -> str:
    """One row per slice count: total latency, the call's RSS growth and the process peak RSS per runtime."""
    counts = scaling["slice_counts"]
    rts = scaling["runtimes"]
    names = list(rts)
    head = "| slices | " + " | ".join(f"{n}: total (ms) | {n}: RSS growth / peak (MiB)" for n in names) + " |"
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


def goal_text(goal: Dict[str, Any]) -> str:
    if "best_runtime" not in goal:
        return f"Goal not assessed: {goal.get('status', 'no CPU runtime ran')}."
    sp = goal.get("speedup")
    parts = [
        f"Fastest CPU runtime: **{goal['best_runtime']}**, warm p50 total **{goal['total_p50_ms']:,.0f} ms** "
        f"({'under' if goal['under_time'] else 'over'} the {goal['target_total_ms']:,.0f} ms target)",
        f"speed-up over the naive baseline **{_x(sp)}** "
        + ("(no naive baseline ran)" if sp is None else f"({'meets' if goal['fast_enough'] else 'misses'} the {goal['target_speedup']:.0f}x target)"),
        f"dominant stage: **{STAGE_LABELS.get(goal.get('dominant_stage') or '', goal.get('dominant_stage'))}**",
    ]
    if goal.get("target_peak_rss_mb") is not None:
        rss = goal.get("peak_rss_mb")
        parts.insert(2, "fresh-process peak RSS not measured (--no-cold-fresh)" if rss is None else
                     f"fresh-process peak RSS **{rss:,.0f} MiB** ({'within' if goal['small_enough'] else 'over'} "
                     f"the {goal['target_peak_rss_mb']:,.0f} MiB target)")
    verdict = "**met**" if goal.get("met") else "**not met**"
    if not goal.get("comparable", True):
        verdict += " (runtimes did not do the same work; see the warnings)"
    return "; ".join(parts) + f". Goal {verdict}."


def machine_text(m: Dict[str, Any]) -> str:
    gpus = ", ".join(f"{g['name']} ({_fmt(g.get('memory_mb'))} MiB, driver {g.get('driver')})" for g in m.get("gpus", [])) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in sorted(m.get("libraries", {}).items()))
    return (f"- CPU: {m['cpu_model']} ({m.get('usable_cores')} usable cores, {m.get('physical_cores')} physical, "
            f"flags {' '.join(m.get('cpu_flags', [])) or '-'}), RAM {m['ram_gb']} GiB\n"
            f"- GPU: {gpus}\n- OS: {m['os']}, Python {m['python']}\n- libraries: {libs}")


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
    if report.get("command"):
        out += ["Command:", "", "```", report["command"], "```", ""]
    out += [f"Schema `{report['schema']}`; {cfg['repeat']} measured calls per runtime after {cfg['warmup']} warm-up call(s), "
            f"runtimes interleaved round-robin in one process; wall time of the whole bench {report['wall_s']:.0f} s.", "",
            "## Machine", "", machine_text(report["machine"]), "", "Machine load during the run:", "", load_text(report["load"]), ""]
    b = report.get("bundle") or {}
    if b.get("name"):
        files = ", ".join(f"{v['path']} ({v['sha256']})" for v in b.get("files", {}).values())
        out += [f"Bundle: {b['name']} {b['version']} ({b['root']}): {files}; INT8 calibration passed: "
                f"{b.get('int8_calibration_passed')}.", ""]
    for i, s in enumerate(report["series"]):
        src = s["source"]
        title = src.get("path", "phantom")
        out += [f"## Series {i + 1}: `{title}`", "",
                f"{src.get('n_files', '?')} files, {src.get('rows', '?')}x{src.get('columns', '?')}, "
                f"{src.get('transfer_syntax_name') or src.get('transfer_syntax', '?')}, "
                f"{(src.get('bytes') or 0) / 2**20:.1f} MiB on disk ({src.get('kind', 'dicom')}).", "",
                "### Goal", "", goal_text(s["goal"]), ""]
        if s.get("warnings"):
            out += ["**Warnings:**", ""] + [f"- {w}" for w in s["warnings"]] + [""]
        out += [
                "### Warm per-stage latency", "", stage_table(s), ""]
        if f"stages_{i}" in charts:
            out += [f"![per-stage latency]({charts[f'stages_{i}']})", ""]
        out += ["### Speed-up over the naive baseline", "", speedup_table(s), "",
                "### Cold start and memory", "", cold_memory_table(s), "",
                "### Throughput by classifier batch size", "", throughput_table(s, cfg["batch_sizes"]), "",
                "### Skipped runtimes", "", skipped_list(s), ""]
        ok = _ok(s)
        out += ["### What ran", ""]
        for n, r in ok.items():
            bits = [runtime_text(r.get("runtime") or {})]
            for key in ("classifier", "segmenter", "aggregator"):
                val = r.get(key)
                if isinstance(val, dict):
                    val = ", ".join(f"{k} {v}" for k, v in val.items())
                if val:
                    bits.append(f"{key}: {val}")
            res = r.get("result", {})
            bits.append(f"label {res.get('label')}, {res.get('n_classified')} of {res.get('n_slices')} slices classified")
            out.append(f"- **{n}**: " + "; ".join(str(b) for b in bits))
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
    """Stacked per-stage bars (warm p50) per runtime; a second panel without the naive baseline."""
    plt = _plt()
    ok = _ok(series)
    names = list(ok)
    panels = [names]
    if "naive" in names and len(names) > 1:
        panels.append([n for n in names if n != "naive"])
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
        for y, n in enumerate(group):
            ax.text(left[y], y, f"  {ok[n]['warm']['total']['p50'] / 1000:.2f} s", va="center", fontsize=8)
        ax.set_xlabel("warm p50 latency per series (s)")
        ax.invert_yaxis()
        ax.set_xlim(0, max(left) * 1.25 if max(left) > 0 else 1)
        ax.set_title("all runtimes" if group is panels[0] else "product runtimes only (zoom)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    fig.suptitle(f"ctsdk bench: {Path(series['source'].get('path', 'phantom')).name} (warm p50 per stage)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if len(labels) > 5 else 0.08, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_chart(scaling: Dict[str, Any], path: PathLike) -> Path:
    """Total latency and memory (peak RSS and the call's RSS growth) vs slice count."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, pts in scaling["runtimes"].items():
        good = sorted((p for p in pts if "error" not in p), key=lambda p: p["n_slices"])
        if not good:
            continue
        xs = [p["n_slices"] for p in good]
        a1.plot(xs, [p["total_ms"] / 1000.0 for p in good], marker="o", label=name)
        line, = a2.plot(xs, [p["delta_rss_mb"] for p in good], marker="o", label=f"{name}: call's RSS growth")
        a2.plot(xs, [p["peak_rss_mb"] for p in good], marker="x", linestyle="--", color=line.get_color(), label=f"{name}: process peak RSS")
    a1.set_xlabel("slices in the series")
    a1.set_ylabel("total latency (s)")
    a1.set_ylim(bottom=0)
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=8)
    a1.set_title("latency vs slice count")
    a2.set_xlabel("slices in the series")
    a2.set_ylabel("MiB")
    a2.grid(True, alpha=0.3)
    a2.legend(fontsize=7)
    a2.set_title("memory vs slice count")
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
            p = scaling_chart(s["scaling"], out / "scaling.png")
            charts["scaling"] = p.name
    paths = {"json": str(out / "bench.json"), "markdown": str(out / "bench.md"),
             "charts": [str(out / c) for c in charts.values()]}
    report["outputs"] = paths
    (out / "bench.md").write_text(to_markdown(report, charts) + "\n")
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    return paths


__all__ = ["to_markdown", "stage_table", "speedup_table", "cold_memory_table", "throughput_table", "scaling_table",
           "stage_chart", "scaling_chart", "write_outputs", "goal_text", "runtime_text"]
