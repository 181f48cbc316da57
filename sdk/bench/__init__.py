"""``ctsdk bench``: per-stage latency, throughput, memory and scaling of every usable runtime,
side by side with a naive PyTorch-eager baseline, in one process, interleaved.

    from sdk.bench import BenchConfig, run_bench, write_outputs
    report = run_bench(BenchConfig(sources=["series/"], runtimes=["naive", "ort-fp32"], repeat=5))
    write_outputs(report, "bench-out/")      # bench.json, bench.md, stages_0.png, scaling.png

Ctrl-C raises :class:`BenchInterrupted` (a ``KeyboardInterrupt``) carrying the partial report
(``exc.report``; ``write_outputs(exc.report, ...)`` keeps it).

Modules: :mod:`.harness` (the run), :mod:`.pipelines` (runtimes and how each is driven),
:mod:`.naive` (the baseline), :mod:`.cold` (cold start in a fresh process), :mod:`.scaling`
(z-resampled series), :mod:`.memory` (peak RSS / GPU memory sampling), :mod:`.machine`
(machine info), :mod:`.stats` (percentiles), :mod:`.report` (markdown and charts).
torch is needed only by the naive baseline.
"""
from __future__ import annotations

from .harness import GOAL_SPEEDUP, GOAL_TOTAL_MS, SCHEMA, Bench, BenchConfig, BenchInterrupted, run_bench
from .pipelines import RUNTIMES, STAGES, parse_runtimes
from .report import to_markdown, write_outputs
from .stats import percentile, summarize

__all__ = ["Bench", "BenchConfig", "BenchInterrupted", "run_bench", "write_outputs", "to_markdown", "RUNTIMES", "STAGES",
           "parse_runtimes", "percentile", "summarize", "SCHEMA", "GOAL_SPEEDUP", "GOAL_TOTAL_MS"]
