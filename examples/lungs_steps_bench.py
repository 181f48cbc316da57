"""Lung finishing steps, old vs new code on the same arrays (process CPU ms, alternating rounds).

    .venv/bin/python examples/lungs_steps_bench.py --base /tmp/base [--rounds 7]

Needs the old package as ``<base>/sdk_base`` (see examples/side_by_side.py). Times the steps
outside ONNX Runtime that changed: per-slice hole filling, the hybrid in-plane reach dilation,
the whole ``finish_lungs`` and the lung-volume sums; checks the outputs are identical.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]
DATA = shared_data_root() / "dicom"


def cpu_ms(fn, rounds):
    out, ts = None, []
    for _ in range(rounds):
        c0 = time.process_time()
        out = fn()
        ts.append((time.process_time() - c0) * 1e3)
    return out, float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--series", default="covid-ct-md/covid-P001")
    a = ap.parse_args()
    sys.path.insert(0, str(a.base))
    import sdk_base.lungs as old_l  # type: ignore[import-not-found]
    import sdk_base.lungs.classical as old_c  # type: ignore[import-not-found]
    from scipy import ndimage as ndi

    import sdk.lungs as new_l
    import sdk.lungs.classical as new_c
    from sdk.io import load_series
    from sdk.lungs.unet2d import DEFAULT_ONNX
    from sdk.runtime.ort import OrtSession

    vol = load_series(DATA / a.series)
    sess = OrtSession(DEFAULT_ONNX, device="cpu", threads=2, precision="fp32")
    cfg = new_c.ClassicalConfig()
    _, cand, grid, _ = new_c.lung_candidates(vol.hu, vol.spacing, cfg)
    zs = np.nonzero(cand.any(axis=(1, 2)))[0]
    zr = (max(0, int(zs[0]) - 2), min(vol.hu.shape[0] - 1, int(zs[-1]) + 2))
    learned, _ = new_l._learned_small(vol, zr, sess, grid, {})
    reach = max(1, int(round(new_l.HYBRID_REACH_MM / grid.spacing[1])))
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = ndi.generate_binary_structure(2, 1)
    seg = new_l.segment(vol, "hybrid", session=sess)
    rows = []
    pairs = {
        "reach dilation": (lambda: ndi.binary_dilation(cand, structure=plane, iterations=reach), lambda: new_l._dilate_in_plane(cand, reach)),
        "fill holes (finish input)": (lambda: old_c._fill_holes_per_slice(learned | cand), lambda: new_c._fill_holes_per_slice(learned | cand)),
        "finish_lungs": (lambda: old_c.finish_lungs((learned & new_l._dilate_in_plane(cand, reach)) | cand, grid, cfg)[0],
                         lambda: new_c.finish_lungs((learned & new_l._dilate_in_plane(cand, reach)) | cand, grid, cfg)[0]),
        "lung volumes": (lambda: [old_l._volume_ml(m, vol.z_mm, vol.pixel_spacing_mm, 2.0) for m in (seg.mask, seg.labels == 1, seg.labels == 2)],
                         lambda: [new_l._volume_ml(c, vol.z_mm, vol.pixel_spacing_mm, 2.0) for c in (lambda mlr: (mlr[1] + mlr[2], mlr[1], mlr[2]))(new_l._mask_and_counts(seg.labels))]),
    }
    for name, (fo, fn) in pairs.items():
        fo(), fn()
        t_old, t_new = [], []
        for r in range(a.rounds):
            oo, to = cpu_ms(fo, 1)
            nn, tn = cpu_ms(fn, 1)
            t_old.append(to)
            t_new.append(tn)
        same = bool(np.array_equal(np.asarray(oo), np.asarray(nn)))
        mo, mn = float(np.median(t_old)), float(np.median(t_new))
        rows.append((name, mo, mn, mo / max(mn, 1e-9), same))
    print(f"{'step':28s} {'old cpu ms':>10s} {'new cpu ms':>10s} {'old/new':>8s} identical")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:10.1f} {r[2]:10.1f} {r[3]:8.2f} {r[4]}")


if __name__ == "__main__":
    main()
