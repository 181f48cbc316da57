"""Bundle integrity (sdk.bundle_check): what a manifest claims about its files must hold.

Bundles are built in tmp_path from copies of the shipped bundle's real files and from tiny ONNX
classifiers (onnx.helper) with deliberately mismatched ctsdk metadata. Each test failed on the
code before sdk/bundle_check.py (audit: rebuilt bundles masquerading as the shipped one, stale
thresholds/metrics/verdicts, ONNX preprocessing never compared with the manifest, a silent 0.5
threshold, hand-edited verdicts trusted, build_hu_bundle's cwd-relative card and leaked staging).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import pytest

from sdk.bundle import DEFAULT_BUNDLE_DIR, load_bundle, verify_bundle, write_bundle
from sdk.errors import BundleError, ConfigError
from sdk.hashing import sha256_file

from conftest import PORTABLE_IR, SDK_HOME, subprocess_env  # noqa: E402

onnx = pytest.importorskip("onnx", reason="building test ONNX files needs onnx (pip install 'ctsdk[train]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SHIPPED = json.loads((DEFAULT_BUNDLE_DIR / "manifest.json").read_text())
Files = Dict[str, Tuple[str, str, str]]


# --- helpers -------------------------------------------------------------------------------------------
def _tiny_classifier(path: Path, size: int = 224, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """image (N, 3, size, size) -> logits / probs / cam, with ``ctsdk.*`` metadata ``meta``."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2]) for n in ("logits", "probs", "cam")]
    w = numpy_helper.from_array(np.ones((3, 2), np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["image"], ["gap"]), helper.make_node("Flatten", ["gap"], ["pooled"]),
             helper.make_node("MatMul", ["pooled", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
             helper.make_node("Identity", ["logits"], ["cam"])]
    m = helper.make_model(helper.make_graph(nodes, "tiny_classifier", [x], outs, [w]),
                          opset_imports=[helper.make_opsetid("", 17)], ir_version=PORTABLE_IR)
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=f"ctsdk.{k}", value=v if isinstance(v, str) else json.dumps(v))
    onnx.save_model(m, str(path))
    return path


def _good_meta(size: int = 224, window: Tuple[float, float] = (-1350.0, 150.0),
               classes: Tuple[str, ...] = ("non_covid", "covid")) -> Dict[str, Any]:
    """ctsdk metadata as ``ctsdk export`` writes it (the shipped classifier's values by default)."""
    return {"preprocessing": {"window_hu": list(window), "size": size, "channels": ["grey", "lung_mask", "grey*mask"],
                              "mean": [0.5] * 3, "std": [0.5] * 3},
            "classes": list(classes)}


def _hand_bundle(root: Path, files: Files, manifest: Mapping[str, Any]) -> Path:
    """A bundle folder written by hand (what an older builder or an editor leaves): files copied,
    hashes right, nothing checked."""
    root.mkdir(parents=True)
    entries = {}
    for name, (src, role, prec) in files.items():
        dst = root / Path(src).name
        shutil.copyfile(src, dst)
        entries[name] = {"path": dst.name, "sha256": sha256_file(dst), "bytes": dst.stat().st_size,
                         "role": role, "precision": prec}
    (root / "manifest.json").write_text(json.dumps({**manifest, "files": entries}))
    return root


def _verify_cli(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdk.bundle", "verify", str(path)], capture_output=True, text=True,
                          cwd=SDK_HOME, env=subprocess_env())


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the shipped files (sources outside every output folder) plus a "retrained"
    classifier: the shipped FP32 graph with one more metadata entry (same network, new sha256)."""
    d = tmp_path_factory.mktemp("src")
    for f in SHIPPED["files"].values():
        shutil.copyfile(DEFAULT_BUNDLE_DIR / f["path"], d / f["path"])
    (d / "retrained").mkdir()
    m = onnx.load(str(DEFAULT_BUNDLE_DIR / "classifier_fp32.onnx"))
    m.metadata_props.add(key="ctsdk.checkpoint_note", value="retrained (test)")
    onnx.save_model(m, str(d / "retrained" / "classifier_fp32.onnx"))
    return d


def _shipped_files(src: Path, *names: str) -> Files:
    return {n: (str(src / SHIPPED["files"][n]["path"]), SHIPPED["files"][n]["role"], SHIPPED["files"][n]["precision"])
            for n in names}


# --- the shipped bundle passes every check -------------------------------------------------------------
def test_shipped_bundle_passes_every_new_check(src: Path, tmp_path: Path) -> None:
    assert verify_bundle(DEFAULT_BUNDLE_DIR) == []
    b = load_bundle()
    assert b.warnings == [] and b.lungs_int8_passed and not b.calibration_passed
    # the documented rebuild with the same files and the current manifest is still allowed
    again = write_bundle(tmp_path / "same", _shipped_files(src, *SHIPPED["files"]), SHIPPED)
    assert (again.name, again.version) == (b.name, b.version) and "stale_metadata" not in again.manifest


# --- 1. a rebuilt bundle must not masquerade as the shipped one ----------------------------------------
def test_rebuild_with_new_classifier_refuses_shipped_name_and_stale_blocks(src: Path, tmp_path: Path) -> None:
    files = _shipped_files(src, "lungs", "lungs_int8", "aggregator", "model_card")
    files["classifier_fp32"] = (str(src / "retrained" / "classifier_fp32.onnx"), "classifier", "fp32")
    with pytest.raises(ConfigError) as err:                          # the shipped name + version, other models
        write_bundle(tmp_path / "a", files, SHIPPED)
    assert "ctsdk-default 0.2.0" in str(err.value) and "shipped bundle" in str(err.value) and "new name" in str(err.value)
    assert not (tmp_path / "a").exists()
    meta = dict(SHIPPED, name="hospital", version="1")
    with pytest.raises(ConfigError) as err:                          # thresholds, metrics, verdicts of the old files
        write_bundle(tmp_path / "b", files, meta)
    msg = str(err.value)
    for block in ("thresholds.series", "thresholds.slice", "metrics", "int8", "image_render", "slice_score", "classifier_features"):
        assert block in msg, block
    assert "classifier:fp32" in msg and "--remeasured" in msg and "--keep-stale-metadata" in msg
    assert "lungs_int8" not in msg.split("measured on the old files")[1]   # the lung U-Nets did not change


def test_keep_stale_metadata_records_and_warns_and_remeasured_clears(src: Path, tmp_path: Path) -> None:
    files = _shipped_files(src, "lungs", "lungs_int8", "aggregator", "model_card", "classifier_int8")
    files["classifier_fp32"] = (str(src / "retrained" / "classifier_fp32.onnx"), "classifier", "fp32")
    meta = dict(SHIPPED, name="hospital", version="1", int8=dict(SHIPPED["int8"], passed=True))
    meta.pop("classifier_features")
    kept = write_bundle(tmp_path / "kept", files, meta, keep_stale_metadata=True)
    rec = kept.manifest["stale_metadata"]
    assert rec["from"].startswith("ctsdk-default 0.2.0") and "classifier:fp32" in rec["changed"]
    assert {"thresholds.series", "metrics", "int8", "slice_score"} <= set(rec["blocks"])
    assert not kept.calibration_passed                               # a stale verdict is no verdict
    assert any("stale_metadata" in w for w in kept.warnings)
    # new values declared as measured on these files: nothing stale is left
    fresh = dict(meta, thresholds={"series": 0.4, "slice": 0.3}, metrics={"note": "measured on the new files"},
                 image_render="hu", int8={"passed": False})
    fresh.pop("slice_score")
    ok = write_bundle(tmp_path / "fresh", files, fresh, remeasured=["thresholds", "metrics", "image_render", "int8"])
    assert "stale_metadata" not in ok.manifest and ok.warnings == [] and ok.threshold == 0.4
    with pytest.raises(ConfigError, match="does not hold"):
        write_bundle(tmp_path / "typo", files, fresh, remeasured=["threshold.series"])


def test_cli_build_refuses_then_keeps_with_the_flag(src: Path, tmp_path: Path) -> None:
    meta = dict(SHIPPED, name="hospital", version="1")
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    args = [sys.executable, "-m", "sdk.bundle", "build", "--out", str(tmp_path / "b"), "--meta", str(tmp_path / "meta.json"),
            "--file", f"lungs={src / 'lungs_fp32.onnx'}:lungs:fp32", "--file", f"lungs_int8={src / 'lungs_int8.onnx'}:lungs:int8",
            "--file", f"classifier_fp32={src / 'retrained' / 'classifier_fp32.onnx'}:classifier:fp32",
            "--file", f"aggregator={src / 'aggregator.json'}:aggregator"]
    bad = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=subprocess_env())
    assert bad.returncode == 2 and "thresholds.series" in bad.stderr and "--keep-stale-metadata" in bad.stderr
    ok = subprocess.run(args + ["--keep-stale-metadata"], capture_output=True, text=True, cwd=tmp_path, env=subprocess_env())
    assert ok.returncode == 0, ok.stderr
    assert "thresholds.series" in json.loads((tmp_path / "b" / "manifest.json").read_text())["stale_metadata"]["blocks"]


def test_derived_files_of_another_classifier_are_refused(src: Path, tmp_path: Path) -> None:
    files = _shipped_files(src, "lungs", "aggregator", "classifier_features_fp32", "classifier_head_fp32")
    files["classifier_fp32"] = (str(src / "retrained" / "classifier_fp32.onnx"), "classifier", "fp32")
    meta = {k: v for k, v in SHIPPED.items() if k not in ("files", "lungs_int8", "classifier_features")}
    meta.update(name="hospital", version="1")
    with pytest.raises(BundleError) as err:
        write_bundle(tmp_path / "b", files, meta)
    assert "classifier_features_fp32.onnx" in str(err.value) and "sdk.export.features" in str(err.value)
    assert not any((tmp_path / "b").iterdir())                     # refused: the copies are removed
    files = _shipped_files(src, "lungs", "aggregator", "classifier_fp16")   # FP16 converted from the old FP32
    files["classifier_fp32"] = (str(src / "retrained" / "classifier_fp32.onnx"), "classifier", "fp32")
    with pytest.raises(BundleError, match="classifier_fp16.onnx.*ctsdk.source_sha256"):
        write_bundle(tmp_path / "c", files, meta)


# --- 2. ONNX metadata against the manifest -------------------------------------------------------------
@pytest.mark.parametrize("kwargs, onnx_key, manifest_key", [
    ({"meta": _good_meta(window=(-1000.0, 400.0))}, "ctsdk.preprocessing.window_hu", "preprocessing.classifier.window"),
    ({"meta": _good_meta(size=256)}, "ctsdk.preprocessing.size", "preprocessing.classifier.size"),
    ({"meta": _good_meta(classes=("covid", "non_covid"))}, "ctsdk.classes", "classes"),
    ({"size": 256, "meta": _good_meta()}, "graph input 'image' shape", "preprocessing.classifier.size"),
])
def test_classifier_metadata_mismatch_is_refused_at_build(src: Path, tmp_path: Path, kwargs: Dict[str, Any],
                                                          onnx_key: str, manifest_key: str) -> None:
    clf = _tiny_classifier(tmp_path / "classifier_fp32.onnx", **kwargs)
    meta = {"name": "hospital", "version": "1", "classes": ["non_covid", "covid"], "thresholds": {"series": 0.5}}
    files = {"classifier_fp32": (str(clf), "classifier", "fp32"), **_shipped_files(src, "aggregator")}
    with pytest.raises(BundleError) as err:
        write_bundle(tmp_path / "b", files, meta)
    msg = str(err.value)
    assert "hospital 1" in msg and "classifier_fp32.onnx" in msg and onnx_key in msg and manifest_key in msg
    # matching metadata builds
    (tmp_path / "ok").mkdir()
    good = _tiny_classifier(tmp_path / "ok" / "classifier_fp32.onnx", meta=_good_meta())
    files["classifier_fp32"] = (str(good), "classifier", "fp32")
    assert write_bundle(tmp_path / "good", files, meta).name == "hospital"


def test_window_mismatch_in_a_real_classifier_names_both_values(src: Path, tmp_path: Path) -> None:
    m = onnx.load(str(DEFAULT_BUNDLE_DIR / "classifier_fp32.onnx"))
    for p in m.metadata_props:
        if p.key == "ctsdk.preprocessing":
            pre = json.loads(p.value)
            p.value = json.dumps(dict(pre, window_hu=[-1000.0, 400.0]))
    onnx.save_model(m, str(tmp_path / "classifier_fp32.onnx"))
    files = {**_shipped_files(src, "lungs", "aggregator"),
             "classifier_fp32": (str(tmp_path / "classifier_fp32.onnx"), "classifier", "fp32")}
    meta = {k: v for k, v in SHIPPED.items() if k not in ("lungs_int8", "classifier_features", "int8")}
    with pytest.raises(BundleError) as err:
        write_bundle(tmp_path / "b", files, dict(meta, name="hospital", version="1"), keep_stale_metadata=True)
    msg = str(err.value)
    assert "[-1000.0, 400.0]" in msg and "[-1350.0, 150.0]" in msg and "preprocessing.classifier.window" in msg


def test_verify_and_triage_refuse_a_classifier_the_manifest_misdescribes(src: Path, tmp_path: Path) -> None:
    """The audit's 256-pixel export: Triage used to fail at warm-up with a bare 'expected shape'."""
    from sdk.triage import Triage

    clf = _tiny_classifier(tmp_path / "classifier_fp32.onnx", size=256, meta=_good_meta(size=224))
    meta = {"name": "hospital", "version": "1", "classes": ["non_covid", "covid"], "thresholds": {"series": 0.5}}
    root = _hand_bundle(tmp_path / "b", {**_shipped_files(src, "lungs", "aggregator"),
                                         "classifier_fp32": (str(clf), "classifier", "fp32")}, meta)
    r = _verify_cli(root)
    assert r.returncode == 2 and "graph input 'image' shape" in r.stderr and "preprocessing.classifier.size" in r.stderr
    with pytest.raises(BundleError) as err:
        Triage(root, device="cpu")
    msg = str(err.value)
    assert "hospital 1" in msg and "classifier_fp32.onnx" in msg and "256" in msg and "preprocessing.classifier.size" in msg
    assert "expected shape" not in msg
    (tmp_path / "w").mkdir()
    clf2 = _tiny_classifier(tmp_path / "w" / "classifier_fp32.onnx", meta=_good_meta(window=(-1000.0, 400.0)))
    root2 = _hand_bundle(tmp_path / "b2", {**_shipped_files(src, "aggregator"),
                                           "classifier_fp32": (str(clf2), "classifier", "fp32")}, meta)
    with pytest.raises(BundleError, match=r"ctsdk.preprocessing.window_hu.*preprocessing.classifier.window"):
        Triage(root2, device="cpu", lung_method="classical")


# --- 3. no silent 0.5 threshold ------------------------------------------------------------------------
def test_missing_series_threshold_is_refused_at_build_and_warned_at_load(src: Path, tmp_path: Path) -> None:
    from sdk.phantom import write_phantom_series
    from sdk.triage import Triage

    files = _shipped_files(src, "lungs", "classifier_fp32", "aggregator")
    meta = {k: v for k, v in SHIPPED.items() if k in ("classes", "positive_class", "inputs", "preprocessing")}
    meta.update(name="hospital", version="1")
    with pytest.raises(ConfigError, match="thresholds.series"):
        write_bundle(tmp_path / "b", files, meta)
    root = _hand_bundle(tmp_path / "hand", files, meta)
    r = _verify_cli(root)
    assert r.returncode == 2 and "thresholds.series" in r.stderr
    tri = Triage(root, device="cpu", threads=1, lanes=1)
    assert tri.threshold == 0.5 and any("thresholds.series" in w for w in tri.runtime_reasons)
    write_phantom_series(tmp_path / "s", n_slices=24, size=64, spacing=(2.5, 4.0, 4.0), seed=1)
    res = tri.run(tmp_path / "s")
    assert any("thresholds.series" in w and "0.5" in w for w in res.warnings)


# --- 4. hand-edited verdicts ---------------------------------------------------------------------------
def test_int8_verdict_without_its_file(src: Path, tmp_path: Path) -> None:
    files = _shipped_files(src, "lungs", "classifier_fp32", "aggregator")
    meta = {k: v for k, v in SHIPPED.items() if k not in ("lungs_int8",)}
    meta.update(name="hospital", version="1", int8=dict(SHIPPED["int8"], passed=True))
    with pytest.raises(ConfigError, match=r"int8.passed is true.*precision 'int8'"):
        write_bundle(tmp_path / "b", files, meta)
    with pytest.raises(ConfigError, match=r"lungs_int8.passed"):
        write_bundle(tmp_path / "c", files, dict(meta, int8={"passed": False}, lungs_int8=SHIPPED["lungs_int8"]))
    root = _hand_bundle(tmp_path / "hand", files, meta)           # an edited manifest: int8.passed true, no INT8 file
    b = load_bundle(root)
    assert not b.calibration_passed and any("int8.passed" in w and "ignored" in w for w in b.warnings)
    r = _verify_cli(root)
    assert r.returncode == 2 and "int8.passed" in r.stderr


# --- 5. python -m sdk.train.finetune bundle ------------------------------------------------------------
def test_build_hu_bundle_outside_the_repo(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch", reason="build_hu_bundle reads a torch checkpoint")
    from sdk.train.finetune import build_hu_bundle

    export = tmp_path / "export"
    export.mkdir()
    shutil.copyfile(src / "retrained" / "classifier_fp32.onnx", export / "classifier_fp32.onnx")
    torch.save({"threshold": 0.42}, tmp_path / "best.pt")
    monkeypatch.chdir(tmp_path)                                    # not the repository root
    staging_before = set(Path(tempfile.gettempdir()).glob("ctsdk-bundle-*"))
    with pytest.raises(ConfigError, match="model card not found"):
        build_hu_bundle(tmp_path / "x", export, tmp_path / "best.pt", Path("docs/no_such_card.md"))
    bad = tmp_path / "bad_export"
    bad.mkdir()
    _tiny_classifier(bad / "classifier_fp32.onnx", meta=_good_meta(size=256))
    with pytest.raises(BundleError):
        build_hu_bundle(tmp_path / "y", bad, tmp_path / "best.pt", Path("docs/model_card.md"))
    out = build_hu_bundle(tmp_path / "hu", export, tmp_path / "best.pt", Path("docs/model_card.md"))
    assert set(Path(tempfile.gettempdir()).glob("ctsdk-bundle-*")) == staging_before   # no staging left behind
    b = load_bundle(out)
    new_sha = sha256_file(export / "classifier_fp32.onnx")
    assert b.version == f"0.2.0+hu.{new_sha[:8]}" and b.slice_threshold == 0.42
    feats = b.files["classifier_features_fp32"]
    assert feats.sha256 != SHIPPED["files"]["classifier_features_fp32"]["sha256"]      # re-derived, not copied
    from sdk.bundle_check import read_model

    assert read_model(b.root / feats.path).metadata["ctsdk.source_sha256"] == new_sha
    assert {"thresholds.series", "slice_score", "metrics"} <= set(b.manifest["stale_metadata"]["blocks"])
    assert "thresholds.slice" not in b.manifest["stale_metadata"]["blocks"]
    assert verify_bundle(out) and all("stale_metadata" in w for w in verify_bundle(out))
    assert os.getcwd() == str(tmp_path)


def test_a_bundle_without_classifier_names_the_role_and_a_parent_folder_lists_its_bundles(tmp_path: Path) -> None:
    """The audit: a bundle with no classifier failed in the runtime registry ("bundle_files must map
    precisions ...", naming neither bundle nor role); --bundle at a folder of bundles said only
    "manifest not found"."""
    import sdk

    root = tmp_path / "bundles" / "noclf"
    shutil.copytree(DEFAULT_BUNDLE_DIR, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if v["role"] != "classifier"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lists no file of role 'classifier'") as exc:
        sdk.Triage(str(root), device="cpu")
    assert str(root) in str(exc.value)
    with pytest.raises(BundleError, match="manifest not found.*bundles in it: noclf"):
        load_bundle(tmp_path / "bundles")
