"""sdk.opacity: ground glass / consolidation fractions against phantoms built voxel by voxel, and
on the real COVID-CT-MD series against the radiologists' slice labels."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from sdk.errors import ConfigError
from sdk.opacity import CONSOLIDATION, GGO, LungOpacity, OpacityConfig, measure_opacity

NO_TRIM = OpacityConfig(base_exclusion=0.0, apex_exclusion=0.0)


def _lungs(shape, spacing):
    """Two ellipsoid lungs (label 1 = left = high x, 2 = right), lung tissue -850 HU + 15 HU noise."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    lab = np.zeros(shape, np.uint8)
    for v, cx in ((1, 0.70 * nx), (2, 0.30 * nx)):
        lab[((x - cx) / (0.17 * nx)) ** 2 + ((y - 0.5 * ny) / (0.32 * ny)) ** 2 + ((z - (nz - 1) / 2) / (0.55 * nz)) ** 2 <= 1] = v
    rng = np.random.default_rng(0)
    hu = np.where(lab > 0, -850.0, 40.0) + rng.normal(0, 15, shape)
    return hu, lab


def _disc(shape, zr, cy, cx, r):
    nz, ny, nx = shape
    _, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    m = ((y - cy) ** 2 + (x - cx) ** 2 <= r * r)
    out = np.zeros(shape, bool)
    out[zr[0]:zr[1]] = m[zr[0]:zr[1]]
    return out


@pytest.fixture(scope="module")
def phantom():
    """40 x 160 x 160 at 2.5 x 1.5 x 1.5 mm (stride 1): GGO in the left lower lung, consolidation in
    the right upper lung, vessels (3 mm tubes, along z and along x), an airway (9 mm air tube)."""
    shape, spacing = (40, 160, 160), (2.5, 1.5, 1.5)
    hu, lab = _lungs(shape, spacing)
    ggo = _disc(shape, (6, 16), 80, 112, 9) & (lab == 1)            # left, lower (z < middle)
    cons = _disc(shape, (26, 34), 70, 48, 7) & (lab == 2)           # right, upper
    hu[ggo] = -600 + np.random.default_rng(1).normal(0, 15, int(ggo.sum()))
    hu[cons] = -20 + np.random.default_rng(2).normal(0, 15, int(cons.sum()))
    vessel = np.zeros(shape, bool)
    for cy, cx in ((50, 100), (110, 120), (60, 40), (105, 30)):
        vessel |= _disc(shape, (0, 40), cy, cx, 1.0)
    vessel[20, 120:122, 20:140] = True                               # an in-plane vessel along x
    vessel &= lab > 0
    hu[vessel] = 40
    airway = _disc(shape, (10, 30), 95, 60, 3.0) & (lab == 2)
    hu[airway] = -1000
    return dict(hu=hu.astype(np.float32), lab=lab, spacing=spacing, ggo=ggo, cons=cons, vessel=vessel, airway=airway)


@pytest.fixture(scope="module")
def measured(phantom):
    return measure_opacity(phantom["hu"], phantom["lab"], phantom["spacing"], config=NO_TRIM)


def test_fractions_match_the_planted_volumes(phantom, measured):
    lab, spacing = phantom["lab"], phantom["spacing"]
    analysed = (lab > 0) & ~phantom["airway"]
    ml = np.prod(spacing) / 1000.0
    assert measured.grid["stride"] == [1, 1, 1]
    # reference: planted voxels / analysed lung voxels (the airway lumen leaves the denominator)
    assert measured.lung_ml == pytest.approx(analysed.sum() * ml, rel=0.01)
    assert measured.ggo_fraction == pytest.approx(phantom["ggo"].sum() / analysed.sum(), rel=0.05)
    assert measured.consolidation_fraction == pytest.approx(phantom["cons"].sum() / analysed.sum(), rel=0.05)
    assert measured.ggo_ml == pytest.approx(phantom["ggo"].sum() * ml, rel=0.05)
    assert measured.consolidation_ml == pytest.approx(phantom["cons"].sum() * ml, rel=0.05)
    # vessels are removed, not counted: they equal the planted tubes (+ nothing else dense)
    assert measured.removed["vessels_ml"] == pytest.approx(phantom["vessel"].sum() * ml, rel=0.1)
    assert measured.removed["airways_ml"] == pytest.approx(phantom["airway"].sum() * ml, rel=0.25)


