"""Guards of the training / calibration / export CLI (the ML engineer's audit, toy-scale retrain):

1. ``ctsdk calibrate --splits auto`` reads ``runs/classifier/splits.csv`` under the working
   directory (where ``ctsdk train classifier`` writes it); without it the hash split is used with a
   loud warning (stderr and the report), and the human summary names the split source;
2. a test set without both classes is refused (exit 2) before any model work; small calibration /
   test sets are warned about; the human summary prints n/a for an AUC that could not be computed
   and never PASS from one;
3. ``ctsdk train ...`` refuses an output folder holding an earlier run unless ``--overwrite``;
4. a run that fails on its config / data leaves no output folder behind;
5. ``--splits-csv``: help and messages name the 7 columns and a CLI way to get a valid file;
6. ``ctsdk export`` writes no made-up ``bundle_version``;
7. ``train seg``: progress on stderr, stdout one format;
8. ``train classifier --limit``: lung masks only for the images the run uses (cache merged).

Tiny synthetic data only (the patterns of tests/test_train_classifier.py and test_calibration.py).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import PORTABLE_IR
from sdk.cli import cli
from sdk.errors import ConfigError

cv2 = pytest.importorskip("cv2")


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="ctsdk")


def _one_error_line(res: Any) -> str:
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("ctsdk: error: ")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def _tree(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- a tiny synthetic images set (classifier training and calibration) ---------------------------
def _lung(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w * 0.33) / (w * 0.12)) ** 2 < 1)
            | (((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w * 0.67) / (w * 0.12)) ** 2 < 1))


def _make_images(root: Path) -> List[Dict[str, str]]:
    """tests/test_train_classifier.py's 28 synthetic PNGs (splits.csv with every SPLIT_COLUMNS
    column, lung-mask cache) plus the images CSV those rows make."""
    from test_train_classifier import _make_set

    rows = _make_set(root)
    with open(root / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "source", "split", "patient"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return rows


@pytest.fixture()
def image_set(tmp_path) -> Path:
    root = tmp_path / "data"
    _make_images(root)
    return root


def _classifier_args(root: Path, out: Path, *extra: Any) -> List[Any]:
    return ["train", "classifier", "--data-root", root, "--splits-csv", root / "splits.csv", "--out-dir", out,
            "--masks-dir", root / "masks", "--seg-onnx", "", "--input-size", "64", "--epochs", "1", "--no-progress",
            "--n-boot", "10", *extra]


# --- a tiny FP32 classifier ONNX (onnx.helper: no export needed) --------------------------------
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in (
        ("w1", rng.normal(0, 0.3, (4, 3, 3, 3))), ("b1", np.zeros(4)),
        ("w2", rng.normal(0, 0.3, (4, 4, 3, 3))), ("b2", np.zeros(4)),
        ("wf", rng.normal(0, 0.5, (2, 4))), ("bf", np.zeros(2)))]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc"),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = PORTABLE_IR
    onnx.checker.check_model(model)
    out = tmp_path_factory.mktemp("guards") / "tiny_fp32.onnx"
    onnx.save_model(model, str(out))
    return out


def _calib_csv(root: Path, labels: List[str], splits: List[str]) -> Path:
    """An images CSV of random 48 x 48 PNGs (absolute paths) with the given labels and splits."""
    rng = np.random.default_rng(1)
    out = root / "calib.csv"
    root.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "source", "split", "patient"])
        for i, (label, split) in enumerate(zip(labels, splits)):
            p = root / f"img{i}.png"
            cv2.imwrite(str(p), rng.integers(0, 255, (48, 48), dtype=np.uint8))
            w.writerow([str(p), label, "syn", split, f"Q{i}"])
    return out


# === 1. calibrate --splits auto ===================================================================
def test_auto_splits_is_where_train_classifier_writes_it():
    from sdk.calibration.dataset import DEFAULT_SPLITS
    from sdk.train.classifier import ClassifierTrainConfig

    assert not DEFAULT_SPLITS.is_absolute()  # relative to the working directory, as training's default
    assert DEFAULT_SPLITS == Path(ClassifierTrainConfig().out_dir) / "splits.csv"


def test_auto_splits_reads_the_working_directory(tmp_path, monkeypatch):
    from sdk.calibration.dataset import load_rows, resolve_splits

    img = _calib_csv(tmp_path / "imgs", ["covid", "non-covid", "covid"], ["", "", ""])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "classifier").mkdir(parents=True)
    split_file = tmp_path / "runs" / "classifier" / "splits.csv"
    with open(img, newline="") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    split_file.write_text("path,split\n" + "".join(f"{p},{s}\n" for p, s in zip(paths, ["test", "train", "val"])))
    choice = resolve_splits("auto")
    assert choice.path == split_file and not choice.warning and str(split_file) in choice.how
    rows, how = load_rows(img, "auto")
    assert [r.split for r in rows] == ["test", "train", "val"] and str(split_file) in how
    # an explicit file: the same rows, the same description as before
    rows2, how2 = load_rows(img, split_file)
    assert [(r.path, r.split) for r in rows2] == [(r.path, r.split) for r in rows]
    assert how2 == f"classifier split file {split_file}"


def test_auto_without_split_file_warns(tmp_path, monkeypatch):
    from sdk.calibration.dataset import HASH_SPLIT, resolve_splits

    monkeypatch.chdir(tmp_path)
    choice = resolve_splits("auto")
    assert choice.path is None and HASH_SPLIT in choice.how
    assert "--splits PATH" in choice.warning and "overlap the classifier's training images" in choice.warning
    assert str(tmp_path / "runs" / "classifier" / "splits.csv") in choice.warning
    assert not resolve_splits(None).warning  # "none" is an explicit choice


def test_calibrate_cli_auto_fallback_warns_and_names_the_split(tiny_onnx, tmp_path, monkeypatch):
    """The audit's case: no split file under the working directory -> loud warning on stderr and
    in the report; the summary says where the split came from."""
    labels = ["covid" if i % 2 else "non-covid" for i in range(40)]
    img = _calib_csv(tmp_path / "imgs", labels, [""] * 40)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out, report = work / "int8.onnx", work / "report.json"
    res = _invoke("calibrate", "--onnx", tiny_onnx, "--images", img, "--out", out, "--report", report, "--n", "8",
                  "--method", "minmax", "--no-bench")
    assert res.exit_code in (0, 1), res.output
    assert "Traceback" not in res.output
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("ctsdk: warning: ")]
    assert any("--splits auto: no classifier split file" in w and "--splits PATH" in w for w in warnings), res.stderr
    assert any("only 8 calibration slices" in w for w in warnings), res.stderr
    assert "  split: official split where present, else sha256" in res.stdout
    d = json.loads(report.read_text())
    assert any("--splits auto" in w for w in d["warnings"]) and "--splits auto: no" in d["split_source"]
    assert "warnings: " in res.stdout


def test_calibrate_masks_follow_the_training_run(tiny_onnx, tmp_path, monkeypatch):
    """The audit: calibration read the repository's runs/classifier/masks whatever the training run's
    --out-dir was. The default is training's default under the working directory, and --masks-dir
    names another run's cache - its masks are used (the report counts them)."""
    from sdk.calibration.dataset import DEFAULT_MASKS
    from sdk.train import data as D
    from sdk.train.classifier import ClassifierTrainConfig

    assert not DEFAULT_MASKS.is_absolute() and DEFAULT_MASKS == ClassifierTrainConfig().mask_dir
    labels = ["covid" if i % 2 else "non-covid" for i in range(24)]
    img = _calib_csv(tmp_path / "imgs", labels, ["train"] * 12 + ["test"] * 12)
    with open(img, newline="") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    D.save_mask_cache({p: np.ones((48, 48), np.uint8) for p in paths}, tmp_path / "run" / "masks")
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "report.json"
    res = _invoke("calibrate", "--onnx", tiny_onnx, "--images", img, "--out", tmp_path / "int8.onnx", "--report", report,
                  "--n", "12", "--method", "minmax", "--no-bench", "--splits", "none",
                  "--masks-dir", tmp_path / "run" / "masks")
    assert res.exit_code in (0, 1), res.output
    notes = json.loads(report.read_text())["notes"]
    assert "lung masks: {'cache': 24}" in notes, notes


