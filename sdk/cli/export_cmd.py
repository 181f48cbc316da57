"""``ctsdk export``: checkpoint -> ONNX (FP32, optionally FP16) with a parity check (needs ctsdk[train])."""
from __future__ import annotations

from typing import Any, Dict, Optional

import click

from ._common import check_not_input, check_output_file, emit, handle_errors, json_option

EXAMPLES = """\b
Examples:
  ctsdk export --model effnet_lite0_mgap --out /tmp/ctsdk-classifier_fp32.onnx --fp16
  ctsdk export --model effnet_lite0_mgap --checkpoint CHECKPOINT_PT --out /tmp/classifier_fp32.onnx --json
  (CHECKPOINT_PT: best.pt of `ctsdk train classifier`; without it the model's default weights)

\b
Exit codes: 0 exported and the parity check passed; 1 the parity check failed (files written);
2 bad arguments, a missing package (ctsdk[train]) or an output that cannot be written."""


def _human(d: Dict[str, Any]) -> str:
    lines = []
    for key in ("fp32", "fp16"):
        r = d.get(key)
        if not r:
            continue
        p = r.get("parity") or {}
        lines.append(f"{key}: {r['path']} ({r['size_bytes'] / 1e6:.1f} MB, opset {r['opset']}, {r['nodes_final']} nodes)")
        if p:
            # a segmentation network has no top-1 class: its parity is the logit difference alone
            top1 = "" if p.get("top1_agreement") is None else f", top-1 agreement {p['top1_agreement']}"
            lines.append(f"  parity vs {p['reference']} on {p['n']} inputs ({p['source']}): max |dlogit| "
                         f"{p['max_abs_logit_diff']:.2e}{top1}, "
                         f"{'PASS' if p['passed'] else 'FAIL'} (tol {p['tolerance']:g})")
    return "\n".join(lines)


@click.command("export", epilog=EXAMPLES)
@click.option("--model", "model_name", required=True, help="Registered model name (see sdk.models.list_models()).")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Trained checkpoint (best.pt from `ctsdk train classifier`); without it the model's default weights.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="ONNX file to write (one file).")
@click.option("--fp16", "fp16", is_flag=True, help="Also write <out stem>_fp16.onnx (FP16 backbone, FP32 head and I/O).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (>= 17).")
@click.option("--input-size", type=click.IntRange(min=1), default=None, help="Input side S (default: the model's cfg, else 224).")
@click.option("--bundle-version", default=None,
              help="Version of the bundle this model will ship in, written to the ONNX metadata as "
                   "ctsdk.bundle_version (default: not written - an export does not know its bundle).")
@click.option("--n-parity", type=click.IntRange(min=1), default=16, show_default=True, help="Real slices used for the parity check.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxslim.")
@json_option
@handle_errors
def export(model_name: str, checkpoint: Optional[str], out_path: str, fp16: bool, opset: int, input_size: Optional[int],
           bundle_version: Optional[str], n_parity: int, no_simplify: bool, as_json: bool) -> None:
    """Export a model to ONNX with onnx.checker, onnxslim, metadata and a parity check against
    PyTorch eager on real CT slices. Exit 1 when the parity check fails."""
    import sys
    from pathlib import Path

    check_not_input(out_path, "--out", {"--checkpoint": checkpoint})
    check_output_file(out_path, "--out")  # before the model is built: the ONNX must be savable
    from ..export.onnx import check_input_size, classifier_metadata, export_fp16, export_onnx

    model = load_model(model_name, checkpoint)
    cfg_size = getattr(getattr(model, "cfg", None), "input_size", None)
    size = input_size or cfg_size or (128 if model_name.startswith("unet") else 224)
    if input_size is not None:  # the API's check, named as this option (export_onnx checks the same way)
        check_input_size(model, input_size, name=model_name, option="--input-size")
    meta: Dict[str, Any]
    if getattr(model, "cfg", None) is not None and hasattr(model.cfg, "classes"):
        meta = classifier_metadata(model, bundle_version=bundle_version, name=model_name, size=size)
    else:
        meta = {"model": model_name, "input_range": [0.0, 1.0]}
        if bundle_version is not None:
            meta["bundle_version"] = bundle_version
    if checkpoint:
        meta["checkpoint"] = Path(checkpoint).name
    report = export_onnx(model, out_path, opset=opset, input_size=size, metadata=meta, simplify=not no_simplify,
                         n_parity=n_parity)
    payload: Dict[str, Any] = {"model": model_name, "checkpoint": checkpoint, "fp32": report.to_dict()}
    ok = bool(report.parity and report.parity.passed)
    if fp16:
        out = Path(out_path)
        stem = out.stem[:-5] if out.stem.endswith("_fp32") else out.stem
        r16 = export_fp16(out, out.with_name(f"{stem}_fp16.onnx"), n_parity=n_parity)
        payload["fp16"] = r16.to_dict()
        ok = ok and bool(r16.parity and r16.parity.passed)
    payload["passed"] = ok
    emit(payload, as_json, _human)
    if not ok:
        sys.exit(1)


def load_model(name: str, checkpoint: Optional[str]) -> Any:
    """A registry model, with the trained weights of ``checkpoint`` when given.

    Classifier checkpoints use ``sdk.models.classifier.load_checkpoint`` (keys model, cfg,
    state_dict); other checkpoints may be a plain state_dict or hold one under ``state_dict``.
    """
    from ..errors import BundleError
    from ..models import create_model

    if checkpoint is None:
        return create_model(name).eval()
    import torch

    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors of a file that is no checkpoint
        first = (str(exc).strip().splitlines() or [""])[0]
        raise BundleError(f"{checkpoint}: cannot be loaded as a PyTorch checkpoint ({type(exc).__name__}: {first}); "
                          "give the best.pt of a ctsdk train run") from None
    if isinstance(ckpt, dict) and "cfg" in ckpt and "model" in ckpt and "state_dict" in ckpt:
        from ..models.classifier import load_checkpoint

        if ckpt["model"] != name:
            raise BundleError(f"{checkpoint}: checkpoint is for model {ckpt['model']!r}, not {name!r}")
        return load_checkpoint(checkpoint)
    state = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt
    kwargs = {}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        kwargs = {k: v for k, v in ckpt["config"].items() if k in ("base", "levels", "in_channels", "out_channels")}
    model = create_model(name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BundleError(f"{checkpoint}: weights do not fit model {name!r}: {str(exc).splitlines()[0]}") from exc
    return model.eval()
