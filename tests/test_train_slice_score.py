"""sdk.train.slice_score: the code behind the default bundle's ``slice_score`` manifest block.

- ``fit_logistic`` (IRLS with an L2 penalty on the weights) against an independent optimiser
  (SciPy's L-BFGS on the same penalised log-likelihood);
- ``apriori_block`` is what the shipped manifest holds (coefficients, transform, scale), and the
  runtime reads it;
- ``write_manifest`` writes the block and refuses one the runtime cannot read, leaving the file as it was.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize

from conftest import SDK_HOME
from sdk.errors import ConfigError
from sdk.slice_score import SliceScoreModel
from sdk.train.slice_score import APRIORI_REFERENCE, APRIORI_SCALE, apriori_block, fit_logistic, write_manifest

BUNDLE = SDK_HOME / "sdk" / "bundles" / "default"


def _penalised_nll(w: np.ndarray, X: np.ndarray, y: np.ndarray, ridge: float) -> float:
    z = w[0] + X @ w[1:]
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * ridge * len(X) * np.sum(w[1:] ** 2))


@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_fit_logistic_matches_an_independent_optimiser(ridge: float) -> None:
    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 3)) * np.array([2.0, 0.5, 1.0])
    true = np.array([-0.4, 1.2, -0.8, 0.3])
    y = (rng.random(400) < 1.0 / (1.0 + np.exp(-(true[0] + X @ true[1:])))).astype(float)
    got = fit_logistic(X, y, ridge=ridge)
    ref = minimize(_penalised_nll, np.zeros(4), args=(X, y, ridge), method="L-BFGS-B",
                   options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 10_000}).x
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert _penalised_nll(got, X, y, ridge) <= _penalised_nll(ref, X, y, ridge) + 1e-8


def test_fit_logistic_penalty_shrinks_the_weights_not_the_intercept() -> None:
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 2))
    y = (X[:, 0] + 0.5 * rng.normal(size=300) > 0.3).astype(float)
    loose, tight = fit_logistic(X, y, ridge=1e-6), fit_logistic(X, y, ridge=10.0)
    assert np.all(np.abs(tight[1:]) < 0.2 * np.abs(loose[1:]).max())
    # with the weights near 0 the intercept is the log-odds of the base rate
    assert tight[0] == pytest.approx(math.log(y.mean() / (1 - y.mean())), abs=0.05)


def test_apriori_block_is_the_shipped_rule_and_the_runtime_reads_it() -> None:
    block = apriori_block()
    shipped = json.loads((BUNDLE / "manifest.json").read_text())["slice_score"]
    for key in ("form", "transform", "scale", "p_clip", "missing_fraction", "coefficients"):
        assert shipped[key] == pytest.approx(block[key]), key
    # intercept = minus (CNN-neutral) the two HU terms at the no-opacity reference fraction
    assert block["coefficients"]["intercept"] == pytest.approx(-2.0 * math.log1p(APRIORI_REFERENCE / APRIORI_SCALE))
    model = SliceScoreModel.from_manifest(block)
    assert model is not None and model.transform == "log1p" and model.w_cnn == 1.0


def test_write_manifest_writes_the_block_and_refuses_a_broken_one(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(BUNDLE / "manifest.json", bundle / "manifest.json")
    before = json.loads((bundle / "manifest.json").read_text())
    block = apriori_block({"coefficients": {"intercept": 0.5}, "weight_x_sd": {"cnn_logit": 8.7},
                           "splits": {"val": {"ggo": 0.57}, "test": {"ggo": 0.53}, "train": {"cnn": {"auc": 0.98}}}})
    write_manifest(bundle, block)
    after = json.loads((bundle / "manifest.json").read_text())
    assert after["slice_score"] == json.loads(json.dumps(block))
    assert after["slice_score"]["option_a_check"]["ggo_auc_val"] == 0.57
    assert {k: v for k, v in after.items() if k != "slice_score"} == {k: v for k, v in before.items() if k != "slice_score"}
    text = (bundle / "manifest.json").read_text()
    broken = dict(block, coefficients={"intercept": 0.0, "cnn_logit": 1.0})
    with pytest.raises(ConfigError, match="coefficients"):
        write_manifest(bundle, broken)
    assert (bundle / "manifest.json").read_text() == text
