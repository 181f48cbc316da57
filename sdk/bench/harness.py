"""The benchmark: every usable runtime in one process, interleaved, against the naive baseline.

Order of work (one process, so ratios are fair on a noisy machine):

1. **cold** - for each runtime in turn: build it (session creation, bundle load and the
   product's own warm-up, under :class:`~sdk.bench.memory.PeakMemory`) and run the first series;
   ``cold_ms = setup_ms + first call``. A runtime that fails to build is *skipped* with the
   error's message (e.g. no GPU, no TensorRT, no INT8 model, INT8 asked but FP32 granted).
   With ``cold_fresh`` each runtime's cold start is also measured in a fresh Python process
   (:mod:`sdk.bench.cold`: imports included, independent of build order, isolated peak RSS).
2. **warm-up** - ``warmup`` more unrecorded calls per runtime.
3. **measured rounds** - ``repeat`` rounds; in each, every runtime triages the series once, the
   order rotating every round (round-robin), each call under PeakMemory and a process-CPU clock
   (cores busy, and the floor: that CPU over the usable cores). Per-stage p50/p95 come
   from these calls.
4. **batch sizes** - for each classifier batch size, round-robin again over the product
   runtimes (``batch_repeat`` calls each): series per minute = 60 000 / p50 total. The naive
   baseline is one slice at a time by definition (batch 1 only).
5. **scaling** - the source resampled along z to each slice count (:mod:`sdk.bench.scaling`),
   written as a temporary DICOM series, one call per runtime (round-robin), total latency and
   peak memory recorded; the temporary series is deleted afterwards.

**Interrupted runs.** A ``KeyboardInterrupt`` (Ctrl-C; ``ctsdk bench`` turns SIGTERM into one
too, :class:`BenchInterrupted`) stops the run where it is: the call in flight is dropped, every
runtime built so far is closed, and :func:`run_bench` raises :class:`BenchInterrupted` carrying
the partial report - the calls and sections that finished, ``"interrupted": {"at", "signal"}`` at
the top level, each unfinished series' ``"unfinished"`` sections, and every goal "not judged".
The phase the report names is :attr:`Bench.phase`, the one place that knows where the run is.
"""
from __future__ import annotations

import datetime as _dt
import gc
import logging
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, CtsdkError, SeriesError
from . import machine as machine_mod
from .memory import PeakMemory
from .pipelines import RUNTIMES, STAGES, Driver, TriageDriver, make_driver, precheck
from .stats import cpu_use, dominant, series_per_minute, speedup, summarize, summarize_stages

log = logging.getLogger("sdk.bench")

SCHEMA = "ctsdk.bench/1"
#: the goal the CPU numbers are reported against (issue 15: warm p50 <= 1.5 s on 2 cores,
#: >= 10x the naive pipeline, peak RSS of a fresh process <= 0.8 GB)
GOAL_SPEEDUP = 10.0
GOAL_TOTAL_MS = 1500.0
GOAL_PEAK_RSS_MB = 800.0
#: most slices of the phantom and of a scaling point (a long chest CT at 0.5 mm has ~800)
MAX_SLICES = 4096
#: largest matrix of the phantom (clinical CT reconstructs 512 or 1024; 2048 x 2048 x 64 int16 is 0.5 GB)
MAX_PHANTOM_SIZE = 2048
#: field of view of the default phantom (mm), so any matrix size is an adult chest
PHANTOM_FOV_MM = 350.0


@dataclass
class BenchConfig:
    """What to benchmark.

    Attributes:
        sources: series folders / files; empty = a synthetic phantom series (sdk.phantom).
        runtimes: runtime names (see :data:`sdk.bench.pipelines.RUNTIMES`).
        repeat: measured calls per runtime (after warm-up), >= 1.
        warmup: unrecorded calls per runtime after the cold call, >= 0.
        batch_sizes: classifier batch sizes for the throughput table (empty: skip).
        batch_repeat: calls per runtime and batch size.
        scaling: slice counts for the scaling curve (empty: skip).
        scaling_repeat: calls per runtime and slice count.
        bundle: model bundle folder (None: the default bundle).
        threads: intra-op threads for ORT sessions and torch (None: each library's default).
        phantom_slices / phantom_size: the default phantom's slice count and matrix.
        mem_interval_s: RSS sampling period.
        cold_fresh: also measure each runtime's cold start in a fresh Python process
            (:mod:`sdk.bench.cold`): imports included, independent of build order, with the
            isolated peak RSS (VmHWM of the child).
    """

    sources: List[str] = field(default_factory=list)
    runtimes: List[str] = field(default_factory=lambda: list(RUNTIMES))
    repeat: int = 5
    warmup: int = 1
    batch_sizes: List[int] = field(default_factory=lambda: [1, 8, 32])
    batch_repeat: int = 2
    scaling: List[int] = field(default_factory=list)
    scaling_repeat: int = 1
    bundle: Optional[str] = None
    threads: Optional[int] = None
    phantom_slices: int = 64
    phantom_size: int = 256
    mem_interval_s: float = 0.005
    cold_fresh: bool = True

    def validate(self) -> None:
        from ..triage import MAX_CLASSIFIER_BATCH, MAX_THREADS

        if self.repeat < 1:
            raise ConfigError(f"--repeat must be >= 1, got {self.repeat}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        bad = [b for b in self.batch_sizes if not 1 <= b <= MAX_CLASSIFIER_BATCH]
        if bad:
            raise ConfigError(f"--batch-sizes must be positive integers <= {MAX_CLASSIFIER_BATCH}, got {bad}")
        bad = [n for n in self.scaling if not 2 <= n <= MAX_SLICES]
        if bad:
            raise ConfigError(f"--scaling slice counts must be >= 2 and <= {MAX_SLICES}, got {bad}")
        if not 1 <= self.phantom_slices <= MAX_SLICES:
            raise ConfigError(f"--phantom-slices must be >= 1 and <= {MAX_SLICES}, got {self.phantom_slices}")
        if not 8 <= self.phantom_size <= MAX_PHANTOM_SIZE:
            raise ConfigError(f"--phantom-size must be >= 8 and <= {MAX_PHANTOM_SIZE} (the phantom's matrix, "
                              f"pixels per side), got {self.phantom_size}")
        if self.batch_repeat < 1:
            raise ConfigError(f"--batch-repeat must be >= 1, got {self.batch_repeat} (use --batch-sizes none to skip the throughput table)")
        if self.scaling_repeat < 1:
            raise ConfigError(f"--scaling-repeat must be >= 1, got {self.scaling_repeat} (leave --scaling out to skip the curve)")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"--threads must be >= 1 and <= {MAX_THREADS}, got {self.threads} (leave it out for "
                              "each library's default)")
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ConfigError(f"unknown runtime(s) {unknown}; valid: {', '.join(RUNTIMES)}")
        if not self.runtimes:
            raise ConfigError(f"no runtime selected; valid: {', '.join(RUNTIMES)}")


