"""Per-slice HU opacity fractions, the fused slice score, its manifest block, and the evaluation tables."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sdk.errors import ConfigError
from sdk.opacity import OpacityConfig, measure_opacity
from sdk.slice_score import SliceScoreModel


# --- per-slice fractions: a synthetic volume with known HU blocks in a known mask -----------------
def _block_volume():
    """(z=12, 64, 64) at 1.4 mm in-plane (stride 1): a 40 x 40 lung box per slice, normal lung
    -850 HU, one wide ground-glass block (-550 HU) on slices 3-6, one wide consolidation block
    (+10 HU) on slices 5-7; nothing else (no vessels, no airways)."""
    nz, n = 12, 64
    hu = np.full((nz, n, n), 30.0, np.float32)          # soft tissue outside the lungs
    lab = np.zeros((nz, n, n), np.uint8)
    lab[:, 12:52, 12:32] = 2                             # right lung (low x)
    lab[:, 12:52, 32:52] = 1                             # left lung
    hu[lab > 0] = -850.0
    hu[3:7, 16:30, 14:28] = -550.0                       # 14 x 14 GGO square, inside the right lung
    hu[5:8, 20:34, 36:50] = 10.0                         # 14 x 14 consolidation square, left lung
    return hu, lab, (2.0, 1.4, 1.4)


def _independent_fractions(hu, lab, cfg):
    """NumPy / SciPy count: per slice, ground glass / consolidation pixels over lung pixels, after
    the basal / apical trim. The ground-glass block is far wider than the 3x3 opening (kept whole);
    consolidation is the dense mask opened (scipy) with the 7 mm disk at 1.4 mm/px (radius 2 px,
    OpenCV's 5x5 ellipse written out), which trims the square's four corners by two pixels each."""
    from scipy import ndimage

    disk5 = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], bool)
    nz = hu.shape[0]
    n_trim_base = int(round(cfg.base_exclusion * nz))
    n_trim_apex = int(round(cfg.apex_exclusion * nz))
    keep = np.zeros(nz, bool)
    keep[n_trim_base:nz - n_trim_apex] = True            # superior = high z: base at low z
    g = np.full(nz, np.nan)
    c = np.full(nz, np.nan)
    for z in np.nonzero(keep)[0]:
        lung = lab[z] > 0
        n = lung.sum()
        g[z] = np.count_nonzero(lung & (hu[z] >= cfg.ggo_lo_hu) & (hu[z] <= cfg.dense_hu)) / n
        dense = ndimage.binary_opening(lung & (hu[z] > cfg.dense_hu), structure=disk5)
        c[z] = np.count_nonzero(dense & (hu[z] <= cfg.consolidation_max_hu)) / n
    return g, c


def test_slice_fractions_match_an_independent_numpy_count() -> None:
    hu, lab, sp = _block_volume()
    cfg = OpacityConfig()
    op = measure_opacity(hu, lab, sp, config=cfg)
    g_ref, c_ref = _independent_fractions(hu, lab, cfg)
    assert op.slice_ggo_fraction.shape == (hu.shape[0],) == op.slice_consolidation_fraction.shape
    np.testing.assert_array_equal(np.isnan(op.slice_ggo_fraction), np.isnan(g_ref))
    ok = ~np.isnan(g_ref)
    np.testing.assert_allclose(op.slice_ggo_fraction[ok], g_ref[ok], atol=1e-12)
    np.testing.assert_allclose(op.slice_consolidation_fraction[ok], c_ref[ok], atol=1e-12)
    # the planted blocks: 196 GGO px of 1600 lung px on slices 3-6, 196 - 4 x 2 consolidation on 5-7
    assert op.slice_ggo_fraction[4] == pytest.approx(196 / 1600)
    assert op.slice_consolidation_fraction[6] == pytest.approx(188 / 1600)
    assert op.slice_ggo_fraction[9] == 0.0 and op.slice_fractions(0) != op.slice_fractions(0)  # NaN at the trimmed base
    # the per-slice counts add up to the series totals of the same pass
    w = op.slice_lung_voxels
    assert w.sum() * op.grid["spacing_mm"][0] * op.grid["spacing_mm"][1] * op.grid["spacing_mm"][2] / 1000 == pytest.approx(op.lung_ml)
    assert np.nansum(op.slice_ggo_fraction * w) / w.sum() == pytest.approx(op.ggo_fraction)
    assert np.nansum(op.slice_consolidation_fraction * w) / w.sum() == pytest.approx(op.consolidation_fraction)


def test_slice_fractions_are_nan_outside_the_lung_and_per_native_slice() -> None:
    hu, lab, sp = _block_volume()
    hu = np.concatenate([np.full((3,) + hu.shape[1:], 30.0, np.float32), hu])     # 3 lungless slices below
    lab = np.concatenate([np.zeros((3,) + lab.shape[1:], np.uint8), lab])
    op = measure_opacity(hu, lab, sp)
    assert op.slice_ggo_fraction.shape == (15,)
    assert np.isnan(op.slice_ggo_fraction[:3]).all() and (op.slice_lung_voxels[:3] == 0).all()
    assert op.slice_ggo_fraction[3 + 4] == pytest.approx(196 / 1600)
    assert "slice_ggo_fraction" not in op.to_dict()      # per-slice values travel with the slice scores


# --- the score function ------------------------------------------------------------------------
BLOCK = {"form": "logistic", "transform": "log1p", "scale": 0.01, "p_clip": 1e-4, "missing_fraction": 0.005,
         "coefficients": {"intercept": -0.5, "cnn_logit": 1.5, "ggo": 0.8, "consolidation": 0.3},
         "source": "test", "command": "none", "note": "kept"}


def test_score_matches_a_hand_computation() -> None:
    m = SliceScoreModel.from_manifest(BLOCK)
    p, g, c = 0.3, 0.12, 0.02
    z = -0.5 + 1.5 * math.log(0.3 / 0.7) + 0.8 * math.log(1 + 12.0) + 0.3 * math.log(1 + 2.0)
    assert m.score(p, g, c) == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-12)
    # missing fractions read as missing_fraction (0.005 -> log1p(0.5)); p is clipped to [1e-4, 1 - 1e-4]
    z2 = -0.5 + 1.5 * math.log(1e-4 / (1 - 1e-4)) + (0.8 + 0.3) * math.log(1.5)
    assert m.score(0.0, float("nan"), float("nan")) == pytest.approx(1 / (1 + math.exp(-z2)), rel=1e-12)
    arr = m.score(np.array([0.3, 0.3]), np.array([0.12, 0.0]), np.array([0.02, 0.02]))
    assert arr.shape == (2,) and arr[0] == pytest.approx(m.score(p, g, c)) and arr[1] < arr[0]
    t = m.terms(p, g, c)
    assert float(t["logit"]) == pytest.approx(z) and float(t["ggo"]) == pytest.approx(0.8 * math.log(13.0))
    sq = SliceScoreModel(0.0, 1.0, 2.0, 0.0, transform="sqrt")
    assert sq.score(0.5, 0.25, 0.0) == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_manifest_block_parsing_and_refusals() -> None:
    m = SliceScoreModel.from_manifest(BLOCK)
    assert (m.intercept, m.w_cnn, m.w_ggo, m.w_consolidation, m.transform, m.scale) == (-0.5, 1.5, 0.8, 0.3, "log1p", 0.01)
    assert m.extra == {"note": "kept"} and SliceScoreModel.from_manifest(m.to_manifest()) == m
    assert SliceScoreModel.from_manifest(None) is None
    for bad in ({**BLOCK, "coefficients": {"intercept": 0}}, {**BLOCK, "transform": "cube"}, {**BLOCK, "form": "mlp"},
                {**BLOCK, "p_clip": 0.7}, {**BLOCK, "coefficients": {**BLOCK["coefficients"], "ggo": "x"}}, [1, 2]):
        with pytest.raises(ConfigError):
            SliceScoreModel.from_manifest(bad)


def test_default_bundle_reads_its_block_through_the_bundle() -> None:
    from sdk.bundle import DEFAULT_BUNDLE_DIR, load_bundle

    b = load_bundle(verify=False)
    raw = json.loads((DEFAULT_BUNDLE_DIR / "manifest.json").read_text())["slice_score"]
    m = b.slice_score_model
    assert m is not None and m.w_ggo == raw["coefficients"]["ggo"] and m.transform == raw["transform"]
    # the shipped a-priori rule: a slice at the no-opacity reference scores the CNN's own probability
    assert m.score(0.37, m.missing_fraction, m.missing_fraction) == pytest.approx(0.37)
    assert m.score(0.37, float("nan"), float("nan")) == pytest.approx(0.37)


def test_slice_scores_builder_and_json_round_trip() -> None:
    from sdk.triage import SliceScore, TriageResult, slice_scores

    hu, lab, sp = _block_volume()
    op = measure_opacity(hu, lab, sp)
    m = SliceScoreModel.from_manifest(BLOCK)
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]], np.float32)
    idx = np.array([0, 4, 6])
    out = slice_scores(["non_covid", "covid"], "covid", idx, np.arange(12) * 2.0, probs, op, m)
    assert out[0].ggo_fraction is None and out[0].slice_score == pytest.approx(m.score(0.2, np.nan, np.nan))
    assert out[1].ggo_fraction == pytest.approx(196 / 1600)
    assert out[2].slice_score == pytest.approx(m.score(0.5, op.slice_ggo_fraction[6], op.slice_consolidation_fraction[6]), rel=1e-6)
    r = TriageResult(label="covid", probabilities={"covid": 0.9, "non_covid": 0.1}, eligible=True, slice_scores=out)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["slice_scores"][0]["ggo_fraction"] is None and d["slice_scores"][1]["slice_score"] == pytest.approx(out[1].slice_score)
    assert TriageResult.from_dict(d).slice_scores == out
    assert SliceScore(1, 2.0, {"covid": 0.5}).to_dict()["slice_score"] is None       # positional use still works
    plain = slice_scores(["non_covid", "covid"], "covid", idx, np.arange(12) * 2.0, probs)
    assert all(s.slice_score is None and s.ggo_fraction is None for s in plain)


def test_series_score_tables_per_series_and_loso_statement() -> None:
    from sdk.evaluate import _named_scores, _series_score_tables, auc

    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(10), np.zeros(30)].astype(int)         # series 0 (pos 20 / clear 10), series 1 negative
    case = np.r_[np.zeros(30), np.ones(30)].astype(int)
    in_pos = case == 0
    p = rng.uniform(size=60)
    g = np.where(y == 1, 0.2, 0.01) + rng.uniform(0, 0.005, 60)
    g[5] = np.nan
    cons = rng.uniform(0, 0.01, 60)
    named = _named_scores(p, g, cons, np.full(60, np.nan), 0.005)
    assert set(named) == {"cnn", "ggo", "consolidation"} and named["ggo"][5] == 0.005
    cases = [{"path": "/x/P1"}, {"path": "/x/N1"}]
    t = _series_score_tables(cases, y, named, in_pos, case, g, n_boot=50, seed=0)
    assert t["pooled"]["ggo"]["auc"] == pytest.approx(auc(y, named["ggo"]))
    assert t["per_series"]["P1"]["slices_without_fractions"] == 1
    assert t["per_series"]["P1"]["auc"]["cnn"]["n"] == 30
    m = (y == 1) | (case == 1)
    assert t["per_series"]["N1"]["auc"]["cnn"]["auc"] == pytest.approx(auc(y[m], p[m]))
    lo, hi = t["pooled"]["cnn"]["ci95"]
    assert lo <= t["pooled"]["cnn"]["auc"] <= hi
    assert t["leave_one_series_out"]["fitted_on_real_series"] is False


def test_paired_difference_of_the_fused_score() -> None:
    from sdk.evaluate import _auc_table, auc, paired_auc_difference

    rng = np.random.default_rng(1)
    y = (rng.uniform(size=80) < 0.4).astype(int)
    a = y + rng.normal(0, 1.0, 80)
    b = y + rng.normal(0, 2.0, 80)
    d = paired_auc_difference(y, a, a, n_boot=30)
    assert d["diff"] == 0.0 and d["ci95"] == [0.0, 0.0]
    t = _auc_table(y, {"cnn": b, "slice_score": a}, n_boot=30, seed=0)
    assert t["slice_score_minus_cnn"]["diff"] == pytest.approx(auc(y, a) - auc(y, b))
    lo, hi = t["slice_score_minus_cnn"]["ci95"]
    assert lo <= t["slice_score_minus_cnn"]["diff"] <= hi and 0.0 <= t["slice_score_minus_cnn"]["p_le_0"] <= 1.0


# --- z context --------------------------------------------------------------------------------------
def _z_context_loop(p, z, half):
    """Independent reference: a plain double loop over slices."""
    out = []
    for zi in z:
        ls = [math.log(min(max(pj, 1e-4), 1 - 1e-4) / (1 - min(max(pj, 1e-4), 1 - 1e-4)))
              for pj, zj in zip(p, z) if abs(zj - zi) <= half + 1e-9]
        out.append(1.0 / (1.0 + math.exp(-sum(ls) / len(ls))))
    return np.array(out)


def test_z_context_matches_a_loop_with_uneven_spacing_gaps_and_any_order() -> None:
    from sdk.slice_score import Z_CONTEXT_MM, z_context

    rng = np.random.default_rng(3)
    z = np.r_[np.arange(0, 20, 2.0), np.arange(40, 52, 3.0), [5.0, 100.0]]   # uneven, a gap, an isolated slice
    rng.shuffle(z)
    p = rng.uniform(0, 1, z.size)
    p[0], p[1] = 0.0, 1.0                                                    # clipped, not infinite
    got = z_context(p, z)
    assert np.allclose(got, _z_context_loop(p, z, Z_CONTEXT_MM), atol=1e-12)
    iso = int(np.argmax(z == 100.0))
    assert got[iso] == pytest.approx(np.clip(p[iso], 1e-4, 1 - 1e-4))          # no neighbour: its own (clipped) probability
    assert np.allclose(z_context(p, z, 1e-3), np.clip(p, 1e-4, 1 - 1e-4))     # window narrower than the spacing
    wide = z_context(p, z, 1e6)                                               # one window over all: one value
    assert np.allclose(wide, wide[0])


def test_z_context_refuses_bad_input() -> None:
    from sdk.slice_score import z_context

    with pytest.raises(ConfigError, match="positions"):
        z_context([0.5, 0.5], [0.0])
    with pytest.raises(ConfigError, match="finite"):
        z_context([0.5, np.nan], [0.0, 1.0])
    with pytest.raises(ConfigError, match="half_window_mm"):
        z_context([0.5], [0.0], 0.0)
    assert z_context([], []).size == 0


def test_slice_scores_carry_the_z_context_score_and_the_tables_compare_it() -> None:
    from sdk.evaluate import _auc_table, _named_scores, auc
    from sdk.slice_score import z_context
    from sdk.triage import SliceScore, TriageResult, slice_scores

    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5], [0.1, 0.9]], np.float32)
    idx = np.array([0, 1, 2, 9])
    z_mm = np.arange(12) * 2.0
    out = slice_scores(["non_covid", "covid"], "covid", idx, z_mm, probs)
    want = z_context(probs[:, 1], z_mm[idx])
    assert [s.z_context_score for s in out] == pytest.approx(list(want))
    r = TriageResult(label="covid", probabilities={"covid": 0.9, "non_covid": 0.1}, eligible=True, slice_scores=out)
    assert TriageResult.from_dict(json.loads(json.dumps(r.to_dict()))).slice_scores == out
    assert SliceScore.from_dict({"index": 1, "z_mm": 2.0, "probabilities": {"covid": 0.5}}).z_context_score is None
    y = np.array([0, 1, 0, 1, 1, 0])
    p = np.array([0.2, 0.6, 0.5, 0.4, 0.9, 0.1])
    zc = np.array([0.3, 0.7, 0.2, 0.8, 0.9, 0.1])
    named = _named_scores(p, np.zeros(6), np.zeros(6), np.full(6, np.nan), 0.0, zc)
    t = _auc_table(y, named, n_boot=30, seed=0)
    assert t["cnn_z"]["auc"] == pytest.approx(auc(y, zc)) and t["cnn_z_minus_cnn"]["diff"] == pytest.approx(auc(y, zc) - auc(y, p))
    assert "cnn_z" not in _named_scores(p, np.zeros(6), np.zeros(6), np.full(6, np.nan), 0.0)
