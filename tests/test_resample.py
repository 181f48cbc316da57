"""NumPy reference resampling vs independent implementations (SciPy, OpenCV, exact integrals, torch)."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import ndimage

from sdk.errors import ConfigError
from sdk.volume import Volume
from sdk.volume.resample import (
    LUNG_WINDOW,
    classifier_inputs,
    nearest_indices,
    resample,
    resample_volume,
    window_hu,
)

RNG = np.random.default_rng(1234)


def _rand_hu(shape):
    return RNG.integers(-1024, 1800, size=shape).astype(np.int16)


# --- independent references --------------------------------------------------------------------
def _uneven_z_coords(z: np.ndarray, n_out: int) -> np.ndarray:
    """Source coordinates of the output slices from the conventions' np.interp construction."""
    dz = np.median(np.diff(z)) if z.size > 1 else 1.0
    e = z[-1] - z[0] + dz
    t = z[0] - dz / 2 + (np.arange(n_out) + 0.5) * e / n_out
    return np.interp(t, z, np.arange(z.size))


def _uniform_coords(n_in: int, n_out: int) -> np.ndarray:
    return np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)


def _map_linear(vol: np.ndarray, cz, cy, cx) -> np.ndarray:
    g = np.meshgrid(cz, cy, cx, indexing="ij")
    return ndimage.map_coordinates(vol.astype(np.float64), g, order=1, mode="nearest")


def _exact_area_1d(x: np.ndarray, edges: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int,
                   fill: float = 0.0) -> np.ndarray:
    """Average of the piecewise-constant signal (fill outside) over [a, b): the integral of a
    piecewise-constant function is piecewise linear, so np.interp of the cumulative integral at the
    edges is exact."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    widths = np.diff(edges)
    cum = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x * widths, axis=-1)], axis=-1)

    def integral(p):
        inside = np.clip(p, edges[0], edges[-1])
        flat = cum.reshape(-1, cum.shape[-1])
        vals = np.stack([np.interp(inside, edges, row) for row in flat]).reshape(x.shape[:-1] + (p.size,))
        outside = np.minimum(p - edges[0], 0) + np.maximum(p - edges[-1], 0)
        return vals + fill * outside

    out = (integral(b) - integral(a)) / (b - a)
    return np.moveaxis(out, -1, axis)


def _block_area_1d(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Exact area rule for a uniform axis: repeat to the lcm grid, then block-average."""
    n_in = x.shape[axis]
    m = n_in * n_out // math.gcd(n_in, n_out)
    fine = np.repeat(np.asarray(x, dtype=np.float64), m // n_in, axis=axis)
    shape = list(fine.shape)
    shape[axis : axis + 1] = [n_out, m // n_out]
    return fine.reshape(shape).mean(axis=axis + 1)


# --- trilinear -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,out",
    [((7, 13, 11), (5, 17, 4)), ((1, 9, 10), (3, 4, 4)), ((12, 513, 511), (8, 224, 224)), ((4, 3, 2), (4, 3, 2))],
)
def test_trilinear_matches_scipy_zoom(shape, out):
    hu = _rand_hu(shape)
    got = resample_volume(hu, np.arange(shape[0]) * 2.5, out, mode="linear")
    assert got.dtype == np.float32 and got.shape == out
    ref = ndimage.zoom(hu.astype(np.float64), [o / i for o, i in zip(out, shape)], order=1,
                       mode="nearest", grid_mode=True)
    assert ref.shape == out
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)  # float32 HU: half an ulp at 2048 is 6e-5
    ref_mc = _map_linear(hu, *(_uniform_coords(i, o) for i, o in zip(shape, out)))
    np.testing.assert_allclose(got, ref_mc, atol=1e-4, rtol=0)


def test_trilinear_float_input_within_1e4():
    hu = RNG.normal(size=(6, 20, 30))
    got = resample_volume(hu, np.arange(6.0), (9, 7, 13))
    ref = _map_linear(hu, _uniform_coords(6, 9), _uniform_coords(20, 7), _uniform_coords(30, 13))
    assert np.abs(got - ref).max() < 1e-4