def test_per_lung_and_zone_placement(phantom, measured):
    left, right = measured.per_lung["left"], measured.per_lung["right"]
    nl = ((phantom["lab"] == 1)).sum()
    assert left["ggo_fraction"] == pytest.approx(phantom["ggo"].sum() / nl, rel=0.05)
    assert left["consolidation_fraction"] == 0.0
    nr = ((phantom["lab"] == 2) & ~phantom["airway"]).sum()
    assert right["ggo_fraction"] < 1e-3
    assert right["consolidation_fraction"] == pytest.approx(phantom["cons"].sum() / nr, rel=0.05)
    zones = measured.per_zone
    lab = phantom["lab"]
    lower = np.zeros(lab.shape, bool)
    for v in (1, 2):  # reference: below the middle of each lung's z extent (z grows towards the head)
        zs = np.nonzero((lab == v).any(axis=(1, 2)))[0]
        lower[: int(np.ceil((zs[0] + zs[-1]) / 2))] |= (lab == v)[: int(np.ceil((zs[0] + zs[-1]) / 2))]
    n_lower = (lower & ~phantom["airway"]).sum()
    assert zones["lower"]["ggo_fraction"] == pytest.approx(phantom["ggo"].sum() / n_lower, rel=0.05)
    assert zones["upper"]["ggo_fraction"] < 1e-3
    assert zones["upper"]["consolidation_fraction"] > 0.005 and zones["lower"]["consolidation_fraction"] == 0.0
    p = measured.pattern
    # left ~2 % ground glass, right ~0.9 % consolidation: one lung reaches the 1 % "involved" bar
    assert p["bilateral_index"] == pytest.approx(right["opacity_fraction"] / left["opacity_fraction"], rel=1e-6)
    assert p["involved_lungs"] == 1
    assert p["consolidation_components"] == 1
    assert p["largest_consolidation_fraction"] == pytest.approx(phantom["cons"].sum() / (phantom["lab"] == 2).sum(), rel=0.1)


def test_peripheral_zone_against_scipy_distance(phantom, measured):
    """Independent reference: exact Euclidean distance (scipy) per slice, outer third of each lung."""
    lab = phantom["lab"]
    analysed = (lab > 0) & ~phantom["airway"]
    periph = np.zeros(lab.shape, bool)
    for z in range(lab.shape[0]):
        d = ndimage.distance_transform_edt(lab[z] > 0)
        for v in (1, 2):
            m = lab[z] == v
            if m.any():
                periph[z] |= m & (d <= d[m].max() / 3.0)
    ref = (analysed & periph).sum() * np.prod(phantom["spacing"]) / 1000.0
    assert measured.per_zone["peripheral"]["lung_ml"] == pytest.approx(ref, rel=0.03)
    assert measured.per_zone["peripheral"]["lung_ml"] + measured.per_zone["central"]["lung_ml"] == pytest.approx(measured.lung_ml)


def test_lobar_consolidation_and_unilateral_pattern():
    shape, spacing = (30, 120, 120), (2.5, 1.5, 1.5)
    hu, lab = _lungs(shape, spacing)
    big = (lab == 2) & _disc(shape, (5, 25), 60, 36, 14)
    hu[big] = 10
    op = measure_opacity(hu, lab, spacing, config=NO_TRIM)
    assert op.pattern["largest_consolidation_fraction"] == pytest.approx(big.sum() / (lab == 2).sum(), rel=0.05)
    assert op.pattern["largest_consolidation_fraction"] > 0.1
    assert op.pattern["involved_lungs"] == 1 and op.pattern["bilateral_index"] < 0.01
    assert op.pattern["ggo_share"] < 0.05


def test_clean_lungs_read_zero():
    hu, lab = _lungs((20, 100, 100), (2.5, 1.5, 1.5))
    op = measure_opacity(hu, lab, (2.5, 1.5, 1.5), config=NO_TRIM)
    assert op.ggo_fraction == 0.0 and op.consolidation_fraction == 0.0
    assert op.pattern["peripheral_index"] == 0.5 and op.pattern["involved_lungs"] == 0


