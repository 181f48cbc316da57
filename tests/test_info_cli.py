"""`ctsdk info`: the machine, the bundle, its engine cache, the data folder, and what Triage() runs."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from sdk.bundle import load_bundle
from sdk.cli import cli
from sdk.cli.info_cmd import machine_info
from sdk.paths import shared_data_root
from sdk.runtime.engine_cache import EngineCache, EngineKey


def test_machine_info_without_opening_triage(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CTSDK_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.setenv("CTSDK_THREADS", "1")
    bundle = load_bundle()
    d = machine_info(open_triage=False)
    assert d["bundle"]["name"] == bundle.name and d["bundle"]["version"] == bundle.version and d["bundle"]["verified"]
    assert d["bundle"]["int8_classifier_passed"] == bundle.calibration_passed
    assert d["bundle"]["int8_lungs_passed"] == bundle.lungs_int8_passed
    assert d["bundle"]["warnings"] == bundle.warnings == []  # the shipped bundle falls back on nothing
    assert d["runtimes"]["ort-cpu"]["available"] is True
    assert d["shared_data"]["path"] == str(shared_data_root())
    assert d["env"]["CTSDK_THREADS"] == "1"
    # the engine folder is the one sdk.Triage hands its TensorRT loader; an engine there is listed
    assert d["tensorrt_engines"] == {"dir": str(bundle.engine_cache_dir()), "engines": []}
    key = EngineKey(onnx_sha256="ab" * 32, gpu_name="NVIDIA H200", compute_capability="9.0", trt_version="11.0.0",
                    precision="fp16", batch=(1, 8, 32))
    EngineCache(bundle.engine_cache_dir()).put(key, b"engine bytes", "classifier_fp16")
    engines = machine_info(open_triage=False)["tensorrt_engines"]["engines"]
    assert len(engines) == 1 and engines[0]["gpu_name"] == "NVIDIA H200" and engines[0]["precision"] == "fp16"
    assert engines[0]["file"].startswith("classifier_fp16.fp16.") and "triage_auto" not in d


def test_cli_json_says_what_triage_runs() -> None:
    r = CliRunner().invoke(cli, ["info", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    t = d["triage_auto"]
    assert t["runtime"]["device"] == "cpu" and t["runtime"]["provider"] == "CPUExecutionProvider"
    assert t["runtime"]["precision"] == ("int8" if load_bundle().calibration_passed else "fp32")
    assert any("selected ort-cpu" in reason for reason in t["reasons"])
    human = CliRunner().invoke(cli, ["info", "--no-open"], catch_exceptions=False)
    assert human.exit_code == 0 and "runtimes:" in human.output and "sdk.Triage() here" not in human.output


def test_cli_missing_bundle_exits_2(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["info", "--bundle", str(tmp_path / "nope")])
    assert r.exit_code == 2


def test_does_not_build_a_tensorrt_engine_to_answer(monkeypatch, tmp_path: Path) -> None:
    """Where TensorRT is usable but the bundle's engine folder is empty, opening Triage() would
    build an engine (minutes): info says so instead of opening it."""
    from sdk.runtime.registry import TensorRTBackend

    monkeypatch.setenv("CTSDK_ENGINE_CACHE", str(tmp_path / "engines"))
    monkeypatch.setattr(TensorRTBackend, "status", lambda self: (True, "TensorRT 11.0 (stand-in)"))
    d = machine_info(open_triage=True)
    assert "ctsdk build-engine" in d["triage_auto"]["skipped"]
    r = CliRunner().invoke(cli, ["info"], catch_exceptions=False)
    assert r.exit_code == 0 and "not opened" in r.output
