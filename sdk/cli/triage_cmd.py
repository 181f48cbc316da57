"""``ctsdk triage SOURCE``: run the whole chain on one series and print the result."""
from __future__ import annotations

from typing import Any, Dict, Optional

import click

from ._common import THREADS, check_output_dir, emit, handle_errors, json_option, warn

EXAMPLES = """\b
Examples:
  ctsdk triage ../shared/data/dicom/covid-ct-md/covid-P001
  ctsdk triage ../shared/data/dicom/covid-ct-md/covid-P001 --json
  ctsdk triage ../shared/data/dicom/covid-ct-md/covid-P001 --heatmaps /tmp/ctsdk-heatmaps --top 3
  ctsdk triage SERIES_DIR --device cpu --precision fp32 --dicom-out /tmp/ctsdk-dicom
  (SERIES_DIR: a folder or file holding one CT series)

\b
Exit codes: 0 a result was printed (not_eligible and indeterminate are results); 2 bad input,
arguments or an output folder that cannot be written (one line on stderr; with --json also
{"error": {...}} on stdout)."""


def _num(v: Any) -> str:
    """A decision term for people: 2 decimals for a number, as-is otherwise."""
    return f"{v:.2f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def _human(d: Dict[str, Any]) -> str:
    lines = [f"label: {d['label']}   ({d.get('statement', 'Research use only - not for diagnosis')})"]
    if d["eligible"]:
        probs = ", ".join(f"{k} {v:.3f}" for k, v in d["probabilities"].items())
        lines.append(f"probabilities: {probs} (threshold {d['threshold']:.3f} on {d['bundle'].get('positive_class')})")
        lines.append(f"selected slices: {len(d['slice_scores'])}, lung volume {d['lung_volume_ml']:.0f} ml")
        op = d.get("lung_opacity")
        if op:
            pat = op["pattern"]
            lines.append(f"HU opacity: ground glass {100 * op['ggo_fraction']:.2f} %, consolidation "
                         f"{100 * op['consolidation_fraction']:.2f} % of lung (left {100 * op['per_lung']['left']['opacity_fraction']:.2f} %, "
                         f"right {100 * op['per_lung']['right']['opacity_fraction']:.2f} %; peripheral index "
                         f"{pat['peripheral_index']:.2f}, lower index {pat['lower_index']:.2f})")
            terms = ", ".join(f"{k} {_num(v)}" for k, v in op["decision"]["hu_terms"].items() if v)
            lines.append(f"decision: CNN P {op['decision']['p_cnn']:.3f}; " + (f"HU terms: {terms}" if terms else "no HU term fired"))
        lines.extend(f"indeterminate: {r}" for r in d["reasons"])
    else:
        lines.extend(f"not eligible: {r}" for r in d["reasons"])
    rt = d.get("runtime", {})
    lungs_rt = (rt.get("stages") or {}).get("lungs") if isinstance(rt.get("stages"), dict) else None
    lines.append(f"runtime: {rt.get('provider', '?')} {rt.get('precision', '?')} on {rt.get('device', '?')}"
                 + (f"; lungs {lungs_rt}" if lungs_rt else "")
                 + (f"; {rt['cpu_lanes']} CPU lane(s)" if rt.get("cpu_lanes") else ""))
    lines.append("timings (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in d["timings_ms"].items()))
    prior = d.get("prior")
    if prior:
        lines.append(f"prior: {prior['error']}" if "error" in prior
                     else f"prior comparison: {prior.get('summary') or prior.get('change', '?')}")
        checks = prior.get("checks") or {}
        if checks:
            said = [f"patient {checks.get('patient')}", f"order {checks.get('order')}"]
            if checks.get("interval_days") not in (None, 0, 0.0):
                said[-1] += f" ({abs(checks['interval_days']):g} days)"
            said.append(checks.get("study", "?") + ("" if checks.get("enforced", True) else "; checks overridden"))
            lines.append("prior checks: " + ", ".join(said))
            lines.extend(f"prior: {n}" for n in checks.get("not_checked", []))
        own = dict((prior.get("prior_series") or {}).get("timings_ms") or {})
        cmp_ms = dict(prior.get("timings_ms") or {})
        if cmp_ms.get("total") is not None:
            own["compare"] = cmp_ms.pop("total")
        if own:
            lines.append("prior timings (ms): " + ", ".join(f"{k} {float(v):.0f}" for k, v in own.items())
                         + (" (" + ", ".join(f"{k} {float(v):.0f}" for k, v in cmp_ms.items()) + ")" if cmp_ms else ""))
    if d.get("heatmaps"):
        lines.append(f"heat maps: {len(d['heatmaps'])} PNG in {d['heatmaps_dir']}")
    if d.get("dicom_results"):
        lines.append(f"DICOM results: {', '.join(d['dicom_results'])} in {d['dicom_dir']}")
    lines.extend(f"warning: {w}" for w in d["warnings"])
    return "\n".join(lines)


@click.command("triage", epilog=EXAMPLES)
@click.argument("source", type=click.Path(exists=True))
@click.option("--series-uid", default=None, help="SeriesInstanceUID to pick when SOURCE holds several series.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True,
              help="Where the classifier runs; auto = TensorRT, else ONNX Runtime CUDA, else CPU, by what is installed "
                   "and usable here (runtime says what ran).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default="auto", show_default=True,
              help="Classifier precision; auto = INT8 on the CPU when the bundle's calibration passed and INT8 measured "
                   "faster, FP16 on a GPU, else FP32.")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model bundle folder (default: the bundle shipped in the package).")
@click.option("--lung-method", type=click.Choice(["auto", "unet2d", "classical"]), default="auto", show_default=True,
              help="Lung segmentation; auto = hybrid (union of the 2D U-Net mask and the classical candidates), "
                   "unet2d = the 2D U-Net alone, classical = HU thresholds and morphology (no model).")
@click.option("--lungs-precision", type=click.Choice(["auto", "fp32", "int8"]), default="auto", show_default=True,
              help="2D lung U-Net: auto = INT8 when the classifier runs INT8 on the CPU and the bundle's lungs_int8 "
                   "Dice gate passed, else FP32 (runtime.stages.lungs says what ran).")
@click.option("--heatmaps", "heatmaps_dir", type=click.Path(file_okay=False), default=None,
              help="Write one PNG heat-map overlay per selected slice into this folder.")
@click.option("--top", type=click.IntRange(min=1), default=None,
              help="With --heatmaps: only the TOP slices with the highest P(covid) (default: every selected slice).")
@click.option("--threads", type=THREADS, default=None, help="ONNX Runtime intra-op threads per session.")
@click.option("--lanes", type=click.IntRange(min=1), default=None,
              help="CPU: classifier / lung U-Net batches run side by side (default: one per core, at most 4, "
                   "unless --threads is given; runtime.cpu_lanes says what ran).")
@click.option("--kernels", type=click.Choice(["auto", "numpy", "gpu", "cuda", "cpu-harness", "reference"]), default="auto",
              show_default=True,
              help="numpy: the host path (OpenCV inputs, graph pooling). cuda/gpu (auto on a CUDA device): the "
                   "device-resident kernel path; cpu-harness / reference: the same kernel path with the CUDA kernels' "
                   "code compiled for the CPU / their NumPy references (runtime.stages says what ran).")
@click.option("--pooling", type=click.Choice(["auto", "kernel", "graph"]), default="auto", show_default=True,
              help="Kernel path: masked GAP by ctsdk's kernels on the features graph, or the classifier graph's own.")
@click.option("--prior", "prior_path", type=click.Path(exists=True), default=None,
              help="An earlier study of the same patient: compare opacity burden per lung (paper 003). Refused "
                   "(reported under 'prior:', exit 0) when the headers name another patient or a later date.")
@click.option("--prior-unchecked", is_flag=True, default=False,
              help="With --prior: compare even when the headers name another patient or a later date (recorded in "
                   "prior.checks and warned about).")
@click.option("--dicom-out", "dicom_dir", type=click.Path(file_okay=False), default=None,
              help="Write the DICOM results here: sr.dcm, measurements.dcm (TID 1500 opacity), sc-NNN.dcm (top 3 heat maps), "
                   "seg.dcm (opacity SEG); needs DICOM input (ctsdk[dicomnet]).")
@json_option
@handle_errors
def triage(source: str, series_uid: Optional[str], device: str, precision: str, bundle_path: Optional[str],
           lung_method: str, lungs_precision: str, heatmaps_dir: Optional[str], top: Optional[int], threads: Optional[int],
           lanes: Optional[int], kernels: str, pooling: str, prior_path: Optional[str], prior_unchecked: bool,
           dicom_dir: Optional[str], as_json: bool) -> None:
    """Triage one CT series (folder or file): label, probabilities, per-slice scores, stage timings.

    Research use only - not for diagnosis.
    """
    # before any model is loaded: a run whose results cannot be saved never starts
    check_output_dir(heatmaps_dir, "--heatmaps")
    check_output_dir(dicom_dir, "--dicom-out")
    if top is not None and heatmaps_dir is None:
        warn(f"--top {top} has no effect without --heatmaps DIR (ignored)")
    from ..triage import Triage

    engine = Triage(bundle_path, device=device, precision=precision, lung_method=lung_method, lungs_precision=lungs_precision,
                    heatmaps=heatmaps_dir is not None or dicom_dir is not None, threads=threads, lanes=lanes,
                    kernels=kernels, pooling=pooling)
    import time

    t0 = time.perf_counter()
    volume = engine._load(source, series_uid)  # loaded here so --dicom-out knows the source files
    load_ms = (time.perf_counter() - t0) * 1000.0
    result = engine.run(volume, prior=prior_path, prior_checks=not prior_unchecked)
    result.timings_ms["load"] = load_ms
    result.timings_ms["total"] = result.timings_ms.get("total", 0.0) + load_ms
    payload = result.to_dict()
    payload["source"] = source
    if heatmaps_dir is not None and result.eligible:
        paths = result.save_heatmaps(heatmaps_dir, top=top)
        payload["heatmaps_dir"] = heatmaps_dir
        payload["heatmaps"] = [str(p) for p in paths]
    elif heatmaps_dir is not None:
        payload["heatmaps_dir"] = heatmaps_dir
        payload["heatmaps"] = []
        why = "; ".join(result.reasons) or "no slice was classified"
        warn(f"no heat maps written to {heatmaps_dir}: the series is not eligible ({why})")
    if dicom_dir is not None:
        payload["dicom_dir"] = dicom_dir
        payload["dicom_results"] = [p.name for p in _write_dicom(volume, result, dicom_dir)]
    emit(payload, as_json, _human)


def _write_dicom(volume: Any, result: Any, out_dir: str) -> list:
    """SR, TID 1500 measurements, heat-map SCs and the opacity SEG of one triaged series."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..integration.results import write_dicom_results
    from ..integration.triage_fns import opacity_from_result, overlays_from_result

    files = sorted({f for f in volume.files if f})
    if not files:
        raise ConfigError("--dicom-out needs DICOM files as input (the series was not read from files)")
    return write_dicom_results([Path(f) for f in files], result.to_dict(), overlays_from_result(result), Path(out_dir),
                               opacity=opacity_from_result(result))
