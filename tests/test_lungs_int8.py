"""The INT8 lung U-Net (issue 15): manifest gate, run-time choice, bundle entry, and its mask on real data."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import shared_path
from sdk.bundle import load_bundle, write_bundle
from sdk.errors import BundleError, ConfigError
from sdk.lungs.int8 import choose_lungs_precision, gate_passed, stage_name

BOTH = {"fp32": "lungs_fp32.onnx", "int8": "lungs_int8.onnx"}
FP32_ONLY = {"fp32": "lungs_fp32.onnx"}


@pytest.mark.parametrize("manifest, expected", [
    ({"lungs_int8": {"passed": True, "dice": {}}}, True),
    ({"lungs_int8": {"passed": False}}, False),
    ({"lungs_int8": {"passed": "true"}}, False),   # only a JSON true counts
    ({"lungs_int8": {}}, False),
    ({"lungs_int8": True}, False),
    ({"int8": {"passed": True}}, False),           # the classifier's gate is not the lungs' gate
    ({}, False),
])
def test_gate_parsing(manifest, expected) -> None:
    assert gate_passed(manifest) is expected


@pytest.mark.parametrize("lungs, clf_prec, on_cpu, files, passed, want", [
    ("auto", "int8", True, BOTH, True, "int8"),        # INT8 classifier on the CPU + passed gate
    ("auto", "int8", True, BOTH, False, "fp32"),       # gate failed
    ("auto", "int8", True, FP32_ONLY, True, "fp32"),   # no INT8 file
    ("auto", "fp32", True, BOTH, True, "fp32"),        # FP32 classifier: FP32 lungs
    ("auto", "fp16", True, BOTH, True, "fp32"),
    ("auto", "int8", False, BOTH, True, "fp32"),       # INT8 classifier on a GPU (TensorRT): lungs stay FP32
    ("fp32", "int8", True, BOTH, True, "fp32"),        # explicit override
    ("int8", "fp32", True, BOTH, True, "int8"),
    ("int8", "fp32", True, BOTH, False, "int8"),       # explicit, gate failed: runs, with a reason
])
def test_choose_lungs_precision(lungs, clf_prec, on_cpu, files, passed, want) -> None:
    got, reasons = choose_lungs_precision(lungs, clf_prec, on_cpu, files, passed)
    assert got == want
    if lungs == "int8" and not passed:
        assert any("did NOT pass" in r for r in reasons)
    if lungs == "auto" and clf_prec == "int8" and on_cpu:
        assert reasons and reasons[0].startswith(f"lungs auto -> {want}")


def test_choose_lungs_precision_errors() -> None:
    with pytest.raises(BundleError, match="sdk.calibration.lungs"):
        choose_lungs_precision("int8", "int8", True, FP32_ONLY, False)
    with pytest.raises(ConfigError):
        choose_lungs_precision("fp16", "fp32", True, BOTH, True)


def test_stage_names() -> None:
    assert stage_name("hybrid", "int8") == "hybrid-unet2d-ort-cpu-int8"
    assert stage_name("unet2d", "fp32") == "unet2d-ort-cpu-fp32"
    assert stage_name("classical", None) == "classical-cpu"
    # the 3D U-Net runs FP32 on the host path; the names match the kernel path's with device "cpu"
    assert stage_name("unet3d", None) == "unet3d-ort-cpu-fp32"
    assert stage_name("hybrid3d", None) == "hybrid-unet3d-ort-cpu-fp32+classical-cpu"


def test_triage_choice_follows_classifier_runtime() -> None:
    """sdk.triage._choose_lungs on the bundle's file list and the classifier runtime that really runs."""
    from sdk.triage import _choose_lungs

    bundle = SimpleNamespace(lungs_paths=lambda: {"fp32": Path("f.onnx"), "int8": Path("i.onnx")}, lungs_int8_passed=True)
    cpu_int8 = {"provider": "CPUExecutionProvider", "precision": "int8", "device": "cpu"}
    cpu_fp32 = dict(cpu_int8, precision="fp32")
    trt_int8 = {"provider": "TensorRT", "precision": "int8", "device": "NVIDIA H200"}
    reasons: list = []
    assert _choose_lungs(bundle, "auto", cpu_int8, reasons) == (Path("i.onnx"), "int8") and reasons
    assert _choose_lungs(bundle, "auto", cpu_fp32, []) == (Path("f.onnx"), "fp32")
    assert _choose_lungs(bundle, "auto", trt_int8, []) == (Path("f.onnx"), "fp32")
    assert _choose_lungs(bundle, "fp32", cpu_int8, []) == (Path("f.onnx"), "fp32")
    bundle.lungs_int8_passed = False
    assert _choose_lungs(bundle, "auto", cpu_int8, []) == (Path("f.onnx"), "fp32")


def test_default_bundle_lists_the_int8_unet() -> None:
    b = load_bundle()
    entry = b.files["lungs_int8"]
    assert (entry.path, entry.role, entry.precision) == ("lungs_int8.onnx", "lungs", "int8")
    assert b.lungs_path.name == "lungs_fp32.onnx"
    assert set(b.lungs_paths()) == {"fp32", "int8"}
    block = b.manifest["lungs_int8"]
    assert b.lungs_int8_passed is block["passed"] is True
    for key in ("cip_ct64", "seg2d_test_mean"):
        d = block["dice"][key]
        assert d["int8"] >= d["fp32"] - 0.005 and d["passed"]
    assert block["criteria"]["max_cip_dice_drop"] == block["criteria"]["max_seg2d_dice_drop"] == 0.005
    assert block["command"].startswith(("python -m sdk.calibration.lungs", "python -m sdk.train.seg quantize"))
    assert block["calibration"]["split"] == "train"
    assert all(260 <= n < 1320 for n in block["calibration"]["file_numbers"])   # never val / test slices


def test_bundle_without_gate_is_not_passed(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("lungs_fp32.onnx", "lungs_int8.onnx"):
        (src / name).write_bytes(name.encode())
    files = {"lungs": (src / "lungs_fp32.onnx", "lungs", "fp32"), "lungs_int8": (src / "lungs_int8.onnx", "lungs", "int8")}
    meta = {"name": "t", "version": "0", "classes": ["non_covid", "covid"]}
    b = write_bundle(tmp_path / "b", files, meta)
    assert set(b.lungs_paths()) == {"fp32", "int8"} and not b.lungs_int8_passed
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["files"]["lungs_int8"]["precision"] == "int8" and m["files"]["lungs_int8"]["role"] == "lungs"


def test_quantize_command_is_wired(capsys) -> None:
    from sdk.calibration.lungs import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--bundle" in capsys.readouterr().out


def test_int8_mask_matches_fp32_mask_on_real_series() -> None:
    """The hybrid segmenter with the INT8 U-Net vs the FP32 U-Net on covid-P001: Dice >= 0.99."""
    from sdk.io import load_series
    from sdk.lungs import segment
    from sdk.lungs.evaluate import dice
    from sdk.runtime.ort import OrtSession

    vol = load_series(shared_path("dicom", "covid-ct-md", "covid-P001"))
    paths = load_bundle().lungs_paths()
    masks = {p: segment(vol, "hybrid", session=OrtSession(paths[p], device="cpu", threads=2, precision=p)).mask
             for p in ("fp32", "int8")}
    d = dice(masks["int8"], masks["fp32"])
    assert d >= 0.99, d
    assert np.count_nonzero(masks["int8"]) > 0
