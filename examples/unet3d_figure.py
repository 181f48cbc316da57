"""Figure of docs/segmentation.md's 3D U-Net section: mid axial and coronal slices of cip-ct64
(manual mask) and covid-ct-md/normal-normal001 (held out; hybrid teacher), reference contour green,
3D U-Net (bundle lungs3d_fp32.onnx) red.

    .venv/bin/python examples/unet3d_figure.py [--data ../shared/data] [--out docs/segmentation/unet3d.png]
"""
import argparse
import warnings
from pathlib import Path

import cv2
import numpy as np

from sdk.io import load_series
from sdk.lungs import segment
from sdk.lungs.nrrd import read_nrrd
from sdk.lungs.unet3d import segment_unet3d
from sdk.paths import shared_data_root

REPO = Path(__file__).resolve().parents[1]


def panel(hu, ref, pred, size=256):
    g = np.clip((hu.astype(np.float32) + 1000) / 1400, 0, 1)
    img = cv2.cvtColor((g * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    for m, col in ((ref, (0, 200, 0)), (pred, (0, 0, 255))):
        mm = cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        cs, _ = cv2.findContours(mm, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, cs, -1, col, 1)
    return img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(shared_data_root()))
    ap.add_argument("--out", default=str(REPO / "docs" / "segmentation" / "unet3d.png"))
    a = ap.parse_args()
    data = Path(a.data)
    rows = []
    warnings.simplefilter("ignore")
    for name in ("cip-ct64", "covid-ct-md/normal-normal001"):
        v = load_series(data / "dicom" / name)
        if name == "cip-ct64":
            ref = read_nrrd(data / "volumes" / "cip-copd-ct64" / "wholeLung-64.nrrd").data > 0
        else:
            ref = segment(v, "hybrid").mask
        pred = segment_unet3d(v).mask
        z = v.shape[0] // 2
        y = v.shape[1] // 2
        cor = lambda a: a[::-1, y, :]  # noqa: E731 (head up)
        rows.append(np.concatenate([panel(v.hu[z], ref[z], pred[z]), panel(cor(v.hu), cor(ref), cor(pred))], 1))
    img = np.concatenate(rows, 0)
    for k, t in enumerate(("cip-ct64 vs manual", "normal001 (held out) vs hybrid")):
        cv2.putText(img, t, (4, 14 + 256 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(a.out, img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(a.out)


if __name__ == "__main__":
    main()