def test_strided_grid_estimates_the_full_grid(phantom):
    """0.75 mm pixels -> stride 2 (a 1/4 sample, no averaging): within 10 % of the planted volume."""
    up = lambda a: np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)  # noqa: E731
    hu, lab = up(phantom["hu"]), up(phantom["lab"])
    op = measure_opacity(hu, lab, (2.5, 0.75, 0.75), config=NO_TRIM)
    assert op.grid["stride"] == [1, 2, 2]
    ml = 2.5 * 0.75 * 0.75 / 1000.0
    assert op.ggo_ml == pytest.approx(up(phantom["ggo"]).sum() * ml, rel=0.1)
    assert op.consolidation_ml == pytest.approx(up(phantom["cons"]).sum() * ml, rel=0.1)
    full = np.stack([op.full_slice(z) for z in range(hu.shape[0])])
    assert full.shape == hu.shape
    inter = ((full == GGO) & up(phantom["ggo"])).sum()
    assert inter / up(phantom["ggo"]).sum() > 0.9


def test_trim_and_binary_mask_and_errors(phantom):
    op = measure_opacity(phantom["hu"], phantom["lab"] > 0, phantom["spacing"], config=NO_TRIM)  # binary: split at the centroid
    assert op.per_lung["left"]["ggo_fraction"] > 0.01 and op.per_lung["right"]["ggo_fraction"] < 1e-3
    trimmed = measure_opacity(phantom["hu"], phantom["lab"], phantom["spacing"])
    assert trimmed.lung_ml < op.lung_ml
    json.dumps(trimmed.to_dict(), allow_nan=False)
    assert isinstance(trimmed, LungOpacity) and "label_map" not in trimmed.to_dict()
    with pytest.raises(ConfigError, match="empty"):
        measure_opacity(phantom["hu"], np.zeros_like(phantom["lab"]), phantom["spacing"])
    with pytest.raises(ConfigError, match="same 3-D shape"):
        measure_opacity(phantom["hu"][:-1], phantom["lab"], phantom["spacing"])


def test_integer_hu_reads_the_same_as_float_hu(phantom):
    """Integer HU is compared in its own dtype (thresholds rounded the exact way); the float path
    is the plain comparison - both must give the same map and numbers, also for fractional thresholds."""
    hu_int = np.round(phantom["hu"]).astype(np.int16)
    for cfg in (NO_TRIM, OpacityConfig(ggo_lo_hu=-750.5, dense_hu=-299.5, consolidation_max_hu=49.5, air_hu=-950.5,
                                       base_exclusion=0.0, apex_exclusion=0.0)):
        a = measure_opacity(hu_int, phantom["lab"], phantom["spacing"], config=cfg)
        b = measure_opacity(hu_int.astype(np.float32), phantom["lab"], phantom["spacing"], config=cfg)
        assert a.to_dict() == b.to_dict()
        assert np.array_equal(a.label_map, b.label_map)
    assert a.ggo_fraction > 0.005 and a.consolidation_fraction > 0.001


def _reference_rules(hu, lab, cfg, px):
    """Steps 1-3 of the module docstring slice by slice the plain way (stride 1, no trimming)."""
    import cv2

    a_px = max(1, int(round(cfg.airway_width_mm / px)))
    r_px = max(1, int(round(cfg.vessel_width_mm / 2.0 / px)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_px + 1, 2 * r_px + 1))
    label_map = np.zeros(hu.shape, np.uint8)
    n_analysed = n_vessel = n_airway = 0
    for z in range(hu.shape[0]):
        h, lung = hu[z], lab[z] > 0
        # pad each slice like the working layout (zero rows below) so the borders match
        pad = lambda m: np.pad(m.astype(np.uint8), ((0, 8), (0, 0)))
        unpad = lambda m: m[:h.shape[0]].astype(bool)
        airway = unpad(cv2.morphologyEx(pad(lung & (h < cfg.air_hu)), cv2.MORPH_OPEN, np.ones((a_px, a_px), np.uint8)))
        analysed = lung & ~airway
        dense = analysed & (h > cfg.dense_hu)
        opened = unpad(cv2.morphologyEx(pad(dense), cv2.MORPH_OPEN, disk))
        vessels = dense & ~opened
        rim = unpad(cv2.dilate(pad(vessels | airway), np.ones((3, 3), np.uint8)))
        ggo = analysed & (h >= cfg.ggo_lo_hu) & ~dense & ~rim
        ggo = unpad(cv2.morphologyEx(pad(ggo), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)))
        label_map[z][ggo] = GGO
        label_map[z][opened & (h <= cfg.consolidation_max_hu)] = CONSOLIDATION
        n_analysed += int(analysed.sum()); n_vessel += int(vessels.sum()); n_airway += int(airway.sum())
    return label_map, n_analysed, n_vessel, n_airway


