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


def test_robust_scale_ignores_hot_pixels_and_negative_evidence() -> None:
    from sdk.heatmap import robust_scale

    heats = [np.linspace(0, 1, 10000).reshape(100, 100).astype(np.float32) for _ in range(3)]
    heats[0][0, 0] = 1000.0                                 # one hot pixel
    heats[1][:50] = -5.0                                    # negative evidence does not count
    masks = [np.ones((100, 100), np.uint8)] * 3
    ref = np.percentile(np.concatenate([h[(h > 0)] for h in heats]), 99)
    assert robust_scale(heats, masks) == pytest.approx(ref)
    assert robust_scale(heats, masks) < 1.01
    assert robust_scale([np.full((4, 4), -1.0)], [np.ones((4, 4))]) is None


def test_opacity_overlay_colours_and_panel_layout() -> None:
    from sdk.heatmap import CONSOLIDATION_BGR, GGO_BGR, colour_bar, opacity_overlay, reading_panel

    grey = np.full((64, 64), 0.2, np.float32)
    lab = np.zeros((64, 64), np.uint8)
    lab[10:20, 10:20] = 1
    lab[40:50, 40:50] = 2
    img = opacity_overlay(grey, lab, None, alpha=1.0)
    assert tuple(img[15, 15]) == GGO_BGR and tuple(img[45, 45]) == CONSOLIDATION_BGR
    assert tuple(img[30, 30]) == (51, 51, 51)
    bar = colour_bar(384, 2.0)
    # top of the ramp is the top of JET (dark red), bottom dark blue
    assert bar[41, 18, 2] > 100 and bar[41, 18, 0] < 50 and bar[384 - 31, 18, 0] > 100
    panel = reading_panel(img.copy(), img.copy(), 2.0, "slice 3  z = -12.0 mm")
    assert panel.shape[0] == 34 + 384 and panel.shape[1] == 384 + 4 + 384 + bar.shape[1]
    single = reading_panel(img.copy(), None, None, "t")
    assert single.shape[1] == 384 + bar.shape[1]
