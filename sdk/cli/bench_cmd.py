"""``ctsdk bench [SOURCE...]``: per-stage latency of every usable runtime against a naive baseline."""
from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import click

from ._common import THREADS, check_output_dir, emit, handle_errors, json_option

_RUNTIME_NAMES = "naive,ort-fp32,ort-int8,ort-cuda-fp16,trt-fp16,trt-int8"

EXAMPLES = """\b
Examples:
  ctsdk bench --runtimes ort-fp32,ort-int8 --repeat 3 --batch-sizes none --no-cold-fresh
  ctsdk bench ../shared/data/dicom/covid-ct-md/covid-P001 --out /tmp/ctsdk-bench
  ctsdk bench SERIES_DIR --runtimes naive,ort-fp32,trt-fp16 --scaling 64,150,300 --json
  ctsdk bench SERIES_DIR --runtimes naive-paper,ort-fp32,ort-int8 --out /tmp/ctsdk-bench-goal
  (no SOURCE: a synthetic phantom; SERIES_DIR: a folder of one CT series; the last line is issue
  15's goal run - naive-paper is its baseline; runtimes that cannot
  run here are reported as skipped with the reason)

\b
Ctrl-C (SIGINT) or SIGTERM stops the bench at once, dropping the call in flight and any
fresh-process cold start child, and still writes the report (--out, --json) with what finished:
"interrupted" at the top of bench.json, the first lines of bench.md, percentiles over the calls
completed, the goal not judged. Further signals are ignored while it is written.

\b
Exit codes: 0 the report was printed (skipped runtimes included); 2 bad arguments or an output
folder that cannot be written (one line on stderr); 130 interrupted by SIGINT, 143 by SIGTERM
(the partial report printed and written, one line on stderr)."""


def _ints(text: Optional[str], what: str) -> List[int]:
    from ..errors import ConfigError

    if text is None or not text.strip() or text.strip().lower() == "none":
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated integers (e.g. 1,8,32), got {text!r}") from exc


def _human(report: Dict[str, Any]) -> str:
    """Short terminal summary: per runtime warm p50 total, speed-ups, skipped reasons, warnings, goal."""
    from ..bench.report import BASELINES, FEW_CALLS, goal_text, interrupted_text, unfinished_text

    lines = []
    intr = interrupted_text(report)
    if intr:
        lines.append(intr)
    for s in report["series"]:
        lines.append(f"series {s['source'].get('path')}:")
        left = unfinished_text(s)
        if left:
            lines.append(f"  {left}")
        default = (s.get("goal") or {}).get("default_runtime")
        ran = {k for k, v in s["runtimes"].items() if v.get("status") == "ok"}
        few = False
        for name, r in s["runtimes"].items():
            label = f"{name}*" if name == default else name
            if r.get("status") != "ok":
                lines.append(f"  {label:14s} {r.get('status', 'skipped')}: {r.get('reason')}")
                continue
            w = r["warm"]["total"]
            few = few or int(w.get("n") or 0) < FEW_CALLS
            stages = ", ".join(f"{k} {v['p50']:.0f}" for k, v in r["warm"].items() if k != "total")
            fresh = r["cold"].get("fresh_process") or {}
            cold = fresh.get("total_ms") if fresh.get("total_ms") is not None else r["cold"]["total_ms"]
            rss = (f"fresh-process peak RSS {fresh['max_rss_mb']:.0f} MiB" if fresh.get("max_rss_mb") is not None else
                   f"bench-process peak RSS {r['memory']['peak_rss_mb']:.0f} MiB (all runtimes loaded)")
            speed = []
            for base, key, _ in BASELINES:
                if base == name:
                    speed.append("(baseline)")
                elif base in ran and (r.get(key) or {}).get("total_p50"):
                    speed.append(f"{r[key]['total_p50']:.1f}x vs {base}")
            lines.append(f"  {label:14s} p50 {w['p50']:8.0f} ms  p95 {w['p95']:8.0f} ms  (n={w.get('n')})  "
                         f"cold {cold:8.0f} ms  {rss}  " + ", ".join(speed))
            lines.append(f"  {'':14s} stages p50 (ms): {stages}")
        if default:
            lines.append("  * the product's CPU default (Triage(device='cpu'), precision auto)")
        if few:
            lines.append(f"  p95 of fewer than {FEW_CALLS} calls is about the slowest call seen, not a tail latency")
        for w in s.get("warnings") or []:
            lines.append(f"  warning: {w}")
        lines.append("  " + goal_text(s["goal"]).replace("**", "").replace("\n\n", "\n  "))
    if report.get("outputs"):
        lines.append(f"report: {report['outputs']['markdown']}")
    return "\n".join(lines)


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """For the bench command only: SIGINT and SIGTERM raise :class:`~sdk.bench.harness.BenchInterrupted`
    (SIGTERM would otherwise kill the process with nothing written), and once one has, both are
    ignored (:func:`_hold_signals`) so a second Ctrl-C cannot cut the partial report short. A signal
    the caller ignores stays ignored (a shell's background job ignores SIGINT); the previous handlers
    come back on exit. Outside the main thread (signals cannot be handled there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from ..bench.harness import BenchInterrupted

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(signum: int, frame: Any) -> None:
        _hold_signals()
        raise BenchInterrupted(signal.Signals(signum).name)

    try:
        for s, handler in previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(s, _on_signal)
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _hold_signals() -> None:
    """Ignore SIGINT and SIGTERM (until :func:`_interruptible` restores them): the report is being
    written, which takes a second or two."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