ProgressFn = Callable[[str], None]

#: the sections of one series, in the order they run (a series' ``"unfinished"`` lists those of
#: them it planned and did not finish)
SECTIONS = ("cold", "cold_fresh", "rounds", "batches", "scaling")
#: what an interrupted report's goal block says instead of a verdict
NOT_JUDGED = "the run was interrupted"


def _noop(_: str) -> None:
    pass


class BenchInterrupted(KeyboardInterrupt):
    """The bench was stopped by a signal.

    Raised by whoever catches the signal (``ctsdk bench`` raises it for SIGTERM; a plain
    ``KeyboardInterrupt`` counts as SIGINT), then re-raised by :func:`run_bench` with ``at`` (the
    phase it stopped in) and ``report`` (the partial report). A ``KeyboardInterrupt``, so a caller
    that does not catch it stops as on any Ctrl-C.
    """

    def __init__(self, signal_name: str = "SIGINT", at: Optional[str] = None,
                 report: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.at = at
        self.report = report

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        try:
            return 128 + int(signal.Signals[self.signal_name])
        except KeyError:
            return 130


@dataclass
class _Live:
    """A built runtime and everything measured on it."""

    name: str
    driver: Driver
    setup_ms: float
    setup_mem: Dict[str, Any]
    cold_stages: Dict[str, float] = field(default_factory=dict)
    cold_total_ms: float = 0.0
    cold_mem: Dict[str, Any] = field(default_factory=dict)
    runs: List[Dict[str, float]] = field(default_factory=list)
    totals: List[float] = field(default_factory=list)
    cpus: List[float] = field(default_factory=list)     # process CPU ms of each measured call
    mems: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    fresh: Dict[str, Any] = field(default_factory=dict)
    batch_totals: Dict[int, List[float]] = field(default_factory=dict)
    batch_cls: Dict[int, List[float]] = field(default_factory=dict)
    errors: List[str] = field(default_factory=list)

    def trim(self) -> None:
        """Keep whole calls only: an interrupt between the appends of one call leaves one list a
        call longer than the others."""
        n = min(len(self.runs), len(self.totals), len(self.cpus), len(self.mems))
        del self.runs[n:], self.totals[n:], self.cpus[n:], self.mems[n:]
        for b in list(self.batch_totals):
            m = min(len(self.batch_totals[b]), len(self.batch_cls.get(b, [])))
            del self.batch_totals[b][m:]
            if not m:
                self.batch_totals.pop(b)
                self.batch_cls.pop(b, None)
            else:
                del self.batch_cls[b][m:]


@dataclass
class _Series:
    """One source while it runs: what its report entry is built from, finished or not."""

    path: str
    kind: Dict[str, Any]
    index: int
    planned: List[str]
    live: List[_Live] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)
    batch_notes: Dict[str, str] = field(default_factory=dict)
    scaling: Optional[Dict[str, Any]] = None
    done: List[str] = field(default_factory=list)
    entry: Optional[Dict[str, Any]] = None  # set once every section finished

    def close(self) -> None:
        """Close every runtime built for this series (each once)."""
        while self.live:
            self.live.pop().driver.close()


@dataclass
class _RunState:
    """The whole run so far: what :meth:`Bench._report` needs, complete or interrupted."""

    started: _dt.datetime
    load_before: Dict[str, Any] = field(default_factory=dict)
    series: List[_Series] = field(default_factory=list)
    not_started: List[str] = field(default_factory=list)


@dataclass
class _Measured:
    """One measured call: per-stage ms, the result summary, wall and process-CPU ms, memory."""

    stages: Dict[str, float]
    summary: Dict[str, Any]
    total_ms: float
    cpu_ms: float
    mem: Dict[str, Any]


def _call(driver: Driver, source: Any, interval: float) -> _Measured:
    """One measured call, under :class:`PeakMemory`; ``cpu_ms`` is the process CPU time around it
    (``time.process_time``: every thread - the product's lanes and helpers, torch's pool -, plus the
    memory sampler's few wake-ups)."""
    gc.collect()
    with PeakMemory(interval_s=interval) as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        stages, summary = driver.run(source)
        total, cpu = (time.perf_counter() - t0) * 1000.0, (time.process_time() - c0) * 1000.0
    return _Measured(stages, summary, total, cpu, mem.result())


