"""Damaged non-DICOM inputs get a typed error naming the file, the key or column, and what to do -
never a raw KeyError / TypeError / ValueError / UnicodeDecodeError (found by fuzzing the bundle
manifest, the aggregator file, the evaluate CSVs and slice-label arrays, and `ctsdk train --config`).

Bundles are the shipped one, hard-linked (or copied) into tmp_path with a damaged manifest.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import pytest
from click.testing import CliRunner

from sdk.bundle import DEFAULT_BUNDLE_DIR, MANIFEST, load_bundle
from sdk.cli import cli
from sdk.errors import BundleError, ConfigError
from sdk.labels import read_images_csv, read_series_rows


# --- bundles ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the shipped bundle per module (the tests' bundles hard-link its files)."""
    base = tmp_path_factory.mktemp("shipped") / "bundle"
    shutil.copytree(DEFAULT_BUNDLE_DIR, base)
    return base


def _bundle(shipped: Path, dest: Path, mutate: Callable[[Dict[str, Any]], None] = lambda m: None,
            files: Dict[str, bytes] = {}) -> Path:
    """A bundle at ``dest``: the shipped files (``files`` replaced, their sha256 / bytes updated in
    the manifest, so only their content is damaged) and the manifest after ``mutate``."""
    dest.mkdir(parents=True)
    manifest = json.loads((shipped / MANIFEST).read_text())
    for p in shipped.iterdir():
        if p.name == MANIFEST:
            continue
        if p.name in files:
            (dest / p.name).write_bytes(files[p.name])
            for entry in manifest["files"].values():
                if entry["path"] == p.name:
                    entry.update(sha256=hashlib.sha256(files[p.name]).hexdigest(), bytes=len(files[p.name]))
            continue
        try:
            os.link(p, dest / p.name)
        except OSError:
            shutil.copyfile(p, dest / p.name)
    mutate(manifest)
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def _set(dotted: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    def mutate(m: Dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        node = m
        for k in parents:
            node = node[k]
        node[last] = value
    return mutate


def _read_everything(root: Path) -> None:
    """Load the bundle and read what sdk.Triage reads from its manifest."""
    b = load_bundle(root)
    b.classes, b.positive_class, b.preprocessing, b.classifier_preprocessing, b.lungs_preprocessing
    b.threshold, b.slice_threshold, b.calibration_passed, b.lungs_int8_passed, b.warnings, b.slice_score_model


@pytest.mark.parametrize("text", [b"3", b"null", b"[1, 2]", b'"name version classes files"'],
                         ids=["number", "null", "list", "string"])
def test_manifest_that_is_not_an_object(shipped: Path, tmp_path: Path, text: bytes) -> None:
    root = _bundle(shipped, tmp_path / "b")
    (root / MANIFEST).write_bytes(text)
    with pytest.raises(BundleError, match="manifest must be one JSON object") as err:
        load_bundle(root)
    assert str(root / MANIFEST) in str(err.value)


@pytest.mark.parametrize("data", [b'{"name": "caf\xe9"}', b"\xff\xfe{\x00}\x00", b"[" * 100_000],
                         ids=["latin-1", "utf-16", "deep-nesting"])
def test_manifest_that_cannot_be_decoded(shipped: Path, tmp_path: Path, data: bytes) -> None:
    root = _bundle(shipped, tmp_path / "b")
    (root / MANIFEST).write_bytes(data)
    with pytest.raises(BundleError, match="manifest is not valid JSON") as err:
        load_bundle(root)
    assert str(root / MANIFEST) in str(err.value) and "rebuild the bundle" in str(err.value)


@pytest.mark.parametrize("key, value, words", [
    ("classes", None, "'classes' must be a list of distinct class names"),
    ("classes", [], "'classes' must be a list of distinct class names"),
    ("classes", 0, "'classes' must be a list of distinct class names"),
    ("thresholds", "x", "thresholds must be an object, found a string"),
    ("thresholds", None, None),                                     # null = absent: the fallback, with a warning
    ("int8", [1], "int8 must be an object, found a list"),
    ("preprocessing", 0, "preprocessing must be an object"),
    ("preprocessing.classifier", "x", "preprocessing.classifier must be an object"),
    ("preprocessing.lungs", None, None),
    ("inputs", "x", "inputs must be an object"),
    ("inputs.lungs", 3, "inputs.lungs must be an object"),
    ("inputs.lungs.shape", 7, "inputs.lungs.shape must be a list"),
    ("inputs.lungs.shape", {"a": 1}, "inputs.lungs.shape must be a list"),
    ("preprocessing.classifier.size", float("inf"), "preprocessing.classifier.size: a size must be a positive whole number"),
    ("preprocessing.classifier.size", -3, "preprocessing.classifier.size: a size must be a positive whole number"),
    ("preprocessing.lungs.window", [0, float("inf")], "preprocessing.lungs: a window must be [lo, hi] in HU (finite"),
    ("thresholds.series", None, None),
    ("thresholds.series", [0.5], "thresholds.series = a list is not a number in [0, 1]"),
    ("thresholds.series", float("nan"), "thresholds.series = NaN is not a number in [0, 1]"),
    ("thresholds.slice", "x", 'thresholds.slice = "x" is not a number in [0, 1]'),
    ("thresholds.slice", 2, "thresholds.slice = 2 is not a number in [0, 1]"),
    ("int8.speedup", "fast", 'int8.speedup = "fast" is not a number > 0'),
    ("slice_score.coefficients.ggo", "x", "manifest slice_score: could not convert string to float"),
    ("slice_score.p_clip", 3, "slice_score p_clip must be in (0, 0.5)"),
], ids=lambda v: str(v)[:30])
def test_manifest_key_of_the_wrong_type(shipped: Path, tmp_path: Path, key: str, value: Any, words: str) -> None:
    root = _bundle(shipped, tmp_path / "b", _set(key, value))
    if words is None:            # a null block or number is read as absent: loads, with the defaults
        _read_everything(root)
        return
    with pytest.raises(BundleError) as err:
        _read_everything(root)
    assert str(root / MANIFEST) in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("value, words", [
    (float("inf"), "file entry 'lungs' is malformed (OverflowError"),
    (-1, "file entry 'lungs' is malformed (bytes = -1)"),
], ids=["inf", "negative"])
def test_file_entry_with_bad_bytes(shipped: Path, tmp_path: Path, value: Any, words: str) -> None:
    root = _bundle(shipped, tmp_path / "b", _set("files.lungs.bytes", value))
    with pytest.raises(BundleError, match=r"need path, sha256, bytes") as err:
        load_bundle(root)
    assert str(root / MANIFEST) in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("path", ["x" * 5000, "a\x00b.onnx"], ids=["too-long", "nul-byte"])
def test_file_entry_with_a_path_the_file_system_refuses(shipped: Path, tmp_path: Path, path: str) -> None:
    root = _bundle(shipped, tmp_path / "b", _set("files.lungs.path", path))
    with pytest.raises(BundleError, match="file entry 'lungs' has a path the file system refuses") as err:
        load_bundle(root)
    assert str(root / MANIFEST) in str(err.value)


def _aggregator_with(shipped: Path, key: str, value: str) -> bytes:
    agg = json.loads((shipped / "aggregator.json").read_text())
    agg["learner"]["attributes"][key] = value
    return json.dumps(agg).encode()


@pytest.mark.parametrize("key, value, words", [
    ("ctsdk_classes", "{oops", "is not a JSON list of class names"),
    ("ctsdk_classes", "3", "is not a JSON list of class names"),
    ("ctsdk_n_groups", "2.5", "is not a whole number of groups"),
    ("ctsdk_n_groups", "x", "is not a whole number of groups"),
    ("ctsdk_info", "[1", "is not a JSON object"),
    ("ctsdk_info", "", "cannot be read"),
], ids=lambda v: str(v)[:20])
def test_aggregator_with_damaged_ctsdk_attributes(shipped: Path, tmp_path: Path, key: str, value: str, words: str) -> None:
    """The aggregator file is intact as far as its sha256 goes (re-hashed): its ctsdk attributes are not."""
    pytest.importorskip("xgboost")
    root = _bundle(shipped, tmp_path / "b", files={"aggregator.json": _aggregator_with(shipped, key, value)})
    with pytest.raises(BundleError) as err:
        load_bundle(root).load_aggregator()
    assert str(root / "aggregator.json") in str(err.value) and repr(key) in str(err.value) and words in str(err.value)


def test_triage_and_info_refuse_a_damaged_manifest_in_one_line(shipped: Path, tmp_path: Path) -> None:
    import sdk

    root = _bundle(shipped, tmp_path / "b", _set("thresholds", [0.5]))
    with pytest.raises(BundleError, match="thresholds must be an object"):
        sdk.Triage(root, heatmaps=False)
    res = CliRunner().invoke(cli, ["info", "--bundle", str(root), "--no-open"], prog_name="ctsdk")
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ctsdk: error: ") and "thresholds must be an object" in lines[0]


def test_bundle_build_refuses_a_meta_it_could_not_load(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from sdk.bundle import main, write_bundle

    card = tmp_path / "card.md"
    card.write_text("# card\n")
    meta = {"name": "t", "version": "1", "classes": ["non_covid", "covid"], "slice_score": {"coefficients": "x"}}
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="refusing to build.*slice_score.coefficients must hold"):
        write_bundle(out, {"card": (card, "card", "")}, meta)
    assert not out.exists()                                          # refused before the folder was touched
    bad = tmp_path / "meta.json"
    bad.write_bytes(b"\xff{not json")
    assert main(["build", "--out", str(out), "--meta", str(bad), "--file", f"card={card}:card"]) == 2
    assert f"--meta {bad}: not a readable JSON file" in capsys.readouterr().err
    bad.write_text("[1]")
    assert main(["build", "--out", str(out), "--meta", str(bad)]) == 2
    assert "must hold one JSON object" in capsys.readouterr().err
    bad.write_text(json.dumps({"name": "t", "version": "1", "classes": ["non_covid", "covid"]}))
    assert main(["build", "--out", str(out), "--meta", str(bad), "--file", "card=nocolon"]) == 2
    assert "expected name=path:role[:precision]" in capsys.readouterr().err


def test_bundle_card_refuses_a_malformed_manifest_before_copying(shipped: Path, tmp_path: Path) -> None:
    from sdk.bundle import refresh_card

    root = _bundle(shipped, tmp_path / "b", _set("files.model_card", "MODEL_CARD.md"))
    (root / "MODEL_CARD.md").unlink()                      # a copy of its own, not a link to the shared one
    shutil.copyfile(shipped / "MODEL_CARD.md", root / "MODEL_CARD.md")
    card = tmp_path / "card.md"
    card.write_text("# card\n")
    with pytest.raises(BundleError, match="file entry 'model_card' is malformed") as err:
        refresh_card(root, card)
    assert str(root / MANIFEST) in str(err.value)
    assert (root / "MODEL_CARD.md").read_bytes() == (shipped / "MODEL_CARD.md").read_bytes()


# --- CSV inputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, words", [
    ("path,label\ns1,covid\ncaf\u00e9,normal\n".encode("latin-1"), "series CSV is not UTF-8 text"),
    ("path,label\ns1,covid\n".encode("utf-16"), "series CSV is not UTF-8 text"),
    (b'path,label\n"' + b"x" * 200_000 + b'",covid\n', "series CSV is not a readable CSV (field larger"),
], ids=["latin-1", "utf-16", "huge-field"])
def test_series_csv_that_is_not_utf8_csv(tmp_path: Path, data: bytes, words: str) -> None:
    csv_path = tmp_path / "series.csv"
    csv_path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        read_series_rows(csv_path)
    assert str(csv_path) in str(err.value) and words in str(err.value)
    res = CliRunner().invoke(cli, ["evaluate", "--series", str(csv_path)], prog_name="ctsdk")
    assert res.exit_code == 2 and "Traceback" not in res.output and words in res.stderr