def test_rules_match_a_plain_per_slice_reference(phantom):
    """On a 1.8 mm grid (2 px airway square: an even kernel) the working-grid implementation gives
    the same voxels as the rules applied slice by slice with plain NumPy / float thresholds."""
    spacing = (2.5, 1.8, 1.8)
    hu, lab = np.round(phantom["hu"]).astype(np.int16), phantom["lab"]
    hu[_disc(hu.shape, (5, 35), 80, 75, 5)] = -1000        # air across the right lung's medial edge
    op = measure_opacity(hu, lab, spacing, config=NO_TRIM)
    assert op.grid["stride"] == [1, 1, 1]
    ref, n_analysed, n_vessel, n_airway = _reference_rules(hu.astype(np.float64), lab, NO_TRIM, 1.8)
    got = np.stack([op.full_slice(z) for z in range(hu.shape[0])])
    assert np.array_equal(got, ref)
    ml = 2.5 * 1.8 * 1.8 / 1000.0
    assert op.lung_ml == pytest.approx(n_analysed * ml)
    assert op.removed["vessels_ml"] == pytest.approx(n_vessel * ml)
    assert op.removed["airways_ml"] == pytest.approx(n_airway * ml)
    assert op.ggo_fraction == pytest.approx((ref == GGO).sum() / n_analysed)
    assert op.consolidation_fraction == pytest.approx((ref == CONSOLIDATION).sum() / n_analysed)


def test_joint_counts_equal_bincount():
    """The OpenCV joint histogram (chunked below float32's exact range) against np.bincount."""
    from sdk.opacity import _joint_counts

    rng = np.random.default_rng(3)
    shape = (140, 256, 256)                      # > 2**23 voxels: more than one chunk
    a = rng.integers(0, 3, shape, dtype=np.uint8)
    b = rng.integers(0, 2, shape, dtype=np.uint8)
    c = rng.integers(0, 3, shape, dtype=np.uint8)
    m = (rng.random(shape) < 0.7).view(np.uint8)
    got = _joint_counts((a, b, c), (3, 2, 3), m)
    code = (a.astype(np.int64) * 2 + b) * 3 + c
    ref = np.bincount(code[m.view(bool)], minlength=18).reshape(3, 2, 3)
    assert np.array_equal(got, ref)


# --- real series --------------------------------------------------------------------------------
def _auc(pos, neg):
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size))


def test_labelled_infected_slices_have_more_ground_glass(covid_p001):
    """COVID-CT-MD P001: per-slice ground-glass fraction, slices labelled infected vs the rest.

    The label arrays run in InstanceNumber order (superior -> inferior here), i.e. *reversed*
    against ascending slice location (docs/triage.md: the lobe labels put RUL below RLL otherwise,
    and the within-series AUC is 0.31 the one way, 0.96 the other)."""
    from conftest import shared_path
    from sdk import lungs
    from sdk.io import load_series

    labels = np.load(shared_path("dicom", "covid-ct-md", "labels", "Slice-level-labels-updated-1.npy"))[0]
    vol = load_series(covid_p001)
    seg = lungs.segment(vol)
    op = measure_opacity(vol.hu, seg.labels, vol.spacing)
    n = vol.shape[0]
    y = labels[:n][::-1]
    s = op.grid["stride"][1]
    lung = (seg.labels[:, ::s, ::s] > 0).sum(axis=(1, 2)).astype(float)
    lung = lung[:, ] if lung.shape[0] == n else lung
    ggo = (op.label_map == GGO).sum(axis=(1, 2)) / np.maximum(1, (seg.labels[:, op.origin[0]::s, op.origin[1]::s] > 0).sum(axis=(1, 2)))
    big = lung >= 0.25 * lung.max()
    auc = _auc(ggo[big & (y == 1)], ggo[big & (y == 0)])
    assert auc >= 0.85, auc
    assert op.per_lung["left"]["lung_ml"] > 1000 and op.per_lung["right"]["lung_ml"] > 1000


