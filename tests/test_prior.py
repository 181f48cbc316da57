"""Prior-study comparison (sdk.prior): burden per lung, rigid registration, change labels.

References are independent of sdk.prior: the phantom's closed-form geometry (left lung = high x),
NumPy block means for the grid resampling, and the known motion applied to the prior.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import shared_path
from sdk.errors import ConfigError
from sdk.phantom import HU_LUNG, Opacity, make_phantom_hu
from sdk.prior import LEFT, RIGHT, PriorConfig, classify_change, compare, lung_labels, to_grid
from sdk.volume import Volume

SPACING = (5.0, 3.5, 3.5)
NZ, SIZE = 48, 96
# two new blobs in the patient's left lung (high x), one ground-glass, one consolidation-like
NEW_BLOBS = (Opacity((0.45, 0.45, 0.70), 26.0, -450.0), Opacity((0.68, 0.55, 0.68), 20.0, -150.0))


def _volume(hu: np.ndarray) -> Volume:
    dz, dy, dx = SPACING
    return Volume(hu=hu, z_mm=(np.arange(hu.shape[0]) + 0.5) * dz, pixel_spacing_mm=(dy, dx))


def _lung_mask(clean: np.ndarray) -> np.ndarray:
    """Ground-truth lungs of the noise-free, opacity-free phantom (parenchyma at exactly -850 HU)."""
    return ndi.binary_closing(clean == HU_LUNG, structure=np.ones((1, 5, 5), bool))


@pytest.fixture(scope="module")
def studies():
    clean = make_phantom_hu(NZ, SIZE, SPACING)
    mask = _lung_mask(clean)
    prior = make_phantom_hu(NZ, SIZE, SPACING, noise_hu=15.0, seed=1)
    current = make_phantom_hu(NZ, SIZE, SPACING, opacities=NEW_BLOBS, noise_hu=15.0, seed=2)
    planted = (make_phantom_hu(NZ, SIZE, SPACING, opacities=NEW_BLOBS) != clean) & mask
    return {"clean": clean, "mask": mask, "prior": prior, "current": current, "planted": planted}


def _moved(hu: np.ndarray, mask: np.ndarray, angle_deg: float, shift_vox):
    """The same patient repositioned: rotation about z (in-plane) and a whole-voxel shift.

    Nearest-neighbour resampling keeps every HU value (linear interpolation of 3.5 mm pixels would
    blur vessels and pleura, inventing partial-volume opacity that no rescan of the same lungs at
    the same resolution has - see the resolution caveat in docs/integration.md).
    """
    r_hu = ndi.rotate(hu, angle_deg, axes=(1, 2), reshape=False, order=0, cval=-1000)
    r_m = ndi.rotate(mask.astype(np.uint8), angle_deg, axes=(1, 2), reshape=False, order=0) > 0
    s_hu = ndi.shift(r_hu, shift_vox, order=0, cval=-1000)
    s_m = ndi.shift(r_m.astype(np.uint8), shift_vox, order=0) > 0
    return np.rint(s_hu).astype(np.int16), s_m


def test_new_opacities_are_worse(studies, tmp_path):
    s = studies
    prior_hu, prior_mask = _moved(s["prior"], s["mask"], 3.0, (1, 3, -2))
    png = tmp_path / "diff.png"
    r = compare(_volume(s["current"]), s["mask"], _volume(prior_hu), prior_mask, heatmap_path=png)
    assert r.change == "worse"
    assert r.lungs["left"]["change"] == "worse" and r.lungs["right"]["change"] == "stable"
    # independent reference: the burden by the phantom's geometry (left lung = x above the midline)
    vox_ml = np.prod(SPACING) / 1000.0
    left = s["mask"] & (np.arange(SIZE) >= SIZE // 2)[None, None, :]
    ref_cur = ((s["current"] > -700) & left).sum() / left.sum()
    assert r.lungs["left"]["current_burden"] == pytest.approx(ref_cur, abs=1e-12)
    assert r.lungs["left"]["current_volume_ml"] == pytest.approx(left.sum() * vox_ml)
    planted_ml = s["planted"].sum() * vox_ml
    assert r.lungs["left"]["current_opacity_ml"] - r.lungs["left"]["prior_opacity_ml"] == pytest.approx(planted_ml, rel=0.1)
    assert r.new_opacity_ml == pytest.approx(planted_ml, rel=0.3)  # on the 4 mm registered grid
    assert r.resolved_opacity_ml < 0.2 * planted_ml
    assert png.is_file() and png.stat().st_size > 1000
    d = r.to_dict()
    assert d["change"] == "worse" and d["heatmap_path"] == str(png) and "left lung" in d["summary"]
    assert d["thresholds"] == {"threshold_hu": -700.0, "stable_band": 0.03}


def test_resolved_opacities_are_improved(studies):
    s = studies
    r = compare(_volume(s["prior"]), s["mask"], _volume(s["current"]), s["mask"])
    assert r.change == "improved" and r.lungs["left"]["change"] == "improved"
    assert r.resolved_opacity_ml > 5 * max(r.new_opacity_ml, 1.0)


def test_series_compared_with_itself_is_stable(studies):
    v = _volume(studies["current"])
    r = compare(v, studies["mask"], v, studies["mask"])
    assert r.change == "stable"
    for lung in r.lungs.values():
        assert lung["delta"] == 0.0 and lung["change"] == "stable"
    assert r.new_opacity_ml == 0.0 and r.resolved_opacity_ml == 0.0
    assert r.registration["rotation_deg"] == [0.0, 0.0, 0.0] and r.registration["translation_mm"] == [0.0, 0.0, 0.0]


def test_rescan_of_unchanged_lungs_is_stable(studies):
    """New noise, new position: the same lungs must not be called worse or improved."""
    s = studies
    hu, m = _moved(make_phantom_hu(NZ, SIZE, SPACING, noise_hu=15.0, seed=7), s["mask"], -2.0, (-1, 2, 2))
    r = compare(_volume(s["prior"]), s["mask"], _volume(hu), m)
    assert r.change == "stable"
    assert all(abs(l["delta"]) < 0.01 for l in r.lungs.values())


def test_registration_recovers_known_rotation(studies):
    s = studies
    hu, m = _moved(s["clean"], s["mask"], 4.0, (0, 0, 0))
    r = compare(_volume(s["clean"]), s["mask"], _volume(hu), m)
    reg = r.registration
    assert 3.0 <= abs(reg["rotation_deg"][0]) <= 5.0, reg  # about z (the in-plane rotation)
    assert abs(reg["rotation_deg"][1]) < 1.0 and abs(reg["rotation_deg"][2]) < 1.0, reg
    assert max(abs(t) for t in reg["translation_mm"]) < 3.0, reg
    assert reg["dice"] > reg["dice_com"]


def test_to_grid_is_block_mean_and_interpolates_thick_slices():
    rng = np.random.default_rng(0)
    f = rng.random((8, 12, 12)).astype(np.float32)
    g, origin = to_grid(f, np.arange(8) * 1.0, (1.0, 1.0), 2.0)
    ref = f.reshape(4, 2, 6, 2, 6, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(g, ref, rtol=1e-6)
    assert origin.tolist() == [0.0, 0.0, 0.0]
    # 5 mm slices on a 2.5 mm grid: linear interpolation at cell centres (np.interp reference)
    col = np.repeat(np.repeat(f[:, :1, :1], 2, axis=1), 2, axis=2)  # constant in y, x
    g2, o2 = to_grid(col, np.arange(8) * 5.0, (1.25, 1.25), 2.5)
    centres = o2[0] + (np.arange(g2.shape[0]) + 0.5) * 2.5
    ref2 = np.interp(centres, np.arange(8) * 5.0, f[:, 0, 0])
    np.testing.assert_allclose(g2[:, 0, 0], ref2, rtol=1e-6)


def test_lung_labels_split_a_binary_mask():
    m = np.zeros((4, 20, 30), bool)
    m[:, 5:15, 2:10] = True    # low x: patient right
    m[:, 5:15, 18:28] = True   # high x: patient left
    lab = lung_labels(m)
    assert (lab[:, :, 18:28][m[:, :, 18:28]] == LEFT).all() and (lab[:, :, 2:10][m[:, :, 2:10]] == RIGHT).all()
    labelled = np.where(m, np.where(np.arange(30) >= 15, RIGHT, LEFT), 0)  # given labels are kept as is
    np.testing.assert_array_equal(lung_labels(labelled), labelled)


def _labels_whole_array(mask: np.ndarray) -> np.ndarray:
    """lung_labels' rule written with whole-array boolean masks (how it was first written): the
    slab-wise, count-based lung_labels must give exactly this."""
    lung = mask > 0
    xs = np.arange(mask.shape[2])

    def cx(m: np.ndarray) -> float:
        return float((m.sum(axis=(0, 1)) * xs).sum() / max(int(m.sum()), 1))

    lab, n = ndi.label(lung)
    a = b = None
    if n >= 2:
        sizes = np.bincount(lab.ravel())[1:]
        o = np.argsort(sizes)[::-1]
        if sizes[o[1]] >= 0.1 * sizes[o[0]]:
            a, b = lab == o[0] + 1, lab == o[1] + 1
            rest = lung & ~a & ~b
            if rest.any():
                near = np.abs(xs - cx(a)) <= np.abs(xs - cx(b))
                a, b = a | (rest & near), b | (rest & ~near)
    if a is None:
        c = cx(lung)
        a, b = lung & (xs < c), lung & (xs >= c)
    left, right = (a, b) if cx(a) > cx(b) else (b, a)
    out = np.zeros(mask.shape, np.uint8)
    out[left], out[right] = LEFT, RIGHT
    return out


def test_lung_labels_and_to_grid_fast_paths_are_exact():
    """The memory-lean paths (slab-wise lung_labels, the boolean block mean of to_grid) give the
    same values bit for bit as the whole-array formulation / to_grid's float path."""
    rng = np.random.default_rng(3)
    for t in range(24):
        shape = tuple(int(v) for v in rng.integers((9, 6, 6), (30, 40, 40)))
        if t % 3 == 0:    # two lungs, islands
            m = np.zeros(shape, bool)
            m[:, 1:-1, 1:shape[2] // 2 - 1] = True
            m[:, 2:-2, shape[2] // 2 + 1:-1] = t % 2 == 0
            m |= rng.random(shape) > 0.97
        elif t % 3 == 1:  # blobs
            m = ndi.gaussian_filter(rng.random(shape), 1.5) > 0.5
        else:             # dust
            m = rng.random(shape) > rng.uniform(0.6, 0.95)
        if t % 6 == 5:    # one block whose x centroid is a whole column (5.0): the split's tie
            m = np.zeros(shape, bool)
            m[1:-1, 1:-1, 2:9] = True
        for mask in (m, m.astype(np.uint8)):
            np.testing.assert_array_equal(lung_labels(mask), _labels_whole_array(mask))
        z = np.cumsum(rng.choice([0.7, 1.0, 2.0, 6.0], size=shape[0]))  # uneven, with empty and thick cells
        for g in (2.0, 4.0):
            fast, o1 = to_grid(m, z, (0.8, 1.3), g)
            ref, o2 = to_grid(m.astype(np.float32), z, (0.8, 1.3), g)
            assert fast.dtype == ref.dtype == np.float32
            np.testing.assert_array_equal(fast, ref)
            np.testing.assert_array_equal(o1, o2)


def test_change_thresholds():
    assert classify_change(0.031, 0.03) == "worse" and classify_change(-0.031, 0.03) == "improved"
    assert classify_change(0.03, 0.03) == "stable" and classify_change(0.0, 0.03) == "stable"
    with pytest.raises(ConfigError):
        classify_change(float("nan"), 0.03)
    with pytest.raises(ConfigError):
        PriorConfig(stable_band=-1)


def test_single_slice_prior_current_pairs_are_refused():
    """covid19-ny-sbu holds one slice per series: no volume, no registration, no burden - say so."""
    from sdk.io import load_series

    folder = shared_path("dicom", "covid19-ny-sbu", "A002304", "axial")
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == 2  # the prior and the current study, one axial slice each
    vols = [load_series(f) for f in files]
    assert {v.meta.study_uid for v in vols}.__len__() == 2
    masks = [np.asarray(v.hu) < -400 for v in vols]
    with pytest.raises(ConfigError, match="single slices cannot be registered"):
        compare(vols[1], masks[1], vols[0], masks[0])


def _report() -> None:  # pragma: no cover - `python tests/test_prior.py` prints the docs' numbers
    import time

    s = studies.__wrapped__() if hasattr(studies, "__wrapped__") else studies()
    vox = np.prod(SPACING) / 1000
    print(f"planted new opacity (inside lungs): {s['planted'].sum() * vox:.1f} ml")
    cases = {
        "new blobs, prior moved 3 deg + shift": (s["current"], s["mask"]) + _moved(s["prior"], s["mask"], 3.0, (1, 3, -2)),
        "same lungs rescanned, moved -2 deg": (s["prior"], s["mask"]) + _moved(
            make_phantom_hu(NZ, SIZE, SPACING, noise_hu=15.0, seed=7), s["mask"], -2.0, (-1, 2, 2)),
        "series vs itself": (s["current"], s["mask"], s["current"], s["mask"]),
        "blobs resolved (swapped)": (s["prior"], s["mask"], s["current"], s["mask"]),
        "clean, prior rotated 4 deg": (s["clean"], s["mask"]) + _moved(s["clean"], s["mask"], 4.0, (0, 0, 0)),
    }
    for name, (c, cm, p, pm) in cases.items():
        t = time.perf_counter()
        r = compare(_volume(c), cm, _volume(p), pm)
        L, R, reg = r.lungs["left"], r.lungs["right"], r.registration
        print(f"{name}: {r.change}; left {L['prior_burden'] * 100:.2f}% -> {L['current_burden'] * 100:.2f}% "
              f"({L['delta'] * 100:+.2f} pp), right {R['prior_burden'] * 100:.2f}% -> {R['current_burden'] * 100:.2f}% "
              f"({R['delta'] * 100:+.2f} pp); new {r.new_opacity_ml:.1f} ml, resolved {r.resolved_opacity_ml:.1f} ml; "
              f"rot {reg['rotation_deg']} deg, t {reg['translation_mm']} mm, {reg['evaluations']} evals; "
              f"{time.perf_counter() - t:.1f} s")


if __name__ == "__main__":  # pragma: no cover
    _report()
