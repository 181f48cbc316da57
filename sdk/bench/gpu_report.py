"""The one-command GPU report: kernels, ONNX Runtime CUDA diagnosis, per-stage Triage timings,
host<->device bytes, GPU memory and agreement with the CPU path.

    python -m sdk.bench.gpu_report --out DIR [--series PATH] [--rounds N] [--bundle DIR]
    ctsdk bench --gpu-report DIR [SERIES] [--repeat N]          # the same, through the CLI

Writes ``DIR/gpu_report.json``, ``DIR/gpu.md`` (ready to paste into docs/benchmarks/gpu.md) and
``DIR/gpu_report.png``, plus ORT profiler JSON files of the diagnosis. Sections:

- ``environment``: GPU, driver, CUDA runtime, versions (onnxruntime as imported, CuPy, pycuda, torch).
- ``kernels``: the ctsdk kernels on each installed backend (CuPy, pycuda) vs NumPy and torch on a
  300x512^2 int16 volume: resample -> 128^3 linear / area (windowed), classifier inputs for 64
  slices, mask weights, masked GAP 64x1280x7x7; median / p95 ms over N calls after warm-up,
  wall time with a device synchronize after each call (what a caller waits for); max |diff| vs NumPy.
- ``ort``: the classifier (FP16 and FP32) under a default ``InferenceSession``, the old product
  configuration, each of its options toggled, the product's :class:`~sdk.runtime.ort.OrtSession`
  (numpy feed, IOBinding on CuPy buffers, CUDA graph); per-call ms; ORT's profiler on the slowest
  and the product configuration, summarised by operator and provider.
- ``triage``: ``Triage(device="cuda", precision="fp16")`` per-stage p50/p95 from the files and from
  a decoded Volume, ``TriageResult.runtime``, host<->device bytes (``result.transfers`` when the
  Triage reports it), GPU memory, and agreement with ``Triage(device="cpu", precision="fp32")``.

Every section and every configuration runs in its own ``try``: a failure is recorded (type,
message, traceback tail) in the report and the rest goes on. On a machine without a GPU each
GPU section says "not run on a GPU". ``--smoke-cpu`` runs the ORT matrix on the CPU EP and the
Triage section on the CPU, to check this script's own code paths where there is no GPU (its
numbers mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..pools import usable_cores
from .stats import summarize

SCHEMA = "ctsdk.gpu_report/1"
NOT_ON_GPU = "not run on a GPU"
SECTIONS = ("environment", "kernels", "ort", "triage")
#: in-process kernel backends --backends may name (sdk.kernels.gpu.gpu_backends)
KERNEL_BACKENDS = ("cupy", "pycuda")
#: the slice batch of the classifier in the product (Triage.classifier_batch default)
BATCH = 32
#: the batch sequence of the "varying batch" configurations (a series' last batch differs)
VARYING = (32, 7, 32, 19, 32, 3, 32, 26)
#: no configuration of the ORT matrix measures longer than this (seconds), after 3 calls at least
CONFIG_BUDGET_S = 4.0
#: Triage runs per input kind stop after this many seconds (3 runs at least)
TRIAGE_BUDGET_S = 25.0


# --- helpers --------------------------------------------------------------------------------------
def _error(exc: BaseException) -> Dict[str, Any]:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": "".join(tb)[-3000:]}


def _not_on_gpu(why: str) -> Dict[str, Any]:
    return {"status": NOT_ON_GPU, "reason": why}


def _time_calls(fn: Callable[[], Any], sync: Callable[[], None], rounds: int, warmup: int = 3,
                budget_s: Optional[float] = None) -> Dict[str, Any]:
    """Wall ms of ``fn(); sync()`` over ``rounds`` calls after ``warmup`` (stops early, after 3
    calls at least, when ``budget_s`` is spent)."""
    for _ in range(warmup):
        fn()
        sync()
    times: List[float] = []
    start = time.perf_counter()
    for _ in range(max(1, rounds)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
        if budget_s is not None and len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return _stats(times)


def _stats(times: Sequence[float]) -> Dict[str, Any]:
    s = summarize(times)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _has(module: str) -> bool:
    from .._lazy import available

    return available(module)


def _gpu_reason() -> Optional[str]:
    """None when an NVIDIA GPU is visible, else why not."""
    from ..runtime.gpu import gpu_info, gpu_reasons

    return None if gpu_info() is not None else "; ".join(gpu_reasons()) or "no GPU"


def _nvml_used_mb() -> Optional[float]:
    try:
        from .memory import nvml

        n = nvml()
        return round(n.used_bytes() / 2**20, 1) if n is not None else None
    except Exception:  # noqa: BLE001 - psutil/NVML absent: no number
        return None


# --- environment ----------------------------------------------------------------------------------
def section_environment() -> Dict[str, Any]:
    from ..runtime.gpu import gpu_info

    env: Dict[str, Any] = {"status": "ok", "python": platform.python_version(), "platform": platform.platform(),
                           "cpu_cores": usable_cores()}
    g = gpu_info()
    env["gpu"] = g.to_dict() if g else None
    try:
        from .machine import gpus

        env["nvidia_smi"] = gpus()
    except Exception as exc:  # noqa: BLE001
        env["nvidia_smi"] = _error(exc)
    env["versions"] = {d: _version(d) for d in ("onnxruntime", "onnxruntime-gpu", "cupy-cuda13x", "cupy-cuda12x",
                                                "pycuda", "torch", "numpy", "opencv-python-headless", "xgboost",
                                                "xgboost-cpu", "pydicom", "cuda-bindings", "nvidia-nvimgcodec-cu13")
                       if _version(d)}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = {"version": ort.__version__, "file": ort.__file__, "device": ort.get_device(),
                              "providers": ort.get_available_providers()}
    except Exception as exc:  # noqa: BLE001
        env["onnxruntime"] = _error(exc)
    if _has("cupy") and g is not None:
        try:
            import cupy

            rt = cupy.cuda.runtime
            env["cuda"] = {"runtime": rt.runtimeGetVersion(), "driver": rt.driverGetVersion(), "cupy": cupy.__version__}
        except Exception as exc:  # noqa: BLE001
            env["cuda"] = _error(exc)
    env["ctsdk_env"] = {k: v for k, v in os.environ.items() if k.startswith("CTSDK_")}
    return env


# --- kernels --------------------------------------------------------------------------------------
def _kernel_inputs(slices: int = 300) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 1500, size=(slices, 512, 512), dtype=np.int16)
    z = np.arange(slices, dtype=np.float64) * 1.0
    lung = np.zeros(hu.shape, np.uint8)
    lung[:, 128:384, 96:416] = 1
    idx = np.linspace(0, slices - 1, 64).astype(np.int32)
    f = rng.normal(size=(64, 1280, 7, 7)).astype(np.float32)
    return {"hu": hu, "z": z, "lung": lung, "idx": idx, "f": f}


def _kernel_cases(k: Any, d: Dict[str, Any], data: Dict[str, Any]) -> Dict[str, Callable[[], Any]]:
    seg = (-1000.0, 400.0)
    return {
        "resample 300x512^2 -> 128^3 linear (windowed)":
            lambda: k.resample(d["hu"], data["z"], (128, 128, 128), mode="linear", window=seg),
        "resample 300x512^2 -> 128^3 area (windowed)":
            lambda: k.resample(d["hu"], data["z"], (128, 128, 128), mode="area", window=seg),
        "classifier inputs 64 slices -> 64x3x224^2": lambda: k.classifier_inputs(d["hu"], d["lung"], data["idx"], 224),
        "mask weights 64x1x224^2 -> 7x7": lambda: k.mask_weights(d["x"], (7, 7), channel=1),
        "masked GAP 64x1280x7x7 fp32": lambda: k.masked_gap(d["f"], d["w"]),
        "masked GAP 64x1280x7x7 fp16": lambda: k.masked_gap(d["f16"], d["w"]),
    }


def _numpy_cases(data: Dict[str, Any]) -> Dict[str, Callable[[], Any]]:
    from ..pooling import mask_weights, masked_gap
    from ..volume.resample import classifier_inputs, resample_volume

    seg = (-1000.0, 400.0)
    x = classifier_inputs(data["hu"], data["lung"] != 0, data["idx"], 224)
    w = mask_weights(x[:, 1:2])
    data["x_ref"], data["w_ref"] = x, w
    return {
        "resample 300x512^2 -> 128^3 linear (windowed)": lambda: resample_volume(data["hu"], data["z"], mode="linear", window=seg),
        "resample 300x512^2 -> 128^3 area (windowed)": lambda: resample_volume(data["hu"], data["z"], mode="area", window=seg),
        "classifier inputs 64 slices -> 64x3x224^2": lambda: classifier_inputs(data["hu"], data["lung"] != 0, data["idx"], 224),
        "mask weights 64x1x224^2 -> 7x7": lambda: mask_weights(x[:, 1:2]),
        "masked GAP 64x1280x7x7 fp32": lambda: masked_gap(data["f"], w),
        "masked GAP 64x1280x7x7 fp16": lambda: masked_gap(data["f"].astype(np.float16), w),
    }


def _torch_cases(data: Dict[str, Any]) -> Tuple[Dict[str, Callable[[], Any]], Callable[[], None]]:
    """torch equivalents on the GPU (same shapes, torch's own arithmetic: trilinear /
    adaptive_avg_pool3d / bilinear / adaptive_avg_pool2d / sum)."""
    import torch
    import torch.nn.functional as F

    dev = torch.device("cuda")
    hu = torch.from_numpy(data["hu"]).to(dev)
    lung = torch.from_numpy(data["lung"]).to(dev)
    idx = torch.from_numpy(data["idx"].astype(np.int64)).to(dev)
    f = torch.from_numpy(data["f"]).to(dev)
    f16 = f.half()

    def win(t: Any, lo: float, hi: float) -> Any:
        return ((t - lo) / (hi - lo)).clamp_(0.0, 1.0)

    def cls_inputs() -> Any:
        g = win(hu.index_select(0, idx).float(), -1350.0, 150.0)[:, None]
        g = F.interpolate(g, size=(224, 224), mode="bilinear", align_corners=False)
        m = F.interpolate(lung.index_select(0, idx).float()[:, None], size=(224, 224), mode="nearest")
        return torch.cat([g, m, g * m], 1)

    x = cls_inputs()
    w = F.adaptive_avg_pool2d(x[:, 1:2], 7)
    cases = {
        "resample 300x512^2 -> 128^3 linear (windowed)":
            lambda: win(F.interpolate(hu.float()[None, None], size=(128, 128, 128), mode="trilinear", align_corners=False), -1000.0, 400.0),
        "resample 300x512^2 -> 128^3 area (windowed)":
            lambda: win(F.adaptive_avg_pool3d(hu.float()[None, None], 128), -1000.0, 400.0),
        "classifier inputs 64 slices -> 64x3x224^2": cls_inputs,
        "mask weights 64x1x224^2 -> 7x7": lambda: F.adaptive_avg_pool2d(x[:, 1:2], 7),
        "masked GAP 64x1280x7x7 fp32": lambda: (f * w).sum((2, 3)),
        "masked GAP 64x1280x7x7 fp16": lambda: (f16.float() * w).sum((2, 3)),
    }
    return cases, torch.cuda.synchronize


def section_kernels(rounds: int, backends: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    why = _gpu_reason()
    if why:
        return _not_on_gpu(why)
    from ..kernels.gpu import GpuKernels, gpu_backends

    data = _kernel_inputs()
    out: Dict[str, Any] = {"status": "ok", "rounds": rounds, "volume": list(data["hu"].shape), "cases": {}, "backends": {}}
    refs: Dict[str, np.ndarray] = {}
    try:
        np_cases = _numpy_cases(data)
        for name, fn in np_cases.items():
            refs[name] = np.asarray(fn(), np.float64)
            out["cases"].setdefault(name, {})["numpy"] = _time_calls(fn, lambda: None, min(rounds, 2), warmup=0)
    except Exception as exc:  # noqa: BLE001
        out["numpy_error"] = _error(exc)
    for backend, missing in gpu_backends().items():
        if backends is not None and backend not in backends:
            out["backends"][backend] = {"status": "not requested", "reason": f"--backends {','.join(backends)}"}
            continue
        if missing:
            out["backends"][backend] = {"status": "not installed", "reason": missing}
            continue
        try:
            k = GpuKernels(backend=backend)
            info: Dict[str, Any] = {"status": "ok", "describe": k.describe()}
            t0 = time.perf_counter()
            d: Dict[str, Any] = {"hu": k.to_device(data["hu"])}
            k.synchronize()
            info["upload_volume_pageable_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
            info["upload_volume_pageable_warm"] = _time_calls(lambda: k.to_device(data["hu"]), k.synchronize, min(rounds, 5), warmup=1)
            d["lung"] = k.to_device(data["lung"])
            d["x"] = k.classifier_inputs(d["hu"], d["lung"], data["idx"], 224)
            d["w"] = k.mask_weights(d["x"], (7, 7), channel=1)
            d["f"], d["f16"] = k.to_device(data["f"]), k.to_device(data["f"].astype(np.float16))
            for name, fn in _kernel_cases(k, d, data).items():
                row = out["cases"].setdefault(name, {})
                try:
                    row[backend] = _time_calls(fn, k.synchronize, rounds)
                    if name in refs:
                        got = np.asarray(k.to_host(fn()), np.float64)
                        row[f"{backend}_max_abs_diff_vs_numpy"] = float(np.abs(got - refs[name]).max())
                except Exception as exc:  # noqa: BLE001
                    row[backend] = _error(exc)
            out["backends"][backend] = info
            del d
        except Exception as exc:  # noqa: BLE001
            out["backends"][backend] = _error(exc)
    if _has("torch"):
        try:
            import torch

            if torch.cuda.is_available():
                cases, sync = _torch_cases(data)
                for name, fn in cases.items():
                    out["cases"].setdefault(name, {})["torch"] = _time_calls(fn, sync, rounds)
                out["torch"] = {"status": "ok", "version": torch.__version__}
            else:
                out["torch"] = {"status": "skipped", "reason": "torch.cuda.is_available() is False"}
        except Exception as exc:  # noqa: BLE001
            out["torch"] = _error(exc)
    else:
        out["torch"] = {"status": "skipped", "reason": "torch is not installed"}
    return out


# --- ORT diagnosis matrix -------------------------------------------------------------------------
def _classifier_input(batch: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = np.zeros((batch, 3, 224, 224), np.float32)
    x[:, 0] = rng.random((batch, 224, 224), dtype=np.float32)
    x[:, 1, 56:168, 40:184] = 1.0
    x[:, 2] = x[:, 0] * x[:, 1]
    return x


def _plain_session(path: str, provider: str, *, device_id: Optional[bool], threads: Optional[int],
                   search: Optional[str], profile: Optional[str] = None, graph: bool = False) -> Any:
    """An ``onnxruntime.InferenceSession`` built option by option (the matrix's building block)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if provider == "CPUExecutionProvider":
        return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    opts: Dict[str, str] = {}
    if device_id:
        opts["device_id"] = "0"
    if search:
        opts["cudnn_conv_algo_search"] = search
    if graph:
        opts["enable_cuda_graph"] = "1"
    return ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", opts), "CPUExecutionProvider"])


def _host_call(sess: Any, batches: Sequence[int]) -> Callable[[], Any]:
    """A call that feeds NumPy batches in turn (a fixed batch, or the varying sequence)."""
    xs = [_classifier_input(b) for b in sorted(set(batches))]
    by = {x.shape[0]: x for x in xs}
    state = {"i": 0}
    names = ["probs", "cam"]

    def call() -> Any:
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        return sess.run(names, {"image": by[b]})

    return call


@contextlib.contextmanager
def _pycuda_primary_pushed() -> Iterator[None]:
    """The old product's state: pycuda's handle on the primary context left pushed on the thread."""
    import pycuda.driver as drv

    drv.init()
    ctx = drv.Device(0).retain_primary_context()
    ctx.push()
    try:
        yield
    finally:
        drv.Context.pop()


def _ort_configs(provider: str) -> List[Dict[str, Any]]:
    """The matrix: name, how the session is built, and what a call feeds."""
    cores = usable_cores()
    old = {"device_id": True, "threads": cores, "search": None}  # main before this change
    rows: List[Dict[str, Any]] = [
        {"name": "InferenceSession default (providers=[CUDA])", "plain": {"device_id": False, "threads": None, "search": None}},
        {"name": f"old product: device_id=0, {cores} threads, EXHAUSTIVE", "plain": dict(old)},
        {"name": "old product, no device_id", "plain": {**old, "device_id": False}},
        {"name": "old product, 1 thread", "plain": {**old, "threads": 1}},
        {"name": "old product, HEURISTIC", "plain": {**old, "search": "HEURISTIC"}},
        {"name": "old product, DEFAULT search", "plain": {**old, "search": "DEFAULT"}},
        {"name": "old product, varying batch", "plain": dict(old), "batches": VARYING},
        {"name": "old product, pycuda primary context pushed", "plain": dict(old), "pycuda": "primary"},
        {"name": "old product, pycuda own context pushed (subprocess)", "plain": dict(old), "pycuda": "own"},
        {"name": "product OrtSession(fixed_batch=32), numpy feed", "product": {}},
        {"name": "product OrtSession(fixed_batch=32), varying batch", "product": {}, "batches": VARYING},
        {"name": "product OrtSession, EXHAUSTIVE, varying batch", "product": {"search": "EXHAUSTIVE"}, "batches": VARYING},
        {"name": "product OrtSession.run_device (IOBinding, CuPy buffers)", "product": {}, "device": True},
        {"name": "product OrtSession.run_device + CUDA graph", "product": {"graph": True}, "device": True},
    ]
    if provider == "CPUExecutionProvider":  # --smoke-cpu: the same machinery on the CPU EP
        rows = [r for r in rows if "pycuda" not in r][:3] + [r for r in rows if "product" in r][:3]
    return rows


def _build(cfg: Dict[str, Any], path: str, provider: str, profile: Optional[str] = None) -> Tuple[Any, Callable[[], Any], Callable[[], None]]:
    """(session, call, sync) for one matrix row."""
    batches = tuple(cfg.get("batches") or (BATCH,))
    if "plain" in cfg:
        p = cfg["plain"]
        sess = _plain_session(path, provider, device_id=p["device_id"], threads=p["threads"], search=p["search"], profile=profile)
        return sess, _host_call(sess, batches), lambda: None
    from ..runtime.ort import OrtSession

    p = cfg["product"]
    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    extra = {"cudnn_conv_algo_search": p["search"]} if p.get("search") else None
    s = OrtSession(path, device=device, strict=device == "cuda", fixed_batch=BATCH, cuda_graph=bool(p.get("graph")),
                   provider_options=extra, profile=profile)
    if cfg.get("device"):
        import cupy as cp

        xs = {b: cp.asarray(_classifier_input(b)) for b in set(batches)}
        state = {"i": 0}

        def dcall() -> Any:
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            return s.run_device({"image": xs[b]}, ["probs", "cam"])

        return s, dcall, lambda: cp.cuda.get_current_stream().synchronize()
    xs_h = {b: _classifier_input(b) for b in set(batches)}
    state_h = {"i": 0}

    def hcall() -> Any:
        b = batches[state_h["i"] % len(batches)]
        state_h["i"] += 1
        return s.infer({"image": xs_h[b]}, ["probs", "cam"])

    return s, hcall, lambda: None


def _measure_config(cfg: Dict[str, Any], path: str, provider: str, rounds: int) -> Dict[str, Any]:
    t0 = time.perf_counter()
    sess, call, sync = _build(cfg, path, provider)
    row: Dict[str, Any] = {"status": "ok", "create_ms": round((time.perf_counter() - t0) * 1000.0, 1)}
    if hasattr(sess, "options"):
        row["options"] = sess.options()
    elif hasattr(sess, "get_provider_options"):
        row["options"] = {"granted": sess.get_providers(), "provider_options": sess.get_provider_options()}
    t1 = time.perf_counter()
    call()
    sync()
    row["first_call_ms"] = round((time.perf_counter() - t1) * 1000.0, 1)
    n = len(cfg.get("batches") or (BATCH,))
    warm = max(2, n) if row["first_call_ms"] < 500 else 1  # a slow configuration is not warmed for long
    row["per_call"] = _time_calls(call, sync, max(rounds, n), warmup=warm, budget_s=CONFIG_BUDGET_S)
    row["batches"] = list(cfg.get("batches") or (BATCH,))
    if hasattr(sess, "transfer_bytes"):
        row["transfer_bytes_total"] = dict(sess.transfer_bytes)  # host<->device bytes of every call above
    return row


def _own_context_subprocess(path: str, rounds: int) -> Dict[str, Any]:
    """The old product's session with a pycuda context of its own (``make_context``) pushed on
    the thread, in a child process (a context mix-up may poison the process)."""
    code = ("import json, sys\n"
            "from sdk.bench.gpu_report import _own_context_child\n"
            "print('GPU_REPORT_JSON ' + json.dumps(_own_context_child(sys.argv[1], int(sys.argv[2]))))\n")
    r = subprocess.run([sys.executable, "-c", code, path, str(rounds)], capture_output=True, text=True, timeout=180)
    for line in r.stdout.splitlines():
        if line.startswith("GPU_REPORT_JSON "):
            out = json.loads(line[len("GPU_REPORT_JSON "):])
            out["exit_code"] = r.returncode
            return out
    return {"status": "error", "error": f"child exited {r.returncode} without a result", "stderr": r.stderr[-3000:]}


def _own_context_child(path: str, rounds: int) -> Dict[str, Any]:
    import pycuda.driver as drv

    drv.init()
    ctx = drv.Device(0).make_context()  # pushed: current on this thread
    try:
        cores = usable_cores()
        cfg = {"plain": {"device_id": True, "threads": cores, "search": None}}
        return _measure_config(cfg, path, "CUDAExecutionProvider", rounds)
    except Exception as exc:  # noqa: BLE001
        return _error(exc)
    finally:
        drv.Context.pop()
        ctx.detach()


def summarize_profile(path: str, top: int = 12) -> Dict[str, Any]:
    """ORT profiler JSON -> total time per operator type and per provider, and the run times."""
    events = json.loads(Path(path).read_text())
    by_op: Dict[str, float] = {}
    by_provider: Dict[str, float] = {}
    runs: List[float] = []
    for e in events:
        if not isinstance(e, dict):
            continue
        dur = float(e.get("dur", 0)) / 1000.0
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(dur)
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        args = e.get("args", {}) or {}
        op = str(args.get("op_name", "?"))
        by_op[op] = by_op.get(op, 0.0) + dur
        prov = str(args.get("provider", "?"))
        by_provider[prov] = by_provider.get(prov, 0.0) + dur
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"file": str(path), "model_runs_ms": [round(r, 3) for r in runs],
            "top_ops_ms": [[k, round(v, 3)] for k, v in ops],
            "by_provider_ms": {k: round(v, 3) for k, v in sorted(by_provider.items(), key=lambda kv: -kv[1])}}


