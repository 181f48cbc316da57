"""The series decision: the XGBoost aggregator's margin plus fixed HU-opacity terms, and when to
say "indeterminate" instead of a class.

**Why a fixed rule and not a retrained model.** Only three labelled real HU series exist here
(COVID-CT-MD covid-P001, cap-cap001, normal-normal001); any weight fitted on them would be fitted
on the very series it is judged on. The aggregator (paper 001's XGBoost over 20 groups x K class
probabilities) is trained on simulated bags of 2D images, which carry no HU. So the HU evidence
(:mod:`sdk.opacity`) enters as a small number of **documented, hand-set logit terms** taken from
the radiological reading rules for COVID-19 pneumonia (typical: bilateral, peripheral, lower-zone
ground glass; atypical: lobar/segmental consolidation, unilateral disease; no opacity at all:
no pneumonia), added to the aggregator's logit of the positive class::

    logit_total = logit(P_xgb(covid)) + sum(HU terms)        P(covid) = sigmoid(logit_total)

Every contribution is reported in logit units: XGBoost's own exact per-feature contributions
(``pred_contribs``, TreeSHAP) for the 20 x K CNN group features, and each HU term. No weight or
bar was fitted; they were set by hand, the 0.5 % no-opacity bar after the three real series'
ground-glass fractions (0.42 / 0.99 / 2.65 %) had been seen - so the terms' effect on those
series is a consistency check, not evidence (docs/triage.md).

**Indeterminate** (``label="indeterminate"``, each firing rule adds a reason):

- ``few_slices``: fewer than ``min_slices`` (20) slices selected - the aggregator's 20 groups
  repeat slices and the series is barely covered;
- ``small_lungs``: segmented lung volume below ``min_lung_ml`` (1500 ml; an adult's lungs on an
  inspiration CT hold 4-7 l, so this means partial coverage or a failed segmentation);
- ``disagree``: the CNN and the HU evidence point in opposite directions, both clearly:
  ``|logit(P_xgb) - logit(threshold)| >= disagree_cnn`` (1.0) and ``|sum(HU terms)| >=
  disagree_hu`` (0.75) with opposite signs; or the CNN says covid (P_xgb >= threshold) while the
  lungs hold less than ``no_opacity_fraction`` (0.5 %) ground glass *and* less than 0.5 %
  consolidation ("a positive call with no opacity to show for it");
- ``near_threshold``: the final P(covid) within ``margin`` (0.05) of the series threshold.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = ["DecisionConfig", "Decision", "Condition", "hu_conditions", "condition_holds", "hu_terms", "decide",
           "INDETERMINATE"]

INDETERMINATE = "indeterminate"


@dataclass(frozen=True)
class DecisionConfig:
    """Constants of the HU terms and of the indeterminate rules (see the module docstring)."""

    # HU terms (logit units) and their conditions
    w_no_opacity: float = -0.75         # ggo_fraction < no_opacity_fraction
    no_opacity_fraction: float = 0.005
    w_lobar: float = -1.5               # largest consolidation component >= lobar_fraction of its lung
    lobar_fraction: float = 0.05
    w_unilateral: float = -0.75         # one lung involved (>= 1 %), bilateral_index < 0.25
    unilateral_index: float = 0.25
    w_typical: float = 1.0              # bilateral, peripheral, lower-zone ground glass
    typical_ggo_fraction: float = 0.02
    typical_bilateral: float = 0.5
    typical_peripheral: float = 0.6
    typical_lower: float = 0.5
    typical_ggo_share: float = 0.6
    # indeterminate rules
    min_slices: int = 20
    min_lung_ml: float = 1500.0
    disagree_cnn: float = 1.0
    disagree_hu: float = 0.75
    margin: float = 0.05


@dataclass
class Decision:
    """Outcome of :func:`decide`.

    Attributes:
        label: a class, or "indeterminate".
        probabilities: final class probabilities (positive class from ``logit_total``).
        p_cnn: the aggregator's P(positive) alone; ``logit_cnn`` its logit.
        hu_terms: {term: logit} of the HU rules (0.0 when a rule does not fire; empty without HU).
        logit_total: ``logit_cnn + sum(hu_terms)``.
        reasons: why the label is indeterminate (empty otherwise).
        rules: {rule: fired?} for every indeterminate rule.
        cnn_contributions: exact XGBoost contributions (logit) summed per class column and the bias.
    """

    label: str
    probabilities: Dict[str, float]
    p_cnn: float
    logit_cnn: float
    hu_terms: Dict[str, float]
    logit_total: float
    reasons: List[str] = field(default_factory=list)
    rules: Dict[str, bool] = field(default_factory=dict)
    cnn_contributions: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"p_cnn": round(self.p_cnn, 6), "logit_cnn": round(self.logit_cnn, 4),
                "hu_terms": {k: round(v, 4) for k, v in self.hu_terms.items()},
                "logit_total": round(self.logit_total, 4), "rules": dict(self.rules),
                "cnn_contributions": {k: round(v, 4) for k, v in self.cnn_contributions.items()}}


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


#: one condition of an HU term: (feature, measured value, comparison, bar)
Condition = Tuple[str, float, str, float]
_HOLDS = {"<": lambda v, b: v < b, ">=": lambda v, b: v >= b, "==": lambda v, b: v == b}


def hu_conditions(opacity: Mapping[str, Any], cfg: DecisionConfig = DecisionConfig()) -> Dict[str, List[Condition]]:
    """Every condition of every HU term (a term fires when all of its conditions hold), from a
    ``LungOpacity.to_dict()`` block: the rules of :func:`hu_terms`, readable with their margins."""
    p = opacity["pattern"]
    ggo = float(opacity["ggo_fraction"])
    return {
        "no_opacity": [("ggo_fraction", ggo, "<", cfg.no_opacity_fraction)],
        "lobar_consolidation": [("largest_consolidation_fraction", float(p["largest_consolidation_fraction"]), ">=",
                                 cfg.lobar_fraction)],
        "unilateral": [("involved_lungs", float(int(p["involved_lungs"])), "==", 1.0),
                       ("bilateral_index", float(p["bilateral_index"]), "<", cfg.unilateral_index)],
        "covid_typical": [("ggo_fraction", ggo, ">=", cfg.typical_ggo_fraction),
                          ("bilateral_index", float(p["bilateral_index"]), ">=", cfg.typical_bilateral),
                          ("peripheral_index", float(p["peripheral_index"]), ">=", cfg.typical_peripheral),
                          ("lower_index", float(p["lower_index"]), ">=", cfg.typical_lower),
                          ("ggo_share", float(p["ggo_share"]), ">=", cfg.typical_ggo_share)],
    }


def condition_holds(cond: Condition) -> bool:
    """Whether one :data:`Condition` holds."""
    _, value, op, bar = cond
    return _HOLDS[op](value, bar)


def hu_terms(opacity: Mapping[str, Any], cfg: DecisionConfig = DecisionConfig()) -> Dict[str, float]:
    """The HU logit terms from a ``LungOpacity.to_dict()`` block (0.0 where a rule does not fire)."""
    weights = {"no_opacity": cfg.w_no_opacity, "lobar_consolidation": cfg.w_lobar,
               "unilateral": cfg.w_unilateral, "covid_typical": cfg.w_typical}
    return {term: weights[term] if all(condition_holds(c) for c in conds) else 0.0
            for term, conds in hu_conditions(opacity, cfg).items()}


def decide(
    cnn_probs: Mapping[str, float],
    positive: str,
    threshold: float,
    *,
    opacity: Optional[Mapping[str, Any]] = None,
    n_slices: int,
    lung_ml: Optional[float],
    cnn_contributions: Optional[Mapping[str, float]] = None,
    cfg: DecisionConfig = DecisionConfig(),
) -> Decision:
    """Combine the aggregator's probabilities with the HU terms and apply the indeterminate rules.

    Args:
        cnn_probs: the aggregator's class probabilities.
        positive: the positive class ("covid").
        threshold: the bundle's series threshold on P(positive).
        opacity: ``LungOpacity.to_dict()`` (None: no HU terms, no HU disagreement rule).
        n_slices: number of selected slices.
        lung_ml: segmented lung volume in ml (None: the small-lungs rule cannot fire).
        cnn_contributions: optional exact XGBoost contributions to report.
    """
    p_cnn = float(cnn_probs[positive])
    l_cnn = _logit(p_cnn)
    terms = hu_terms(opacity, cfg) if opacity is not None else {}
    hu = float(sum(terms.values()))
    l_tot = l_cnn + hu
    p_tot = _sigmoid(l_tot)
    probs = _rescale(cnn_probs, positive, p_tot)
    cnn_rel = l_cnn - _logit(threshold)
    no_opacity = (opacity is not None and float(opacity["ggo_fraction"]) < cfg.no_opacity_fraction
                  and float(opacity["consolidation_fraction"]) < cfg.no_opacity_fraction)
    rules = {
        "few_slices": int(n_slices) < cfg.min_slices,
        "small_lungs": lung_ml is not None and float(lung_ml) < cfg.min_lung_ml,
        "disagree": bool(opacity is not None and (
            (abs(cnn_rel) >= cfg.disagree_cnn and abs(hu) >= cfg.disagree_hu and cnn_rel * hu < 0)
            or (p_cnn >= threshold and no_opacity))),
        "near_threshold": abs(p_tot - threshold) < cfg.margin,
    }
    reasons = []
    if rules["few_slices"]:
        reasons.append(f"few slices: {n_slices} selected (< {cfg.min_slices})")
    if rules["small_lungs"]:
        reasons.append(f"small lung volume: {float(lung_ml):.0f} ml (< {cfg.min_lung_ml:.0f} ml): partial coverage or failed segmentation")
    if rules["disagree"]:
        if p_cnn >= threshold and no_opacity:
            reasons.append(f"CNN and HU evidence disagree: CNN P({positive}) {p_cnn:.3f} >= {threshold:.3f} but the lungs show "
                           f"< {100 * cfg.no_opacity_fraction:.1f} % ground glass and consolidation")
        else:
            reasons.append(f"CNN and HU evidence disagree: CNN logit margin {cnn_rel:+.2f} vs HU terms {hu:+.2f}")
    if rules["near_threshold"]:
        reasons.append(f"P({positive}) {p_tot:.3f} within {cfg.margin:.2f} of the threshold {threshold:.3f}")
    if reasons:
        label = INDETERMINATE
    elif p_tot >= threshold:
        label = positive
    else:
        others = {k: v for k, v in probs.items() if k != positive}
        label = max(others, key=others.get) if others else positive
    return Decision(label=label, probabilities=probs, p_cnn=p_cnn, logit_cnn=l_cnn, hu_terms=terms, logit_total=l_tot,
                    reasons=reasons, rules=rules, cnn_contributions=dict(cnn_contributions or {}))


def _rescale(probs: Mapping[str, float], positive: str, p_pos: float) -> Dict[str, float]:
    """New P(positive); the other classes keep their relative shares of the rest."""
    rest = {k: float(v) for k, v in probs.items() if k != positive}
    total = sum(rest.values())
    out = {k: (v / total * (1.0 - p_pos) if total > 0 else (1.0 - p_pos) / max(1, len(rest))) for k, v in rest.items()}
    out[positive] = p_pos
    return {k: out[k] for k in probs}


def config_dict(cfg: DecisionConfig = DecisionConfig()) -> Dict[str, Any]:
    return asdict(cfg)
