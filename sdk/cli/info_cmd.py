"""`ctsdk info` - what this machine and bundle give ctsdk, and what `sdk.Triage()` would run here.

For an engineer on a target machine before shipping: the runtimes and why each is or is not usable,
the GPU and the kernel backends, the bundle (verified) and its precision gates, where TensorRT
engines for it are cached and which are there, the shared data folder, the ``CTSDK_*`` variables
that are set - and, by opening the facade once (``--no-open`` skips it), the runtime it really
chose and the reasons. Where TensorRT is usable and no engine is cached yet, the facade is not
opened (it would build one first, for minutes); the output says so.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, List, Optional

import click

from ._common import emit, handle_errors, json_option

#: optional packages whose presence changes what ctsdk can do here: {name: its pip distributions}
PACKAGES = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu"), "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy"),
            "pycuda": ("pycuda",), "tensorrt": ("tensorrt",), "polygraphy": ("polygraphy",), "torch": ("torch",),
            "xgboost": ("xgboost", "xgboost-cpu"), "imagecodecs": ("imagecodecs",), "pylibjpeg": ("pylibjpeg",),
            "gdcm": ("python-gdcm",), "pynetdicom": ("pynetdicom",), "highdicom": ("highdicom",), "ray": ("ray",)}


def _packages() -> Dict[str, Optional[str]]:
    """{package: version (with the distribution when it is not the package's own name), or None when
    not installed}, from the installed distributions' metadata (sdk.bench.machine.library_versions)."""
    from ..bench.machine import library_versions

    found = library_versions(tuple(d for dists in PACKAGES.values() for d in dists))
    out: Dict[str, Optional[str]] = {}
    for pkg, dists in PACKAGES.items():
        dist = next((d for d in dists if d in found), None)
        out[pkg] = None if dist is None else (found[dist] if dist == pkg else f"{found[dist]} ({dist})")
    return out


def _engines(bundle: Any) -> Dict[str, Any]:
    from ..runtime.engine_cache import EngineCache

    root = bundle.engine_cache_dir()
    entries = EngineCache(root).entries() if root.is_dir() else []
    return {"dir": str(root), "engines": [{"file": p.name, **{k: v for k, v in key.to_dict().items() if k != "onnx_sha256"}}
                                          for p, key in entries]}


def machine_info(bundle_path: Optional[str] = None, *, open_triage: bool = True) -> Dict[str, Any]:
    """Everything `ctsdk info` prints, as one JSON-safe dict."""
    from .. import __version__
    from ..bundle import load_bundle
    from ..paths import shared_data_candidates, shared_data_root
    from ..pools import usable_cores
    from ..runtime import describe_runtimes
    from ..runtime.gpu import gpu_info, gpu_reasons

    bundle = load_bundle(bundle_path)
    gpu = gpu_info()
    data = shared_data_root()
    out: Dict[str, Any] = {
        "ctsdk": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "usable_cores": usable_cores(),
        "gpu": gpu.to_dict() if gpu is not None else None,
        "gpu_reasons": gpu_reasons(),
        "runtimes": describe_runtimes(),
        "packages": _packages(),
        "bundle": {"name": bundle.name, "version": bundle.version, "path": str(bundle.root), "verified": bundle.verified,
                   "files": sorted(bundle.files), "classes": bundle.classes,
                   "int8_classifier_passed": bundle.calibration_passed, "int8_lungs_passed": bundle.lungs_int8_passed,
                   "warnings": bundle.warnings},
        "tensorrt_engines": _engines(bundle),
        "shared_data": {"path": str(data), "exists": data.is_dir(), "looked_in": [str(p) for p in shared_data_candidates()]},
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("CTSDK_")},
    }
    if open_triage and out["runtimes"].get("tensorrt", {}).get("available") and not out["tensorrt_engines"]["engines"]:
        # Triage() would pick TensorRT and build its engine now: minutes, not what `info` is for
        out["triage_auto"] = {"skipped": "TensorRT is usable here and the bundle's engine folder holds no engine: "
                                         "opening sdk.Triage() would build one first (minutes). Build it with "
                                         "`ctsdk build-engine --model classifier --precision fp16`, then run ctsdk info again"}
    elif open_triage:
        from ..triage import Triage

        tri = Triage(bundle=bundle, heatmaps=False)  # the bundle loaded (and verified) above
        out["triage_auto"] = {"runtime": tri.runtime, "reasons": list(tri.runtime_reasons), "lung_method": tri.lung_method,
                              "init_ms": round(tri.init_ms, 1)}
    return out


