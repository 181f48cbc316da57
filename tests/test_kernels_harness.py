"""The CUDA kernels' __host__ __device__ arithmetic, compiled by g++ (CPU harness), vs the NumPy
references: FP32 within 1e-5 (windowed / weights; 1e-5 relative for raw HU), FP16 within one
binary16 rounding, on awkward shapes (1 slice, 513×511, non-square, uneven z, empty mask)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from sdk.pooling import mask_weights, masked_gap
from sdk.volume.resample import classifier_inputs, resample_volume

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ on PATH: the CPU kernel harness needs a C++ compiler")

RNG = np.random.default_rng(99)
SEG = (-1000.0, 400.0)


@pytest.fixture(scope="module")
def harness():
    from sdk.kernels.harness import CpuHarness

    return CpuHarness()


def _hu(shape, dtype=np.int16):
    a = RNG.integers(-1024, 1800, size=shape)
    return a.astype(dtype)


def _uneven(n):
    return np.cumsum(np.r_[0.0, RNG.uniform(0.4, 2.2, size=n - 1)]) - 120.0


CASES = [
    # (shape, z, out_shape, isotropic, pixel spacing)
    ((1, 40, 33), np.array([12.5]), (4, 16, 16), False, None),
    ((1, 40, 33), np.array([12.5]), (8, 8, 8), True, (0.7, 0.9)),
    ((3, 513, 511), np.arange(3) * 1.25, (2, 224, 224), False, None),
    ((17, 30, 52), _uneven(17), (9, 16, 24), False, None),
    ((17, 30, 52), _uneven(17), (12, 12, 12), True, (1.3, 0.6)),
    ((6, 7, 5), np.arange(6.0), (11, 13, 9), False, None),  # up-sampling
]


@pytest.mark.parametrize("mode", ["linear", "area"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_resample_fp32_matches_reference(harness, mode, case):
    shape, z, out, iso, ps = CASES[case]
    hu = _hu(shape)
    kw = dict(out_shape=out, mode=mode, isotropic=iso, pixel_spacing_mm=ps, fill_hu=-1024)
    got = harness.resample(hu, z, window=SEG, **kw)
    ref = resample_volume(hu, z, window=SEG, **kw)
    assert got.shape == ref.shape == out and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    got_hu = harness.resample(hu, z, **kw)
    ref_hu = resample_volume(hu, z, **kw)
    np.testing.assert_allclose(got_hu, ref_hu, atol=1e-5 * 2048, rtol=0)  # 1e-5 of the HU range


@pytest.mark.parametrize("mode", ["linear", "area"])
def test_resample_float_input_and_half_output(harness, mode):
    hu = (RNG.normal(size=(9, 21, 34)) * 400 - 500).astype(np.float32)
    z = _uneven(9)
    kw = dict(out_shape=(5, 16, 20), mode=mode, isotropic=True, pixel_spacing_mm=(0.8, 0.8), window=SEG)
    ref = resample_volume(hu, z, **kw)
    np.testing.assert_allclose(harness.resample(hu, z, **kw), ref, atol=1e-5)
    half = harness.resample(hu, z, out_dtype="float16", **kw)
    assert half.dtype == np.float16
    # one binary16 rounding of a value within 1e-5 of the reference
    np.testing.assert_allclose(half.astype(np.float32), ref, rtol=2.0 ** -11, atol=1e-5)
    assert np.mean(half == ref.astype(np.float16)) > 0.99


@pytest.mark.parametrize("hw,size", [((513, 511), 224), ((40, 64), 224), ((31, 17), 8)])
def test_classifier_inputs_match_reference(harness, hw, size):
    hu = _hu((5,) + hw)
    mask = RNG.random((5,) + hw) > 0.4
    mask[2] = False
    idx = [4, 2, 0, 4]
    got = harness.classifier_inputs(hu, mask, idx, size)
    ref = classifier_inputs(hu, mask, idx, size)
    assert got.shape == ref.shape == (4, 3, size, size)
    np.testing.assert_allclose(got[:, 0], ref[:, 0], atol=1e-5)
    np.testing.assert_array_equal(got[:, 1], ref[:, 1])
    np.testing.assert_allclose(got[:, 2], ref[:, 2], atol=1e-5)


def test_classifier_inputs_float_volume(harness):
    hu = _hu((2, 50, 50), np.float32) + 0.25
    mask = np.ones(hu.shape, bool)
    np.testing.assert_allclose(harness.classifier_inputs(hu, mask, [1], 32),
                               classifier_inputs(hu, mask, [1], 32), atol=1e-5)


@pytest.mark.parametrize("hw,grid", [((224, 224), (7, 7)), ((30, 50), (3, 5)), ((513, 511), (7, 7)), ((5, 6), (7, 7))])
def test_mask_weights_match_reference(harness, hw, grid):
    mask = (RNG.random((4, 1) + hw) > 0.5).astype(np.float32)
    mask[1] = 0.0  # empty -> uniform
    mask[3] = RNG.random(hw)  # soft mask
    got = harness.mask_weights(mask, grid)
    ref = mask_weights(mask, grid)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[1], 1.0 / (grid[0] * grid[1]), atol=1e-7)


def test_mask_weights_read_channel_1_of_classifier_input(harness):
    hu = _hu((3, 64, 48))
    lung = RNG.random(hu.shape) > 0.7
    x = classifier_inputs(hu, lung, [0, 1, 2], 56)
    got = harness.mask_weights(x, (7, 7), channel=1)
    np.testing.assert_allclose(got, mask_weights(x[:, 1:2], (7, 7)), atol=1e-5)


@pytest.mark.parametrize("n,c,h,w", [(3, 1280, 7, 7), (1, 5, 14, 14), (2, 33, 1, 1), (4, 64, 3, 5)])
def test_masked_gap_fp32_fp16(harness, n, c, h, w):
    f = RNG.normal(size=(n, c, h, w)).astype(np.float32) * 3
    wts = mask_weights((RNG.random((n, 1, h * 4, w * 4)) > 0.5).astype(np.float32), (h, w))
    np.testing.assert_allclose(harness.masked_gap(f, wts), masked_gap(f, wts), atol=1e-5, rtol=0)
    f16 = f.astype(np.float16)
    # FP16 input, FP32 accumulation: same as the reference on the same FP16 values
    np.testing.assert_allclose(harness.masked_gap(f16, wts), masked_gap(f16, wts), atol=1e-5, rtol=0)


def test_half_conversions_match_numpy(harness):
    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    ours = harness.half_to_float(every)
    ref = every.astype(np.float32)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(ours[finite], ref[finite])
    assert np.all(np.isnan(ours[~finite]) == np.isnan(ref[~finite]))
    x = np.concatenate([
        RNG.normal(size=200_000).astype(np.float32) * np.float32(10.0) ** RNG.uniform(-9, 5.5, 200_000).astype(np.float32),
        np.array([0.0, -0.0, 65504, 65519.99, 65520, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0001, 2.0 ** -14,
                  np.inf, -np.inf], dtype=np.float32),
        (ref[finite] + np.float32(0)).astype(np.float32),
    ])
    with np.errstate(over="ignore"):
        expect = x.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(harness.float_to_half(x).view(np.uint16), expect)