def _phantom_source(cfg: BenchConfig, tmp: Path) -> Tuple[str, Dict[str, Any]]:
    try:
        from ..phantom import write_phantom_series
    except ImportError as exc:
        raise ConfigError(f"no SOURCE given and the synthetic phantom (sdk.phantom) is unavailable ({exc}); pass a series folder") from exc
    out = tmp / "phantom"
    px = PHANTOM_FOV_MM / cfg.phantom_size  # a chest-sized field of view whatever the matrix
    write_phantom_series(out, n_slices=cfg.phantom_slices, size=cfg.phantom_size, spacing=(2.0, px, px),
                         ground_glass=True, seed=0)
    return str(out), {"kind": "phantom", "n_slices": cfg.phantom_slices, "size": cfg.phantom_size,
                      "pixel_spacing_mm": round(px, 3),
                      "note": f"synthetic chest phantom from sdk.phantom, {PHANTOM_FOV_MM:.0f} mm field of view, "
                              "2 mm slices, ground-glass blobs, explicit VR little endian"}


def describe_source(path: str) -> Dict[str, Any]:
    """File count, size on disk, the series in it and the transfer syntax of the one the product
    loads (cheap, headers only; called after the timed calls, so it warms no cache for them)."""
    import pydicom

    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    info: Dict[str, Any] = {"path": str(path), "n_files": len(files),
                            "bytes": int(sum(f.stat().st_size for f in files))}
    try:
        from ..io import list_series, syntax_name

        found = list_series(str(path))
    except Exception:  # noqa: BLE001 - the description is best effort; the runs said what failed
        found = []
    if found:
        info["n_series"] = len(found)
        info["series"] = [{"uid": s.uid, "n_files": s.n_files, "shape": list(s.shape), "chosen": s.chosen,
                           "slice_thickness_mm": s.slice_thickness_mm} for s in found]
        chosen = next((s for s in found if s.chosen), None)
        if chosen is not None:
            ts = chosen.transfer_syntaxes[0] if chosen.transfer_syntaxes else ""
            info.update(transfer_syntax=ts, transfer_syntax_name=syntax_name(ts) if ts else "",
                        rows=int(chosen.shape[1]), columns=int(chosen.shape[2]),
                        slice_thickness_mm=chosen.slice_thickness_mm)
            return info
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
        try:
            from ..io import syntax_name

            ts_name = syntax_name(ts)
        except Exception:  # an unknown UID: keep it as it is
            ts_name = ts
        info.update(transfer_syntax=ts, transfer_syntax_name=ts_name, rows=int(getattr(ds, "Rows", 0)),
                    columns=int(getattr(ds, "Columns", 0)),
                    slice_thickness_mm=float(ds.SliceThickness) if "SliceThickness" in ds else None)
        break
    return info