def _human(d: Dict[str, Any]) -> str:
    lines: List[str] = [f"ctsdk {d['ctsdk']} - Python {d['python']} on {d['platform']}, {d['usable_cores']} usable core(s)"]
    g = d["gpu"]
    lines.append(f"GPU: {g['name']} (compute {g['compute_capability']}, driver {g['driver'] or '?'})" if g
                 else "GPU: none - " + "; ".join(d["gpu_reasons"]))
    lines.append("runtimes:")
    for name, r in d["runtimes"].items():
        lines.append(f"  {name:9s} {'yes' if r['available'] else 'no '}  {r['reason']}")
    have = [f"{k} {v}" for k, v in d["packages"].items() if v]
    missing = [k for k, v in d["packages"].items() if not v]
    lines.append("packages: " + ", ".join(have))
    if missing:
        lines.append("not installed: " + ", ".join(missing))
    b = d["bundle"]
    lines.append(f"bundle: {b['name']} {b['version']} ({'verified' if b['verified'] else 'NOT verified'}) at {b['path']}; "
                 f"INT8 classifier gate {'passed' if b['int8_classifier_passed'] else 'not passed'}, "
                 f"INT8 lung U-Net gate {'passed' if b['int8_lungs_passed'] else 'not passed'}")
    lines.extend(f"  bundle warning: {w}" for w in b.get("warnings", []))
    e = d["tensorrt_engines"]
    lines.append(f"TensorRT engines for it: {len(e['engines'])} in {e['dir']}")
    for eng in e["engines"]:
        lines.append(f"  {eng['file']}: {eng.get('gpu_name')} / TensorRT {eng.get('trt_version')} / {eng.get('precision')}")
    s = d["shared_data"]
    lines.append(f"shared data: {s['path']} ({'found' if s['exists'] else 'not found; set CTSDK_SHARED_DATA'})")
    if d["env"]:
        lines.append("env: " + ", ".join(f"{k}={v}" for k, v in d["env"].items()))
    t = d.get("triage_auto")
    if t and "skipped" in t:
        lines.append("sdk.Triage() here: not opened - " + t["skipped"])
    elif t:
        st = t["runtime"].get("stages", {})
        lines.append(f"sdk.Triage() here: {t['runtime'].get('provider')} {t['runtime'].get('precision')} on "
                     f"{t['runtime'].get('device')}, kernels {t['runtime'].get('kernels')}, lungs {st.get('lungs', t['lung_method'])} "
                     f"(ready in {t['init_ms']:.0f} ms)")
        lines.extend(f"  - {r}" for r in t["reasons"])
    return "\n".join(lines)


@click.command("info", epilog="""\b
Examples:
  ctsdk info
  ctsdk info --no-open --json
  ctsdk info --bundle sdk/bundles/default

\b
Exit codes: 0 the report was printed; 2 the bundle cannot be loaded (one line on stderr).""")
@click.option("--bundle", "bundle_path", type=click.Path(file_okay=False, exists=True), default=None,
              help="Bundle folder (default: the packaged default bundle).")
@click.option("--no-open", "no_open", is_flag=True, help="Do not open sdk.Triage() to show what it would run (faster).")
@json_option
@handle_errors
def info(bundle_path: Optional[str], no_open: bool, as_json: bool) -> None:
    """What this machine and bundle give ctsdk, and what sdk.Triage() would run here."""
    emit(machine_info(bundle_path, open_triage=not no_open), as_json, _human)
