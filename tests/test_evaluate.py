"""Evaluation metrics against independent references, and `ctsdk evaluate` on real data."""
from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from sdk.errors import ConfigError
from sdk.evaluate import auc, binary_metrics, bootstrap_ci, read_images_csv, read_series_csv, roc_curve, youden_threshold

from conftest import shared_path

from conftest import SDK_HOME  # noqa: E402 - where subprocesses import the same sdk


def brute_auc(y, p) -> float:
    pos = [s for s, t in zip(p, y) if t == 1]
    neg = [s for s, t in zip(p, y) if t == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_mann_whitney_and_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60) + 0.3 * y, 1)  # rounding creates ties
    u = mannwhitneyu(p[y == 1], p[y == 0]).statistic
    assert auc(y, p) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()), abs=1e-12)
    assert auc(y, p) == pytest.approx(brute_auc(y, p), abs=1e-12)


def test_roc_curve_trapezoid_equals_auc() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) + 0.5 * y, 2)
    fpr, tpr, thr = roc_curve(y, p)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(y, p), abs=1e-12)


def test_point_metrics_and_confusion() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.5])
    m = binary_metrics(y, p, 0.5, n_boot=0)
    assert m["confusion"] == {"tp": 2, "fn": 1, "fp": 2, "tn": 2}
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(4 / 7)


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 150)
    p = rng.random(150) + 0.4 * y
    a = bootstrap_ci(y, p, 0.7, n_boot=300, seed=1)
    b = bootstrap_ci(y, p, 0.7, n_boot=300, seed=1)
    c = bootstrap_ci(y, p, 0.7, n_boot=300, seed=2)
    assert a == b and a != c
    lo, hi = a["auc"]
    assert lo < auc(y, p) < hi and hi - lo < 0.3


def test_youden_threshold_is_optimal() -> None:
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, 100)
    p = rng.random(100) + 0.5 * y
    t = youden_threshold(y, p)
    j = lambda thr: ((p >= thr) & (y == 1)).sum() / y.sum() - ((p >= thr) & (y == 0)).sum() / (1 - y).sum()
    assert j(t) == pytest.approx(max(j(v) for v in np.unique(p)))