# === 2. too few images ============================================================================
def test_calibrate_refuses_a_test_set_of_one_class(tiny_onnx, tmp_path):
    img = _calib_csv(tmp_path / "imgs", ["covid", "non-covid", "covid", "covid"], ["train", "train", "test", "test"])
    out = tmp_path / "int8.onnx"
    res = _invoke("calibrate", "--onnx", tiny_onnx, "--images", img, "--out", out, "--splits", "none", "--no-bench",
                  "--method", "minmax", "--json")
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert "has no non-covid slice" in line and "AUC" in line and "nothing was calibrated" in line
    assert json.loads(res.stdout)["error"]["type"] == "ConfigError"
    assert not out.exists()
    res = _invoke("calibrate", "--onnx", tiny_onnx, "--images", img, "--out", out, "--splits", "none", "--no-bench",
                  "--max-test", "1")
    assert res.exit_code == 2 and "raise --max-test (now 1)" in _one_error_line(res)


def test_data_warnings_small_sets():
    from sdk.calibration.dataset import Row
    from sdk.calibration.quantize import MIN_CALIBRATION_SLICES, data_warnings

    def rows(n: int, src: str = "a") -> List[Row]:
        return [Row(f"{src}{i}.png", "", "covid" if i % 2 else "normal", src, "train") for i in range(n)]

    train = rows(200) + rows(50, "b")
    assert data_warnings(train[:MIN_CALIBRATION_SLICES] + train[-4:], train, rows(40)) == []
    w = data_warnings(train[:2], train, rows(40))
    assert len(w) == 1 and "only 2 calibration slices covering 2 of the train split's 4" in w[0] and "--n 64" in w[0]
    w = data_warnings(train[:100], train, rows(2))
    assert len(w) == 2 and "covering 2 of the train split's 4" in w[0] and "steps of 1" in w[1]


