"""``ctsdk calibrate``: INT8 QDQ calibration on real slices, with an accuracy and speed report."""
from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import click

from ._common import THREADS, FiniteFloat, check_not_input, check_output_file, emit, handle_errors, json_option, warn

EXAMPLES = """\b
Examples:
  ctsdk calibrate --onnx sdk/bundles/default/classifier_fp32.onnx --images ../shared/data/images_index.csv \\
      --splits docs/data/splits.csv --out /tmp/ctsdk-classifier_int8.onnx --n 64 --method minmax \\
      --max-test 64 --no-bench
  ctsdk calibrate --onnx FP32_ONNX --images ../shared/data/images_index.csv --out /tmp/int8.onnx \\
      --report /tmp/int8.json --json
  ctsdk calibrate --onnx FP32_ONNX --images ../shared/data/images_index.csv --target tensorrt \\
      --out /tmp/classifier_int8_trt.onnx --report /tmp/classifier_int8_trt.json --no-bench
  (FP32_ONNX: a classifier exported by `ctsdk export`; --target tensorrt: the file
  `ctsdk build-engine --precision int8` takes, symmetric S8 activations and weights)

\b
Splits: --splits auto reads runs/classifier/splits.csv under the working directory (where
`ctsdk train classifier` writes it with its default --out-dir). Without it the images CSV's split
column and a hash split are used, with a warning: test and calibration images may then be the
classifier's training images. Pass --splits PATH (the run's OUT_DIR/splits.csv) to be sure.
A test set without both classes is refused (exit 2); fewer than 64 calibration slices, or a test
set too small to resolve the AUC bar, give a warning (stderr and the report's "warnings").

\b
Exit codes: 0 the INT8 model passed the accuracy bar; 1 it missed the bar (the file is still
written, the report says so); 2 bad arguments, a test set without both classes, or an output
that cannot be written."""


