"""``ctsdk build-engine``: build (or fetch from the cache) a TensorRT engine on this GPU (needs ctsdk[gpu])."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import click

from ._common import check_not_input, check_output_dir, check_output_file, emit, handle_errors, json_option

EXAMPLES = """\b
Examples:
  ctsdk build-engine --model classifier --precision fp16
  ctsdk build-engine --model classifier --precision fp16 --timing-cache /tmp/ctsdk_trt.cache --measure-warm --json
  ctsdk build-engine --model ONNX_PATH --precision fp16 --out /tmp/classifier_fp16.engine
  ctsdk build-engine --model QDQ_ONNX --precision int8 --batch 1,8,32
  (needs an NVIDIA GPU and ctsdk[gpu]; ONNX_PATH: an FP16 ONNX; QDQ_ONNX: a symmetric INT8 Q/DQ ONNX)

\b
An INT8 file for TensorRT (symmetric signed INT8, zero points 0; made on any CPU machine):
  ctsdk calibrate --onnx FP32_ONNX --images IMAGES_CSV --target tensorrt --out /tmp/classifier_int8_trt.onnx
  ctsdk build-engine --model /tmp/classifier_int8_trt.onnx --precision int8
  (the bundle file classifier_int8.onnx is the CPU one, U8 activations: --precision int8 refuses it
  in a second, before TensorRT is loaded, and prints this calibrate command; docs/deployment.md)

\b
Check an engine against ONNX Runtime (parity; docs/deployment.md section 4):
  polygraphy run classifier_fp32.onnx --onnxrt --input-shapes image:[8,3,224,224] \\
      --val-range image:[0,1] --save-inputs in.json --save-outputs ref.json
  polygraphy run ENGINE --trt --load-inputs in.json --load-outputs ref.json --atol 0.05 --rtol 0.05
  (ENGINE: the "engine" path this command prints; written, never run here: no TensorRT)

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
              help="Engine precision; NAME resolves to <bundle>/<NAME>_<precision>.onnx (fp16: the FP16 ONNX, int8: a "
                   "symmetric signed INT8 Q/DQ ONNX from ctsdk calibrate --target tensorrt, checked before TensorRT "
                   "loads); on TensorRT 11 the file decides the precision.")
@click.option("--batch", default="1,8,32", show_default=True, help="Optimisation profile MIN,OPT,MAX batch sizes.")
@click.option("--workspace", "workspace_mb", type=int, default=2048, show_default=True,
              help="Builder workspace (MB), 16 to 1048576.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Timing cache file: loaded if present, updated after the build (cold vs warm build time).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the engine (and its .json sidecar) here; it is cached as well (see Cache above).")
@click.option("--bundle", "bundle_dir", type=click.Path(file_okay=False), default=None,
              help="Bundle folder where NAME is looked up (default: the packaged default bundle, the one "
                   "sdk.Triage() runs); an engine built from a bundle's file lands where Triage looks for it.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Engine cache folder (default: see Cache above).")
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds a matching engine.")
@click.option("--measure-warm", is_flag=True,
              help="Build twice and report the warm (timing-cached) build time too (needs --timing-cache).")
@json_option
@handle_errors
def build_engine(model: str, precision: str, batch: str, workspace_mb: int, timing_cache: Optional[str],
                 out_path: Optional[str], bundle_dir: Optional[str], cache_dir: Optional[str], force: bool,
                 measure_warm: bool, as_json: bool) -> None:
    """Build a TensorRT engine for this GPU from an FP32 / FP16 / INT8-QDQ ONNX.

    Precision: TensorRT 11 has no FP16/INT8 builder flags and builds strongly typed networks, so
    the precision comes from the ONNX - fp16 needs the FP16 ONNX (its Casts, `ctsdk export
    --fp16`), int8 a Q/DQ ONNX (`ctsdk calibrate --target tensorrt`); a file of the wrong kind is
    refused. TensorRT 10 builds weakly typed and sets the FP16 (int8: INT8 + FP16) flags. TensorRT
    takes only symmetric signed INT8 Q/DQ (int8 zero points, all 0; float biases); --precision int8
    checks the file for that before TensorRT is imported and refuses the bundle's CPU INT8 file
    (QUInt8 activations, INT32 biases) with the calibrate command that makes a TensorRT one
    (docs/deployment.md).

    Cache: --cache-dir; else, for a file of a ctsdk bundle, the bundle's engine folder (where
    sdk.Triage loads engines: $CTSDK_ENGINE_CACHE/<name>-<version>, <bundle>.engines/ beside a
    user bundle, ${XDG_CACHE_HOME:-~/.cache}/ctsdk/engines/<name>-<version> for the packaged one);
    else $CTSDK_ENGINE_CACHE, engines/ beside the ONNX, or ~/.cache/ctsdk/engines. Files are
    <stem>.<precision>.<digest>.engine with a .json sidecar holding the key (ONNX sha256, GPU,
    compute capability, TensorRT version, precision, batch profile), checked on every load.
    """
    from ..export.tensorrt import BuildConfig, build_engine as run, parse_batch, resolve_model
    from ..runtime.trt import import_tensorrt

    profile = parse_batch(batch)                    # argument errors first (exit 2)
    if measure_warm and timing_cache is None:
        from ..errors import ConfigError

        raise ConfigError("--measure-warm needs --timing-cache FILE: the warm build is the rebuild that reads "
                          "the timing cache the first build wrote (without one both builds are cold)")
    check_output_file(out_path, "--out")            # and outputs that could not be saved
    check_output_file(timing_cache, "--timing-cache")
    check_output_dir(cache_dir, "--cache-dir")
    onnx = resolve_model(model, precision, bundle_dir)
    check_not_input(out_path, "--out", {"--model": str(onnx)})
    check_not_input(timing_cache, "--timing-cache", {"--model": str(onnx), "--out": out_path})
    cfg = BuildConfig(onnx=onnx, precision=precision, batch=profile, workspace_mb=workspace_mb,  # checks its values
                      timing_cache=timing_cache, out=out_path, cache_dir=cache_dir, force=force,
                      measure_warm=measure_warm)
    warnings = _int8_preflight(onnx) if precision == "int8" else []  # a non-TensorRT Q/DQ file: exit 2 here
    import_tensorrt("ctsdk build-engine")           # then: is TensorRT here at all? (exit 2, one line)
    report = run(cfg)
    report.warnings[:0] = warnings
    emit(report.to_dict(), as_json, _human)


def _int8_preflight(onnx: Any) -> List[str]:
    """The TensorRT Q/DQ check of an INT8 build's ONNX (sdk.export.qdq_check): raises ConfigError
    for a file TensorRT would reject; returns (and prints on stderr) a warning when it cannot run."""
    from ..export.qdq_check import require_tensorrt_qdq

    warnings = require_tensorrt_qdq(onnx)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    return warnings