def test_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a BOM: the columns are found (it was refused as
    "needs the columns path,label; found ['\\ufeffpath', ...]")."""
    (tmp_path / "s1").mkdir()
    csv_path = tmp_path / "series.csv"
    csv_path.write_bytes(b"\xef\xbb\xbfpath,label\ns1,covid\n")
    rows = read_series_rows(csv_path)
    assert [(r["path"].name, r["label"]) for r in rows] == [("s1", "covid")]


@pytest.mark.parametrize("data, words", [
    (b"path\nser\xe9ies\n", "not UTF-8 text"),
    (b'path\n"' + b"x" * 200_000 + b'"\n', "not a readable CSV (field larger"),
], ids=["latin-1", "huge-field"])
def test_other_csv_readers_refuse_what_is_not_utf8_csv(tmp_path: Path, data: bytes, words: str) -> None:
    """The triage-batch manifest and the aggregator's predictions.csv (its reader is sdk.tables'
    read_csv_rows, the one every label table uses): ConfigError naming the file."""
    from sdk.cluster.manifest import read_manifest
    from sdk.tables import read_csv_rows

    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(data)
    with pytest.raises(ConfigError, match=re.escape(f"--manifest {manifest} is {words}")):
        read_manifest(manifest)
    predictions = tmp_path / "predictions.csv"
    predictions.write_bytes(data.replace(b"path", b"label,split,patient,p_covid", 1))
    with pytest.raises(ConfigError, match=re.escape(f"{predictions}: predictions CSV is {words}")):
        read_csv_rows(predictions, ("label", "split", "patient", "p_covid"), "predictions CSV")


def test_a_manifest_path_the_file_system_refuses_is_missing(tmp_path: Path) -> None:
    from sdk.cluster.manifest import read_manifest

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "x" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"1 path\(s\) do not exist"):
        read_manifest(manifest)


def test_images_csv_short_row_and_unusable_paths(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"png")
    csv_path = tmp_path / "images.csv"
    csv_path.write_text("path,label,source,split,patient\na.png,covid,s,test,p1\na.png,normal\n")   # short row: no split
    with pytest.raises(ConfigError, match=r"no rows with split 'val'; splits present: \['', 'test'\]"):
        read_images_csv(csv_path, split="val")
    csv_path.write_text("path,label\n" + "x" * 5000 + ".png,covid\n")                              # a name too long
    with pytest.raises(ConfigError, match=r"1 image\(s\) not found"):
        read_images_csv(csv_path)
    csv_path.write_bytes(b"path,label\nimg\xe9.png,covid\n")
    with pytest.raises(ConfigError, match="images CSV .* is not UTF-8 text"):
        read_images_csv(csv_path)


def _labels(tmp_path: Path, name: str, write: Callable[[Path], None], row: str = "0") -> Path:
    write(tmp_path / name)
    (tmp_path / "s1").mkdir(exist_ok=True)
    csv_path = tmp_path / "series.csv"
    csv_path.write_text(f"path,label,slice_labels,slice_labels_row\ns1,covid,{name},{row}\n")
    return csv_path


@pytest.mark.parametrize("name, write, words", [
    ("text.npy", lambda p: p.write_text("not numpy\n"), "is not a readable NumPy .npy array"),
    ("empty.npy", lambda p: p.write_bytes(b""), "is not a readable NumPy .npy array"),
    ("objects.npy", lambda p: np.save(p, np.array([[1, None]], dtype=object), allow_pickle=True),
     "is not a readable NumPy .npy array"),
    ("labels.npz", lambda p: np.savez(p, a=np.zeros((2, 200))), "holds a .npz archive"),
    ("scalar.npy", lambda p: np.save(p, np.array(3)), "holds a single number"),
    ("words.npy", lambda p: np.save(p, np.array([["a", "b"]])), "holds <U1 values; slice labels are numbers 0/1"),
    ("twos.npy", lambda p: np.save(p, np.full((2, 200), 2)), "holds values other than 0/1 (e.g. 2)"),
    ("nan.npy", lambda p: np.save(p, np.full((2, 200), np.nan)), "holds values other than 0/1 (e.g. nan)"),
], ids=lambda v: v if isinstance(v, str) and v.endswith((".npy", ".npz")) else "")
def test_slice_labels_file_that_is_not_a_label_array(tmp_path: Path, name: str, write: Callable[[Path], None],
                                                     words: str) -> None:
    csv_path = _labels(tmp_path, name, write)
    with pytest.raises(ConfigError) as err:
        read_series_rows(csv_path)
    assert str(csv_path) in str(err.value) and name in str(err.value) and words in str(err.value), str(err.value)


def test_slice_labels_path_the_file_system_refuses(tmp_path: Path) -> None:
    csv_path = _labels(tmp_path, "ok.npy", lambda p: np.save(p, np.zeros((2, 200), dtype=np.uint8)))
    csv_path.write_text("path,label,slice_labels,slice_labels_row\ns1,covid," + "x" * 5000 + ".npy,0\n")
    with pytest.raises(ConfigError, match="slice_labels file not found"):
        read_series_rows(csv_path)
    assert read_series_rows(_labels(tmp_path, "ok.npy", lambda p: np.save(p, np.eye(2, 200, dtype=np.uint8)),
                                    row="1"))[0]["slice_labels"][1] == 1   # a valid file still reads


# --- ctsdk train --config -------------------------------------------------------------------------------
@pytest.mark.parametrize("command, config, words", [
    ("seg", {"epochs": "ten"}, "config key 'epochs' must be a whole number (as --epochs takes), got \"ten\""),
    ("seg", {"val_block": [1]}, "config key 'val_block' must be a list of 2 values"),
    ("seg", {"notes": "x"}, "config key 'notes' must be a list (each a string)"),
    ("seg3d", {"out_dir": 5}, "config key 'out_dir' must be a string"),
    ("classifier", {"pretrained": "yes"}, "config key 'pretrained' must be true or false"),
    ("aggregator", {"eta": float("nan")}, "config key 'eta' must be a finite number"),
    ("aggregator", {"seed": 1.5}, "config key 'seed' must be a whole number"),
], ids=lambda v: str(v)[:24])
def test_train_config_value_of_the_wrong_type_stops_before_training(tmp_path: Path, command: str,
                                                                     config: Dict[str, Any], words: str) -> None:
    """--print-config: nothing can start training whatever the outcome (the old code printed the bad value)."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(config))
    res = CliRunner().invoke(cli, ["train", command, "--config", str(cfg), "--print-config"], prog_name="ctsdk")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"ctsdk: error: {cfg}: {words}" in res.stderr and "nothing was run" in res.stderr


