"""The grey->HU estimate of 8-bit CT images (sdk.train.hu_estimate) against known windows, and the
HU re-rendering / real-slice inputs against the runtime's own classifier-input builder."""
from __future__ import annotations

import numpy as np
import pytest

from sdk.train import hu_estimate as H
from sdk.train.real_slices import render_inputs
from sdk.volume.resample import LUNG_WINDOW, classifier_inputs

from conftest import shared_path


def chest_hu(size: int = 256, seed: int = 0) -> tuple:
    """A chest-like HU slice: air outside, a body ellipse (muscle + fat ring), two lungs at -850
    with noise and vessels; returns (hu, lung mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    c = size / 2
    hu = np.full((size, size), -1000.0)
    body = ((xx - c) / (0.45 * size)) ** 2 + ((yy - c) / (0.33 * size)) ** 2 <= 1
    inner = ((xx - c) / (0.41 * size)) ** 2 + ((yy - c) / (0.29 * size)) ** 2 <= 1
    hu[body] = -100.0                     # subcutaneous fat ring
    hu[inner] = 40.0                      # muscle / mediastinum
    lungs = np.zeros((size, size), bool)
    for sx in (-1, 1):
        lungs |= ((xx - c - sx * 0.19 * size) / (0.15 * size)) ** 2 + ((yy - c) / (0.22 * size)) ** 2 <= 1
    hu[lungs] = -850.0
    hu += rng.normal(0, 15, hu.shape)
    vessels = lungs & (rng.random(hu.shape) < 0.02)
    hu[vessels] = 30.0
    return hu.astype(np.float32), lungs.astype(np.uint8)


@pytest.mark.parametrize("window", [(-1350.0, 150.0), (-1250.0, 250.0), (-1100.0, 100.0), (-1400.0, 400.0)])
def test_estimate_recovers_a_known_window(window) -> None:
    hu, lungs = chest_hu()
    g = H.render_8bit(hu, window)
    est = H.estimate_hu_map(g, lungs)
    assert est.ok, est.reason
    # HU of grey -> true HU, evaluated at the lung and soft-tissue values (the anchors are physical
    # constants, the phantom's soft tissue is a -100 / +40 blend, so ~60 HU is the expected bias)
    w = window[1] - window[0]
    for h_true in (-850.0, -500.0, 0.0):
        g_true = (h_true - window[0]) / w
        assert abs(g_true * est.slope + est.intercept - h_true) < 80.0, (h_true, est)


def test_mediastinal_window_is_dropped_with_a_reason() -> None:
    hu, lungs = chest_hu()
    est = H.estimate_hu_map(H.render_8bit(hu, (-160.0, 240.0)), lungs)
    assert not est.ok and "lung peak saturated" in est.reason


def test_tiny_lung_mask_is_dropped() -> None:
    hu, _ = chest_hu()
    est = H.estimate_hu_map(H.render_8bit(hu, LUNG_WINDOW), np.zeros(hu.shape, np.uint8))
    assert not est.ok and "lung mask covers" in est.reason


def test_hu_rendering_goes_through_the_runtime_rule() -> None:
    """A square image re-rendered with the exact map = classifier_inputs on the same HU."""
    hu, lungs = chest_hu(200)
    est = H.HuEstimate(True, slope=1500.0, intercept=-1350.0, g_lung=0.33, g_soft=0.9)
    g = ((hu + 1350.0) / 1500.0).astype(np.float32)         # no clipping: exact inverse exists
    r_hu, r_mask = H.render_hu_image(g, lungs, est, 224)
    got = render_inputs(r_hu[None], r_mask[None], LUNG_WINDOW)
    ref = classifier_inputs(hu[None].astype(np.float64), lungs[None], [0], size=224, window=LUNG_WINDOW)
    np.testing.assert_allclose(got, ref, atol=2e-4)


def test_letterbox_pads_with_air_and_keeps_pixels() -> None:
    hu = np.arange(12, dtype=np.float32).reshape(3, 4)
    out, m = H.letterbox_hu(hu, np.ones((3, 4)))
    assert out.shape == (4, 4) and m.sum() == 12
    np.testing.assert_array_equal(out[3], -1000.0)           # (4 - 3) // 2 = 0 rows above, 1 below
    np.testing.assert_array_equal(out[:3], hu)


def test_estimate_on_real_dicom_rendered_with_random_windows() -> None:
    """lung-pet-ct-dx A0002 (30 uncompressed slices): the estimate's HU error at -850 and 0 HU."""
    from sdk.io import load_series
    from sdk.lungs import segment

    vol = load_series(shared_path("dicom", "lung-pet-ct-dx", "A0002-s2-8mm-B70f"))
    mask = np.asarray(segment(vol, method="classical").mask)
    frac = mask.reshape(len(mask), -1).mean(axis=1)
    idx = np.flatnonzero(frac > 0.05)[::4]
    assert idx.size >= 3
    res = H.validate_on_dicom([("A0002", np.asarray(vol.hu[i], np.float32), mask[i]) for i in idx], n_windows=3, seed=1)
    assert res["n_ok"] >= 0.8 * res["n"]
    assert res["abs_err_at_-850"]["median"] < 60 and res["abs_err_at_0"]["median"] < 150
    assert res["mae_hu"]["median"] < 100