def test_calibrate_human_prints_na_and_no_pass_without_auc():
    from sdk.cli.calibrate_cmd import _human

    na = {"auc": None, "accuracy": 0.0, "auc_delta": None, "accuracy_delta": 0.0, "top1_agreement": 1.0}
    d = {"int8_onnx": "i.onnx", "fp32_onnx": "f.onnx", "passed": True, "split_source": "classifier split file s.csv",
         "criteria": {"max_auc_drop": 0.01, "min_top1_agreement": 0.99},
         "calibration": {"n": 1, "composition": {"x/covid": 1}, "target": "cpu"}, "test": {"n": 1},
         "fp32": {"auc": None, "accuracy": 0.0}, "methods": {"minmax": dict(na)}, "chosen": dict(na, method="minmax"),
         "excluded_nodes": [], "speed": {}, "warnings": ["w"]}
    text = _human(d)
    assert "FP32 AUC n/a" in text and "AUC n/a (n/a)" in text and "PASS" not in text and "FAIL" in text
    assert "  split: classifier split file s.csv" in text and "warnings: 1" in text


def test_passes_needs_a_computed_auc():
    from sdk.calibration.quantize import _passes

    assert not _passes({"auc_delta": float("nan"), "top1_agreement": 1.0}, 0.01, 0.99)
    assert not _passes({"auc_delta": None, "top1_agreement": 1.0}, 0.01, 0.99)
    assert _passes({"auc_delta": 0.0, "top1_agreement": 1.0}, 0.01, 0.99)


