"""TensorRT engine building: every pure-logic part, without TensorRT (it cannot be installed here).

Covers argument parsing, optimisation-profile shapes, precision plans for TensorRT 10 (builder
flags) and 11 (strongly typed), ONNX precision detection, engine-cache keys, the sidecar key
check (EngineMismatchError "rebuild with ctsdk build-engine"), the file lock, and the CLI's
no-TensorRT exit path through the installed ``ctsdk`` script.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sdk.errors import ConfigError, EngineMismatchError
from sdk.export.tensorrt import (
    BuildConfig, check_onnx_for_plan, engine_key, onnx_precision, parse_batch, precision_plan, profile_shapes, resolve_model,
)
from sdk.runtime.engine_cache import EngineCache, EngineKey, check_engine_key, file_lock, read_sidecar, write_sidecar

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
from conftest import PORTABLE_IR, SDK_HOME  # noqa: E402 - where subprocesses import the same sdk
CTSDK = Path(sys.executable).with_name("ctsdk")
SHA = "ab" * 32


@pytest.mark.parametrize("text, want", [("1,8,32", (1, 8, 32)), ("4", (4, 4, 4)), (" 1, 1 ,2", (1, 1, 2)),
                                        ((2, 4, 8), (2, 4, 8)), (None, (1, 8, 32))])
def test_parse_batch(text, want):
    assert parse_batch(text) == want


@pytest.mark.parametrize("text", ["8,4,2", "0,1,2", "1,2", "a,b,c", "1,2,3,4", "1,1,5000"])
def test_parse_batch_rejects(text):
    with pytest.raises(ConfigError, match="--batch"):
        parse_batch(text)


def test_profile_shapes():
    shapes = profile_shapes([("image", ("batch", 3, 224, 224))], (1, 8, 32))
    assert shapes == {"image": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}
    assert profile_shapes([("x", (None, 1, 128, 128))], (2, 2, 2))["x"][0] == (2, 1, 128, 128)
    with pytest.raises(ConfigError, match="dynamic axis 2"):
        profile_shapes([("image", ("batch", 3, "h", 224))], (1, 8, 32))
    with pytest.raises(ConfigError, match="fixed batch 1"):
        profile_shapes([("image", (1, 3, 224, 224))], (1, 8, 32))
    assert profile_shapes([("image", (1, 3, 4, 4))], (1, 1, 1))["image"][2] == (1, 3, 4, 4)


def test_precision_plans_trt10_vs_trt11():
    # TensorRT 11: no BuilderFlag.FP16/INT8 -> strongly typed, the ONNX carries the precision
    for p in ("fp32", "fp16", "int8"):
        plan = precision_plan(p, has_precision_flags=False)
        assert plan.strongly_typed and not plan.fp16_flag and not plan.int8_flag and plan.onnx_must_be == p
    # TensorRT 10: weakly typed + flags
    assert precision_plan("fp32", True).to_dict() == {"precision": "fp32", "strongly_typed": False, "fp16_flag": False,
                                                      "int8_flag": False, "onnx_must_be": "fp32"}
    p16 = precision_plan("fp16", True)
    assert p16.fp16_flag and not p16.int8_flag and p16.onnx_must_be == "any"
    p8 = precision_plan("int8", True)
    assert p8.int8_flag and p8.fp16_flag and p8.onnx_must_be == "int8"
    with pytest.raises(ConfigError, match="precision"):
        precision_plan("bf16", True)


def _onnx_file(path: Path, kind: str) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4, 4])
    w = np.ones((3, 2, 1, 1), np.float32)
    nodes, inits = [], []
    if kind == "int8":
        inits += [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
        nodes += [helper.make_node("QuantizeLinear", ["image", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        src = "dq"
    else:
        src = "image"
    if kind == "fp16":
        inits.append(numpy_helper.from_array(w.astype(np.float16), "w"))
        nodes += [helper.make_node("Cast", [src], ["h"], to=TensorProto.FLOAT16),
                  helper.make_node("Conv", ["h", "w"], ["yh"]),
                  helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT)]
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(helper.make_node("Conv", [src, "w"], ["y"]))
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)], ir_version=PORTABLE_IR)
    onnx.checker.check_model(m)
    onnx.save_model(m, str(path))
    return path


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8"])
def test_onnx_precision_detection(tmp_path, kind):
    info = onnx_precision(_onnx_file(tmp_path / f"m_{kind}.onnx", kind))
    assert info["kind"] == kind
    assert (info["qdq_nodes"] > 0) == (kind == "int8")


def test_wrong_onnx_for_precision(tmp_path):
    p = _onnx_file(tmp_path / "m.onnx", "fp32")
    with pytest.raises(ConfigError, match="ctsdk export --fp16"):
        check_onnx_for_plan(p, precision_plan("fp16", has_precision_flags=False), "fp32")
    assert check_onnx_for_plan(p, precision_plan("fp16", True), "fp32") == []          # TRT 10: flags do it
    warn = check_onnx_for_plan(p, precision_plan("int8", True), "fp32")
    assert len(warn) == 1 and "ctsdk calibrate" in warn[0]
    assert check_onnx_for_plan(p, precision_plan("int8", False), "int8") == []


def test_engine_key_digest_and_roundtrip(tmp_path):
    p = _onnx_file(tmp_path / "m.onnx", "fp32")
    k = engine_key(p, "fp16", (1, 8, 32), "NVIDIA H100 80GB HBM3", "9.0", "10.9.0")
    import hashlib

    assert k.onnx_sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert EngineKey.from_dict(json.loads(json.dumps(k.to_dict()))) == k
    variants = [dict(gpu_name="NVIDIA A100"), dict(compute_capability="8.0"), dict(trt_version="11.0.0"),
                dict(precision="int8"), dict(batch=(1, 8, 64)), dict(onnx_sha256=SHA)]
    digests = {k.digest()}
    for v in variants:
        other = EngineKey(**{**k.to_dict(), "batch": tuple(k.batch), **v})
        assert other.mismatches(k) and other.digest() not in digests
        digests.add(other.digest())
    assert k.digest() == engine_key(p, "fp16", (1, 8, 32), "NVIDIA H100 80GB HBM3", "9.0", "10.9.0").digest()
    with pytest.raises(ConfigError):
        EngineKey(SHA, "g", "9.0", "10", "fp64")


def test_engine_cache_put_get_and_mismatch(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    key = EngineKey(SHA, "NVIDIA H100", "9.0", "10.9.0", "fp16", (1, 8, 32))
    assert cache.get(key, "cls") is None
    path = cache.put(key, b"engine-bytes", "cls", extra={"build_s": 1.0})
    assert path.name == f"cls.fp16.{key.digest()}.engine" and path.read_bytes() == b"engine-bytes"
    assert cache.get(key, "cls") == path
    built, side = read_sidecar(path)
    assert built == key and side["build_s"] == 1.0
    newer = EngineKey(SHA, "NVIDIA H100", "9.0", "10.10.0", "fp16", (1, 8, 32))
    assert cache.get(newer, "cls") is None                   # other TensorRT: different entry
    assert [k for _, k in cache.entries()] == [key]
    # loading on another machine / TensorRT -> clear "rebuild" error
    with pytest.raises(EngineMismatchError, match="rebuild with ctsdk build-engine") as e:
        check_engine_key(path, built, "NVIDIA L4", "8.9", "10.9.0", "fp16")
    assert "NVIDIA H100" in str(e.value) and "8.9" in str(e.value)
    with pytest.raises(EngineMismatchError, match="TensorRT 10.9.0"):
        check_engine_key(path, built, "NVIDIA H100", "9.0", "11.0.1")
    with pytest.raises(EngineMismatchError, match="precision fp16"):
        check_engine_key(path, built, "NVIDIA H100", "9.0", "10.9.0", "int8")
    check_engine_key(path, built, "NVIDIA H100", "9.0", "10.9.0", "fp16")    # same machine: fine


def test_engine_without_sidecar_is_refused(tmp_path):
    e = tmp_path / "foreign.engine"
    e.write_bytes(b"x")
    with pytest.raises(EngineMismatchError, match="rebuild with ctsdk build-engine"):
        read_sidecar(e)
    (tmp_path / "foreign.engine.json").write_text("{not json")
    with pytest.raises(EngineMismatchError, match="unreadable"):
        read_sidecar(e)
    write_sidecar(e, EngineKey(SHA, "g", "9.0", "10", "fp32"))
    assert read_sidecar(e)[0].gpu_name == "g"


def test_file_lock_is_exclusive(tmp_path):
    target = tmp_path / "x.engine"
    held, release = threading.Event(), threading.Event()

    def holder():
        with file_lock(target):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(10)
    with pytest.raises(ConfigError, match="still locked"):
        with file_lock(target, timeout_s=0.3):
            pass
    release.set()
    t.join()
    with file_lock(target, timeout_s=1):
        pass


def test_build_config_and_resolve_model(tmp_path):
    with pytest.raises(ConfigError, match="workspace"):
        BuildConfig(onnx="m.onnx", workspace_mb=1)
    with pytest.raises(ConfigError, match="precision"):
        BuildConfig(onnx="m.onnx", precision="int4")
    assert BuildConfig(onnx=tmp_path / "m.onnx").engine_cache().root == tmp_path / "engines"
    p = _onnx_file(tmp_path / "classifier_fp16.onnx", "fp16")
    assert resolve_model("classifier", "fp16", tmp_path) == p
    assert resolve_model(str(p), "int8", tmp_path) == p
    with pytest.raises(ConfigError, match="classifier_int8.onnx not found"):
        resolve_model("classifier", "int8", tmp_path)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the no-TensorRT path cannot be exercised")
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_cli_without_tensorrt_exits_2_with_one_line(tmp_path, extra):
    if not CTSDK.exists():
        pytest.skip(f"{CTSDK} not installed (pip install -e .)")
    onnx_path = _onnx_file(tmp_path / "m_fp16.onnx", "fp16")
    r = subprocess.run([str(CTSDK), "build-engine", "--model", str(onnx_path), "--precision", "fp16", *extra],
                       capture_output=True, text=True, timeout=120, cwd=SDK_HOME)
    assert r.returncode == 2
    assert (r.stdout == "") if not extra else json.loads(r.stdout)["error"]["exit_code"] == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "install ctsdk[gpu] (TensorRT)" in lines[0]


def test_cli_bad_batch_exits_2(tmp_path):
    if not CTSDK.exists():
        pytest.skip(f"{CTSDK} not installed (pip install -e .)")
    r = subprocess.run([str(CTSDK), "build-engine", "--model", "x.onnx", "--batch", "8,4,2"],
                       capture_output=True, text=True, timeout=120, cwd=SDK_HOME)
    assert r.returncode == 2 and "--batch must satisfy" in r.stderr


def test_cli_measure_warm_needs_a_timing_cache():
    """--measure-warm without --timing-cache did nothing silently; now exit 2 before TensorRT is asked."""
    from click.testing import CliRunner

    from sdk.cli import cli

    r = CliRunner().invoke(cli, ["build-engine", "--model", "classifier", "--precision", "fp16", "--measure-warm"])
    assert r.exit_code == 2 and "--measure-warm needs --timing-cache" in r.stderr


def test_model_name_resolves_in_the_default_bundle():
    """`ctsdk build-engine --model classifier --precision fp16` on a target GPU takes the packaged
    bundle's file (the one sdk.Triage() runs), not a development folder."""
    from sdk.bundle import DEFAULT_BUNDLE_DIR

    for name, prec in (("classifier", "fp16"), ("classifier", "int8"), ("lungs3d", "fp16")):
        assert resolve_model(name, prec) == DEFAULT_BUNDLE_DIR / f"{name}_{prec}.onnx"
    with pytest.raises(ConfigError, match=r"classifier_fp8\.onnx not found|precision"):
        resolve_model("classifier", "fp8")