def test_csv_readers(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"x")
    with (tmp_path / "i.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "source", "split", "patient"])
        w.writerow(["img/a.jpg", "covid", "s", "test", ""])
        w.writerow(["img/b.jpg", "normal", "s", "train", ""])
    rows = read_images_csv(tmp_path / "i.csv", split="test")
    assert rows[0]["abspath"] == str(tmp_path / "img" / "a.jpg")
    with pytest.raises(ConfigError, match="not found"):
        read_images_csv(tmp_path / "i.csv")  # b.jpg missing
    with pytest.raises(ConfigError, match="splits present"):
        read_images_csv(tmp_path / "i.csv", split="val")
    (tmp_path / "s.csv").write_text("path,label\nseries1,covid\n/abs/series2,cap\n")
    assert read_series_csv(tmp_path / "s.csv") == [(tmp_path / "series1", "covid"), (Path("/abs/series2"), "cap")]


def test_cli_needs_an_input() -> None:
    r = subprocess.run([sys.executable, "-c", "from sdk.cli import main; main(['evaluate', '--json'])"],
                       capture_output=True, text=True, cwd=SDK_HOME)
    assert r.returncode == 2 and "give --images CSV, --series CSV, or both" in r.stderr


def test_evaluate_images_cli_matches_independent_scoring(tmp_path: Path) -> None:
    """A few real images through `ctsdk evaluate --images`; one case re-scored by hand."""
    import onnxruntime as ort

    from sdk.bundle import load_bundle
    from sdk.lungs import segment_slices_2d
    from sdk.train.data import load_grey, eval_input

    index = shared_path("images_index.csv")
    with index.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    pick = [r for r in rows if r["source"] == "ucsd-covid-ct" and r["split"] == "test"][:3]
    pick += [r for r in rows if r["source"] == "mosmed-midslices" and r["label"] == "normal"][:3]
    small = tmp_path / "images.csv"
    with small.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(pick)
    cmd = [sys.executable, "-c", "from sdk.cli import main; main()", "evaluate", "--images", str(small),
           "--data-root", str(index.parent), "--render", "8bit", "--n-bootstrap", "50", "--out", str(tmp_path / "out"),
           "--cases", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=SDK_HOME, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout)
    assert d["overall"]["n"] == 6 and d["overall"]["n_pos"] == sum(r["label"] == "covid" for r in pick)
    assert d["input"]["render"] == "8bit"
    assert set(d["per_source"]) == {"ucsd-covid-ct", "mosmed-midslices"}
    assert (tmp_path / "out" / "roc_images.png").is_file()
    c = sum(d["overall"]["confusion"].values())
    assert c == 6
    # independent scoring of the first case
    b = load_bundle()
    grey = load_grey(index.parent / pick[0]["path"])
    lungs = ort.InferenceSession(str(b.lungs_path), providers=["CPUExecutionProvider"])
    mask = segment_slices_2d(grey[None], lungs)[0]
    x = eval_input(grey, mask, b.input_size)[None].astype(np.float32)
    cls = ort.InferenceSession(b.classifier_paths()["fp32"], providers=["CPUExecutionProvider"])
    p = cls.run(["probs"], {"image": x})[0][0, b.classes.index("covid")]
    assert d["cases"][0]["p_covid"] == pytest.approx(float(p), abs=1e-5)


def test_evaluate_series_on_phantoms(tmp_path: Path) -> None:
    """Series mode end to end on phantom series: metrics, slice labels, an excluded series."""
    from sdk.evaluate import evaluate_series
    from sdk.phantom import write_phantom_series

    write_phantom_series(tmp_path / "a", n_slices=32, size=64, spacing=(2.5, 4.0, 4.0), ground_glass=True, seed=1)
    write_phantom_series(tmp_path / "b", n_slices=32, size=64, spacing=(2.5, 4.0, 4.0), seed=2)
    write_phantom_series(tmp_path / "thick", n_slices=24, size=64, spacing=(5.0, 4.0, 4.0), slice_thickness=5.0)
    labels = np.zeros((2, 200), np.int64)
    labels[0, 10:20] = 1
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "series.csv").write_text(
        "path,label,slice_labels,slice_labels_row\na,covid,labels.npy,0\nb,normal,,\nthick,cap,,\n")
    rep = evaluate_series(tmp_path / "series.csv", n_boot=20, out=tmp_path / "out", progress=False)
    d = rep.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["overall"]["n"] == 2 and d["overall"]["n_pos"] == 1
    # the breakdown is by the CSV's label word, and says so (images: per_source, by dataset)
    assert "per_source" not in d and set(d["per_label"]) == {"covid", "normal"}
    assert [e["path"] for e in d["excluded"]] == [str(tmp_path / "thick")] and d["excluded"][0]["reasons"]
    a, b = d["cases"]
    # "indeterminate" (sdk.decision): the phantom's ~1 l lungs are below the small-lungs bar
    assert a["predicted"] in ("indeterminate", "covid" if a["p_covid"] >= rep.overall["threshold"] else "non_covid")
    sl = d["slice_level"]["labelled_positive_vs_all_other"]
    assert sl["n"] == a["n_slices"] + b["n_slices"]
    assert sl["n_pos"] == a["slices_labelled_positive"] <= 10
    assert (tmp_path / "out" / "evaluation_series.json").is_file()


