"""Cold start of one runtime in a fresh Python process.

In the bench's own process, whichever runtime is built first pays the imports (onnxruntime,
xgboost, OpenCV, torch) for all the others, so in-process "cold" numbers depend on the order.
The bench therefore also measures each runtime's cold start in a fresh interpreter:

    python -m sdk.bench.cold --runtime ort-fp32 --source SERIES [--bundle B] [--threads N]

prints one JSON object: ``setup_ms`` (imports + bundle load + session creation + the product's
own warm-up), ``first_call_ms``, ``total_ms`` and ``max_rss_mb`` - the process's peak RSS
(``VmHWM``; the runtime's memory in isolation, nothing else loaded).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: ``VmHWM`` of /proc/self/status (the high-water mark of
    the current address space, so it starts afresh at exec), else ``getrusage`` (whose
    ``ru_maxrss`` on Linux also carries the parent's RSS at fork time)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure_cold(runtime: str, source: str, bundle: Optional[str] = None, threads: Optional[int] = None) -> Dict[str, Any]:
    """Build ``runtime`` and triage ``source`` once in *this* process (meant to be a fresh one)."""
    from .pipelines import make_driver

    t0 = time.perf_counter()
    driver = make_driver(runtime, bundle=bundle, threads=threads)
    driver.setup()
    t1 = time.perf_counter()
    stages, summary = driver.run(source)
    t2 = time.perf_counter()
    max_rss_mb = peak_rss_mb()
    return {
        "runtime": runtime,
        "setup_ms": round((t1 - t0) * 1e3, 1),
        "first_call_ms": round((t2 - t1) * 1e3, 1),
        "total_ms": round((t2 - t0) * 1e3, 1),
        "max_rss_mb": round(max_rss_mb, 1),
        "label": summary.get("label"),
        "method": "fresh python process: imports + setup + first call; peak RSS = VmHWM of that process",
    }


def stop_child(proc: "subprocess.Popen[str]", grace_s: float = 2.0) -> None:
    """End ``proc`` if it still runs (SIGTERM, then SIGKILL after ``grace_s``), reap it and close
    its pipes: nothing is left running or as a zombie."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def run_fresh(runtime: str, source: str, bundle: Optional[str] = None, threads: Optional[int] = None,
              timeout_s: float = 900.0) -> Dict[str, Any]:
    """Run :func:`measure_cold` in a child interpreter; returns its JSON or ``{"error": ...}``.

    Whatever stops the wait - the timeout, or an interrupt (Ctrl-C, the bench's SIGTERM) that is
    then re-raised - the child is terminated and reaped first (:func:`stop_child`).
    """
    cmd: List[str] = [sys.executable, "-m", "sdk.bench.cold", "--runtime", runtime, "--source", str(source)]
    if bundle:
        cmd += ["--bundle", str(bundle)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_child(proc)
        return {"runtime": runtime, "error": f"fresh-process cold start exceeded {timeout_s:.0f} s"}
    except BaseException:  # KeyboardInterrupt / BenchInterrupted: no child outlives the bench
        stop_child(proc)
        raise
    if proc.returncode != 0:
        tail = (stderr or "").strip().splitlines()[-1:] or ["no message"]
        return {"runtime": runtime, "error": f"fresh-process cold start failed (exit {proc.returncode}): {tail[0]}"}
    try:
        return json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"runtime": runtime, "error": f"fresh-process cold start printed no JSON: {stdout[-200:]!r}"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdk.bench.cold", description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", required=True)
    ap.add_argument("--source", required=True)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    from ..errors import CtsdkError

    try:
        out = measure_cold(args.runtime, args.source, args.bundle, args.threads)
    except CtsdkError as exc:
        print(f"ctsdk: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through run_fresh
    sys.exit(main())
