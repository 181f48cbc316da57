"""Patient-level aggregation: 20-group features (any slice count) and the XGBoost round trip."""
from __future__ import annotations

import numpy as np
import pytest

from sdk.aggregate import N_GROUPS, Aggregator, fit_aggregator, group_features, group_matrix
from sdk.errors import BundleError, ConfigError


def reference_groups(p: np.ndarray, g: int) -> np.ndarray:
    """Independent construction: repeat each slice g times, average consecutive blocks of n."""
    n = p.shape[0]
    return np.repeat(p, g, axis=0).reshape(g, n, p.shape[1]).mean(axis=1)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 19, 20, 21, 40, 57, 148])
def test_group_matrix_matches_supersampled_reference(n: int) -> None:
    rng = np.random.default_rng(n)
    p = rng.random((n, 2))
    got = group_matrix(p)
    assert got.shape == (N_GROUPS, 2)
    np.testing.assert_allclose(got, reference_groups(p, N_GROUPS), atol=1e-6)


def test_multiple_of_20_is_block_mean() -> None:
    p = np.random.default_rng(0).random((60, 3))
    np.testing.assert_allclose(group_matrix(p), p.reshape(20, 3, 3).mean(axis=1), atol=1e-6)


def test_single_slice_fills_every_group() -> None:
    p = np.array([[0.2, 0.8]])
    np.testing.assert_allclose(group_matrix(p), np.tile(p, (20, 1)), atol=1e-7)


def test_ten_slices_each_fill_two_groups() -> None:
    p = np.stack([1 - np.linspace(0, 1, 10), np.linspace(0, 1, 10)], axis=1)
    np.testing.assert_allclose(group_matrix(p), np.repeat(p, 2, axis=0), atol=1e-7)


def test_order_matters_and_features_are_group_major() -> None:
    p = np.stack([np.zeros(40), np.r_[np.zeros(20), np.ones(20)]], axis=1)
    f = group_features(p)
    assert f.shape == (40,)
    # group g occupies f[2g:2g+2]; the covid column is 0 in the first half and 1 in the second
    np.testing.assert_array_equal(f[1::2], np.r_[np.zeros(10), np.ones(10)])
    assert not np.allclose(group_features(p[::-1]), f)


def test_means_preserved() -> None:
    p = np.random.default_rng(3).random((33, 2))
    np.testing.assert_allclose(group_matrix(p).mean(axis=0), p.mean(axis=0), atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((0, 2)), np.full((5, 2), np.nan), np.zeros((2, 2, 2))])
def test_bad_inputs_raise_config_error(bad: np.ndarray) -> None:
    with pytest.raises(ConfigError):
        group_matrix(bad)


def _toy(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x, y = [], []
    for i in range(n):
        lab = i % 2
        k = int(rng.integers(5, 90))
        p = np.clip(rng.normal(0.3 + 0.4 * lab, 0.2, k), 0, 1)
        x.append(group_features(np.stack([1 - p, p], axis=1)))
        y.append(lab)
    return np.asarray(x), np.asarray(y)


def test_xgboost_round_trip(tmp_path) -> None:
    x, y = _toy(160, 0)
    agg = fit_aggregator(x[:120], y[:120], ["non_covid", "covid"], eval_set=(x[120:], y[120:]), info={"what": "toy"})
    path = agg.save(tmp_path / "aggregator.json")
    back = Aggregator.load(path)
    assert back.classes == ["non_covid", "covid"] and back.n_groups == 20 and back.info["what"] == "toy"
    np.testing.assert_array_equal(back.predict_features(x), agg.predict_features(x))
    probs = back.predict_features(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    # it learned something on held-out toy data: mean P(covid) higher for covid series
    assert probs[120:][y[120:] == 1, 1].mean() > probs[120:][y[120:] == 0, 1].mean() + 0.3
    # predict_proba on raw slices equals the features path
    p = np.stack([np.full(7, 0.1), np.full(7, 0.9)], axis=1)
    d = back.predict_proba(p)
    assert set(d) == {"non_covid", "covid"}
    assert d["covid"] == pytest.approx(float(back.predict_features(group_features(p)[None])[0, 1]))


def test_fit_is_deterministic() -> None:
    x, y = _toy(80, 1)
    a = fit_aggregator(x, y, ["non_covid", "covid"], seed=3).predict_features(x)
    b = fit_aggregator(x, y, ["non_covid", "covid"], seed=3).predict_features(x)
    np.testing.assert_array_equal(a, b)


def test_load_refuses_foreign_model(tmp_path) -> None:
    import xgboost as xgb

    x, y = _toy(40, 2)
    xgb.train({"objective": "binary:logistic"}, xgb.DMatrix(x, label=y), 2).save_model(str(tmp_path / "m.json"))
    with pytest.raises(BundleError, match="ctsdk_classes"):
        Aggregator.load(tmp_path / "m.json")
    with pytest.raises(BundleError, match="not found"):
        Aggregator.load(tmp_path / "missing.json")


def test_wrong_class_count_raises() -> None:
    x, y = _toy(40, 4)
    agg = fit_aggregator(x, y, ["non_covid", "covid"])
    with pytest.raises(ConfigError, match="classes"):
        agg.predict_proba(np.zeros((10, 3)))


def _predictions_csv(path, rng) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "source", "split", "patient", "p_covid"])
        for split in ("train", "val", "test"):
            for i in range(60):
                k = i // 3 if i < 30 else i  # the first 30 rows: patients of 3 slices, one label each
                lab = "covid" if k % 2 else ("normal" if k % 4 == 0 else "non-covid")
                pid = f"{split}-p{i // 3}" if i < 30 else ""
                p = float(np.clip(rng.normal(0.75 if lab == "covid" else 0.25, 0.15), 0, 1))
                # a marker value so the test can see which split a bag drew from
                p = round(p, 3) + (0.0001 if split == "train" else 0.0)
                w.writerow([f"img/{split}{i}.jpg", lab, "src", split, pid, p])