def _profile(cfg: Dict[str, Any], path: str, provider: str, out_dir: Path, tag: str) -> Dict[str, Any]:
    prefix = str(out_dir / f"ort_profile_{tag}")
    sess, call, sync = _build(cfg, path, provider, profile=prefix)
    for _ in range(max(4, len(cfg.get("batches") or ()))):
        call()
        sync()
    raw = sess.end_profiling()
    return {"config": cfg["name"], **summarize_profile(raw)}


def section_ort(rounds: int, bundle: Optional[str], out_dir: Path, provider: str = "CUDAExecutionProvider",
                backends: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    if provider == "CUDAExecutionProvider":
        why = _gpu_reason()
        if why:
            return _not_on_gpu(why)
        from ..runtime.ort import CUDA_EP, probe_provider

        ok, reason = probe_provider(CUDA_EP)
        if not ok:
            return _not_on_gpu(reason)
    from ..bundle import load_bundle

    paths = load_bundle(bundle).classifier_paths()
    out: Dict[str, Any] = {"status": "ok", "provider": provider, "rounds": rounds, "batch": BATCH, "models": {}}
    for prec in ("fp16", "fp32"):
        if prec not in paths:
            out["models"][prec] = {"status": "skipped", "reason": f"the bundle has no {prec} classifier"}
            continue
        path = str(paths[prec])
        rows: Dict[str, Any] = {}
        configs = _ort_configs(provider)
        if prec == "fp32":  # the full matrix on FP16 (the GPU default); the main rows on FP32
            configs = [c for c in configs if c["name"].startswith(("InferenceSession", "old product:", "product OrtSession(fixed"))]
        for cfg in configs:
            try:
                if cfg.get("pycuda") and backends is not None and "pycuda" not in backends:
                    rows[cfg["name"]] = {"status": "skipped", "reason": "pycuda not requested (--backends)"}
                elif cfg.get("pycuda") and not _has("pycuda"):
                    rows[cfg["name"]] = {"status": "skipped", "reason": "pycuda is not installed"}
                elif cfg.get("pycuda") == "own":
                    rows[cfg["name"]] = _own_context_subprocess(path, rounds)
                elif cfg.get("pycuda") == "primary":
                    with _pycuda_primary_pushed():
                        rows[cfg["name"]] = _measure_config(cfg, path, provider, rounds)
                else:
                    rows[cfg["name"]] = _measure_config(cfg, path, provider, rounds)
            except Exception as exc:  # noqa: BLE001 - recorded; the matrix goes on
                rows[cfg["name"]] = _error(exc)
        out["models"][prec] = {"path": path, "configs": rows}
    try:
        fp16 = out["models"].get("fp16", {}).get("configs", {})
        timed = {k: v["per_call"]["p50"] for k, v in fp16.items() if v.get("status") == "ok" and "per_call" in v}
        if timed:
            cfgs = {c["name"]: c for c in _ort_configs(provider)}
            slowest = max((k for k in timed if not cfgs.get(k, {}).get("pycuda")), key=timed.get, default=None)
            prof = {}
            for tag, name in (("slowest", slowest), ("product", "product OrtSession(fixed_batch=32), numpy feed")):
                if name and name in cfgs:
                    try:
                        prof[tag] = _profile(cfgs[name], str(paths["fp16"]), provider, out_dir, tag)
                    except Exception as exc:  # noqa: BLE001
                        prof[tag] = _error(exc)
            out["profiles"] = prof
    except Exception as exc:  # noqa: BLE001
        out["profiles"] = _error(exc)
    return out


# --- Triage ---------------------------------------------------------------------------------------
def default_series(tmp: Path) -> Tuple[str, str]:
    """(path, what) of the series to triage: covid-P001 from ../shared/data (or
    ``$CTSDK_SHARED_DATA``) when present, else a phantom written to ``tmp``."""
    from ..paths import shared_data_candidates

    for root in shared_data_candidates():
        p = root / "dicom" / "covid-ct-md" / "covid-P001"
        if p.is_dir():
            return str(p), "covid-P001"
    from ..phantom import write_phantom_series

    write_phantom_series(tmp / "phantom", n_slices=64, size=256, spacing=(2.0, 1.4, 1.4), noise_hu=10.0, seed=2,
                         ground_glass=True, consolidation=True)
    return str(tmp / "phantom"), "phantom (64 x 256^2)"


def _stage_summary(runs: Sequence[Dict[str, float]]) -> Dict[str, Any]:
    keys: List[str] = []
    for r in runs:
        keys.extend(k for k in r if k not in keys)
    return {k: _stats([float(r.get(k, 0.0)) for r in runs]) for k in keys}


def _gpu_pool_mb() -> Optional[Dict[str, float]]:
    if not _has("cupy"):
        return None
    try:
        import cupy

        pool = cupy.get_default_memory_pool()
        return {"cupy_pool_used_mb": round(pool.used_bytes() / 2**20, 1), "cupy_pool_total_mb": round(pool.total_bytes() / 2**20, 1)}
    except Exception:  # noqa: BLE001
        return None


def _transfers(result: Any) -> Any:
    """Host<->device byte counts a TriageResult reports (``transfers`` attribute or method), if any."""
    t = getattr(result, "transfers", None)
    t = t() if callable(t) else t
    if t is None:
        return None
    return t.to_dict() if hasattr(t, "to_dict") else t


def _agreement(gpu: Any, cpu: Any) -> Dict[str, Any]:
    """Label, series and slice probabilities of two TriageResults."""
    out: Dict[str, Any] = {"label_gpu": gpu.label, "label_cpu": cpu.label, "same_label": gpu.label == cpu.label}
    if gpu.probabilities and cpu.probabilities:
        out["max_abs_dp_series"] = max(abs(float(gpu.probabilities[c]) - float(cpu.probabilities[c])) for c in cpu.probabilities)
    g = {s.index: s.probabilities for s in gpu.slice_scores}
    c = {s.index: s.probabilities for s in cpu.slice_scores}
    common = sorted(set(g) & set(c))
    out["slices_gpu"], out["slices_cpu"], out["slices_common"] = len(g), len(c), len(common)
    if common:
        out["max_abs_dp_slices"] = max(abs(float(g[i][k]) - float(c[i][k])) for i in common for k in c[i])
    return out


def _warm_runs(tri: Any, source: Any, rounds: int, peak: float) -> Tuple[List[Dict[str, float]], Any, float]:
    """``rounds`` warm ``tri.run(source)`` calls (3 at least, then until TRIAGE_BUDGET_S is spent):
    their timings, the last result, and the sampled peak of NVML's used memory (MB)."""
    runs: List[Dict[str, float]] = []
    last = None
    t_start = time.perf_counter()
    for _ in range(max(1, rounds)):
        last = tri.run(source)
        runs.append(dict(last.timings_ms))
        peak = max(peak, _nvml_used_mb() or 0.0)
        if len(runs) >= 3 and time.perf_counter() - t_start > TRIAGE_BUDGET_S:
            break
    return runs, last, peak


def section_triage(rounds: int, series: Optional[str], bundle: Optional[str], tmp: Path, device: str = "cuda",
                   lung_method: str = "auto") -> Dict[str, Any]:
    if device == "cuda":
        why = _gpu_reason()
        if why:
            return _not_on_gpu(why)
    from ..io import load_series
    from ..triage import Triage

    path, what = (series, str(series)) if series else default_series(tmp)
    out: Dict[str, Any] = {"status": "ok", "series": what, "path": path, "rounds": rounds, "device": device,
                           "lung_method": lung_method}
    mem: Dict[str, Any] = {"nvml_used_mb_before": _nvml_used_mb()}
    t0 = time.perf_counter()
    precision = "fp16" if device == "cuda" else "fp32"
    tri = Triage(bundle, device=device, precision=precision, lung_method=lung_method)
    out["init_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
    out["runtime_reasons"] = list(getattr(tri, "runtime_reasons", []))
    mem["nvml_used_mb_after_init"] = _nvml_used_mb()
    first = tri.run(path)
    out["first_run_ms"] = first.timings_ms
    out["runtime"] = dict(first.runtime)
    peak = mem["nvml_used_mb_after_init"] or 0.0
    runs_files, last, peak = _warm_runs(tri, path, rounds, peak)
    out["from_files"] = _stage_summary(runs_files)
    volume = load_series(path)
    tri.run(volume)
    runs_vol, last_v, peak = _warm_runs(tri, volume, rounds, peak)
    out["from_volume"] = _stage_summary(runs_vol)
    out["label"] = last_v.label
    out["probabilities"] = dict(last_v.probabilities)
    out["transfers"] = _transfers(last_v)
    out["transfers_from_files"] = _transfers(last)
    mem["nvml_used_mb_peak_sampled"] = peak or None
    mem["cupy_pool"] = _gpu_pool_mb()
    try:
        from ..runtime.gpu import device_memory

        fm = device_memory(0) if device == "cuda" else None
        mem["cudaMemGetInfo_free_total_mb"] = [round(v / 2**20, 1) for v in fm] if fm else None
    except Exception as exc:  # noqa: BLE001
        mem["cudaMemGetInfo_free_total_mb"] = _error(exc)
    out["gpu_memory"] = mem
    try:
        ref = Triage(bundle, device="cpu", precision="fp32").run(volume)
        out["agreement_vs_cpu_fp32"] = _agreement(last_v, ref)
    except Exception as exc:  # noqa: BLE001
        out["agreement_vs_cpu_fp32"] = _error(exc)
    out["goals"] = goals(out)
    return out


def goals(t: Dict[str, Any]) -> Dict[str, Any]:
    """Issue 13's bars, checked on the measured numbers: warm total p50 from a Volume <= 30 ms,
    from the files <= 500 ms, same label as the CPU path, |dp| <= 0.02 (series and slices)."""
    agree = t.get("agreement_vs_cpu_fp32") or {}
    vol = (t.get("from_volume") or {}).get("total", {}).get("p50")
    files = (t.get("from_files") or {}).get("total", {}).get("p50")
    dps = [agree.get("max_abs_dp_series"), agree.get("max_abs_dp_slices")]
    return {
        "volume_total_p50_ms<=30": None if vol is None else vol <= 30.0,
        "files_total_p50_ms<=500": None if files is None else files <= 500.0,
        "same_label_as_cpu": agree.get("same_label"),
        "max_abs_dp<=0.02": None if any(d is None for d in dps) else max(dps) <= 0.02,
    }


# --- outputs --------------------------------------------------------------------------------------
def _ms(d: Any, key: str = "p50") -> str:
    if isinstance(d, dict) and key in d:
        return f"{d[key]:.3f}" if d[key] < 10 else f"{d[key]:.1f}"
    if isinstance(d, dict) and d.get("status") == "error":
        return "error"
    return "-"


def _triage_md(t: Dict[str, Any], lungs: str) -> List[str]:
    """The markdown of one Triage section (``lungs``: its lung method)."""
    L: List[str] = []
    L += [f"### Triage(device=\"{t['device']}\", lung_method=\"{lungs}\") on {t['series']} (ms, {t['rounds']} warm runs each)", "",
          f"runtime: `{json.dumps(t.get('runtime'))}`", "",
          "| stage | from files p50 | p95 | from Volume p50 | p95 |", "|---|---|---|---|---|"]
    stages = list(t["from_files"]) + [s for s in t["from_volume"] if s not in t["from_files"]]
    for s in stages:
        a, b = t["from_files"].get(s), t["from_volume"].get(s)
        L.append(f"| {s} | {_ms(a)} | {_ms(a, 'p95')} | {_ms(b)} | {_ms(b, 'p95')} |")
    L += ["", f"- host<->device bytes (from a Volume): {t.get('transfers')}",
          f"- host<->device bytes (from files): {t.get('transfers_from_files')}",
          f"- GPU memory: {t.get('gpu_memory')}",
          f"- agreement with Triage(device=\"cpu\", precision=\"fp32\"): {t.get('agreement_vs_cpu_fp32')}",
          f"- init {t.get('init_ms')} ms; label {t.get('label')} {t.get('probabilities')}",
          f"- issue 13 goals (True = met): {t.get('goals')}", ""]
    return L


def to_markdown(rep: Dict[str, Any]) -> str:
    L: List[str] = [f"<!-- written by {rep.get('command')} on {rep.get('date')} -->", ""]
    env = rep["sections"].get("environment", {})
    g = env.get("gpu") or {}
    ortv = env.get("onnxruntime", {})
    L += ["### Machine", "",
          f"- GPU: {g.get('name', NOT_ON_GPU)} (compute {g.get('compute_capability', '-')}, driver {g.get('driver', '-')})",
          f"- CUDA runtime / driver API: {env.get('cuda', {}).get('runtime', '-')} / {env.get('cuda', {}).get('driver', '-')}",
          f"- onnxruntime {ortv.get('version', '-')} ({', '.join(ortv.get('providers', []))}); "
          + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
          f"- Python {env.get('python')}, {env.get('cpu_cores')} cores", ""]
    # every Triage section: "triage" (lung method auto) and one "triage-<method>" per further --lungs
    triage_keys = [n for n in rep["sections"] if n == "triage" or n.startswith("triage-")]
    for name in [n for n in SECTIONS[1:] if n in rep["sections"] and n != "triage"] + triage_keys:
        s = rep["sections"][name]
        if s.get("status") != "ok":
            L += [f"### {name}", "", f"**{s.get('status', 'missing')}**: {s.get('reason') or s.get('error', '')}", ""]
    k = rep["sections"].get("kernels", {})
    if k.get("status") == "ok":
        L += [f"### Kernels ({' x '.join(map(str, k['volume']))} int16; ms p50 / p95 over {k['rounds']} calls, synchronized)", "",
              "| case | ctsdk CuPy | ctsdk pycuda | torch | NumPy | max abs diff vs NumPy (CuPy / pycuda) |", "|---|---|---|---|---|---|"]
        for case, row in k["cases"].items():
            cells = [f"{_ms(row.get(b))} / {_ms(row.get(b), 'p95')}" for b in ("cupy", "pycuda", "torch")]
            diffs = " / ".join(f"{row[f'{b}_max_abs_diff_vs_numpy']:.1e}" if f"{b}_max_abs_diff_vs_numpy" in row else "-" for b in ("cupy", "pycuda"))
            L.append(f"| {case} | {' | '.join(cells)} | {_ms(row.get('numpy'))} | {diffs} |")
        for b, info in k.get("backends", {}).items():
            if info.get("status") == "ok":
                L.append(f"\n{b}: {info['describe'].get('context')} context, {info['describe'].get('memory')}; "
                         f"volume upload (pageable) {info.get('upload_volume_pageable_ms')} ms first, "
                         f"{_ms(info.get('upload_volume_pageable_warm'))} ms warm")
            else:
                L.append(f"\n{b}: {info.get('status')}: {info.get('reason') or info.get('error')}")
        L.append("")
    o = rep["sections"].get("ort", {})
    if o.get("status") == "ok":
        L += [f"### ONNX Runtime classifier ({o['provider']}, batch {o['batch']}; ms per run call)", "",
              "| model | configuration | create | first call | p50 | p95 | calls |", "|---|---|---|---|---|---|---|"]
        for prec, m in o["models"].items():
            for name, r in (m.get("configs") or {}).items():
                if r.get("status") == "ok":
                    L.append(f"| {prec} | {name} | {r['create_ms']:.0f} | {r['first_call_ms']:.1f} | {_ms(r['per_call'])} | "
                             f"{_ms(r['per_call'], 'p95')} | {r['per_call']['n']} |")
                else:
                    L.append(f"| {prec} | {name} | {r.get('status')}: {str(r.get('error') or r.get('reason'))[:160]} | | | | |")
        for tag, p in (o.get("profiles") or {}).items():
            if isinstance(p, dict) and p.get("top_ops_ms"):
                ops = ", ".join(f"{op} {ms:.1f}" for op, ms in p["top_ops_ms"][:8])
                L.append(f"\nProfile ({tag}: {p['config']}): runs {p['model_runs_ms'][:6]} ms; by provider "
                         f"{p['by_provider_ms']}; top ops (ms, all runs): {ops}")
            elif isinstance(p, dict) and p.get("status") == "error":
                L.append(f"\nProfile ({tag}): error {p['error']}")
        L.append("")
    for key in triage_keys:
        t = rep["sections"][key]
        if t.get("status") == "ok":
            L += _triage_md(t, "auto" if key == "triage" else key[len("triage-"):])
    if rep.get("charts"):
        L += [f"![GPU report]({Path(c).name})" for c in rep["charts"].values()] + [""]
    return "\n".join(L)


def write_chart(rep: Dict[str, Any], path: Path) -> Optional[str]:
    """Kernels (ms, log) and the FP16 ORT matrix (ms per call, log) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = rep["sections"].get("kernels", {})
    o = rep["sections"].get("ort", {})
    rows = (o.get("models", {}).get("fp16", {}) or {}).get("configs", {}) if o.get("status") == "ok" else {}
    timed = [(n, r["per_call"]["p50"]) for n, r in rows.items() if r.get("status") == "ok"]
    if k.get("status") != "ok" and not timed:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(16, 6.5))
    if k.get("status") == "ok":
        cases = list(k["cases"])
        impls = [b for b in ("cupy", "pycuda", "torch", "numpy") if any(isinstance(k["cases"][c].get(b), dict) and "p50" in k["cases"][c][b] for c in cases)]
        wid = 0.8 / max(1, len(impls))
        for i, b in enumerate(impls):
            vals = [k["cases"][c].get(b, {}).get("p50", np.nan) if isinstance(k["cases"][c].get(b), dict) else np.nan for c in cases]
            axes[0].bar(np.arange(len(cases)) + i * wid, vals, wid, label=b)
        axes[0].set_xticks(np.arange(len(cases)) + 0.4 - wid / 2)
        axes[0].set_xticklabels([c.split(" ->")[0].replace("300x512^2", "") for c in cases], rotation=30, ha="right", fontsize=8)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("ms (p50, log)")
        axes[0].set_title("kernels on a 300x512^2 volume")
        axes[0].legend()
    if timed:
        names, vals = zip(*timed)
        axes[1].barh(range(len(vals)), vals, color="tab:orange")
        axes[1].set_yticks(range(len(vals)))
        axes[1].set_yticklabels([n[:60] for n in names], fontsize=7)
        axes[1].set_xscale("log")
        axes[1].invert_yaxis()
        axes[1].set_xlabel("ms per run call (p50, log)")
        axes[1].set_title(f"classifier FP16, batch {BATCH}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_report(out_dir: Path, *, series: Optional[str] = None, rounds: int = 20, bundle: Optional[str] = None,
               sections: Sequence[str] = SECTIONS, smoke_cpu: bool = False, command: Optional[str] = None,
               backends: Optional[Sequence[str]] = None, lungs: Sequence[str] = ("auto",),
               progress: Callable[[str], None] = lambda m: print(f"gpu_report: {m}", file=sys.stderr, flush=True)) -> Dict[str, Any]:
    """Run the sections, write gpu_report.json / gpu.md / gpu_report.png into ``out_dir``; return the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep: Dict[str, Any] = {"schema": SCHEMA, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": command or "python -m sdk.bench.gpu_report " + " ".join(sys.argv[1:]),
                           "rounds": rounds, "smoke_cpu": smoke_cpu, "sections": {}}
    provider = "CPUExecutionProvider" if smoke_cpu else "CUDAExecutionProvider"
    device = "cpu" if smoke_cpu else "cuda"
    with tempfile.TemporaryDirectory(prefix="ctsdk-gpu-report-") as tmp:
        runners: Dict[str, Callable[[], Dict[str, Any]]] = {
            "environment": section_environment,
            "kernels": (lambda: _not_on_gpu("--smoke-cpu")) if smoke_cpu else (lambda: section_kernels(rounds, backends)),
            "ort": lambda: section_ort(rounds, bundle, out_dir, provider, backends),
        }
        names = [n for n in SECTIONS if n != "triage"]
        for lm in lungs:  # one Triage section per lung method: "triage" (auto) and "triage-<method>"
            key = "triage" if lm == "auto" else f"triage-{lm}"
            runners[key] = (lambda lm=lm: section_triage(rounds, series, bundle, Path(tmp), device, lm))
            names.append(key)
        for name in names:
            if name.split("-")[0] not in sections:
                continue
            progress(f"{name} ...")
            t0 = time.perf_counter()
            try:
                rep["sections"][name] = runners[name]()
            except Exception as exc:  # noqa: BLE001 - a report records what failed and goes on
                rep["sections"][name] = _error(exc)
            rep["sections"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            progress(f"{name}: {rep['sections'][name].get('status')} in {rep['sections'][name]['seconds']} s")
            (out_dir / "gpu_report.json").write_text(json.dumps(rep, indent=1, default=str))
    try:
        png = write_chart(rep, out_dir / "gpu_report.png")
        rep["charts"] = {"summary": png} if png else {}
    except Exception as exc:  # noqa: BLE001
        rep["charts_error"] = _error(exc)
    (out_dir / "gpu_report.json").write_text(json.dumps(rep, indent=1, default=str))
    (out_dir / "gpu.md").write_text(to_markdown(rep))
    return rep


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdk.bench.gpu_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_report.json, gpu.md, gpu_report.png")
    p.add_argument("--series", default=None, help="DICOM series folder (default: covid-P001 from ../shared/data, else a phantom)")
    p.add_argument("--rounds", type=int, default=20, help="measured calls per item after warm-up")
    p.add_argument("--bundle", default=None, help="model bundle folder (default: the packaged bundle)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--backends", default=None, help="comma-separated kernel backends to measure in-process (cupy,pycuda; default: every installed one)")
    p.add_argument("--lungs", default="auto", help="comma-separated lung methods for the Triage section (auto,hybrid,unet3d,hybrid3d): one section each")
    p.add_argument("--smoke-cpu", action="store_true", help="run the ORT/Triage code paths on the CPU (checks this script; numbers mean nothing)")
    a = p.parse_args(argv)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        p.error(f"unknown sections {bad}; choose from {SECTIONS}")
    # checked before anything runs: a typo must not cost a GPU session's minutes
    backends = [b.strip() for b in a.backends.split(",") if b.strip()] if a.backends else None
    bad = sorted(set(backends or ()) - set(KERNEL_BACKENDS))
    if bad:
        p.error(f"--backends: unknown {bad}; choose from {','.join(KERNEL_BACKENDS)}")
    from ..triage import LUNG_METHODS

    lungs = [m.strip() for m in a.lungs.split(",") if m.strip()]
    bad = sorted(set(lungs) - set(LUNG_METHODS))
    if bad or not lungs:
        p.error(f"--lungs: unknown {bad or '(empty)'}; choose from {','.join(LUNG_METHODS)}")
    rep = run_report(Path(a.out), series=a.series, rounds=max(1, a.rounds), bundle=a.bundle, sections=sections,
                     smoke_cpu=a.smoke_cpu, backends=backends, lungs=lungs)
    failed = [n for n, s in rep["sections"].items() if s.get("status") == "error"]
    print(f"wrote {Path(a.out) / 'gpu_report.json'}, {Path(a.out) / 'gpu.md'}"
          + (f", {rep['charts']['summary']}" if rep.get("charts", {}).get("summary") else "")
          + (f"; sections with errors: {failed}" if failed else ""))
    return 1 if failed else 0  # 1: a section failed (gpu.md says why); "not run on a GPU" is no failure


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
