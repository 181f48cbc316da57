"""Model bundle: manifest, sha256 verification, tamper refusal, size limit, build CLI."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sdk.bundle import DEFAULT_BUNDLE_DIR, MAX_BUNDLE_BYTES, load_bundle, write_bundle
from sdk.errors import BundleError, ConfigError

from conftest import SDK_HOME  # noqa: E402 - where subprocesses import the same sdk


def test_default_bundle_verifies_against_hashlib() -> None:
    b = load_bundle()
    assert b.root == DEFAULT_BUNDLE_DIR.resolve()
    assert b.classes == ["non_covid", "covid"] and b.positive_class == "covid"
    assert b.is_default
    total = 0
    for name, f in b.files.items():
        data = (b.root / f.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256, name
        assert len(data) == f.bytes
        total += len(data)
    assert total <= MAX_BUNDLE_BYTES
    roles = {f.role for f in b.files.values()}
    assert {"lungs", "classifier", "aggregator", "card"} <= roles
    assert "fp32" in b.classifier_paths()
    assert not any(p.suffix == ".engine" for p in b.root.iterdir()), "engines are never shipped"
    assert b.engine_cache_dir() != b.root


@pytest.fixture()
def bundle_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, dst)
    return dst


def test_flipped_byte_is_refused_naming_file_and_hashes(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    entry = manifest["files"]["aggregator"]
    target = bundle_copy / entry["path"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    msg = str(err.value)
    assert entry["path"] in msg and entry["sha256"] in msg and actual in msg
    # without verification it loads (for inspection), and the flag says so
    assert load_bundle(bundle_copy, verify=False).verified is False


def test_missing_file_and_missing_manifest_are_refused(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / manifest["files"]["classifier_fp32"]["path"]).unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(bundle_copy / "nope")


def test_path_escape_in_manifest_is_refused(bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["aggregator"]["path"] = "../outside.json"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside"):
        load_bundle(bundle_copy)


def test_write_bundle_round_trip_and_limits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.onnx").write_bytes(b"\x00" * 1000)
    (src / "card.md").write_text("card")
    meta = {"name": "t", "version": "1", "classes": ["non_covid", "covid"], "thresholds": {"series": 0.4, "slice": 0.6}}
    files = {"classifier_fp32": (src / "a.onnx", "classifier", "fp32"), "card": (src / "card.md", "card", "")}
    b = write_bundle(tmp_path / "out", files, meta)
    assert b.threshold == 0.4 and b.slice_threshold == 0.6
    assert b.files["classifier_fp32"].sha256 == hashlib.sha256(b"\x00" * 1000).hexdigest()
    with pytest.raises(ConfigError, match="not empty"):
        write_bundle(tmp_path / "out", files, meta)
    with pytest.raises(ConfigError, match="limit"):
        write_bundle(tmp_path / "big", files, meta, max_bytes=100)
    with pytest.raises(ConfigError, match="role"):
        write_bundle(tmp_path / "r", {"x": (src / "a.onnx", "weird", "")}, meta)


def test_bundle_cli_verify_exit_codes(bundle_copy: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "sdk.bundle", "verify", str(bundle_copy)], capture_output=True, text=True, cwd=SDK_HOME)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == load_bundle().name
    card = bundle_copy / "MODEL_CARD.md"
    card.write_text(card.read_text() + "\nedited\n")
    bad = subprocess.run([sys.executable, "-m", "sdk.bundle", "verify", str(bundle_copy)], capture_output=True, text=True, cwd=SDK_HOME)
    assert bad.returncode == 2 and "MODEL_CARD.md" in bad.stderr and "changed" in bad.stderr


def test_shipped_card_is_the_docs_card() -> None:
    """Integrators get the bundle's MODEL_CARD.md: it is docs/model_card.md, byte for byte (after an
    edit of the docs card: python -m sdk.bundle card sdk/bundles/default)."""
    assert (DEFAULT_BUNDLE_DIR / "MODEL_CARD.md").read_bytes() == (Path(SDK_HOME) / "docs" / "model_card.md").read_bytes()


def test_refresh_card_rehashes_only_the_card(bundle_copy: Path, tmp_path: Path) -> None:
    from sdk.bundle import refresh_card

    before = json.loads((bundle_copy / "manifest.json").read_text())
    card = tmp_path / "card.md"
    card.write_text("# a new card\nResearch use only.\n")
    b = refresh_card(bundle_copy, card)  # re-loaded: every sha256 verified
    after = json.loads((bundle_copy / "manifest.json").read_text())
    assert (bundle_copy / "MODEL_CARD.md").read_bytes() == card.read_bytes() and b.name == before["name"]
    changed = {k for k in before["files"] if before["files"][k] != after["files"][k]}
    assert changed == {"model_card"} and after["files"]["model_card"]["bytes"] == card.stat().st_size
    assert after["total_bytes"] - before["total_bytes"] == card.stat().st_size - before["files"]["model_card"]["bytes"]
    assert {k: v for k, v in after.items() if k not in ("files", "total_bytes")} == \
        {k: v for k, v in before.items() if k not in ("files", "total_bytes")}
    with pytest.raises(ConfigError, match="no such model card"):
        refresh_card(bundle_copy, tmp_path / "missing.md")


def test_default_manifest_agrees_with_its_models() -> None:
    """The manifest's preprocessing / classes are what the shipped graphs were exported with."""
    import onnxruntime as ort

    b = load_bundle()
    for precision, path in b.classifier_paths().items():
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        meta = sess.get_modelmeta().custom_metadata_map
        assert [o.name for o in sess.get_outputs()] == ["logits", "probs", "cam"], precision
        if "ctsdk.preprocessing" in meta:
            pre = json.loads(meta["ctsdk.preprocessing"])
            assert list(b.window) == [float(v) for v in pre["window_hu"]]
            assert b.input_size == int(pre["size"])
        if "ctsdk.classes" in meta:
            assert json.loads(meta["ctsdk.classes"]) == b.classes
    agg = b.load_aggregator()
    assert agg.classes == b.classes and agg.n_groups == 20
    assert 0.0 < b.threshold < 1.0 and 0.0 < b.slice_threshold < 1.0