class Bench:
    """Runs a :class:`BenchConfig` and returns the report dict (:meth:`run`)."""

    def __init__(self, config: BenchConfig, progress: ProgressFn = _noop) -> None:
        config.validate()
        self.cfg = config
        self.progress = progress
        #: what the run is doing now, in the words an interrupted report uses ("measuring round 3/5
        #: (ort-int8)", "scaling 150 (ort-fp32)"); set only through :meth:`_enter`
        self.phase = "starting"
        self._series_prefix = ""
        self._default_cpu: Dict[str, Any] = {}

    def _enter(self, phase: str) -> None:
        """The run starts ``phase`` (within the current series when there are several)."""
        self.phase = self._series_prefix + phase

    # --- building ----------------------------------------------------------------------------------
    def _build(self, names: Sequence[str], series: _Series) -> None:
        """Build each runtime and run its first call; fills ``series.live`` / ``series.skipped``."""
        source = series.path
        for name in names:
            spec = RUNTIMES[name]
            why = precheck(spec)
            if why:
                series.skipped[name] = why
                self.progress(f"{name}: skipped ({why})")
                continue
            driver = make_driver(name, bundle=self.cfg.bundle, threads=self.cfg.threads)
            self._enter(f"cold start of {name}")
            self.progress(f"{name}: building (cold start)")
            gc.collect()
            try:
                with PeakMemory(interval_s=self.cfg.mem_interval_s) as mem:
                    t0 = time.perf_counter()
                    driver.setup()
                    setup_ms = (time.perf_counter() - t0) * 1000.0
            except Exception as exc:  # noqa: BLE001 - reported as the skip reason, never swallowed
                why = str(exc) if isinstance(exc, CtsdkError) else f"{type(exc).__name__}: {exc}"
                series.skipped[name] = why
                self.progress(f"{name}: skipped ({why})")
                log.debug("%s failed to build", name, exc_info=True)
                driver.close()
                continue
            except BaseException:  # interrupted: not in series.live yet, so close it here
                driver.close()
                raise
            item = _Live(name=name, driver=driver, setup_ms=setup_ms, setup_mem=mem.result())
            try:
                first = _call(driver, source, self.cfg.mem_interval_s)
            except SeriesError:
                driver.close()
                raise  # the input is bad for everyone: stop with the product's message
            except Exception as exc:  # noqa: BLE001 - reported as the skip reason, never swallowed
                why = str(exc) if isinstance(exc, CtsdkError) else f"{type(exc).__name__}: {exc}"
                series.skipped[name] = f"first call failed: {why}"
                self.progress(f"{name}: skipped (first call failed: {why})")
                log.debug("%s failed on its first call", name, exc_info=True)
                driver.close()
                continue
            except BaseException:
                driver.close()
                raise
            item.cold_stages, item.cold_total_ms, item.summary = first.stages, first.total_ms, first.summary
            item.cold_mem = {**first.mem, "peak_rss_mb": max(first.mem["peak_rss_mb"], item.setup_mem["peak_rss_mb"])}
            series.live.append(item)
            self.progress(f"{name}: cold {setup_ms + first.total_ms:.0f} ms (setup {setup_ms:.0f} + first call {first.total_ms:.0f})")

    # --- phases ------------------------------------------------------------------------------------
    def _fresh_cold(self, live: List[_Live], source: str) -> None:
        """Cold start of each runtime in a fresh interpreter (this process waits meanwhile; an
        interrupt stops the child, :func:`sdk.bench.cold.run_fresh`)."""
        from .cold import run_fresh

        for item in live:
            self._enter(f"fresh-process cold start of {item.name}")
            self.progress(f"{item.name}: cold start in a fresh process")
            item.fresh = run_fresh(item.name, source, self.cfg.bundle, self.cfg.threads)
            if "error" in item.fresh:
                self.progress(f"{item.name}: {item.fresh['error']}")
            else:
                self.progress(f"{item.name}: fresh-process cold {item.fresh['total_ms']:.0f} ms, max RSS {item.fresh['max_rss_mb']:.0f} MiB")

    def _rounds(self, live: List[_Live], source: str) -> None:
        for item in live:
            if self.cfg.warmup:
                self._enter(f"warm-up of {item.name}")
                self.progress(f"{item.name}: warm-up ({self.cfg.warmup} unrecorded call(s))")
            for _ in range(self.cfg.warmup):
                item.driver.run(source)
        self._enter(f"measuring round 1/{self.cfg.repeat}")
        self.progress(f"measuring: {self.cfg.repeat} round(s) of {', '.join(i.name for i in live)}, order rotating")
        for r in range(self.cfg.repeat):
            order = live[r % len(live):] + live[: r % len(live)]
            for item in order:
                self._enter(f"measuring round {r + 1}/{self.cfg.repeat} ({item.name})")
                m = _call(item.driver, source, self.cfg.mem_interval_s)
                item.runs.append(m.stages)
                item.totals.append(m.total_ms)
                item.cpus.append(m.cpu_ms)
                item.mems.append(m.mem)
                item.summary = m.summary
            self.progress(f"round {r + 1}/{self.cfg.repeat}: " + ", ".join(f"{i.name} {i.totals[-1]:.0f} ms" for i in live))

    def _batches(self, live: List[_Live], source: str, notes: Dict[str, str]) -> None:
        """Calls at each classifier batch size; a runtime that refuses one is noted in ``notes``."""
        product = [i for i in live if isinstance(i.driver, TriageDriver)]
        if not product or not self.cfg.batch_sizes:
            return
        for b in self.cfg.batch_sizes:
            for r in range(self.cfg.batch_repeat):
                order = product[r % len(product):] + product[: r % len(product)]
                for item in order:
                    drv = item.driver
                    assert isinstance(drv, TriageDriver)
                    self._enter(f"batch size {b}, call {r + 1}/{self.cfg.batch_repeat} ({item.name})")
                    try:
                        drv.set_batch(b)
                        m = _call(drv, source, self.cfg.mem_interval_s)
                    except ConfigError as exc:
                        notes[item.name] = str(exc)
                        continue
                    finally:
                        try:
                            drv.set_batch(None)
                        except ConfigError:
                            pass
                    item.batch_totals.setdefault(b, []).append(m.total_ms)
                    item.batch_cls.setdefault(b, []).append(m.stages.get("classify", 0.0))
            self.progress(f"batch {b}: " + ", ".join(
                f"{i.name} {summarize(i.batch_totals[b])['p50']:.0f} ms" for i in product if i.batch_totals.get(b)))

    def _scaling_header(self, live: List[_Live]) -> Dict[str, Any]:
        """The scaling section before any point (:meth:`_scaling` fills its ``runtimes``)."""
        return {
            "method": ("source loaded with sdk.io.load_series, resampled along z only (linear, same physical "
                       "extent) to each slice count, written as a temporary DICOM series (explicit VR little "
                       "endian, int16); SliceThickness = min(original, new spacing)"),
            "slice_counts": list(self.cfg.scaling),
            "repeat": self.cfg.scaling_repeat,
            "runtimes": {i.name: [] for i in live},
        }

    def _scaling(self, live: List[_Live], source: str, tmp: Path, out: Dict[str, Any]) -> None:
        """Append one point per call to ``out["runtimes"]`` (so an interrupt keeps those done)."""
        from .scaling import write_z_resampled

        for n in self.cfg.scaling:
            folder = tmp / f"z{n}"
            self._enter(f"scaling {n} (writing the series)")
            self.progress(f"scaling: writing {n}-slice series")
            write_z_resampled(source, n, folder)
            gc.collect()
            for r in range(self.cfg.scaling_repeat):
                order = live[r % len(live):] + live[: r % len(live)]
                for item in order:
                    self._enter(f"scaling {n} ({item.name})")
                    try:
                        m = _call(item.driver, str(folder), self.cfg.mem_interval_s)
                    except CtsdkError as exc:
                        out["runtimes"][item.name].append({"n_slices": n, "error": str(exc)})
                        continue
                    out["runtimes"][item.name].append({
                        "n_slices": n, "total_ms": round(m.total_ms, 1),
                        "stages_ms": {k: round(v, 1) for k, v in m.stages.items()},
                        "peak_rss_mb": m.mem["peak_rss_mb"], "delta_rss_mb": m.mem["delta_rss_mb"],
                        "gpu_peak_mb": m.mem["gpu_peak_mb"], "n_classified": m.summary.get("n_classified"),
                        "label": m.summary.get("label"),
                    })
            self.progress(f"scaling {n}: " + ", ".join(
                f"{k} {v[-1].get('total_ms', float('nan')):.0f} ms" for k, v in out["runtimes"].items() if v))
            shutil.rmtree(folder, ignore_errors=True)

    # --- reporting ---------------------------------------------------------------------------------
    def _runtime_report(self, item: _Live, naive: Optional[_Live], paper: Optional[_Live] = None) -> Dict[str, Any]:
        stage_names = list(STAGES) + (["other"] if any("other" in r for r in item.runs) else [])
        warm = summarize_stages(item.runs, stage_names)
        warm["total"] = summarize(item.totals)
        rep: Dict[str, Any] = {
            "status": "ok",
            "description": RUNTIMES[item.name].description,
            **{k: v for k, v in item.driver.info.items() if k != "description"},
            "cold": {
                "setup_ms": round(item.setup_ms, 1),
                "first_call_ms": round(item.cold_total_ms, 1),
                "total_ms": round(item.setup_ms + item.cold_total_ms, 1),
                "stages_ms": {k: round(v, 1) for k, v in item.cold_stages.items()},
                "peak_rss_mb": item.cold_mem.get("peak_rss_mb"),
                "setup_delta_rss_mb": item.setup_mem.get("delta_rss_mb"),
                "gpu_peak_mb": item.cold_mem.get("gpu_peak_mb"),
                "note": "in the bench process: imports already done by earlier runtimes are not counted",
                "fresh_process": item.fresh or None,
            },
            "warm": {k: {kk: (round(vv, 2) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in warm.items()},
            "warm_totals_ms": [round(t, 1) for t in item.totals],
            "memory": {
                "peak_rss_mb": max(m["peak_rss_mb"] for m in item.mems),
                "delta_rss_mb": max(m["delta_rss_mb"] for m in item.mems),
                "gpu_peak_mb": max((m["gpu_peak_mb"] for m in item.mems if m["gpu_peak_mb"] is not None), default=None),
                "method": "psutil RSS sampled every %.0f ms in a thread during each call" % (self.cfg.mem_interval_s * 1000),
            },
            "cpu": {**{k: round(v, 2) for k, v in cpu_use(item.cpus, item.totals, machine_mod.usable_cores()).items()},
                    "method": "process CPU time (time.process_time: every thread of the bench process) around each "
                              "measured call; cores busy = CPU / wall; floor = the p50 CPU spread perfectly over the "
                              "usable cores (no scheduling gets below it, only less work)"},
            "dominant_stage": dominant({k: v["p50"] for k, v in warm.items() if k != "total"}),
            "result": {k: v for k, v in item.summary.items() if k != "triage_timings_ms"},
            "triage_timings_ms_last": item.summary.get("triage_timings_ms"),
        }
        tp: Dict[str, Any] = {}
        if isinstance(item.driver, TriageDriver):
            default_b = item.driver.default_batch
            for b, totals in sorted(item.batch_totals.items()):
                p50 = summarize(totals)["p50"]
                tp[str(b)] = {"total_p50_ms": round(p50, 1), "classify_p50_ms": round(summarize(item.batch_cls[b])["p50"], 1),
                              "series_per_min": round(series_per_minute(p50) or 0.0, 2), "n": len(totals)}
            rep["default_batch"] = default_b
        else:
            p50 = warm["total"]["p50"]
            tp["1"] = {"total_p50_ms": round(p50, 1), "classify_p50_ms": round(warm.get("classify", {}).get("p50", 0.0), 1),
                       "series_per_min": round(series_per_minute(p50) or 0.0, 3), "n": len(item.totals),
                       "note": "the naive baseline classifies one slice at a time (batch 1 only)"}
        rep["throughput"] = tp
        for key, ref in (("speedup_vs_naive", naive), ("speedup_vs_naive_paper", paper)):
            if ref is not None and ref is not item and RUNTIMES[item.name].device != "naive":
                nwarm = summarize_stages(ref.runs, STAGES)
                rep[key] = {
                    "total_p50": _r(speedup(summarize(ref.totals)["p50"], warm["total"]["p50"])),
                    "cold": _r(speedup(_cold_ms(ref), _cold_ms(item))),
                    "stages_p50": {s: _r(speedup(nwarm[s]["p50"], warm[s]["p50"])) for s in STAGES if s in nwarm and s in warm},
                }
        return rep

    def _sources(self, tmp: Path) -> List[Tuple[str, Dict[str, Any]]]:
        cfg = self.cfg
        if cfg.sources:
            for s in cfg.sources:
                if not Path(s).exists():
                    raise SeriesError("no such file or folder", path=s, hint="give a DICOM series folder")
            return [(s, {"kind": "dicom"}) for s in cfg.sources]
        self._enter("writing the phantom series")
        return [_phantom_source(cfg, tmp)]

    def _planned(self, index: int) -> List[str]:
        """The sections series ``index`` runs (see :data:`SECTIONS`)."""
        cfg = self.cfg
        want = {"cold": True, "cold_fresh": cfg.cold_fresh, "rounds": True, "batches": bool(cfg.batch_sizes),
                "scaling": bool(cfg.scaling) and index == 0}
        return [s for s in SECTIONS if want[s]]

    def _product_default(self) -> Dict[str, Any]:
        if not self._default_cpu:  # after the timed calls: it may import onnxruntime
            self._default_cpu = product_default_cpu(self.cfg.bundle)
        return self._default_cpu

    def _run_series(self, series: _Series, n_sources: int, tmp: Path) -> Dict[str, Any]:
        """Every section of one source, in order; returns its report entry."""
        cfg = self.cfg
        self._series_prefix = f"series {series.index + 1}/{n_sources}: " if n_sources > 1 else ""
        self.progress(f"series {series.index + 1}/{n_sources}: {series.path}")
        self._build(cfg.runtimes, series)
        if not series.live:
            hint = ("; the CPU runtimes run on any machine: --runtimes ort-fp32,ort-int8"
                    if all(RUNTIMES[k].gpu for k in series.skipped) else "")
            raise ConfigError("no runtime could run here: " + "; ".join(f"{k}: {v}" for k, v in series.skipped.items()) + hint)
        series.done.append("cold")
        if "cold_fresh" in series.planned:
            self._fresh_cold(series.live, series.path)
            series.done.append("cold_fresh")
        self._rounds(series.live, series.path)
        series.done.append("rounds")
        if "batches" in series.planned:
            self._batches(series.live, series.path, series.batch_notes)
            series.done.append("batches")
        self._enter("summarising the series")
        entry = self._entry(series)
        for w in entry["warnings"]:
            self.progress(f"warning: {w}")
        if "scaling" in series.planned:
            series.scaling = self._scaling_header(series.live)
            self._scaling(series.live, series.path, tmp, series.scaling)
            series.done.append("scaling")
            entry["scaling"] = series.scaling
        return entry

    def _entry(self, series: _Series, interrupted: bool = False) -> Dict[str, Any]:
        """The report entry of ``series`` from what it measured. ``interrupted``: only whole calls
        count, a runtime without a measured call gets no warm numbers (status "interrupted"), one
        never built "not run", and the entry lists its ``unfinished`` sections."""
        cfg = self.cfg
        for item in series.live:
            item.trim()
        measured = [i for i in series.live if i.totals]
        naive = next((i for i in measured if i.name == "naive"), None)
        paper = next((i for i in measured if i.name == "naive-paper"), None)
        rts: Dict[str, Any] = {}
        for name in cfg.runtimes:
            item = next((i for i in series.live if i.name == name), None)
            if item is not None and item.totals:
                rts[name] = self._runtime_report(item, naive, paper)
                if name in series.batch_notes:
                    rts[name]["throughput_note"] = series.batch_notes[name]
            elif item is not None:
                rts[name] = _unmeasured_report(item)
            elif name in series.skipped or not interrupted:
                rts[name] = {"status": "skipped", "reason": series.skipped.get(name, "not run"),
                             "description": RUNTIMES[name].description}
            else:
                rts[name] = {"status": "not run", "reason": f"not built: {NOT_JUDGED} before its cold start",
                             "description": RUNTIMES[name].description}
        default_cpu = self._product_default()
        desc = {**describe_source(series.path), **series.kind}
        warns = source_warnings(desc) + consistency_warnings(rts)
        entry: Dict[str, Any] = {
            "source": desc, "runtimes": rts,
            "goal": goal_status(rts, comparable=not warns, source_kind=series.kind.get("kind", "dicom"),
                                default_runtime=default_cpu.get("runtime")),
            "warnings": warns}
        if interrupted:
            entry["unfinished"] = [s for s in series.planned if s not in series.done]
            if series.scaling is not None and any(series.scaling["runtimes"].values()):
                entry["scaling"] = {**series.scaling, "complete": "scaling" in series.done}
        return entry

    def _report(self, state: _RunState, interrupted: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The JSON-safe report of everything in ``state``; ``interrupted`` (``{"at", "signal"}``)
        makes it the partial report: unfinished series summarised from what they measured, every
        goal "not judged"."""
        cfg = self.cfg
        results = []
        for series in state.series:
            entry = series.entry if series.entry is not None else self._entry(series, interrupted=True)
            if interrupted:
                entry = {**entry, "goal": goal_not_judged(entry["goal"], NOT_JUDGED)}
            results.append(entry)
        finished = _dt.datetime.now(_dt.timezone.utc)
        head: Dict[str, Any] = {"schema": SCHEMA}
        if interrupted:
            head["interrupted"] = {
                **interrupted,
                "note": ("partial results: the sections and calls that finished before the signal (the call in "
                         "flight is dropped); percentiles are over the calls completed; the goal is not judged"),
                **({"series_not_run": list(state.not_started)} if state.not_started else {}),
            }
        return {
            **head,
            "started_utc": state.started.isoformat(timespec="seconds"),
            "finished_utc": finished.isoformat(timespec="seconds"),
            "wall_s": round((finished - state.started).total_seconds(), 1),
            "command": None,  # the CLI fills in the exact command line
            "config": {k: v for k, v in asdict(cfg).items()},
            "stages": list(STAGES),
            "machine": machine_mod.machine_info(),
            "bundle": bundle_info(cfg.bundle),
            "product_default_cpu": self._product_default(),
            "load": {"before": state.load_before,
                     "after": {**machine_mod.load_snapshot(), "busy_processes": machine_mod.busy_processes()}},
            "decode_hu_split": ("product: the reader's own split of Triage's load (sdk.io.load_series(timings=...)): "
                                "decode = scan (file listing + headers) + pixel decoding, hu = stored -> HU + "
                                "geometry (ordering, checks, re-orientation) + bookkeeping; a reader without "
                                "the split leaves load whole in decode (each run's notes say so). naive: dcmread + "
                                "pixel_array vs sort + rescale + stack"),
            "series": results,
        }

    def _run(self, state: _RunState, tmp: Path) -> Dict[str, Any]:
        state.load_before = {**machine_mod.load_snapshot(), "busy_processes": machine_mod.busy_processes()}
        sources = self._sources(tmp)
        state.not_started = [src for src, _ in sources]
        for idx, (src, kind) in enumerate(sources):
            series = _Series(path=src, kind=kind, index=idx, planned=self._planned(idx))
            state.series.append(series)
            state.not_started.remove(src)
            series.entry = self._run_series(series, len(sources), tmp)
            series.close()
        self._series_prefix = ""
        self._enter("summarising the run")
        return self._report(state)

    def run(self) -> Dict[str, Any]:
        """Run everything; returns the JSON-safe report (schema ``ctsdk.bench/1``).

        Raises:
            BenchInterrupted: on a ``KeyboardInterrupt`` (or a :class:`BenchInterrupted` raised by a
                signal handler), with ``.report`` the partial report and ``.at`` the phase.
        """
        self.phase, self._series_prefix, self._default_cpu = "starting", "", {}
        state = _RunState(started=_dt.datetime.now(_dt.timezone.utc))
        tmp = Path(tempfile.mkdtemp(prefix="ctsdk-bench-"))
        try:
            try:
                return self._run(state, tmp)
            except KeyboardInterrupt as exc:
                sig = getattr(exc, "signal_name", "SIGINT")
                at = self.phase
                log.debug("bench interrupted (%s) during %s", sig, at)
                report = self._report(state, interrupted={"at": at, "signal": sig})
                raise BenchInterrupted(sig, at=at, report=report) from exc
        finally:
            for series in state.series:
                series.close()
            shutil.rmtree(tmp, ignore_errors=True)


def _unmeasured_report(item: _Live) -> Dict[str, Any]:
    """A runtime built (cold start measured) but interrupted before its first measured call: no
    warm numbers, so no p50."""
    cold = item.setup_ms + item.cold_total_ms
    return {"status": "interrupted",
            "reason": f"{NOT_JUDGED} before its first measured call, so no warm p50 (cold start in the bench "
                      f"process {cold:,.0f} ms)",
            "description": RUNTIMES[item.name].description,
            "cold": {"setup_ms": round(item.setup_ms, 1), "first_call_ms": round(item.cold_total_ms, 1),
                     "total_ms": round(cold, 1), "fresh_process": item.fresh or None}}


def source_warnings(source: Dict[str, Any]) -> List[str]:
    """Reasons the source is not one series: the product triages only the series it chooses,
    while the naive baselines read every file under the folder."""
    series = source.get("series") or []
    if len(series) < 2:
        return []
    chosen = next((s for s in series if s.get("chosen")), None)
    what = ("the product triaged only " + f"{chosen['uid']} ({chosen['n_files']} images)" if chosen
            else "the product chose none of them")
    return [f"{source.get('path')} holds {len(series)} series ("
            + ", ".join(f"{s['n_files']} images" for s in series)
            + f"): {what}, the naive baselines read every file; give one series per folder"]


def consistency_warnings(runtimes: Dict[str, Any]) -> List[str]:
    """Reasons the runtimes' timings are not comparable or not a triage benchmark: a runtime
    that stopped early (not eligible, no slice selected) while another classified slices, product
    runtimes that all stopped early, or different labels."""
    ok = {k: v for k, v in runtimes.items() if v.get("status") == "ok"}
    warns: List[str] = []
    classified = {k: int(v["result"].get("n_classified") or 0) for k, v in ok.items()}
    product = [k for k in ok if RUNTIMES[k].device != "naive"]
    if product and not any(classified[k] for k in product):
        why = "; ".join(ok[product[0]]["result"].get("reasons") or []) or ok[product[0]]["result"].get("label", "")
        warns.append(f"no product runtime classified a slice ({why}): their totals cover reading the series and "
                     "the eligibility check only, not a triage; benchmark an eligible chest CT series")
        return warns
    if any(classified.values()):
        for k, n in classified.items():
            if n == 0:
                why = "; ".join(ok[k]["result"].get("reasons") or []) or ok[k]["result"].get("label", "")
                warns.append(f"{k} classified no slice ({why}) while "
                             + ", ".join(f"{o} classified {m}" for o, m in classified.items() if m)
                             + ": its total skips the classifier and is not comparable")
    labels = {k: v["result"].get("label") for k, v in ok.items() if RUNTIMES[k].device != "naive"}
    if len(set(labels.values())) > 1:
        warns.append("product runtimes disagree on the label: " + ", ".join(f"{k} {v}" for k, v in labels.items()))
    return warns


def bundle_info(path: Optional[str]) -> Dict[str, Any]:
    """Name, version and file hashes of the bundle the product runtimes used."""
    try:
        from ..bundle import load_bundle

        b = load_bundle(path, verify=False)
    except CtsdkError as exc:
        return {"error": str(exc)}
    return {"root": str(b.root), "name": b.name, "version": b.version,
            "files": {n: {"path": f.path, "sha256": f.sha256[:16], "precision": f.precision} for n, f in sorted(b.files.items())},
            "int8_calibration_passed": b.calibration_passed}


def product_default_cpu(bundle: Optional[str]) -> Dict[str, Any]:
    """Which bench runtime ``sdk.Triage(device="cpu")`` runs by default (``precision="auto"``) with
    this bundle, and why: ``{"runtime": "ort-fp32", "precision": "fp32", "reason": ...}``. Decided
    by the product's own rule (:func:`sdk.triage.choose_classifier_runtime`; nothing is built)."""
    try:
        from ..bundle import load_bundle
        from ..triage import choose_classifier_runtime

        _, info, reasons = choose_classifier_runtime(load_bundle(bundle, verify=False), "cpu", "auto")
    except Exception as exc:  # noqa: BLE001 - context for the report, never fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    name = f"ort-{info.precision}"
    return {"runtime": name if name in RUNTIMES else None, "precision": info.precision,
            "reason": next((r for r in reasons if r.startswith("precision auto")), "; ".join(reasons))}


def _verdict(rep: Dict[str, Any], comparable: bool) -> Dict[str, Any]:
    """One CPU runtime against the goal (see :func:`goal_status`)."""
    total = rep["warm"]["total"]["p50"]
    # issue 15's "naive pipeline" is paper 000 done naively (naive-paper) when it ran, else the light one
    ref_key = "speedup_vs_naive_paper" if rep.get("speedup_vs_naive_paper") else "speedup_vs_naive"
    sp = (rep.get(ref_key) or {}).get("total_p50")
    rss = ((rep.get("cold") or {}).get("fresh_process") or {}).get("max_rss_mb")
    v: Dict[str, Any] = {
        "total_p50_ms": round(total, 1), "n_calls": rep["warm"]["total"].get("n"),
        "naive_reference": ("naive-paper" if ref_key == "speedup_vs_naive_paper" else
                            "naive" if rep.get("speedup_vs_naive") else None),
        "speedup": sp, "under_time": total <= GOAL_TOTAL_MS, "fast_enough": None if sp is None else sp >= GOAL_SPEEDUP,
        "peak_rss_mb": rss, "small_enough": None if rss is None else rss <= GOAL_PEAK_RSS_MB,
        "dominant_stage": rep.get("dominant_stage"),
    }
    v["met"] = bool(v["under_time"] and v["fast_enough"] and v["small_enough"] is not False and comparable)
    cpu = rep.get("cpu") or {}
    if cpu.get("floor_ms"):  # what perfect packing of this call's CPU work would give (the goal's headroom)
        floor = float(cpu["floor_ms"])
        v.update(cpu_p50_ms=cpu["per_call_p50_ms"], cores_busy=cpu["cores_busy_p50"], cores=int(cpu["cores"]),
                 floor_ms=round(floor, 1), floor_under_time=floor <= GOAL_TOTAL_MS,
                 floor_speedup=None if sp is None else _r(sp * total / floor))
    return v


def goal_status(runtimes: Dict[str, Any], comparable: bool = True, source_kind: str = "dicom",
                default_runtime: Optional[str] = None) -> Dict[str, Any]:
    """Where the CPU runtimes stand against the goal (:data:`GOAL_SPEEDUP` x naive, warm p50
    <= :data:`GOAL_TOTAL_MS`, fresh-process peak RSS <= :data:`GOAL_PEAK_RSS_MB` when measured).

    The top-level fields (``best_runtime``, ``total_p50_ms``, ``speedup``, ``met``...) are the
    fastest CPU runtime's; ``default_runtime`` / ``default_met`` the one ``sdk.Triage`` runs on the
    CPU by default (``precision="auto"``), which need not be the fastest; ``by_runtime`` has
    every CPU runtime's verdict. ``speedup`` is against ``naive_reference`` (issue 15's naive
    pipeline, ``naive-paper``, when it ran, else the light ``naive``).
    """
    cpu = {k: v for k, v in runtimes.items() if v.get("status") == "ok" and RUNTIMES[k].device == "cpu"}
    out: Dict[str, Any] = {"target_speedup": GOAL_SPEEDUP, "target_total_ms": GOAL_TOTAL_MS,
                           "target_peak_rss_mb": GOAL_PEAK_RSS_MB, "comparable": comparable,
                           "source_kind": source_kind, "default_runtime": default_runtime}
    if not cpu:
        out["status"] = "no CPU product runtime ran"
        return out
    by = {k: _verdict(v, comparable) for k, v in cpu.items()}
    best = min(cpu, key=lambda k: cpu[k]["warm"]["total"]["p50"])
    out.update(best_runtime=best, **by[best])
    out["by_runtime"] = by
    out["default_met"] = by[default_runtime]["met"] if default_runtime in by else None
    return out


def goal_not_judged(goal: Dict[str, Any], why: str) -> Dict[str, Any]:
    """``goal`` (from :func:`goal_status`) without any verdict: the targets and context stay,
    ``judged`` is False, ``status`` says why, ``met`` / ``default_met`` are None (an interrupted
    run's numbers are partial: nothing is "met" from them)."""
    keep = ("target_speedup", "target_total_ms", "target_peak_rss_mb", "comparable", "source_kind", "default_runtime")
    return {**{k: goal.get(k) for k in keep}, "judged": False, "status": f"not judged: {why}", "met": None,
            "default_met": None}


def _cold_ms(item: _Live) -> float:
    """Fresh-process cold total when measured, else the in-process one."""
    fresh = item.fresh.get("total_ms") if item.fresh else None
    return float(fresh) if fresh is not None else item.setup_ms + item.cold_total_ms


def _r(v: Optional[float], sig: int = 3) -> Optional[float]:
    """A ratio to ``sig`` significant digits (0.0655 stays 0.0655, not 0.07)."""
    return None if v is None else float(f"{v:.{sig}g}")


def run_bench(config: BenchConfig, progress: ProgressFn = _noop) -> Dict[str, Any]:
    """Run the benchmark described by ``config``; returns the report dict.

    Raises:
        BenchInterrupted: when interrupted (Ctrl-C), with the partial report as ``.report``.
    """
    return Bench(config, progress).run()


__all__ = ["BenchConfig", "Bench", "BenchInterrupted", "run_bench", "goal_status", "goal_not_judged",
           "consistency_warnings", "source_warnings", "product_default_cpu", "describe_source", "SCHEMA",
           "GOAL_SPEEDUP", "GOAL_TOTAL_MS", "NOT_JUDGED"]
