"""sdk.heatmap: class-discriminative CAM, up-sampling rule, masking, PNG overlays."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import zoom

from sdk.errors import ConfigError
from sdk.heatmap import discriminative_cam, overlay, slice_heatmap, upsample_cam, window_to_unit, write_png


def test_discriminative_cam_two_and_three_classes() -> None:
    rng = np.random.default_rng(0)
    cam2 = rng.normal(size=(2, 7, 7))
    np.testing.assert_allclose(discriminative_cam(cam2, 1), cam2[1] - cam2[0], atol=1e-6)
    np.testing.assert_allclose(discriminative_cam(cam2, 0), -(cam2[1] - cam2[0]), atol=1e-6)
    cam3 = rng.normal(size=(3, 7, 7))
    np.testing.assert_allclose(discriminative_cam(cam3, 2), cam3[2] - (cam3[0] + cam3[1]) / 2, atol=1e-6)
    with pytest.raises(ConfigError):
        discriminative_cam(cam2, 2)


@pytest.mark.parametrize("out_hw", [(224, 224), (512, 512), (400, 512), (7, 7)])
def test_upsample_equals_scipy_grid_mode(out_hw) -> None:
    g = np.random.default_rng(1).normal(size=(7, 7)).astype(np.float64)
    ref = zoom(g, (out_hw[0] / 7, out_hw[1] / 7), order=1, mode="nearest", grid_mode=True)
    np.testing.assert_allclose(upsample_cam(g, out_hw), ref, atol=1e-4)


def test_slice_heatmap_is_zero_outside_the_mask() -> None:
    cam = np.ones((2, 7, 7), np.float32)
    cam[1] += 2.0
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 5:40] = 1
    h = slice_heatmap(cam, 1, mask, (64, 64))
    assert np.all(h[mask == 0] == 0) and np.allclose(h[mask == 1], 2.0)
    with pytest.raises(ConfigError, match="shape"):
        slice_heatmap(cam, 1, mask, (32, 32))


def test_overlay_colours_only_positive_evidence_inside_mask(tmp_path) -> None:
    import cv2

    hu = np.full((32, 32), -850.0)
    grey = window_to_unit(hu, (-1350, 150))
    assert np.allclose(grey, (-850 + 1350) / 1500)
    heat = np.zeros((32, 32), np.float32)
    heat[:, 16:] = 1.0
    heat[:, :8] = -1.0
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, :] = 1
    img = overlay(grey, heat, mask)
    base = int(round(grey[0, 0] * 255))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert np.all(img[:8] == base)                       # outside the mask: grey
    assert np.all(img[8:24, :8] == base)                 # negative evidence: grey
    assert not np.all(img[8:24, 16:] == base)            # positive evidence inside: coloured
    p = write_png(tmp_path / "x" / "o.png", img)
    np.testing.assert_array_equal(cv2.imread(str(p)), img)