def test_a_lazy_cube_label_source_measures_the_same_as_the_full_labels():
    """The GPU path hands the 3D U-Net's label cube to the host opacity as CubeLabels (sampled only at
    the opacity grid's stride): every number and the label map equal those from the full volume."""
    from sdk.lungs.unet3d import CubeLabels, cube_geometry, labels_to_volume

    shape, spacing, n = (24, 192, 192), (2.0, 0.75, 0.75), 32
    g = cube_geometry(shape, np.arange(shape[0]) * spacing[0], spacing[1:], n=n)
    c = np.arange(n)
    cz, cy, cx = np.meshgrid(c, c, c, indexing="ij")
    cube = np.zeros((n, n, n), np.uint8)
    for v, x0 in ((1, 0.70 * n), (2, 0.30 * n)):
        cube[((cx - x0) / (0.17 * n)) ** 2 + ((cy - 0.5 * n) / (0.32 * n)) ** 2 + ((cz - n / 2) / (0.3 * n)) ** 2 <= 1] = v
    full = labels_to_volume(cube, g)
    rng = np.random.default_rng(4)
    hu = np.where(full > 0, -850.0, 40.0) + rng.normal(0, 15, shape)
    hu[8:14, 80:120, 120:150] = -550.0                                  # ground glass in the left lung
    for labels in (cube, (cube > 0).astype(np.uint8)):                   # split lungs, and a binary mask
        a = measure_opacity(hu, labels_to_volume(labels, g), spacing, config=NO_TRIM)
        b = measure_opacity(hu, CubeLabels(labels, g), spacing, config=NO_TRIM)
        assert a.grid["stride"][1] > 1                                  # the strided path is exercised
        assert json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)
        assert a.ggo_fraction > 0
        np.testing.assert_array_equal(a.label_map, b.label_map)
        np.testing.assert_array_equal(a.slice_ggo_fraction, b.slice_ggo_fraction)
    with pytest.raises(ConfigError, match="same 3-D shape"):
        measure_opacity(hu[:-1], CubeLabels(cube, g), spacing)


@pytest.mark.parametrize("workers", [2, 3, 7])
def test_slices_split_over_threads_measure_the_same(phantom, workers):
    """measure_opacity(workers=k) splits the slices into k runs (each OpenCV call starting at the
    previous slice's empty rows): every number, the label map and the per-slice arrays equal the
    one-run measurement, for split lungs, for a binary mask (split at the x centroid) and for lungs
    whose every slice reaches the first row of the box (where an OpenCV call starting at a slice
    instead of at the empty rows before it would see the image border)."""
    prism = np.repeat(phantom["lab"][20:21], phantom["lab"].shape[0], axis=0)   # every slice reaches the box's top row
    for lab in (phantom["lab"], phantom["lab"] > 0, prism):
        one = measure_opacity(phantom["hu"], lab, phantom["spacing"], config=NO_TRIM)
        many = measure_opacity(phantom["hu"], lab, phantom["spacing"], config=NO_TRIM, workers=workers)
        assert one.consolidation_fraction > 0 and one.ggo_fraction > 0 and one.removed["vessels_ml"] > 0
        assert json.dumps(one.to_dict(), sort_keys=True) == json.dumps(many.to_dict(), sort_keys=True)
        np.testing.assert_array_equal(one.label_map, many.label_map)
        for key in ("slice_ggo_fraction", "slice_consolidation_fraction", "slice_lung_voxels"):
            np.testing.assert_array_equal(getattr(one, key), getattr(many, key))