def test_evaluate_series_per_row_bundle_and_per_series_slices(tmp_path: Path) -> None:
    """A ``bundle`` column routes its row to that bundle (leave-one-series-out evaluation); the
    per-series slice block is checked against an independent AUC; a missing bundle is refused."""
    from sdk.bundle import load_bundle, write_bundle
    from sdk.evaluate import evaluate_series, read_series_rows
    from sdk.phantom import write_phantom_series

    base = load_bundle()
    files = {k: (str(base.root / f.path), f.role, f.precision) for k, f in base.files.items() if k != "classifier_int8"}
    meta = dict(base.manifest, name="ctsdk-fold-test")
    write_bundle(tmp_path / "fold", files, meta)
    write_phantom_series(tmp_path / "a", n_slices=32, size=64, spacing=(2.5, 4.0, 4.0), ground_glass=True, seed=1)
    write_phantom_series(tmp_path / "b", n_slices=32, size=64, spacing=(2.5, 4.0, 4.0), seed=2)
    labels = np.zeros((1, 200), np.int64)
    labels[0, 8:20] = 1
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "series.csv").write_text("path,label,slice_labels,slice_labels_row,bundle\n"
                                         "a,covid,labels.npy,0,fold\nb,normal,,,\n")
    rep = evaluate_series(tmp_path / "series.csv", n_boot=20, out=tmp_path / "out", progress=False)
    d = rep.to_dict()
    a, b = d["cases"]
    assert "ctsdk-fold-test" in a["bundle"] and base.name in b["bundle"] and "ctsdk-fold-test" not in b["bundle"]
    assert d["input"]["per_row_bundles"] == [str((tmp_path / "fold").resolve())]
    per = d["slice_level"]["per_series"]
    assert set(per) == {"a", "b"} and per["b"]["n_pos"] == 0 and "within_series" not in per["b"]
    if 0 < per["a"]["n_pos"] < per["a"]["n"]:
        w = per["a"]["within_series"]
        assert a["slice_auc_within_series"] == pytest.approx(w["auc"])
    sl = d["slice_level"]["labelled_positive_vs_all_other"]
    assert sl["n"] == per["a"]["n"] + per["b"]["n"]
    assert (tmp_path / "out" / "roc_series_slices.png").is_file()
    (tmp_path / "bad.csv").write_text("path,label,bundle\na,covid,nowhere\n")
    with pytest.raises(ConfigError, match="not a bundle folder"):
        read_series_rows(tmp_path / "bad.csv")


def test_hu_image_input_matches_the_runtime_builder() -> None:
    """``--render hu``: one real 8-bit image, grey->HU estimated, re-rendered; checked against
    ``sdk.volume.resample.classifier_inputs`` on the letterboxed estimated-HU image."""
    import onnxruntime as ort

    from sdk.bundle import load_bundle
    from sdk.evaluate import hu_image_input, image_lung_mask
    from sdk.train.data import load_grey
    from sdk.train.hu_estimate import estimate_hu_map, grey_to_hu, letterbox_hu
    from sdk.volume.resample import classifier_inputs

    index = shared_path("images_index.csv")
    with index.open(newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["source"] == "ucsd-covid-ct")
    b = load_bundle()
    grey = load_grey(index.parent / row["path"])
    mask = image_lung_mask(grey, ort.InferenceSession(str(b.lungs_path), providers=["CPUExecutionProvider"]))
    x, reason = hu_image_input(grey, mask, 224, b.window)
    est = estimate_hu_map(grey, mask)
    if not est.ok:
        assert x is None and reason == est.reason
        return
    hu, m = letterbox_hu(grey_to_hu(grey, est), mask)
    ref = classifier_inputs(hu[None].astype(np.float64), m[None], [0], size=224, window=b.window)[0]
    np.testing.assert_allclose(x, ref, atol=2e-4)