def _num(v: Any, spec: str = ".4f") -> str:
    """``v`` formatted with ``spec``, or "n/a" for a value that could not be computed (None, NaN)."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def _verdict(d: Dict[str, Any]) -> str:
    """PASS only when the bar was met on AUCs that could be computed."""
    computed = d.get("fp32", {}).get("auc") is not None and d.get("chosen", {}).get("auc_delta") is not None
    return "PASS" if d["passed"] and computed else "FAIL"


def _human(d: Dict[str, Any]) -> str:
    lines = [f"INT8 ({d['calibration'].get('target', 'cpu')} target) {d['int8_onnx']} from {d['fp32_onnx']}: "
             f"{_verdict(d)} "
             f"(AUC drop <= {d['criteria']['max_auc_drop']}, top-1 agreement >= {d['criteria']['min_top1_agreement']})",
             f"  split: {d.get('split_source', 'n/a')}",
             f"  calibration: {d['calibration']['n']} train slices ("
             + ", ".join(f"{k} {v}" for k, v in d["calibration"]["composition"].items()) + ")",
             f"  test: {d['test']['n']} slices; FP32 AUC {_num(d['fp32']['auc'])}, accuracy {_num(d['fp32']['accuracy'])}"]
    for m, r in d["methods"].items():
        lines.append(f"  {m:10s} AUC {_num(r['auc'])} ({_num(r['auc_delta'], '+.4f')}), accuracy {_num(r['accuracy'])} "
                     f"({_num(r['accuracy_delta'], '+.4f')}), top-1 agreement {_num(r['top1_agreement'])}")
    c = d["chosen"]
    lines.append(f"  chosen: {c['method']} (AUC delta {_num(c['auc_delta'], '+.4f')}, agreement {_num(c['top1_agreement'])}, "
                 f"{len(d['excluded_nodes'])} nodes FP32)")
    for b in ("batch1", "batch32"):
        s = d.get("speed", {}).get(b)
        if s:
            lines.append(f"  speed {b}: FP32 {s['fp32_ms']:.1f} ms, INT8 {s['int8_ms']:.1f} ms -> {s['speedup']:.2f}x")
    if d.get("warnings"):
        lines.append(f"  warnings: {len(d['warnings'])} (on stderr, and in the report's \"warnings\")")
    return "\n".join(lines)


@click.command("calibrate", epilog=EXAMPLES)
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, dir_okay=False), required=True, help="FP32 classifier ONNX.")
@click.option("--images", "images_csv", type=click.Path(exists=True, dir_okay=False), required=True,
              help="Labelled slices CSV (format of ../shared/data/images_index.csv).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="INT8 QDQ ONNX to write.")
@click.option("--n", "n", type=int, default=256, show_default=True,
              help="Calibration slices from the TRAIN split (fewer than 64 give a warning).")
@click.option("--method", default="all", show_default=True,
              help="minmax | entropy | percentile | all, or a comma list (e.g. minmax,percentile); the best on the test split is kept.")
@click.option("--splits", "splits_csv", default="auto", show_default=True,
              help="path,split CSV (the OUT_DIR/splits.csv of the ctsdk train classifier run); 'auto' = "
                   "runs/classifier/splits.csv under the working directory, else a hash split WITH A WARNING (test "
                   "images may be training images); 'none' = the images CSV's split column.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report JSON here.")
@click.option("--max-test", type=click.IntRange(min=1), default=None,
              help="Cap on test slices (stratified); default all. The test set must hold both classes.")
@click.option("--threads", type=THREADS, default=2, show_default=True, help="ORT CPU threads for evaluation and timing.")
@click.option("--no-bench", is_flag=True, help="Skip the FP32 vs INT8 speed measurement.")
@click.option("--render", type=click.Choice(["8bit", "hu"]), default="8bit", show_default=True,
              help="How images become inputs: '8bit' = the 8-bit letterbox transform; 'hu' = grey->HU estimate, "
                   "re-rendered through the runtime's window (for a classifier trained on HU renderings).")
@click.option("--bias-correction", is_flag=True,
              help="Correct each quantised convolution's bias for the mean output shift of its INT8 weights "
                   "(per-channel input means of the calibration slices; docs/benchmarks/int8.md).")
@click.option("--percentile", type=FiniteFloat(min=0, max=100, min_open=True), default=99.999, show_default=True,
              help="Upper percentile of |activation| for --method percentile.")
@click.option("--masks-dir", type=click.Path(file_okay=False), default=None,
              help="Lung-mask cache of the classifier's training run (its OUT_DIR/masks, holding masks.npz); default "
                   "runs/classifier/masks under the working directory. Images without a cached mask are segmented "
                   "with the bundle's lung U-Net (the report counts both).")
@click.option("--target", type=click.Choice(["cpu", "tensorrt"]), default="cpu", show_default=True,
              help="cpu: U8 activations / S8 weights / INT32 biases (ONNX Runtime CPU's fast path); tensorrt: "
                   "symmetric S8 activations and S8 weights, zero points 0, float biases - the only Q/DQ TensorRT "
                   "builds (ctsdk build-engine --precision int8). The accuracy bar is judged on ORT CPU either way.")
@json_option
@handle_errors
def calibrate(onnx_path: str, images_csv: str, out_path: str, n: int, method: str, splits_csv: Optional[str],
              report_path: Optional[str], max_test: Optional[int], threads: int, no_bench: bool, render: str, bias_correction: bool,
              percentile: float, masks_dir: Optional[str], target: str, as_json: bool) -> None:
    """Quantise a classifier to INT8 (QDQ, per-channel S8 weights; U8 activations for --target cpu,
    symmetric S8 for --target tensorrt) with calibration slices from the train split, compare
    MinMax / Entropy / Percentile on the test split, and report AUC/accuracy delta, top-1
    agreement and the speed ratio. Exit 1 when the INT8 model misses the accuracy bar (the file is
    still written, marked by the report)."""
    check_not_input(out_path, "--out", {"--onnx": onnx_path, "--images": images_csv})
    check_not_input(report_path, "--report", {"--onnx": onnx_path, "--images": images_csv, "--out": out_path})
    check_output_file(out_path, "--out")  # before the calibration runs: the model must be savable
    check_output_file(report_path, "--report")
    from ..calibration.dataset import HuRenderPreprocessor
    from ..calibration.quantize import CalibrationOptions
    from ..calibration.quantize import calibrate as run

    opts = CalibrationOptions(n=n, method=method, splits_csv=None if splits_csv == "none" else splits_csv, max_test=max_test,
                              bench=not no_bench, threads=threads, report_path=report_path, progress=not as_json,
                              preprocess=HuRenderPreprocessor(mask_dir=masks_dir) if render == "hu" else None,
                              masks_dir=masks_dir, bias_correction=bias_correction, percentile=percentile,
                              target=target, on_warning=warn)
    report = run(onnx_path, images_csv, out_path, opts)
    emit(report.to_dict(), as_json, _human)
    if not report.passed:
        sys.exit(1)
