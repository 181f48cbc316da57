"""Mask-weighted GAP references vs independent constructions (OpenCV, SciPy, explicit sums)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sdk.errors import ConfigError
from sdk.pooling import area_pool, cam, gaussian_kernel3, mask_weights, masked_gap

RNG = np.random.default_rng(7)


def _ref_weights(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """cv2 INTER_AREA (integer factors) + scipy gaussian_filter(sigma 1, truncate 1, zero pad)."""
    import cv2

    out = []
    for m in mask[:, 0].astype(np.float32):
        a = cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA).astype(np.float64)
        s = ndimage.gaussian_filter(a, sigma=1.0, truncate=1.0, mode="constant", cval=0.0)
        out.append(s / s.sum() if s.sum() >= 1e-6 else np.full((h, w), 1.0 / (h * w)))
    return np.stack(out)[:, None]


def test_gaussian_kernel():
    g = gaussian_kernel3()
    assert g.shape == (3, 3) and abs(g.sum() - 1) < 1e-15
    assert np.isclose(g[1, 1] / g[0, 1], np.exp(0.5)) and np.isclose(g[0, 1] / g[0, 0], np.exp(0.5))


def test_mask_weights_match_cv2_and_scipy():
    mask = (RNG.random((4, 1, 224, 224)) > 0.6).astype(np.float32)
    mask[1] = 0.0  # empty -> uniform
    mask[2, :, :100] = 0.0
    got = mask_weights(mask, (7, 7))
    assert got.shape == (4, 1, 7, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, _ref_weights(mask, 7, 7), atol=1e-7)
    np.testing.assert_allclose(got.sum(axis=(2, 3)), 1.0, atol=1e-6)
    np.testing.assert_allclose(got[1], 1 / 49, atol=0)


def test_area_pool_fractional_matches_lcm_construction():
    m = RNG.random((2, 1, 13, 10))
    got = area_pool(m, (5, 4))
    fine = np.repeat(np.repeat(m, 5, axis=2), 2, axis=3)  # 65 x 20
    ref = fine.reshape(2, 1, 5, 13, 4, 5).mean(axis=(3, 5))
    np.testing.assert_allclose(got, ref, atol=1e-12)


def test_mask_weights_nonsquare_and_3d_input():
    mask = RNG.random((3, 30, 50))
    got = mask_weights(mask, (3, 5))
    ref = _ref_weights(mask[:, None], 3, 5)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_masked_gap_explicit_sum_fp32_and_fp16():
    f = RNG.normal(size=(3, 40, 7, 7)).astype(np.float32)
    w = mask_weights(RNG.random((3, 1, 224, 224)) > 0.5)
    ref = np.array([[sum(float(f[n, c, y, x]) * float(w[n, 0, y, x]) for y in range(7) for x in range(7))
                     for c in range(40)] for n in range(3)])
    np.testing.assert_allclose(masked_gap(f, w), ref, atol=1e-6)
    got16 = masked_gap(f.astype(np.float16), w)
    ref16 = np.einsum("nchw,nhw->nc", f.astype(np.float16).astype(np.float64), w[:, 0].astype(np.float64))
    np.testing.assert_allclose(got16, ref16, atol=1e-6)


def test_uniform_weights_are_plain_gap():
    f = RNG.normal(size=(2, 5, 4, 6))
    w = mask_weights(np.zeros((2, 1, 8, 12)), (4, 6))
    np.testing.assert_allclose(masked_gap(f, w), f.mean(axis=(2, 3)), atol=1e-6)


def test_cam_grid_mean_plus_bias_is_logit():
    f = RNG.normal(size=(2, 16, 7, 7)).astype(np.float32)
    w = mask_weights(RNG.random((2, 1, 56, 56)), (7, 7))
    W = RNG.normal(size=(3, 16))
    b = RNG.normal(size=3)
    maps = cam(f, w, W, b)
    logits = masked_gap(f, w).astype(np.float64) @ W.T + b
    np.testing.assert_allclose(maps.mean(axis=(2, 3)) + b, logits, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ConfigError, match="disagree"):
        masked_gap(np.zeros((2, 3, 7, 7)), np.zeros((2, 1, 6, 7)))
    with pytest.raises(ConfigError, match="fc_weight"):
        cam(np.zeros((1, 3, 2, 2)), np.ones((1, 1, 2, 2)), np.zeros((2, 4)))
    with pytest.raises(ConfigError, match="N, 1, H, W"):
        mask_weights(np.zeros((2, 3, 8, 8)))
