"""Where does the HU "consolidation" of the COVID-CT-MD series lie? (issue 14, exploratory; nothing fitted)

For each series, every 2D connected component of `sdk.opacity`'s consolidation map (native slices,
8-connected) is called **wall-contact** when it comes within 2 pixels of dense tissue (> -300 HU)
*outside* the lung mask - chest wall, diaphragm, spleen, mediastinum: a mask that leaks into them,
or real subpleural consolidation - and **interior** otherwise (hilar vessels wider than the 7 mm
opening, round dense objects, consolidation inside the lung). Pixels of each kind are split by the
dataset's slice labels (labelled infected / clear; normal001 has none). A PNG shows the six slices
of each series with the most consolidation (red), ground glass (yellow) and the lung mask (green).

Second measurement, an experiment on the segmenter (not the product): the lung finishing steps fill
every in-plane hole of each closed lung (``sdk.lungs.classical._fill_holes_per_slice``), which
also turns the top of a diaphragm dome - soft tissue that a basal slice cuts as an island inside
the lung - into lung. For this run only, that step is swapped for a variant that leaves a hole
unfilled where its background is connected in 3D (6-connectivity) to the outside of the volume;
the script reports the lung voxels that would leave the mask and the slices they are on.

    .venv/bin/python examples/consolidation_contact.py --out runs/consolidation   # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from sdk.paths import shared_data_root

SERIES = {"covid-P001": 0, "cap-cap001": 55, "normal-normal001": None}   # name -> slice-label row


def _components(cons: np.ndarray, outside_dense: np.ndarray) -> List[Dict[str, Any]]:
    """(pixels, wall-contact?) of every 8-connected component of one slice's consolidation."""
    import cv2

    n, cc = cv2.connectedComponents(cons.astype(np.uint8), connectivity=8)
    near = np.ones((5, 5), np.uint8)   # within 2 pixels
    out = []
    for c in range(1, n):
        comp = (cc == c).astype(np.uint8)
        touch = bool((cv2.dilate(comp, near).astype(bool) & outside_dense).any())
        out.append({"pixels": int(comp.sum()), "wall_contact": touch})
    return out


def _fill_holes_3d_aware(original: Any) -> Any:
    """``original`` (the per-slice hole filling), minus the filled holes whose background is
    connected in 3D to the volume's outside (a dome continues into the abdomen; a hole inside the
    lung does not)."""
    import scipy.ndimage as ndi

    def fill(mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask, bool)
        filled = original(mask)
        holes = filled & ~mask
        if not holes.any():
            return filled
        lab, n = ndi.label(~mask)
        outside = np.zeros(n + 1, bool)
        for face in (lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]):
            outside[face] = True
        outside[0] = False
        return filled & ~(holes & outside[lab])

    return fill


def dome_experiment(vol: Any, seg: Any) -> Dict[str, Any]:
    """Lung voxels (and ml) the 3D-aware hole filling would remove from ``seg``'s mask."""
    import sdk.lungs.classical as classical
    from sdk.lungs import segment

    original = classical._fill_holes_per_slice
    classical._fill_holes_per_slice = _fill_holes_3d_aware(original)
    try:
        alt = segment(vol)
    finally:
        classical._fill_holes_per_slice = original
    per_slice = (seg.mask & ~alt.mask).reshape(seg.mask.shape[0], -1).sum(axis=1)
    top = sorted(int(k) for k in np.argsort(per_slice)[::-1][:6] if per_slice[k] > 0)
    return {"voxels_removed": int(per_slice.sum()), "voxels_added": int((alt.mask & ~seg.mask).sum()),
            "lung_ml": [round(float(seg.lung_volume_ml), 1), round(float(alt.lung_volume_ml), 1)],
            "top_slices": {k: int(per_slice[k]) for k in top}}


def _tile(hu: np.ndarray, label_map: np.ndarray, lung: np.ndarray, text: str) -> np.ndarray:
    import cv2

    grey = (np.clip((hu.astype(np.float32) + 1350.0) / 1500.0, 0.0, 1.0) * 255).astype(np.uint8)
    im = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    im[label_map == 2] = (0, 0, 255)
    im[label_map == 1] = (0, 220, 255)
    contours, _ = cv2.findContours(lung.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(im, contours, -1, (0, 255, 0), 1)
    cv2.putText(im, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2)
    return cv2.resize(im, (384, 384), interpolation=cv2.INTER_AREA)


def measure(name: str, row: Optional[int], data: Path, out: Path) -> Dict[str, Any]:
    import cv2

    from sdk.io import load_series
    from sdk.labels import align_slice_labels
    from sdk.lungs import segment
    from sdk.opacity import full_label_slice, measure_opacity

    vol = load_series(data / "dicom" / "covid-ct-md" / name)
    seg = segment(vol)
    op = measure_opacity(vol.hu, seg.labels, vol.spacing)
    nz = vol.hu.shape[0]
    infected = None
    if row is not None:
        labels = np.load(data / "dicom" / "covid-ct-md" / "labels" / "Slice-level-labels-updated-1.npy")
        infected = align_slice_labels(labels[row], nz, "reversed").astype(bool)
    px = {kind: {"clear": 0, "infected": 0, "all": 0} for kind in ("wall_contact", "interior")}
    for z in range(nz):
        cons = full_label_slice(op, z) == 2
        if not cons.any():
            continue
        outside_dense = (seg.labels[z] == 0) & (vol.hu[z] > -300)
        for comp in _components(cons, outside_dense):
            kind = "wall_contact" if comp["wall_contact"] else "interior"
            px[kind]["all"] += comp["pixels"]
            if infected is not None:
                px[kind]["infected" if infected[z] else "clear"] += comp["pixels"]
    frac = np.nan_to_num(op.slice_consolidation_fraction)
    top = sorted(int(k) for k in np.argsort(frac)[::-1][:6])
    tiles = [_tile(vol.hu[k], full_label_slice(op, k), seg.labels[k] > 0, f"{k}: cons {frac[k]:.3f}") for k in top]
    png = out / f"consolidation_{name}.png"
    cv2.imwrite(str(png), np.vstack([np.hstack(tiles[:3]), np.hstack(tiles[3:6])]))
    total = px["wall_contact"]["all"] + px["interior"]["all"]
    return {"series": name, "consolidation_fraction": op.consolidation_fraction, "pixels": px,
            "wall_contact_share": px["wall_contact"]["all"] / max(total, 1), "top_slices": top, "png": str(png),
            "dome_experiment": dome_experiment(vol, seg)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=shared_data_root(), help="the shared data folder (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("runs/consolidation"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [measure(name, row, args.data, args.out) for name, row in SERIES.items()]
    (args.out / "consolidation_contact.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        p = r["pixels"]
        print(f"{r['series']}: consolidation {100 * r['consolidation_fraction']:.2f} % of lung; wall-contact "
              f"{100 * r['wall_contact_share']:.0f} % of its pixels; wall-contact clear/infected "
              f"{p['wall_contact']['clear']}/{p['wall_contact']['infected']}, interior clear/infected "
              f"{p['interior']['clear']}/{p['interior']['infected']} px; slices {r['top_slices']} -> {r['png']}")
        d = r["dome_experiment"]
        print(f"  3D-aware hole filling: {d['voxels_removed']} lung voxels removed ({d['voxels_added']} added), "
              f"lung {d['lung_ml'][0]} -> {d['lung_ml'][1]} ml; most on slices {d['top_slices']}")


if __name__ == "__main__":
    main()
