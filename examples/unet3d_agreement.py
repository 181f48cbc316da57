"""Why the 3D U-Net lungs disagree with the CPU path (issue 13's |dp| <= 0.02), measured on the CPU.

For each COVID-CT-MD series: P(covid) of the series decision with the lung mask of
- ``hybrid2d``: the CPU default (2D U-Net + classical candidates + finishing steps);
- ``unet3d``: the 3D U-Net at 128^3, up-sampled (what the GPU path's device lungs give);
- ``unet3d + hybrid slices`` / ``hybrid2d + unet3d slices``: one mask with the other's slice selection;
- ``hybrid with the 3D U-Net``: the hybrid pipeline with the 3D U-Net's mask (on the working grid) in
  place of the 2D U-Net's (an experiment: ``sdk.lungs._learned_small`` is swapped for this run only).
Everything else (classifier FP32 on ORT CPU, opacity of the hybrid mask, aggregator) is the product's.

    .venv/bin/python examples/unet3d_agreement.py      # ~1 min on 2 cores; needs ../shared/data
"""
from __future__ import annotations

import argparse
from typing import Any, Dict

import numpy as np

from sdk.paths import shared_data_root

DICOM = shared_data_root() / "dicom" / "covid-ct-md"
SERIES = ("covid-P001", "cap-cap001", "normal-normal001")


def series_p(engine: Any, volume: Any, mask: np.ndarray, indices: np.ndarray, ref_seg: Any) -> float:
    """P(covid) of the series decision for this mask and these slices (opacity of ``ref_seg``)."""
    from sdk.triage import _Timer

    probs, _ = engine._classify(volume.hu, mask, indices, _Timer())
    opacity = engine._opacity(volume, ref_seg, [])
    return float(engine._decide_series(probs, opacity, int(indices.size), float(ref_seg.lung_volume_ml)).probabilities["covid"])


def hybrid_with_unet3d(engine: Any, volume: Any, mask3d: np.ndarray) -> Any:
    """The hybrid segmenter with the 3D U-Net's mask as its learned part (nearest to the working grid)."""
    import cv2

    import sdk.lungs as lungs

    def learned(vol: Any, zr: Any, session: Any, grid: Any, timings: Dict[str, float], step_mm: Any = None, pre: Any = None):
        small = np.stack([cv2.resize(m.view(np.uint8), (grid.w, grid.h), interpolation=cv2.INTER_NEAREST) > 0 for m in mask3d])
        out = np.zeros_like(small)
        out[zr[0]:zr[1] + 1] = small[zr[0]:zr[1] + 1]
        return out, 0

    original = lungs._learned_small
    lungs._learned_small = learned
    try:
        return engine._segment(volume)
    finally:
        lungs._learned_small = original


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    import sdk
    from sdk.slices import select_slices

    cpu = sdk.Triage(heatmaps=False)
    u3 = sdk.Triage(heatmaps=False, lung_method="unet3d")
    dice = lambda a, b: 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())  # noqa: E731
    for name in SERIES:
        vol = cpu._load(DICOM / name)
        sh, s3 = cpu._segment(vol), u3._segment(vol)
        sx = hybrid_with_unet3d(cpu, vol, s3.mask)
        ih = np.asarray(select_slices(vol, sh.mask, lung_voxels=sh.slice_voxels).indices)
        i3 = np.asarray(select_slices(vol, s3.mask).indices)
        ix = np.asarray(select_slices(vol, sx.mask, lung_voxels=sx.slice_voxels).indices)
        ref = series_p(cpu, vol, sh.mask, ih, sh)
        rows = {"unet3d": series_p(cpu, vol, s3.mask, i3, sh),
                "unet3d mask + hybrid slices": series_p(cpu, vol, s3.mask, ih, sh),
                "hybrid mask + unet3d slices": series_p(cpu, vol, sh.mask, i3, sh),
                "hybrid with the 3D U-Net": series_p(cpu, vol, sx.mask, ix, sx)}
        print(f"{name}: hybrid2d P(covid) {ref:.4f}")
        for k, v in rows.items():
            print(f"  {k:30s} {v:.4f}  |dp| {abs(v - ref):.4f}")
        print(f"  mask Dice vs hybrid2d: unet3d {dice(sh.mask, s3.mask):.4f}, hybrid with the 3D U-Net {dice(sh.mask, sx.mask):.4f}")


if __name__ == "__main__":
    main()
