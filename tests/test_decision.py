"""sdk.decision: HU logit terms and every indeterminate rule, on crafted inputs; the real normal series."""
from __future__ import annotations

import math

import pytest

from sdk.decision import INDETERMINATE, DecisionConfig, decide, hu_terms

THR = 0.672


def _op(ggo=0.01, cons=0.005, bilateral=0.8, peripheral=0.5, lower=0.5, ggo_share=None, largest=0.001, involved=2):
    share = ggo / (ggo + cons) if ggo_share is None and ggo + cons > 0 else (ggo_share or 0.0)
    return {"ggo_fraction": ggo, "consolidation_fraction": cons,
            "pattern": {"bilateral_index": bilateral, "peripheral_index": peripheral, "lower_index": lower,
                        "ggo_share": share, "largest_consolidation_fraction": largest, "involved_lungs": involved}}


def _p(p):
    return {"non_covid": 1.0 - p, "covid": p}


def _logit(p):
    return math.log(p / (1 - p))


def test_hu_terms_fire_on_their_conditions_only():
    cfg = DecisionConfig()
    assert hu_terms(_op()) == {"no_opacity": 0.0, "lobar_consolidation": 0.0, "unilateral": 0.0, "covid_typical": 0.0}
    assert hu_terms(_op(ggo=0.004))["no_opacity"] == cfg.w_no_opacity
    assert hu_terms(_op(ggo=0.005))["no_opacity"] == 0.0
    assert hu_terms(_op(largest=0.05))["lobar_consolidation"] == cfg.w_lobar
    assert hu_terms(_op(involved=1, bilateral=0.2))["unilateral"] == cfg.w_unilateral
    assert hu_terms(_op(involved=1, bilateral=0.3))["unilateral"] == 0.0
    typical = _op(ggo=0.03, cons=0.005, bilateral=0.6, peripheral=0.65, lower=0.6)
    assert hu_terms(typical)["covid_typical"] == cfg.w_typical
    for change in ({"peripheral": 0.55}, {"bilateral": 0.4}, {"lower": 0.45}, {"ggo": 0.015}):
        kw = dict(ggo=0.03, cons=0.005, bilateral=0.6, peripheral=0.65, lower=0.6)
        kw.update(change)
        assert hu_terms(_op(**kw))["covid_typical"] == 0.0, change


def test_final_probability_is_the_logit_sum():
    op = _op(ggo=0.004, cons=0.001)
    d = decide(_p(0.3), "covid", THR, opacity=op, n_slices=100, lung_ml=5000)
    assert d.logit_total == pytest.approx(_logit(0.3) - 0.75)
    assert d.probabilities["covid"] == pytest.approx(1 / (1 + math.exp(-d.logit_total)))
    assert sum(d.probabilities.values()) == pytest.approx(1.0)
    assert d.label == "non_covid" and d.reasons == []
    d = decide(_p(0.9), "covid", THR, opacity=None, n_slices=100, lung_ml=5000)
    assert d.label == "covid" and d.hu_terms == {} and d.probabilities["covid"] == pytest.approx(0.9, abs=1e-6)


def test_three_classes_keep_the_others_shares():
    d = decide({"normal": 0.3, "cap": 0.1, "covid": 0.6}, "covid", 0.5, opacity=_op(ggo=0.001, cons=0.0),
               n_slices=50, lung_ml=4000)
    assert d.probabilities["normal"] / d.probabilities["cap"] == pytest.approx(3.0)
    assert sum(d.probabilities.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("kw, rule", [
    (dict(n_slices=19), "few_slices"),
    (dict(lung_ml=1499.0), "small_lungs"),
    (dict(p=0.5), "near_threshold"),
])
def test_each_indeterminate_rule(kw, rule):
    p = kw.pop("p", 0.95)
    args = dict(n_slices=60, lung_ml=4000.0)
    args.update(kw)
    d = decide(_p(p), "covid", THR, opacity=_op(ggo=0.02, cons=0.005), **args)
    if rule == "near_threshold":  # 0.5 is far from 0.672: move the threshold next to it
        d = decide(_p(p), "covid", 0.52, opacity=_op(ggo=0.02, cons=0.005), **args)
    assert d.label == INDETERMINATE and d.rules[rule] and len(d.reasons) == 1, d.reasons
    ok = decide(_p(p), "covid", THR, opacity=_op(ggo=0.02, cons=0.005), n_slices=20, lung_ml=1500.0)
    assert ok.label != INDETERMINATE or rule == "near_threshold"


def test_disagreement_cnn_positive_without_opacity():
    d = decide(_p(0.95), "covid", THR, opacity=_op(ggo=0.003, cons=0.002), n_slices=80, lung_ml=5000)
    assert d.label == INDETERMINATE and d.rules["disagree"]
    assert "< 0.5 % ground glass" in d.reasons[0]
    # 0.3 % ground glass but 0.6 % consolidation: not "nothing to show", yet the no-ground-glass term
    # (-0.75) against a CNN margin of +2.2 is a disagreement by margins
    d = decide(_p(0.95), "covid", THR, opacity=_op(ggo=0.003, cons=0.006), n_slices=80, lung_ml=5000)
    assert d.rules["disagree"] and "logit margin" in d.reasons[0]
    # 0.6 % of each: no HU term fires, no conflict
    d = decide(_p(0.95), "covid", THR, opacity=_op(ggo=0.006, cons=0.006), n_slices=80, lung_ml=5000)
    assert not d.rules["disagree"] and d.label == "covid"


def test_disagreement_by_margins():
    lobar = _op(ggo=0.01, cons=0.08, largest=0.08)      # HU sum -1.5 (lobar consolidation)
    # CNN margin +1.01 (logit(p) - logit(thr), the bar is 1.0): disagree
    p = 1 / (1 + math.exp(-(_logit(THR) + 1.01)))
    d = decide(_p(p), "covid", THR, opacity=lobar, n_slices=80, lung_ml=5000)
    assert d.rules["disagree"] and d.label == INDETERMINATE
    # CNN margin +0.9: not clear enough to call it a conflict
    p = 1 / (1 + math.exp(-(_logit(THR) + 0.9)))
    d = decide(_p(p), "covid", THR, opacity=lobar, n_slices=80, lung_ml=5000)
    assert not d.rules["disagree"]
    # CNN clearly negative and HU typical (+1.0): disagree
    typical = _op(ggo=0.05, cons=0.01, bilateral=0.7, peripheral=0.7, lower=0.6)
    d = decide(_p(0.05), "covid", THR, opacity=typical, n_slices=80, lung_ml=5000)
    assert d.rules["disagree"] and d.label == INDETERMINATE
    # both negative: agree
    d = decide(_p(0.05), "covid", THR, opacity=lobar, n_slices=80, lung_ml=5000)
    assert not d.rules["disagree"] and d.label == "non_covid"


def test_normal001_is_decided_confidently():
    """The real normal series: the current bundle calls it non_covid and no indeterminate rule fires."""
    from conftest import shared_path

    import sdk

    path = shared_path("dicom", "covid-ct-md", "normal-normal001")
    r = sdk.Triage(device="cpu", precision="fp32", threads=1, heatmaps=False).run(path)
    dec = r.lung_opacity["decision"]
    assert not any(dec["rules"].values()), r.reasons
    assert r.label == "non_covid"
    assert dec["hu_terms"]["lobar_consolidation"] == 0.0 and dec["hu_terms"]["covid_typical"] == 0.0
