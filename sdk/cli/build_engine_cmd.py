"""``ctsdk build-engine``: build (or fetch from the cache) a TensorRT engine on this GPU (needs ctsdk[gpu])."""
from __future__ import annotations

from typing import Any, Dict, Optional

import click

from ._common import check_output_dir, check_output_file, emit, handle_errors, json_option

EXAMPLES = """\b
Examples:
  ctsdk build-engine --model classifier --precision fp16
  ctsdk build-engine --model classifier --precision int8 --batch 1,8,32 --measure-warm --json
  ctsdk build-engine --model ONNX_PATH --precision fp16 --out /tmp/classifier_fp16.engine
  (needs an NVIDIA GPU and ctsdk[gpu]; ONNX_PATH: an FP16 or Q/DQ INT8 ONNX)

\b
Exit codes: 0 the engine was built or found in the cache; 2 bad arguments, no TensorRT here, a
failed build or an output that cannot be written (one line on stderr)."""


def _human(d: Dict[str, Any]) -> str:
    k = d["key"]
    head = "cached" if d["cached"] else f"built in {d['build_s']:.1f} s (timing cache {d['timing_cache_state']})"
    lines = [f"engine {d['engine']} ({d['size_bytes'] / 1e6:.1f} MB): {head}",
             f"  {k['precision']} on {k['gpu_name']} (cc {k['compute_capability']}), TensorRT {k['trt_version']}, "
             f"batch {k['batch']}"]
    if d.get("warm_build_s") is not None:
        lines.append(f"  warm rebuild with the timing cache: {d['warm_build_s']:.1f} s")
    lines += [f"  warning: {w}" for w in d.get("warnings", [])]
    return "\n".join(lines)


@click.command("build-engine", epilog=EXAMPLES)
@click.option("--model", "model", required=True,
              help="An ONNX path, or a NAME resolved as <bundle>/<NAME>_<precision>.onnx (e.g. classifier).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp16", show_default=True,
              help="Engine precision; NAME resolves to <bundle>/<NAME>_<precision>.onnx (int8: the Q/DQ ONNX).")
@click.option("--batch", default="1,8,32", show_default=True, help="Optimisation profile MIN,OPT,MAX batch sizes.")
@click.option("--workspace", "workspace_mb", type=int, default=2048, show_default=True, help="Builder workspace (MB).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file: loaded if present, updated after the build (cold vs warm build time).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Engine file (default: the engine cache beside the ONNX, keyed by GPU/TensorRT/precision).")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), default=None,
              help="Bundle folder where NAME is looked up (default: the packaged default bundle, the one "
                   "sdk.Triage() runs); an engine built from a bundle's file lands where Triage looks for it.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Engine cache folder.")
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds a matching engine.")
@click.option("--measure-warm", is_flag=True, help="Build twice and report the warm (timing-cached) build time too.")
@json_option
@handle_errors
def build_engine(model: str, precision: str, batch: str, workspace_mb: int, timing_cache: Optional[str],
                 out_path: Optional[str], bundle_dir: Optional[str], cache_dir: Optional[str], force: bool,
                 measure_warm: bool, as_json: bool) -> None:
    """Build a TensorRT engine for this GPU from an FP32 / FP16 / INT8-QDQ ONNX.

    TensorRT 11 takes the precision from the ONNX (FP16 ONNX for fp16, Q/DQ ONNX for int8);
    TensorRT 10 also sets the FP16/INT8 builder flags. Engines are cached under a key of ONNX
    sha256, GPU, compute capability, TensorRT version, precision and batch profile.
    """
    from ..export.tensorrt import BuildConfig, build_engine as run, parse_batch, resolve_model
    from ..runtime.trt import import_tensorrt

    profile = parse_batch(batch)                    # argument errors first (exit 2)
    check_output_file(out_path, "--out")            # and outputs that could not be saved
    check_output_file(timing_cache, "--timing-cache")
    check_output_dir(cache_dir, "--cache-dir")
    import_tensorrt("ctsdk build-engine")           # then: is TensorRT here at all? (exit 2, one line)
    onnx = resolve_model(model, precision, bundle_dir)
    cfg = BuildConfig(onnx=onnx, precision=precision, batch=profile, workspace_mb=workspace_mb,
                      timing_cache=timing_cache, out=out_path, cache_dir=cache_dir, force=force, measure_warm=measure_warm)
    report = run(cfg)
    emit(report.to_dict(), as_json, _human)