@pytest.mark.parametrize("data", [b'{"notes": ["caf\xe9"]}', b"[" * 100_000], ids=["latin-1", "deep-nesting"])
def test_train_config_that_cannot_be_decoded(tmp_path: Path, data: bytes) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_bytes(data)
    res = CliRunner().invoke(cli, ["train", "seg", "--config", str(cfg), "--print-config"], prog_name="ctsdk")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert f"ctsdk: error: {cfg}: not a readable JSON config" in res.stderr


def test_train_config_of_the_right_types_still_resolves(tmp_path: Path) -> None:
    """Whole floats become ints, lists become tuples, ints stay numbers for float fields."""
    from sdk.cli.train_cmd import resolve_config
    from sdk.train.seg import SegTrainConfig

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"epochs": 3.0, "lr": 1, "val_block": [0, 100], "notes": ["a"], "_meta": {"x": 1}}))
    c = resolve_config(SegTrainConfig, str(cfg), {"seed": 4})
    assert (c.epochs, c.lr, c.val_block, c.notes, c.seed) == (3, 1, (0, 100), ["a"], 4)
    assert type(c.epochs) is int


def test_triage_checks_the_lung_unet_against_the_manifest_at_open(shipped: Path, tmp_path: Path) -> None:
    """A manifest whose lung input says 64 x 64 beside the 128 x 128 U-Net: Triage() refuses at
    construction naming the bundle, the file and the key (it failed only in run(), naming neither)."""
    import sdk

    def small(m: Dict[str, Any]) -> None:
        m["inputs"]["lungs"]["shape"] = ["batch", 1, 64, 64]

    root = _bundle(shipped, tmp_path / "b", small)
    with pytest.raises(BundleError) as err:
        sdk.Triage(root, device="cpu", precision="fp32")
    msg = str(err.value)
    assert "lungs_fp32.onnx" in msg and "inputs.lungs.shape" in msg
    sdk.Triage(root, device="cpu", precision="fp32", lung_method="classical")   # no U-Net session: nothing to check