def test_engine_of_a_bundle_file_lands_where_triage_looks(tmp_path, monkeypatch):
    """An engine built from a bundle's ONNX is cached in Bundle.engine_cache_dir() - the folder
    sdk.Triage passes to its TensorRT loader (sdk.triage -> select_runtime(engine_cache_dir=...))
    - for the packaged bundle, for a user bundle, and with $CTSDK_ENGINE_CACHE; a file outside any
    bundle keeps the old rule; a bundle with a changed file is refused as the runtime refuses it."""
    import shutil

    from sdk.bundle import DEFAULT_BUNDLE_DIR, load_bundle
    from sdk.errors import BundleError
    from sdk.runtime.trt_build import bundle_of

    monkeypatch.delenv("CTSDK_ENGINE_CACHE", raising=False)
    packaged = DEFAULT_BUNDLE_DIR / "classifier_fp16.onnx"
    assert BuildConfig(onnx=packaged).engine_cache().root == load_bundle().engine_cache_dir()

    user = tmp_path / "mybundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, user)
    want = load_bundle(user).engine_cache_dir()
    assert want == user.parent / "mybundle.engines"
    assert BuildConfig(onnx=user / "classifier_fp16.onnx").engine_cache().root == want

    monkeypatch.setenv("CTSDK_ENGINE_CACHE", str(tmp_path / "cache"))
    assert BuildConfig(onnx=user / "classifier_fp16.onnx").engine_cache().root == load_bundle(user).engine_cache_dir()
    assert load_bundle(user).engine_cache_dir().parent == tmp_path / "cache"
    monkeypatch.delenv("CTSDK_ENGINE_CACHE")

    stray = _onnx_file(user / "extra_fp16.onnx", "fp16")  # in the folder, not in the manifest
    assert bundle_of(stray) is None
    assert BuildConfig(onnx=stray).engine_cache().root == user / "engines"
    (user / "aggregator.json").write_text("{}")
    with pytest.raises(BundleError, match="aggregator.json"):
        BuildConfig(onnx=user / "classifier_fp16.onnx").engine_cache()