# === 3. earlier runs are not overwritten ===========================================================
def test_train_classifier_refuses_an_earlier_run(image_set, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "runs"
    run = out / "effnet_lite0_mgap"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"earlier weights")
    (run / "metrics.json").write_text("{}")
    before = _tree(tmp_path / "runs")
    # (a missing --seg-onnx too: code without the check stops on it instead of training)
    res = _invoke(*_classifier_args(image_set, out, "--seg-onnx", tmp_path / "missing.onnx", "--json"))
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert f"--out-dir {out}" in line and "holds an earlier run (best.pt, metrics.json)" in line and "--overwrite" in line
    assert json.loads(res.stdout)["error"]["type"] == "ConfigError"
    assert _tree(tmp_path / "runs") == before and (run / "best.pt").read_bytes() == b"earlier weights"
    # --overwrite passes the check (here the run then stops on a bad value, before writing)
    res = _invoke(*_classifier_args(image_set, out, "--overwrite", "--loss", "hinge"))
    assert res.exit_code == 2 and "loss must be" in _one_error_line(res)
    assert (run / "best.pt").read_bytes() == b"earlier weights"


@pytest.mark.parametrize("sub, files, option", [
    ("seg", ["unet2d_lung.onnx"], "--out-dir"),
    ("seg3d", ["train_log.json"], "--out-dir"),
    ("aggregator", ["aggregator.json", "metrics.json"], "--out"),
])
def test_other_trainers_refuse_an_earlier_run(tmp_path, sub, files, option):
    pytest.importorskip("torch" if sub != "aggregator" else "xgboost")
    run = tmp_path / "run"
    run.mkdir()
    for f in files:
        (run / f).write_text("earlier")
    value = run / "aggregator.json" if sub == "aggregator" else run
    data = ["--predictions", tmp_path / "none.csv"] if sub == "aggregator" else ["--data-dir", tmp_path / "nodata"]
    res = _invoke("train", sub, option, value, *data)  # (missing data: checked after the earlier run)
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert f"{option} {value}: {run} holds an earlier run" in line and "--overwrite" in line
    assert all((run / f).read_text() == "earlier" for f in files)


def test_train_seg_target_names_its_files_and_refuses_unknown_targets(tmp_path):
    """--target infection guards its own files (a lung run beside it is not an earlier infection run)."""
    pytest.importorskip("torch")
    run = tmp_path / "run"
    run.mkdir()
    (run / "unet2d_lung.onnx").write_text("earlier lungs")
    res = _invoke("train", "seg", "--target", "infection", "--out-dir", run, "--data-dir", tmp_path / "nodata")
    assert res.exit_code == 2 and "holds an earlier run" not in _one_error_line(res)   # fails on the data instead
    (run / "unet2d_infection.onnx").write_text("earlier lesions")
    res = _invoke("train", "seg", "--target", "infection", "--out-dir", run, "--data-dir", tmp_path / "nodata")
    assert "holds an earlier run (unet2d_infection.onnx)" in _one_error_line(res)
    res = _invoke("train", "seg", "--target", "vessels", "--out-dir", tmp_path / "new", "--data-dir", tmp_path / "nodata")
    assert res.exit_code == 2 and "target must be one of ['infection', 'lung']" in _one_error_line(res)
    assert not (tmp_path / "new").exists()


def test_the_python_trainers_refuse_an_earlier_run_too(tmp_path):
    """The audit's gap: only `ctsdk train` refused; train_seg(cfg) & co. replaced a run silently. Now
    each trainer refuses before writing anything unless overwrite=True (then it goes on: here to the
    missing data, a ConfigError of its own)."""
    pytest.importorskip("torch")
    pytest.importorskip("xgboost")
    from sdk.train import aggregator, seg, seg3d

    run = tmp_path / "run"
    run.mkdir()
    cases = [
        (seg.train_seg, seg.SegTrainConfig(out_dir=str(run), data_dir=str(tmp_path / "nodata")), "unet2d_lung.onnx"),
        (seg3d.train_seg3d, seg3d.Seg3DTrainConfig(out_dir=str(run), data_dir=str(tmp_path / "nodata")), "train_log.json"),
        (aggregator.train_aggregator, aggregator.AggTrainConfig(out=str(run / "aggregator.json"),
                                                                predictions=str(tmp_path / "none.csv")), "aggregator.json"),
    ]
    for train, cfg, marker in cases:
        (run / marker).write_text("earlier")
        with pytest.raises(ConfigError, match=rf"holds an earlier run \({marker}.*overwrite=True"):
            train(cfg)
        with pytest.raises(ConfigError) as err:   # overwrite=True: past the guard, stopped by the data
            train(cfg, overwrite=True)
        assert "earlier run" not in str(err.value)
        assert (run / marker).read_text() == "earlier"
        (run / marker).unlink()