def test_align_slice_labels_orders_and_refusals() -> None:
    from sdk.evaluate import align_slice_labels

    row = np.zeros(200, np.int64)
    row[[0, 1, 5]] = 1
    np.testing.assert_array_equal(align_slice_labels(row, 6, "z"), [1, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(align_slice_labels(row, 6, "reversed"), [1, 0, 0, 0, 1, 1])
    with pytest.raises(ConfigError, match="beyond"):
        align_slice_labels(row, 5, "z")          # slice 5 labelled in a 5-slice series
    with pytest.raises(ConfigError, match="order"):
        align_slice_labels(row, 6, "up")


def test_covid_ct_md_labels_run_head_to_feet() -> None:
    """COVID-CT-MD's slice labels, reversed into our z order, put P001's lobe labels in anatomical
    order: the right upper lobe (RUL) above (higher z index than) the right lower lobe (RLL)."""
    from sdk.evaluate import align_slice_labels
    from sdk.train.real_slices import LABEL_ORDER

    lobes = np.load(shared_path("dicom", "covid-ct-md", "labels", "Lobe-level-labels-updated-1.npy"))[0]   # (200, 5)
    n = 148                                                                                                # P001 slices
    rll = align_slice_labels(lobes[:, 2], n, LABEL_ORDER).nonzero()[0]       # lobes: LLL, LUL, RLL, RML, RUL
    rul = align_slice_labels(lobes[:, 4], n, LABEL_ORDER).nonzero()[0]
    assert rll.size and rul.size and np.median(rul) > np.median(rll)


def test_unknown_labels_are_refused_before_any_work(tmp_path: Path) -> None:
    """A label outside the vocabulary ("positive", a typo) was counted silently as negative; now
    the CSV is refused, naming its lines and the accepted words. Spellings of the classes pass."""
    from sdk.labels import is_positive, read_series_rows

    assert [is_positive(w) for w in ("covid", "COVID-19", "covid_19", "non_covid", "Normal", "cap")] == [1, 1, 1, 0, 0, 0]
    with pytest.raises(ConfigError, match="unknown label 'positive'"):
        is_positive("positive")
    (tmp_path / "s.csv").write_text("path,label\na,covid\nb,positive\nc,nromal\n")
    with pytest.raises(ConfigError, match=r"2 series row\(s\) with an unknown label - line 3: 'positive', line 4: 'nromal'"):
        read_series_rows(tmp_path / "s.csv")
    with open(tmp_path / "i.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label"], ["a.png", "covid19"], ["b.png", "healthy"]])
    with pytest.raises(ConfigError, match="line 3: 'healthy'"):
        read_images_csv(tmp_path / "i.csv")


def test_slice_label_errors_say_which_part_is_wrong(tmp_path: Path) -> None:
    from sdk.labels import read_series_rows

    np.save(tmp_path / "labels.npy", np.zeros((2, 10), np.int64))
    cases = {"missing.npy,0": f"slice_labels file not found: {tmp_path.resolve() / 'missing.npy'}",
             "labels.npy,x": "slice_labels_row must be the integer row of this series in labels.npy, got 'x'",
             "labels.npy,5": "slice_labels_row 5 is outside labels.npy's 2 rows"}
    for cols, msg in cases.items():
        (tmp_path / "s.csv").write_text(f"path,label,slice_labels,slice_labels_row\na,covid,{cols}\n")
        with pytest.raises(ConfigError) as exc:
            read_series_rows(tmp_path / "s.csv")
        assert msg in str(exc.value)
    (tmp_path / "s.csv").write_text("path,label,slice_labels,slice_labels_row\na,covid,labels.npy,1\n")
    assert read_series_rows(tmp_path / "s.csv")[0]["slice_labels"].shape == (10,)


def test_few_series_per_class_warn() -> None:
    from sdk.evaluate import MIN_CASES_PER_CLASS, few_cases_warning

    n = MIN_CASES_PER_CLASS
    assert few_cases_warning(np.array([1] * n + [0] * n), "series") == []
    (w,) = few_cases_warning(np.array([1, 0, 0]), "series")
    assert "1 positive and 2 negative series" in w and "not informative" in w
    assert len(few_cases_warning(np.array([1] * (n - 1) + [0] * 50), "series")) == 1
