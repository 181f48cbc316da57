"""sdk.bench.gpu_report on any machine: without a GPU every GPU section says so and the files are
written; the profile summary and the CPU/GPU agreement are checked on real ORT output and results."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sdk.bench import gpu_report as gr
from conftest import PORTABLE_IR  # noqa: E402


def _no_gpu() -> bool:
    from sdk.runtime.gpu import gpu_info

    return gpu_info() is None


def test_report_without_a_gpu_writes_not_run_sections(tmp_path):
    if not _no_gpu():
        pytest.skip("a GPU is present here: the GPU sections would really run (use the report itself)")
    rep = gr.run_report(tmp_path, rounds=1, progress=lambda m: None)
    assert rep["sections"]["environment"]["status"] == "ok"
    for name in ("kernels", "ort", "triage"):
        assert rep["sections"][name]["status"] == gr.NOT_ON_GPU and rep["sections"][name]["reason"]
    on_disk = json.loads((tmp_path / "gpu_report.json").read_text())
    assert on_disk["schema"] == gr.SCHEMA and set(on_disk["sections"]) == set(gr.SECTIONS)
    md = (tmp_path / "gpu.md").read_text()
    assert md.count(gr.NOT_ON_GPU) >= 3 and "### Machine" in md


def test_cli_alias_writes_the_report(tmp_path):
    from click.testing import CliRunner

    from sdk.cli import cli

    if not _no_gpu():
        pytest.skip("a GPU is present here: the full report would run")
    r = CliRunner().invoke(cli, ["bench", "--gpu-report", str(tmp_path / "g"), "--repeat", "1", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["sections"]["kernels"] == gr.NOT_ON_GPU
    assert (tmp_path / "g" / "gpu.md").is_file()


def test_summarize_profile_on_a_real_ort_profile(tmp_path):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from sdk.runtime.ort import OrtSession

    w = np.ones((4, 2, 3, 3), np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["y"], ["out"])], "p",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                          [numpy_helper.from_array(w, "w")])
    path = tmp_path / "p.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=PORTABLE_IR), str(path))
    s = OrtSession(path, threads=1, profile=str(tmp_path / "prof"), graph_optimization="disable")
    for _ in range(3):
        s.infer({"image": np.ones((2, 2, 8, 8), np.float32)})
    summary = gr.summarize_profile(s.end_profiling())
    ops = dict(summary["top_ops_ms"])
    assert {"Conv", "Relu"} <= set(ops) and all(v >= 0 for v in ops.values())
    assert len(summary["model_runs_ms"]) == 3
    assert set(summary["by_provider_ms"]) == {"CPUExecutionProvider"}


def test_agreement_of_two_results():
    from sdk.triage import SliceScore, TriageResult

    a = TriageResult("covid", {"covid": 0.9, "non_covid": 0.1}, True,
                     slice_scores=[SliceScore(3, 1.0, {"covid": 0.8, "non_covid": 0.2}), SliceScore(5, 2.0, {"covid": 0.5, "non_covid": 0.5})])
    b = TriageResult("covid", {"covid": 0.85, "non_covid": 0.15}, True,
                     slice_scores=[SliceScore(3, 1.0, {"covid": 0.75, "non_covid": 0.25}), SliceScore(7, 3.0, {"covid": 0.1, "non_covid": 0.9})])
    got = gr._agreement(a, b)
    assert got["same_label"] and got["slices_common"] == 1
    assert got["max_abs_dp_series"] == pytest.approx(0.05) and got["max_abs_dp_slices"] == pytest.approx(0.05)
    g = gr.goals({"agreement_vs_cpu_fp32": got, "from_volume": {"total": {"p50": 29.0}},
                  "from_files": {"total": {"p50": 501.0}}})
    assert g == {"volume_total_p50_ms<=30": True, "files_total_p50_ms<=500": False, "same_label_as_cpu": True,
                 "max_abs_dp<=0.02": False}


@pytest.mark.parametrize("args, what", [(["--backends", "cupyy"], "--backends: unknown ['cupyy']"),
                                        (["--lungs", "auto,hybird"], "--lungs: unknown ['hybird']"),
                                        (["--sections", "kernel"], "unknown sections ['kernel']")])
def test_options_are_checked_before_anything_runs(tmp_path, capsys, args, what):
    """A typo in --backends / --lungs / --sections exits 2 naming it, before any section runs (it
    used to measure nothing, or fail in a section, on a GPU minutes in)."""
    with pytest.raises(SystemExit) as exc:
        gr.main(["--out", str(tmp_path / "r"), *args])
    assert exc.value.code == 2 and what in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert gr.KERNEL_BACKENDS == tuple(__import__("sdk.kernels.gpu", fromlist=["gpu_backends"]).gpu_backends())


def test_markdown_shows_every_triage_section_and_only_requested_ones():
    """gpu.md renders each Triage section (auto and every further --lungs method), and sections
    that were not requested are not listed as "missing"."""
    t = {"status": "ok", "device": "cuda", "series": "P001", "rounds": 3, "runtime": {"lungs": "x"},
         "from_files": {"total": {"p50": 400.0, "p95": 410.0}}, "from_volume": {"total": {"p50": 25.0, "p95": 26.0}},
         "goals": {"volume_30ms": True}}
    rep = {"command": "c", "date": "d", "sections": {
        "environment": {"status": "ok"}, "triage": t,
        "triage-hybrid3d": dict(t, from_volume={"total": {"p50": 20.0, "p95": 21.0}}),
        "triage-hybrid": {"status": "error", "error": "boom"}}}
    md = gr.to_markdown(rep)
    assert 'lung_method="auto"' in md and 'lung_method="hybrid3d"' in md and "20.0" in md
    assert "### triage-hybrid" in md and "boom" in md
    assert "### kernels" not in md and "### ort" not in md and "missing" not in md
