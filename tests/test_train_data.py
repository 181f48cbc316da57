"""Classifier training data: labels, patient-grouped splits (no leakage), augmentation shapes and
ranges, the letterbox transform against an independent resampler, the mask cache; training
plumbing: focal loss, class weights, early stopping, metrics."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from conftest import shared_path
from sdk.errors import ConfigError
from sdk.train import common
from sdk.train import data as D


# --- labels and splits ---------------------------------------------------------------------------
def test_binary_labels():
    assert D.binary_label("covid") == 1
    assert D.binary_label("non-covid") == 0 and D.binary_label("normal") == 0
    assert D.binary_label("cap") == 0  # one vocabulary with evaluation and the aggregator (sdk.labels)
    with pytest.raises(ConfigError, match="unknown label 'pneumonia'"):
        D.binary_label("pneumonia")


@pytest.fixture(scope="module")
def real_splits():
    rows = D.read_images_index(shared_path("images_index.csv"))
    return rows, D.assign_splits(rows, seed=0)


def test_real_splits_have_no_patient_in_two_splits(real_splits):
    rows, out = real_splits
    assert len(out) == len(rows) == 2568
    groups = collections.defaultdict(set)
    for r in out:
        groups[D.group_id(r)].add(r["split"])
        if r["patient"]:  # independent check on the raw patient ids
            groups["raw:" + r["source"] + r["patient"]].add(r["split"])
    assert all(len(s) == 1 for s in groups.values())
    counts = D.check_no_leakage(out)
    assert set(counts) == {"train", "val", "test"}


def test_real_splits_follow_the_rules(real_splits):
    rows, out = real_splits
    for r, o in zip(rows, out):
        assert o["path"] == r["path"] and o["source_split"] == r["split"]
        if r["source"] == "ucsd-covid-ct":
            assert o["split"] == r["split"]  # official split unchanged
        if r["source"] == "sarscov2-ctscan-soares":
            assert o["split"] in ("train", "val")  # never in the held-out test
    mos = [o for o in out if o["source"] == "mosmed-midslices"]
    for cat in ("CT-0", "CT-1", "CT-2", "CT-3"):
        c = collections.Counter(o["split"] for o in mos if o["source_split"] == cat)
        n = sum(c.values())
        assert set(c) == {"train", "val", "test"}
        assert abs(c["train"] / n - 0.6) < 0.1 and abs(c["test"] / n - 0.2) < 0.1
    # Soares: contiguous number blocks -> every val number is above every train number (per class)
    for label in ("covid", "non-covid"):
        num = lambda o: int(o["path"].rsplit("_", 1)[1].split(".")[0])  # noqa: E731
        tr = [num(o) for o in out if o["source"] == "sarscov2-ctscan-soares" and o["label"] == label and o["split"] == "train"]
        va = [num(o) for o in out if o["source"] == "sarscov2-ctscan-soares" and o["label"] == label and o["split"] == "val"]
        assert max(tr) < min(va)
    assert D.assign_splits(rows, seed=0) == out  # deterministic


def test_splits_csv_round_trip(real_splits, tmp_path):
    _, out = real_splits
    p = D.write_splits_csv(out, tmp_path / "splits.csv")
    back = D.read_splits_csv(p)
    assert [(r["path"], r["split"], r["group"]) for r in back] == [(r["path"], r["split"], r["group"]) for r in out]
    assert D.check_no_leakage(back) == D.check_no_leakage(out)


def test_leakage_is_detected():
    rows = [
        {"path": "a/1.jpg", "label": "covid", "source": "x", "split": "train", "patient": "P1"},
        {"path": "a/2.jpg", "label": "covid", "source": "x", "split": "test", "patient": "P1"},
        {"path": "a/3.jpg", "label": "covid", "source": "x", "split": "test", "patient": "P2"},
    ]
    with pytest.raises(ConfigError, match="leakage.*x:P1"):
        D.check_no_leakage(rows)
    # UCSD images without a patient id are grouped by their source paper
    ucsd = [
        {"path": "images/ucsd-covid-ct/covid/2020.03.25.20043166-p17-78.jpg", "label": "covid", "source": "ucsd-covid-ct", "split": "train", "patient": ""},
        {"path": "images/ucsd-covid-ct/covid/2020.03.25.20043166-p17-79.jpg", "label": "covid", "source": "ucsd-covid-ct", "split": "test", "patient": ""},
    ]
    with pytest.raises(ConfigError, match="paper:2020.03.25.20043166"):
        D.check_no_leakage(ucsd)


def test_read_index_names_missing_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("path,label\nx.jpg,covid\n")
    with pytest.raises(ConfigError, match="missing column"):
        D.read_images_index(p)


# --- transforms --------------------------------------------------------------------------------------
def _phantom(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (h * 0.45)) ** 2 + ((xx - w / 2) / (w * 0.45)) ** 2 < 1
    lung = (((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w * 0.33) / (w * 0.12)) ** 2 < 1) | (
        ((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w * 0.67) / (w * 0.12)) ** 2 < 1)
    grey = np.where(body, 0.8, 0.02) - 0.6 * lung + rng.normal(0, 0.02, (h, w))
    return np.clip(grey, 0, 1).astype(np.float32), lung.astype(np.uint8)


@pytest.mark.parametrize("h,w", [(256, 256), (180, 256), (256, 140), (512, 512)])
def test_augment_keeps_shapes_ranges_and_channel_rules(h, w):
    grey, mask = _phantom(h, w)
    aug = D.Augment()
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = aug(grey, mask, 96, rng)
        assert x.shape == (3, 96, 96) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(np.unique(x[1]).tolist()) <= {0.0, 1.0}
        assert np.array_equal(x[2], x[0] * x[1])
        assert 0.02 < x[1].mean() < 0.6  # the lungs survive the crop/rotation
    x0 = D.eval_input(grey, mask, 96)
    assert x0.shape == (3, 96, 96) and np.array_equal(x0[2], x0[0] * x0[1])


def test_augment_is_reproducible_for_a_seed():
    grey, mask = _phantom(200, 240)
    a = D.Augment()(grey, mask, 64, np.random.default_rng(7))
    b = D.Augment()(grey, mask, 64, np.random.default_rng(7))
    c = D.Augment()(grey, mask, 64, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_letterbox_matches_an_independent_resampler():
    """Letterbox = scale longer side to S (pixel-centre rule of docs/conventions.md), centre, pad 0."""
    from scipy import ndimage as ndi

    grey, mask = _phantom(100, 160, seed=1)
    S = 64
    x = D.eval_input(grey, mask, S)
    s = S / 160.0
    top = (S - 100 * s) / 2.0  # 12 rows of padding above and below
    yy, xx = np.mgrid[:S, :S].astype(np.float64)
    src_y = (yy + 0.5 - top) / s - 0.5
    src_x = (xx + 0.5) / s - 0.5
    ref = ndi.map_coordinates(grey.astype(np.float64), [src_y, src_x], order=1, mode="constant", cval=0.0)
    inside = (src_y >= 0) & (src_y <= 99)
    assert np.abs(x[0][inside] - ref[inside]).max() < 0.03  # OpenCV's 1/32-pixel fixed-point weights
    assert np.all(x[0][:12] == 0) and np.all(x[0][-12:] == 0)  # padding rows
    ref_m = ndi.map_coordinates(mask.astype(np.float64), [np.round(src_y).clip(0, 99), np.round(src_x).clip(0, 159)], order=0)
    agree = (x[1][inside] == ref_m[inside]).mean()
    assert agree > 0.98


def test_warp_rejects_mismatched_mask():
    with pytest.raises(ConfigError, match="same shape"):
        D.warp_to_input(np.zeros((10, 10), np.float32), np.zeros((10, 12), np.uint8), 32)


def test_mask_cache_round_trip(tmp_path):
    masks = {"images/a/x%20y.jpg": np.eye(5, dtype=np.uint8), "images/b/z.jpg": np.ones((3, 4), np.uint8) * 7}
    D.save_mask_cache(masks, tmp_path, meta={"seg_sha256": "abc"})
    back = D.load_mask_cache(tmp_path)
    assert list(back) == list(masks)
    assert np.array_equal(back["images/a/x%20y.jpg"], np.eye(5)) and np.array_equal(back["images/b/z.jpg"], np.ones((3, 4)))
    with pytest.raises(ConfigError, match="not found"):
        D.load_mask_cache(tmp_path / "nothing")


# --- training plumbing -----------------------------------------------------------------------------
def test_focal_loss_against_the_formula():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 2))
    y = np.array([0, 1, 1, 0, 1, 0])
    w = np.array([0.7, 1.9])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    py = p[np.arange(6), y]
    ref = np.mean(-w[y] * (1 - py) ** 1.5 * np.log(py))
    got = common.focal_loss(torch.tensor(logits), torch.tensor(y), gamma=1.5, weight=torch.tensor(w))
    assert abs(float(got) - ref) < 1e-6
    ce = common.focal_loss(torch.tensor(logits), torch.tensor(y), gamma=0.0)
    assert abs(float(ce) - float(torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(y)))) < 1e-6


def test_class_weights_balanced():
    w = common.class_weights([0, 0, 0, 1], 2)
    assert np.allclose(w, [4 / (2 * 3), 4 / (2 * 1)])
    assert np.allclose(common.class_weights([0, 1], 2, "none"), 1)
    with pytest.raises(ConfigError, match="no training sample"):
        common.class_weights([0, 0], 2)


def test_early_stopping():
    es = common.EarlyStopping(patience=2)
    assert es.step(0.5) and es.step(0.6)
    assert not es.step(0.55) and not es.should_stop
    assert not es.step(0.6) and es.should_stop and es.best == 0.6 and es.best_step == 1


def test_metrics_against_brute_force():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 2)  # ties on purpose
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg))
    assert abs(common.roc_auc(y, s) - brute) < 1e-12
    t = common.youden_threshold(y, s)
    j = max(sum(common.sens_spec(y, s, c)) for c in np.unique(s))
    assert abs(sum(common.sens_spec(y, s, t)) - j) < 1e-12
    rep = common.binary_report(y, s, t, n_boot=200)
    assert rep["auc_ci95"][0] <= rep["auc"] <= rep["auc_ci95"][1]
    assert rep["n"] == 200 and rep["n_pos"] == int(y.sum())


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    good = y + rng.normal(0, 0.5, 300)
    bad = rng.random(300)
    same = common.paired_bootstrap_diff(y, good, good, common.roc_auc, n_boot=100)
    assert same["diff"] == 0.0 and same["ci95"] == (0.0, 0.0)
    d = common.paired_bootstrap_diff(y, good, bad, common.roc_auc, n_boot=200)
    assert abs(d["diff"] - (common.roc_auc(y, good) - common.roc_auc(y, bad))) < 1e-12
    assert d["ci95"][0] > 0 and d["p_le_0"] == 0.0
