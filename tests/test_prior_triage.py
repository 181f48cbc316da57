"""``Triage.run(series, prior=...)`` end to end: the facade's hook calls sdk.prior.compare.

Phantom studies written as real DICOM: the prior is clean, the current one has new ground-glass
and consolidation blobs -> "worse". Skipped (with the reason) only when a runtime package the
default bundle needs is not installed; a Triage that fails to construct fails the test.
"""
from __future__ import annotations

import pytest

pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the default bundle's classifier)")
    pytest.importorskip("xgboost", reason="xgboost is not installed (the default bundle's aggregator)")
    from sdk.triage import Triage

    return Triage()


def test_triage_with_prior_reports_worse(engine, tmp_path):
    from sdk.phantom import write_phantom_series

    kw = dict(n_slices=48, size=192, spacing=(2.0, 1.8, 1.8), noise_hu=10.0)
    prior = write_phantom_series(tmp_path / "prior", seed=1, **kw)
    current = write_phantom_series(tmp_path / "current", seed=2, ground_glass=True, consolidation=True, **kw)
    result = engine.run([str(p) for p in current], prior=[str(p) for p in prior])
    cmp = result.prior
    assert cmp is not None and cmp["change"] == "worse", cmp
    assert cmp["lungs"]["left"]["change"] == "worse" and cmp["lungs"]["right"]["change"] == "worse"  # one blob each
    assert cmp["new_opacity_ml"] > 10 * max(cmp["resolved_opacity_ml"], 0.1)
    assert result.to_dict()["prior"]["summary"].startswith("worse")
    assert "prior" in result.timings_ms


if __name__ == "__main__":  # pragma: no cover - `python tests/test_prior_triage.py` prints the docs' numbers
    import tempfile
    import time

    from sdk.phantom import write_phantom_series
    from sdk.triage import Triage

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(n_slices=60, size=256, spacing=(2.0, 1.4, 1.4), noise_hu=10)
        write_phantom_series(f"{tmp}/prior", seed=1, **kw)
        write_phantom_series(f"{tmp}/cur", seed=2, ground_glass=True, consolidation=True, **kw)
        engine = Triage()
        t = time.time()
        r = engine.run(f"{tmp}/cur", prior=f"{tmp}/prior")
        print(f"{time.time() - t:.1f} s", r.prior["summary"], r.prior["registration"],
              {k: round(v) for k, v in r.timings_ms.items()})