def test_preprocessing_is_read_from_the_manifest() -> None:
    """One typed Preprocessing from the bundle manifest: the default bundle's values, a bundle's
    own values override the defaults, malformed windows are a BundleError."""
    from sdk.bundle import load_bundle
    from sdk.errors import BundleError
    from sdk.preprocessing import Preprocessing

    b = load_bundle(None)
    man = b.manifest["preprocessing"]
    pre = b.preprocessing
    assert pre.classifier_window == tuple(man["classifier"]["window"]) and pre.classifier_size == man["classifier"]["size"]
    assert pre.classifier_mean == tuple(man["classifier"]["mean"]) and pre.classifier_std == tuple(man["classifier"]["std"])
    assert pre.segmenter_window == tuple(float(v) for v in man["lungs"]["window"])
    assert pre.segmenter_size == b.manifest["inputs"]["lungs"]["shape"][-1]
    assert (b.window, b.input_size) == (pre.classifier_window, pre.classifier_size)
    own = Preprocessing.from_manifest({"preprocessing": {"classifier": {"window": [-1200, 0], "size": 192},
                                                         "lungs": {"window": [-900, 300]}}})
    assert own.classifier_window == (-1200.0, 0.0) and own.classifier_size == 192
    assert own.segmenter_window == (-900.0, 300.0) and own.classifier_mean == Preprocessing().classifier_mean
    with pytest.raises(BundleError, match="hi > lo"):
        Preprocessing.from_manifest({"preprocessing": {"lungs": {"window": [400, -1000]}}})