def test_bags_use_only_requested_split_and_keep_patients_together(tmp_path) -> None:
    from sdk.train.aggregator import _units, make_bags, read_predictions

    rng = np.random.default_rng(0)
    _predictions_csv(tmp_path / "pred.csv", rng)
    rows = read_predictions(str(tmp_path / "pred.csv"))
    units = _units(rows, ["train"])
    allowed = {float(r["p_covid"]) for r in rows if r["split"] == "train"}
    bags, y = make_bags(units, 20, np.random.default_rng(1), min_slices=5, max_slices=30, covid_fraction_min=0.5)
    assert len(bags) == 40 and y.tolist() == [0] * 20 + [1] * 20
    for b, lab in zip(bags, y):
        assert 5 <= b.shape[0] <= 30 and b.shape[1] == 2
        np.testing.assert_allclose(b.sum(axis=1), 1.0)
        assert set(np.round(b[:, 1], 4)) <= {round(v, 4) for v in allowed}
    # patient units: slices sharing an id are one contiguous unit
    assert any(u.size == 3 for u in units[1]) and all(u.size in (1, 2, 3) for u in units[0] + units[1])


def test_train_aggregator_end_to_end(tmp_path) -> None:
    import json

    from sdk.train.aggregator import AggTrainConfig, train_aggregator

    _predictions_csv(tmp_path / "pred.csv", np.random.default_rng(2))
    cfg = AggTrainConfig(predictions=str(tmp_path / "pred.csv"), out=str(tmp_path / "agg" / "aggregator.json"),
                         bags_per_class=60, n_bootstrap=50, num_boost_round=50, min_slices=5, max_slices=40)
    m = train_aggregator(cfg)
    assert Aggregator.load(m["out"]).classes == ["non_covid", "covid"]
    assert m["test_bags"]["auc"] > 0.9  # well separated toy scores
    assert 0.0 < m["threshold"] < 1.0
    assert json.loads((tmp_path / "agg" / "config.json").read_text())["bags_per_class"] == 60


def test_compare_aggregators_rebuilds_the_trainers_bags(tmp_path) -> None:
    """compare_aggregators scores the same val/test bags the trainer reported on."""
    import json

    from sdk.agg_predictions import join_cases
    from sdk.train.aggregator import compare_aggregators
    from sdk.train.aggregator import AggTrainConfig, train_aggregator

    _predictions_csv(tmp_path / "pred.csv", np.random.default_rng(3))
    cfg = AggTrainConfig(predictions=str(tmp_path / "pred.csv"), out=str(tmp_path / "agg" / "aggregator.json"),
                         bags_per_class=40, n_bootstrap=20, num_boost_round=20, min_slices=5, max_slices=40)
    m = train_aggregator(cfg)
    conf = json.loads((tmp_path / "agg" / "config.json").read_text())
    res = compare_aggregators(str(tmp_path / "pred.csv"), {"a": m["out"], "b": m["out"]},
                              {"a": m["threshold"], "b": 0.5}, conf, str(tmp_path / "cmp.json"))
    for step in ("val_bags", "test_bags"):
        got = res["aggregators"]["a"][step]
        assert got["auc"] == pytest.approx(m[step]["auc"]) and got["sensitivity"] == pytest.approx(m[step]["sensitivity"])
        assert res["paired"][f"{step}: b - a"]["diff"] == pytest.approx(0.0)
    rows = [{"path": "x.jpg", "label": "covid", "source": "s", "split": "val", "patient": "p1"}]
    assert join_cases(rows, [{"path": "x.jpg", "p_covid": 0.25}]) == [dict(rows[0], p_covid="0.250000")]


def test_contributions_sum_to_the_margin() -> None:
    """XGBoost pred_contribs (TreeSHAP) are exact: features + bias = logit of the positive class."""
    rng = np.random.default_rng(3)
    bags = [rng.uniform(0, 1, (int(rng.integers(5, 60)), 1)) * (0.5 + 0.5 * (i % 2)) for i in range(120)]
    x = np.stack([group_features(np.hstack([1 - b, b])) for b in bags])
    y = np.array([i % 2 for i in range(120)])
    agg = fit_aggregator(x, y, ["non_covid", "covid"], num_boost_round=20)
    sp = np.hstack([1 - bags[1], bags[1]])
    c = agg.contributions(sp)
    p = agg.predict_proba(sp)["covid"]
    assert c.shape == (41,) and c.sum() == pytest.approx(np.log(p / (1 - p)), abs=1e-4)
    s = agg.contribution_summary(sp)
    assert set(s) == {"groups_non_covid", "groups_covid", "bias"}
    assert sum(s.values()) == pytest.approx(c.sum(), abs=1e-6)
    assert s["groups_covid"] == pytest.approx(c[1:-1:2].sum(), abs=1e-6)