def test_check_no_earlier_run_lists_what_it_found(tmp_path):
    from sdk.cli.train_cmd import check_no_earlier_run
    from sdk.train import aggregator, classifier

    cfg = classifier.ClassifierTrainConfig(out_dir=str(tmp_path))
    check_no_earlier_run(classifier, cfg, overwrite=False)  # a fresh folder
    cfg.run_dir.mkdir()
    (cfg.run_dir / "predictions.csv").write_text("")  # not a marker on its own
    (cfg.run_dir / "config.json").write_text("{}")
    check_no_earlier_run(classifier, cfg, overwrite=False)
    (cfg.run_dir / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"holds an earlier run \(metrics.json\)"):
        check_no_earlier_run(classifier, cfg, overwrite=False)
    check_no_earlier_run(classifier, cfg, overwrite=True)
    # the aggregator also guards the metrics.json it writes beside --out (e.g. a classifier run folder)
    agg = aggregator.AggTrainConfig(out=str(cfg.run_dir / "aggregator.json"))
    with pytest.raises(ConfigError, match=r"--out .*aggregator.json: .* holds an earlier run \(metrics.json\)"):
        check_no_earlier_run(aggregator, agg, overwrite=False)


# === 4. a failed run leaves no output folder ======================================================
def test_classifier_config_errors_write_nothing(image_set, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    # the lung U-Net is missing (given split)
    res = _invoke(*_classifier_args(image_set, out, "--seg-onnx", tmp_path / "missing.onnx"))
    assert res.exit_code == 2 and "lung U-Net ONNX not found" in _one_error_line(res)
    assert not out.exists()
    # the same with a computed split: no splits.csv either
    res = _invoke("train", "classifier", "--data-root", image_set, "--index-csv", image_set / "index.csv",
                  "--out-dir", out, "--seg-onnx", tmp_path / "missing.onnx", "--no-progress")
    assert res.exit_code == 2 and "lung U-Net ONNX not found" in _one_error_line(res)
    assert not out.exists()
    # the cache lacks images (seg_onnx ""), or a split of one class (--limit 1)
    res = _invoke(*_classifier_args(image_set, out, "--masks-dir", tmp_path / "nomasks"))
    assert res.exit_code == 2 and "lung-mask cache not found" in _one_error_line(res)
    res = _invoke(*_classifier_args(image_set, out, "--limit", "1"))
    assert res.exit_code == 2 and "needs both classes" in _one_error_line(res)
    assert not out.exists()


def test_seg_and_seg3d_config_errors_write_nothing(tmp_path):
    pytest.importorskip("torch")
    for sub in ("seg", "seg3d"):
        out = tmp_path / f"out-{sub}"
        res = _invoke("train", sub, "--data-dir", tmp_path / "nodata", "--out-dir", out)
        assert res.exit_code == 2, res.output
        assert str(tmp_path / "nodata") in _one_error_line(res)
        assert not out.exists(), sub


def test_aggregator_config_error_writes_nothing(tmp_path):
    pytest.importorskip("xgboost")
    from sdk.train.aggregator import AggTrainConfig, train_aggregator

    pred = tmp_path / "predictions.csv"
    pred.write_text("path,label,source,split,patient,p_covid\n" + "".join(
        f"p{i}.png,covid,s,train,P{i},0.9\n" for i in range(20)))
    out = tmp_path / "agg" / "aggregator.json"
    with pytest.raises(ConfigError, match="both classes"):
        train_aggregator(AggTrainConfig(predictions=str(pred), out=str(out), val_splits="", test_splits="",
                                        bags_per_class=4, min_slices=2, max_slices=4, n_bootstrap=10))
    assert not out.parent.exists()


# === 5. --splits-csv: help and messages =============================================================
def test_splits_csv_help_and_messages(tmp_path):
    from sdk.cli.train_cmd import field_help
    from sdk.train import data as D
    from conftest import REPO

    text = field_help("classifier", "splits_csv")
    assert "path,label,source,split,patient,source_split,group" in text and "docs/data/splits.csv" in text
    assert "ctsdk train classifier" in text
    header = ",".join(D.SPLIT_COLUMNS)
    row = "a.png,covid,s,train,P1,,s:P1"
    cases = {"split": "path,label,source,patient,source_split,group\na.png,covid,s,P1,,s:P1\n",
             "group": "path,label,source,split,patient,source_split\na.png,covid,s,train,P1,\n",
             "path_split": "path,split\na.png,train\n"}
    for name, content in cases.items():
        p = tmp_path / f"{name}.csv"
        p.write_text(content)
        with pytest.raises(ConfigError) as ei:
            D.read_splits_csv(p)
        msg = str(ei.value)
        assert str(p) in msg and header in msg and "ctsdk train classifier" in msg and "docs/data/splits.csv" in msg
        assert "assign_splits" not in msg
    assert "['split']" in str(pytest.raises(ConfigError, D.read_splits_csv, tmp_path / "split.csv").value)
    assert "['label', 'source', 'patient', 'source_split', 'group']" in str(
        pytest.raises(ConfigError, D.read_splits_csv, tmp_path / "path_split.csv").value)
    with pytest.raises(ConfigError, match="splits CSV not found"):
        D.read_splits_csv(tmp_path / "nope.csv")
    good = tmp_path / "good.csv"
    good.write_text(f"{header}\n{row}\n")
    assert D.read_splits_csv(good)[0]["group"] == "s:P1"
    assert len(D.read_splits_csv(REPO / "docs" / "data" / "splits.csv")) > 0  # the file the messages name


# === 6. export: no made-up bundle_version ===========================================================
def test_export_writes_bundle_version_only_when_given(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import sdk.cli.export_cmd as E
    import sdk.export.onnx as X

    assert X.classifier_metadata(None).get("bundle_version") is None
    assert X.classifier_metadata(None, bundle_version="2.0.0")["bundle_version"] == "2.0.0"
    seen: List[Dict[str, Any]] = []

    class Report:
        parity = None

        def to_dict(self) -> Dict[str, Any]:
            return {"path": "x"}

    class Tiny:
        cfg = type("Cfg", (), {"classes": ["non_covid", "covid"], "input_size": 64})()

    monkeypatch.setattr(E, "load_model", lambda name, ckpt: Tiny())
    monkeypatch.setattr(X, "export_onnx", lambda model, out, **kw: seen.append(kw["metadata"]) or Report())
    _invoke("export", "--model", "effnet_lite0_mgap", "--out", tmp_path / "m.onnx", "--json")
    _invoke("export", "--model", "effnet_lite0_mgap", "--out", tmp_path / "m.onnx", "--bundle-version", "1.2.3")
    assert len(seen) == 2, seen
    assert "bundle_version" not in seen[0] and seen[1]["bundle_version"] == "1.2.3"


# === 7. train seg: progress on stderr, stdout one format ============================================
def _seg2d(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    with open(root / "seg2d_index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "lung_mask"])
        for i in range(n):
            lung = _lung(256, 256)
            img = np.clip(200 - 150 * lung + rng.normal(0, 8, (256, 256)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / f"{i}.png"), img)
            cv2.imwrite(str(root / f"m{i}.png"), (lung * 255).astype(np.uint8))
            w.writerow([f"{i}.png", f"m{i}.png"])
    return root


def test_train_seg_stdout_is_one_format(tmp_path):
    pytest.importorskip("torch")
    data = _seg2d(tmp_path / "seg2d")
    out = tmp_path / "seg"
    args = ["train", "seg", "--data-dir", data, "--out-dir", out, "--size", "32", "--base", "4", "--levels", "2",
            "--epochs", "1", "--batch-size", "4", "--val-block", "0", "2", "--test-block", "6", "100", "--threads", "1"]
    res = _invoke(*args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines and all(": " in ln and not ln.startswith(("{", " ", "}")) for ln in lines), res.stdout
    assert any(ln.startswith("seg2d_test_dice_mean: ") for ln in lines)
    assert any(ln.startswith('{"epoch": 0') for ln in res.stderr.splitlines()), res.stderr  # progress on stderr
    res = _invoke(*args)  # a second run into the same folder: refused
    assert res.exit_code == 2 and "holds an earlier run" in _one_error_line(res)
    res = _invoke(*args, "--overwrite", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)  # exactly one JSON object
    assert d["epochs_run"] == 1 and (out / "unet2d_lung.onnx").is_file()


# === 8. train classifier --limit: masks for the used images only ====================================
def test_limit_builds_masks_for_the_limited_images_only(image_set, monkeypatch):
    pytest.importorskip("torch")
    import sdk.train.classifier as C

    seen: List[int] = []

    class Stop(Exception):
        pass

    def fake_cache(rows, *a, **k):
        seen.append(len(rows))
        raise Stop

    monkeypatch.setattr(C, "build_mask_cache", fake_cache)
    cfg = C.ClassifierTrainConfig(data_root=str(image_set), splits_csv=str(image_set / "splits.csv"),
                                  out_dir=str(image_set / "out"), masks_dir=str(image_set / "masks"), seg_onnx="",
                                  input_size=64, progress=False, limit=4)
    with pytest.raises(Stop):
        C.train_classifier(cfg)
    cfg.limit = 0
    with pytest.raises(Stop):
        C.train_classifier(cfg)
    assert seen == [12, 28]  # 4 per split with --limit 4; every image without a limit


def test_mask_cache_adds_only_missing_masks(image_set, tmp_path, monkeypatch):
    import sdk.lungs
    import sdk.lungs.unet2d
    from sdk.train import data as D
    from sdk.train.classifier import build_mask_cache

    calls: List[int] = []

    def fake_segment(grey, session):
        calls.append(1)
        return (grey > grey.mean()).astype(np.uint8)

    monkeypatch.setattr(sdk.lungs, "segment_slices_2d", fake_segment)
    monkeypatch.setattr(sdk.lungs.unet2d, "open_session", lambda *a, **k: None)
    onnx = tmp_path / "seg.onnx"
    onnx.write_bytes(b"a lung U-Net")
    rows = D.read_splits_csv(image_set / "splits.csv")
    cache = tmp_path / "masks"
    first = build_mask_cache(rows[:3], image_set, cache, str(onnx), show_progress=False)
    assert len(calls) == 3 and set(first) == {r["path"] for r in rows[:3]}
    second = build_mask_cache(rows[:5], image_set, cache, str(onnx), show_progress=False)
    assert len(calls) == 5 and set(second) == {r["path"] for r in rows[:5]}  # 2 new masks, 3 reused
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert set(D.load_mask_cache(cache)) == set(second)
    build_mask_cache(rows[:5], image_set, cache, str(onnx), show_progress=False)
    assert len(calls) == 5  # everything cached
    onnx.write_bytes(b"another lung U-Net")  # another model: its masks replace the cache
    build_mask_cache(rows[:2], image_set, cache, str(onnx), show_progress=False)
    assert len(calls) == 7 and set(D.load_mask_cache(cache)) == {r["path"] for r in rows[:2]}