def test_trilinear_uneven_z_matches_np_interp_construction():
    z = np.cumsum(np.r_[0.0, RNG.uniform(0.6, 1.8, size=14)]) - 40.0
    hu = _rand_hu((15, 21, 19))
    got = resample_volume(hu, z, (11, 10, 12), mode="linear")
    ref = _map_linear(hu, _uneven_z_coords(z, 11), _uniform_coords(21, 10), _uniform_coords(19, 12))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_uniform_z_equals_uniform_formula():
    hu = _rand_hu((10, 8, 8))
    a = resample_volume(hu, 3.0 + 1.25 * np.arange(10), (7, 8, 8))
    b = resample_volume(hu, np.arange(10), (7, 8, 8))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_trilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    hu = RNG.normal(size=(9, 31, 17)).astype(np.float32)
    got = resample_volume(hu, np.arange(9.0), (5, 12, 40))
    ref = torch.nn.functional.interpolate(torch.from_numpy(hu)[None, None], size=(5, 12, 40),
                                          mode="trilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_isotropic_cube_fill_and_centre():
    # 20 slices of 2 mm (extent 40 mm) and 30 x 10 pixels of 1 mm: cube side 40 mm.
    hu = _rand_hu((20, 30, 10))
    z = 100.0 + 2.0 * np.arange(20)
    got = resample_volume(hu, z, (16, 16, 16), isotropic=True, pixel_spacing_mm=(1.0, 1.0), fill_hu=-1024)
    side = 40.0
    t = (np.arange(16) + 0.5) * side / 16  # cube coordinates from its low corner
    # z: cube == extent; y: extent 30 centred -> outside for |t - 20| > 15; x: extent 10 -> |t-20| > 5
    cz = np.interp(z[0] - 1.0 + t, z, np.arange(20))
    cy = np.clip(t - 5.0 - 0.5, 0, 29)
    cx = np.clip(t - 15.0 - 0.5, 0, 9)
    ref = _map_linear(hu, cz, cy, cx)
    out_y = np.abs(t - 20) > 15
    out_x = np.abs(t - 20) > 5
    ref[:, out_y, :] = -1024
    ref[:, :, out_x] = -1024
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert out_x.sum() == 12 and np.all(got[:, :, out_x] == -1024)


def test_isotropic_needs_pixel_spacing():
    with pytest.raises(ConfigError, match="pixel_spacing_mm"):
        resample_volume(_rand_hu((2, 4, 4)), [0.0, 1.0], isotropic=True)


# --- area ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,out", [((13, 26, 9), (5, 13, 4)), ((1, 513, 511), (1, 224, 100)), ((6, 5, 7), (9, 10, 3))])
def test_area_matches_exact_block_average(shape, out):
    hu = _rand_hu(shape)
    got = resample_volume(hu, np.arange(shape[0]) * 1.5, out, mode="area")
    ref = hu.astype(np.float64)
    for axis, n in enumerate(out):
        ref = _block_area_1d(ref, n, axis)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_area_integer_factor_matches_cv2_inter_area():
    cv2 = pytest.importorskip("cv2")
    img = RNG.normal(size=(1, 512, 384)).astype(np.float32)
    got = resample_volume(img, [0.0], (1, 128, 96), mode="area")[0]
    ref = cv2.resize(img[0], (96, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_area_uneven_z_matches_exact_integral():
    z = np.cumsum(np.r_[0.0, RNG.uniform(0.5, 2.0, size=16)])
    hu = _rand_hu((17, 6, 5))
    got = resample_volume(hu, z, (7, 6, 5), mode="area")
    dz = np.median(np.diff(z))
    edges = np.r_[z[0] - dz / 2, 0.5 * (z[1:] + z[:-1]), z[-1] + dz / 2]
    e = z[-1] - z[0] + dz
    a = z[0] - dz / 2 + np.arange(7) * e / 7
    ref = _exact_area_1d(hu, edges, a, a + e / 7, axis=0)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_out", [3, 6])
def test_area_isotropic_counts_fill_outside(n_out):
    hu = _rand_hu((4, 12, 6))  # 1 mm everywhere: cube side 12, x covers [3, 9) of it
    got = resample_volume(hu, np.arange(4.0), (n_out,) * 3, mode="area", isotropic=True,
                          pixel_spacing_mm=(1, 1), fill_hu=-1000)
    ref = hu.astype(np.float64)
    cell = 12.0 / n_out
    for axis, n_in in enumerate(hu.shape):
        edges = np.arange(n_in + 1.0) + (12 - n_in) / 2  # input edges in cube coordinates
        a = np.arange(n_out) * cell
        ref = _exact_area_1d(ref, edges, a, a + cell, axis, fill=-1000)
    if n_out == 6:  # x cells [0, 2) and [10, 12) lie wholly outside the input
        assert np.all(got[:, :, [0, -1]] == -1000)
    np.testing.assert_allclose(got, ref, atol=1e-4)


# --- windowing and classifier inputs -------------------------------------------------------------
def test_window_hu():
    hu = np.array([-2000, -1350, -600, 150, 3000], dtype=np.int16)
    np.testing.assert_allclose(window_hu(hu), [0, 0, 0.5, 1, 1], atol=1e-7)
    with pytest.raises(ConfigError):
        window_hu(hu, (100, 100))


def test_windowed_resample_is_window_of_resample():
    hu = _rand_hu((5, 40, 33))
    a = resample_volume(hu, np.arange(5.0), (3, 16, 16), window=LUNG_WINDOW)
    b = window_hu(resample_volume(hu, np.arange(5.0), (3, 16, 16)))
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("hw", [(513, 511), (40, 64)])
def test_classifier_inputs_channels(hw):
    hu = _rand_hu((6,) + hw)
    mask = RNG.random((6,) + hw) > 0.5
    idx = [5, 0, 3]
    x = classifier_inputs(hu, mask, idx, size=224)
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32
    for n, k in enumerate(idx):
        grey = ndimage.zoom(hu[k].astype(np.float64), (224 / hw[0], 224 / hw[1]), order=1,
                            mode="nearest", grid_mode=True)
        grey = np.clip((grey + 1350) / 1500, 0, 1)
        np.testing.assert_allclose(x[n, 0], grey, atol=1e-5)
        # nearest: floor(s + 0.5) of the clamped source coordinate
        ry = np.minimum(np.floor(_uniform_coords(hw[0], 224) + 0.5).astype(int), hw[0] - 1)
        rx = np.minimum(np.floor(_uniform_coords(hw[1], 224) + 0.5).astype(int), hw[1] - 1)
        m = mask[k][np.ix_(ry, rx)].astype(np.float32)
        np.testing.assert_array_equal(x[n, 1], m)
        np.testing.assert_allclose(x[n, 2], x[n, 0] * m, atol=0)


def test_nearest_matches_torch_nearest_exact():
    torch = pytest.importorskip("torch")
    for n_in, n_out in [(512, 224), (448, 224), (7, 10), (511, 224)]:
        x = torch.arange(n_in, dtype=torch.float32)[None, None]
        ref = torch.nn.functional.interpolate(x, size=n_out, mode="nearest-exact")[0, 0].numpy()
        np.testing.assert_array_equal(nearest_indices(n_in, n_out), ref.astype(np.int64))


def test_classifier_inputs_errors_name_the_problem():
    hu = _rand_hu((3, 8, 8))
    with pytest.raises(ConfigError, match="lung_mask shape"):
        classifier_inputs(hu, np.zeros((3, 8, 7)), [0])
    with pytest.raises(ConfigError, match="slice indices"):
        classifier_inputs(hu, np.zeros((3, 8, 8)), [3])
    with pytest.raises(ConfigError, match="strictly increasing"):
        resample_volume(hu, [0.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="3 slices"):
        resample_volume(hu, [0.0, 1.0])
    with pytest.raises(ConfigError, match="mode"):
        resample_volume(hu, [0.0, 1.0, 2.0], mode="cubic")


def test_volume_wrapper_isotropic():
    hu = _rand_hu((10, 16, 16))
    v = Volume(hu=hu, z_mm=np.arange(10) * 3.0, pixel_spacing_mm=(0.5, 0.5))
    got = resample(v, (8, 8, 8))
    ref = resample_volume(hu, v.z_mm, (8, 8, 8), isotropic=True, pixel_spacing_mm=(0.5, 0.5))
    np.testing.assert_array_equal(got, ref)


def test_runtime_speed_150x512x512_under_1s():
    hu = RNG.integers(-1024, 2000, size=(150, 512, 512), dtype=np.int16)
    z = np.arange(150) * 2.0
    best = min(_timed(lambda: resample_volume(hu, z, mode="area")) for _ in range(2))
    assert best < 1.0, f"area resample 150x512x512 -> 128^3 took {best:.2f} s"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@pytest.mark.parametrize("window", [LUNG_WINDOW, (-1000.0, 400.0), (-1000.5, 400.0)])
def test_window_hu_int16_equals_float64_formula(window):
    hu = np.arange(-32768, 32768, dtype=np.int64).astype(np.int16)
    lo, hi = window
    ref = np.clip((hu.astype(np.float64) - lo) / (hi - lo), 0, 1).astype(np.float32)
    np.testing.assert_array_equal(window_hu(hu, window), ref)


@pytest.mark.parametrize("shape,size", [((5, 512, 512), 224), ((3, 513, 511), 224), ((1, 64, 80), 224), ((2, 300, 200), 96)])
def test_classifier_inputs_fast_matches_reference(shape, size) -> None:
    """The runtime's OpenCV path equals the NumPy reference (same sample positions, float32)."""
    from sdk.volume.resample import classifier_inputs, classifier_inputs_fast

    rng = np.random.default_rng(7)
    hu = rng.integers(-1100, 1600, shape).astype(np.int16)
    mask = rng.random(shape) > 0.5
    idx = list(range(shape[0]))[::-1]
    ref = classifier_inputs(hu, mask, idx, size=size)
    got = classifier_inputs_fast(hu, mask, idx, size=size)
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, 1], ref[:, 1])
    assert np.abs(got - ref).max() <= 1e-5
