"""sdk.Triage / TriageResult on a phantom series (fresh-clone safe) and on covid-P001 (shared data).

Numbers are checked against independent constructions: the slice probabilities against ONNX
Runtime run directly on the documented classifier inputs, the series probabilities against the
aggregator on those slice probabilities, heat maps against a NumPy bilinear up-sampling.
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import sdk
from sdk.errors import ConfigError, SeriesError
from sdk.triage import NOT_ELIGIBLE, STAGES, TriageResult

from conftest import shared_path

from conftest import SDK_HOME  # noqa: E402 - where subprocesses import the same sdk
CTSDK = [sys.executable, "-c", "from sdk.cli import main; main()"]


@pytest.fixture(scope="module")
def engine() -> "sdk.Triage":
    return sdk.Triage(device="cpu", precision="fp32", threads=1)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from sdk.phantom import write_phantom_series

    out = tmp_path_factory.mktemp("phantom")
    write_phantom_series(out, n_slices=48, size=128, spacing=(2.5, 2.0, 2.0), ground_glass=True, seed=1)
    return out


@pytest.fixture(scope="module")
def phantom_result(engine, phantom) -> TriageResult:
    return engine.run(phantom)


def _bilinear(grid: np.ndarray, out_hw) -> np.ndarray:
    """docs/conventions.md sample positions s = (i + 0.5) * n_in / n_out - 0.5, clamped."""
    def taps(n_in: int, n_out: int):
        s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(s).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    y0, y1, wy = taps(grid.shape[0], out_hw[0])
    x0, x1, wx = taps(grid.shape[1], out_hw[1])
    rows = grid[y0] * (1 - wy)[:, None] + grid[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def test_phantom_result_contract(phantom_result: TriageResult, engine) -> None:
    r = phantom_result
    assert r.eligible
    assert set(r.probabilities) == set(engine.classes)
    assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    dec = r.lung_opacity["decision"]
    if r.reasons:  # weak or conflicting evidence: every reason comes from a rule that fired
        assert r.label == "indeterminate" and len(r.reasons) == sum(dec["rules"].values())
    else:
        assert r.label == ("covid" if r.probabilities["covid"] >= engine.threshold else "non_covid")
    assert "opacity" in r.timings_ms and 0 <= r.lung_opacity["ggo_fraction"] <= 1
    assert list(r.timings_ms)[: len(STAGES)] == list(STAGES)
    assert r.timings_ms["total"] >= max(v for k, v in r.timings_ms.items() if k != "total")
    assert r.runtime["provider"] == "CPUExecutionProvider" and r.runtime["precision"] == "fp32"
    idx = [s.index for s in r.slice_scores]
    assert idx == sorted(idx) and len(set(idx)) == len(idx) and 0 <= idx[0] and idx[-1] < r.shape[0]
    z = [s.z_mm for s in r.slice_scores]
    assert z == sorted(z)
    assert r.lung_volume_ml is not None and r.lung_volume_ml > 0
    # per-slice HU evidence next to the CNN's probability, and the bundle's fused score
    model = engine.slice_score_model
    assert model is not None and any(s.ggo_fraction is not None for s in r.slice_scores)
    for s in r.slice_scores:
        assert s.slice_score == pytest.approx(model.score(s.probabilities["covid"], s.ggo_fraction if s.ggo_fraction is not None
                                                          else float("nan"), s.consolidation_fraction if
                                                          s.consolidation_fraction is not None else float("nan")), rel=1e-6)


def test_phantom_numbers_match_independent_pipeline(phantom_result: TriageResult, engine, phantom) -> None:
    import onnxruntime as ort

    from sdk.io import load_series
    from sdk.lungs import segment
    from sdk.volume.resample import classifier_inputs

    vol = load_series(phantom)
    seg = segment(vol, method=engine.lung_method, session=engine._lungs)
    idx = [s.index for s in phantom_result.slice_scores]
    x = classifier_inputs(vol.hu, seg.mask, idx, size=224, window=(-1350.0, 150.0))
    sess = ort.InferenceSession(engine.bundle.classifier_paths()["fp32"], providers=["CPUExecutionProvider"])
    probs, cam = sess.run(["probs", "cam"], {"image": x})
    got = np.array([[s.probabilities[c] for c in engine.classes] for s in phantom_result.slice_scores])
    np.testing.assert_allclose(got, probs, atol=1e-5)
    series = engine.bundle.load_aggregator().predict_proba(probs)
    dec = phantom_result.lung_opacity["decision"]
    assert dec["p_cnn"] == pytest.approx(series["covid"], abs=1e-5)
    # final P(covid) = sigmoid(logit(aggregator) + sum of the HU terms), sdk.decision
    logit = np.log(series["covid"] / series["non_covid"]) + sum(dec["hu_terms"].values())
    assert phantom_result.probabilities["covid"] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-4)
    assert sum(dec["cnn_contributions"].values()) == pytest.approx(np.log(series["covid"] / series["non_covid"]), abs=1e-3)
    # heat map: covid - non_covid CAM, bilinear to the slice, zero outside the lung mask
    i = len(idx) // 2
    h = phantom_result.heatmap(i)
    assert h.shape == vol.hu.shape[1:] and h.dtype == np.float32
    ref = _bilinear((cam[i, 1] - cam[i, 0]).astype(np.float64), vol.hu.shape[1:])
    ref[seg.mask[idx[i]] == 0] = 0.0
    np.testing.assert_allclose(h, ref, atol=2e-4 * max(1.0, np.abs(ref).max()))
    with pytest.raises(ConfigError, match="out of range"):
        phantom_result.heatmap(len(idx))


def test_save_heatmaps_writes_pngs(phantom_result: TriageResult, tmp_path: Path) -> None:
    import cv2

    paths = phantom_result.save_heatmaps(tmp_path, top=3)
    assert len(paths) == 3
    rows, cols = phantom_result.shape[1:]
    for p in paths:
        img = cv2.imread(str(p))
        # title line over [CAM | opacity | colour bar], panels scaled to >= 384 px high
        scale = max(1.0, 384 / rows)
        assert img is not None and img.shape[2] == 3
        assert img.shape[0] == 34 + round(rows * scale) and img.shape[1] > 2 * round(cols * scale)


def test_to_dict_json_round_trip(phantom_result: TriageResult) -> None:
    d = phantom_result.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = TriageResult.from_dict(json.loads(text))
    assert back.to_dict() == d
    for key in ("label", "probabilities", "eligible", "reasons", "slice_scores", "lung_volume_ml", "timings_ms",
                "warnings", "runtime"):
        assert key in d
    assert set(d["runtime"]) >= {"provider", "precision", "device"}
    assert set(d["slice_scores"][0]) == {"index", "z_mm", "probabilities", "ggo_fraction", "consolidation_fraction",
                                         "slice_score", "z_context_score"}
    with pytest.raises(ConfigError, match="no heat maps"):
        back.heatmap(0)


def test_not_eligible_is_a_result(engine, tmp_path: Path) -> None:
    from sdk.phantom import write_phantom_series

    write_phantom_series(tmp_path, n_slices=24, size=64, spacing=(5.0, 4.0, 4.0), slice_thickness=5.0)
    r = engine.run(tmp_path)
    assert r.label == NOT_ELIGIBLE and not r.eligible and r.reasons
    assert any("thick" in x.lower() or "mm" in x for x in r.reasons)
    assert r.probabilities == {} and r.slice_scores == []
    json.dumps(r.to_dict(), allow_nan=False)
    with pytest.raises(ConfigError, match="not eligible"):
        r.heatmap(0)


def test_series_error_propagates(engine, tmp_path: Path) -> None:
    bad = tmp_path / "notes.dcm"
    bad.write_text("not dicom")
    with pytest.raises(SeriesError) as err:
        engine.run(bad)
    assert "notes.dcm" in str(err.value)


def test_concurrent_runs_equal_sequential(engine, phantom, phantom_result, tmp_path: Path) -> None:
    from sdk.phantom import write_phantom_series

    other = tmp_path / "other"
    write_phantom_series(other, n_slices=32, size=64, spacing=(2.5, 4.0, 4.0), consolidation=True, seed=4)
    sources = [phantom, other, phantom, other]
    sequential = [phantom_result, engine.run(other)]
    assert sequential[1].eligible, sequential[1].reasons
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(engine.run, sources))
    for i, r in enumerate(parallel):
        ref = sequential[i % 2]
        assert r.probabilities == ref.probabilities
        assert [s.to_dict() for s in r.slice_scores] == [s.to_dict() for s in ref.slice_scores]


def test_lanes_give_the_same_triage_also_concurrently(engine, phantom, phantom_result) -> None:
    """CPU lanes (batches of the classifier and the lung U-Net side by side, one intra-op thread
    each) change no number: same series and slice probabilities as one lane, also when several
    runs share the lane threads at once; the runtime block says how many lanes ran."""
    lanes = sdk.Triage(device="cpu", precision="fp32", lanes=2, threads=1)
    assert lanes.runtime["cpu_lanes"] == "2" and engine.runtime["cpu_lanes"] == "1"
    assert lanes._classifier.lanes == 2 and lanes._lungs.lanes == 2
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lanes.run, [phantom] * 3))
    for r in results:
        assert r.probabilities == phantom_result.probabilities
        assert [s.to_dict() for s in r.slice_scores] == [s.to_dict() for s in phantom_result.slice_scores]
        assert r.lung_volume_ml == phantom_result.lung_volume_ml
    with pytest.raises(ConfigError, match="lanes"):
        sdk.Triage(device="cpu", lanes=0)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="device"):
        sdk.Triage(device="tpu")
    with pytest.raises(ConfigError, match="precision"):
        sdk.Triage(precision="fp8")


def test_triage_subprocess_never_imports_torch(phantom: Path) -> None:
    code = (
        "import sys, json, sdk\n"
        f"r = sdk.Triage(device='cpu').run({str(phantom)!r})\n"
        "assert r.eligible\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'label': r.label}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SDK_HOME, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["torch"] is False


def test_cli_json_is_one_object_and_heatmaps(phantom: Path, tmp_path: Path) -> None:
    out = subprocess.run(CTSDK + ["triage", str(phantom), "--device", "cpu", "--json", "--heatmaps", str(tmp_path / "h"), "--top", "2",
                                  "--dicom-out", str(tmp_path / "dcm"), "--lanes", "3"],
                         capture_output=True, text=True, cwd=SDK_HOME, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)  # the whole stdout is one JSON object
    assert d["eligible"] and d["label"] in ("covid", "non_covid", "indeterminate") and len(d["heatmaps"]) == 2
    assert (d["label"] == "indeterminate") == bool(d["reasons"]) and d["lung_opacity"]["decision"]["rules"]
    assert all(Path(p).is_file() for p in d["heatmaps"])
    assert d["runtime"]["cpu_lanes"] == "3"
    assert d["statement"] == "Research use only - not for diagnosis"  # every result object says so
    # the phantom's planted ground glass: opacity block, TID 1500 measurements and the SEG written
    assert d["lung_opacity"]["ggo_fraction"] > 0.005
    assert d["dicom_results"] == ["sr.dcm", "sc-001.dcm", "sc-002.dcm", "sc-003.dcm", "measurements.dcm", "seg.dcm"]
    assert all((tmp_path / "dcm" / n).is_file() for n in d["dicom_results"])


def test_cli_exit_2_on_series_error(tmp_path: Path) -> None:
    bad = tmp_path / "empty.dcm"
    bad.write_bytes(b"")
    out = subprocess.run(CTSDK + ["triage", str(bad), "--json"], capture_output=True, text=True, cwd=SDK_HOME, timeout=300)
    assert out.returncode == 2
    assert "empty.dcm" in out.stderr and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    err = json.loads(out.stdout)["error"]  # --json: the error is one JSON object on stdout too
    assert err["type"] == "NotDicomError" and err["exit_code"] == 2 and "empty.dcm" in err["message"]


def test_covid_p001(engine) -> None:
    path = shared_path("dicom", "covid-ct-md", "covid-P001")
    r = engine.run(path)
    assert r.eligible, r.reasons
    assert r.shape == [148, 512, 512]
    assert 2000 < r.lung_volume_ml < 8000
    assert len(r.slice_scores) >= 20
    assert r.label in ("covid", "non_covid", "indeterminate")
    assert (r.label == "indeterminate") == bool(r.reasons)
    op = r.lung_opacity
    assert set(op["per_lung"]) == {"left", "right"} and set(op["per_zone"]) == {"upper", "lower", "central", "peripheral"}
    assert 0.002 < op["ggo_fraction"] < 0.05 and op["pattern"]["involved_lungs"] >= 1
    # no HU term fires on P001 (sum 0), so "disagree" cannot, whatever the classifier says; the
    # series has 148 slices and > 6 l of lung: none of the evidence-quality rules may fire
    assert sum(op["decision"]["hu_terms"].values()) == 0.0
    assert not any(op["decision"]["rules"][k] for k in ("few_slices", "small_lungs", "disagree"))
    json.dumps(r.to_dict(), allow_nan=False)


def test_prior_hook(engine, phantom, tmp_path: Path) -> None:
    """run(prior=...) hands both studies to sdk.prior.compare; an unusable prior is an error entry."""
    r = engine.run(phantom, prior=phantom)
    assert r.prior["change"] == "stable" and "prior" in r.timings_ms
    json.dumps(r.to_dict(), allow_nan=False)
    from sdk.phantom import write_phantom_series

    write_phantom_series(tmp_path, n_slices=24, size=64, spacing=(5.0, 4.0, 4.0), slice_thickness=5.0)
    r2 = engine.run(phantom, prior=tmp_path)
    assert r2.eligible and "not eligible" in r2.prior["error"]
    assert any(w.startswith("prior comparison skipped") for w in r2.warnings)


def test_kernel_backed_inputs_give_the_same_triage(phantom, phantom_result: TriageResult) -> None:
    """The classifier-input stage through ctsdk's CUDA kernel source (compiled with g++ by the CPU
    harness) gives the same slice and series probabilities as the NumPy/OpenCV path."""
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the kernel CPU harness cannot be built")
    harness_engine = sdk.Triage(device="cpu", precision="fp32", kernels="cpu-harness")
    assert harness_engine.runtime["kernels"] == "cpu-harness"
    numpy_engine = sdk.Triage(device="cpu", precision="fp32", kernels="numpy")
    assert numpy_engine.runtime["kernels"] == "numpy"
    a, b = harness_engine.run(phantom), numpy_engine.run(phantom)
    assert [s.index for s in a.slice_scores] == [s.index for s in b.slice_scores]
    pa = np.array([[s.probabilities[c] for c in a.probabilities] for s in a.slice_scores])
    pb = np.array([[s.probabilities[c] for c in b.probabilities] for s in b.slice_scores])
    assert np.abs(pa - pb).max() <= 1e-4
    assert a.label == b.label
    for c in a.probabilities:
        assert a.probabilities[c] == pytest.approx(b.probabilities[c], abs=1e-4)


def test_gpu_kernels_requested_without_gpu_fall_back_with_a_reason() -> None:
    from sdk.kernels import gpu_backends

    if any(why == "" for why in gpu_backends().values()):
        pytest.skip("pycuda or CuPy is importable here; this test is for machines without one")
    eng = sdk.Triage(device="cpu", precision="fp32", kernels="gpu")
    assert eng.runtime["kernels"] == "numpy"
    assert any("GPU kernels unavailable" in r for r in eng.runtime_reasons)
    with pytest.raises(ConfigError):
        sdk.Triage(kernels="opencl")


def test_a_float_volume_with_nan_is_refused_naming_the_slice(engine, phantom, phantom_result) -> None:
    """An integrator's own Volume with NaN / inf HU: a ConfigError at the door naming the count and
    the first slice (it surfaced later as 'slice probabilities contain NaN or inf'); the same
    volume with finite float HU triages as the int16 one does."""
    import dataclasses

    from sdk.io import load_series

    vol = load_series(phantom)
    hu = vol.hu.astype(np.float32)
    finite = engine.run(dataclasses.replace(vol, hu=hu))
    assert finite.label == phantom_result.label
    assert finite.probabilities == pytest.approx(phantom_result.probabilities, abs=1e-6)
    hu[7, 3, 5] = np.nan
    hu[9, 0, 0] = np.inf
    with pytest.raises(ConfigError, match=r"Volume.hu holds 2 NaN / inf values \(first in slice 7 of"):
        engine.run(dataclasses.replace(vol, hu=hu))