@click.command("bench", epilog=EXAMPLES)
@click.argument("sources", nargs=-1, type=click.Path(exists=True))
@click.option("--runtimes", default=_RUNTIME_NAMES, show_default=True,
              help="Comma-separated runtimes; those that cannot run here are listed as skipped with the reason. "
                   "Also naive-paper (issue 15's naive pipeline and the goal's reference; not in the default list: it "
                   "adds about 2 minutes on a 148-slice series).")
@click.option("--repeat", type=int, default=5, show_default=True, help="Measured calls per runtime (after warm-up).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Unrecorded calls per runtime after the cold call.")
@click.option("--batch-sizes", default="1,8,32", show_default=True, help="Classifier batch sizes for series/min ('none' to skip).")
@click.option("--batch-repeat", type=int, default=2, show_default=True, help="Calls per runtime and batch size.")
@click.option("--scaling", default="none", show_default=True,
              help="Slice counts for the scaling curve, e.g. 64,150,300,600 (made from the first SOURCE, or the phantom).")
@click.option("--scaling-repeat", type=int, default=1, show_default=True, help="Calls per runtime and slice count.")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model bundle folder (default: the bundle shipped in the package).")
@click.option("--threads", type=THREADS, default=None, help="Intra-op threads for ONNX Runtime and torch (default: each library's; the product then runs its CPU "
                   "sessions in lanes, one per core - given, one batch at a time on THREADS).")
@click.option("--phantom-slices", type=int, default=64, show_default=True, help="Slices of the default phantom (no SOURCE).")
@click.option("--phantom-size", type=int, default=256, show_default=True, help="Matrix of the default phantom (no SOURCE).")
@click.option("--cold-fresh/--no-cold-fresh", default=True, show_default=True,
              help="Also time each runtime's cold start (imports + setup + first call) in a fresh Python process.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write bench.json, bench.md and PNG charts into this folder.")
@click.option("--gpu-report", "gpu_report_dir", type=click.Path(file_okay=False), default=None,
              help="Instead: write the GPU report (python -m sdk.bench.gpu_report) into this folder; "
                   "SOURCE = the series, --repeat = rounds.")
@json_option
@handle_errors
def bench(sources: Tuple[str, ...], runtimes: str, repeat: int, warmup: int, batch_sizes: str, batch_repeat: int,
          scaling: str, scaling_repeat: int, bundle_path: Optional[str], threads: Optional[int], phantom_slices: int,
          phantom_size: int, cold_fresh: bool, out_dir: Optional[str], gpu_report_dir: Optional[str], as_json: bool) -> None:
    """Benchmark every usable runtime on SOURCE series (default: a synthetic phantom).

    Per-stage p50/p95 (decode, HU, eligibility, resample, lung segmentation, slice selection,
    classification, aggregation, total), cold and warm, peak memory, series/min at several
    classifier batch sizes, and the speed-up of each runtime over the naive PyTorch-eager
    baseline. All runtimes run in this one process, interleaved round-robin after warm-up.
    """
    check_output_dir(out_dir, "--out")  # before any runtime is timed: the report must be savable
    check_output_dir(gpu_report_dir, "--gpu-report")
    if gpu_report_dir:
        from pathlib import Path

        from ..bench.gpu_report import run_report

        rep = run_report(Path(gpu_report_dir), series=sources[0] if sources else None, rounds=max(1, repeat),
                         bundle=bundle_path, command="ctsdk " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        emit({"out": gpu_report_dir, "sections": {k: v.get("status") for k, v in rep["sections"].items()}}, as_json,
             lambda r: f"GPU report in {r['out']}: " + ", ".join(f"{k} {v}" for k, v in r["sections"].items()))
        return
    from ..bench import BenchConfig, parse_runtimes, run_bench, write_outputs

    cfg = BenchConfig(
        sources=list(sources), runtimes=parse_runtimes(runtimes), repeat=repeat, warmup=warmup,
        batch_sizes=_ints(batch_sizes, "--batch-sizes"), batch_repeat=batch_repeat,
        scaling=_ints(scaling, "--scaling"), scaling_repeat=scaling_repeat, bundle=bundle_path, threads=threads,
        phantom_slices=phantom_slices, phantom_size=phantom_size, cold_fresh=cold_fresh,
    )
    from ..bench.harness import BenchInterrupted

    progress = (lambda msg: click.echo(f"bench: {msg}", err=True))
    stopped: Optional[BenchInterrupted] = None
    with _interruptible():
        try:
            report = run_bench(cfg, progress=progress)
        except BenchInterrupted as exc:
            if exc.report is None:  # stopped before the run began: nothing measured, nothing to write
                click.echo(f"ctsdk: bench interrupted ({exc.signal_name}) before it started; nothing written", err=True)
                sys.exit(exc.exit_code)
            report, stopped = exc.report, exc
        _hold_signals()  # a complete or partial report is written whole, whatever is pressed meanwhile
        report["command"] = "ctsdk " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if "bench" in sys.argv[1:3] else None
        if out_dir:
            write_outputs(report, out_dir)
        emit(report, as_json, _human)
    if stopped is not None:
        where = report["outputs"]["json"] if out_dir else "stdout only (no --out)"
        click.echo(f"ctsdk: bench interrupted during {stopped.at}; partial report: {where}", err=True)
        sys.exit(stopped.exit_code)
