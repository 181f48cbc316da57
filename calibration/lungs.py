"""Build the INT8 2D lung U-Net into a bundle and gate it on Dice (issue 15).

    python -m sdk.calibration.lungs --bundle sdk/bundles/default [--data ../shared/data]

Writes ``lungs_int8.onnx`` beside the bundle's ``lungs_fp32.onnx``: static QDQ, per-channel QInt8
weights, QUInt8 activations, MinMax ranges (:mod:`sdk.calibration.quantize`), calibrated on
prepared seg2d slices of the *train* block only (never the val block [0, 260) nor the held-out
test block >= 1320). Then the gate:

- 3D Dice of the hybrid segmenter against the manual cip-ct64 mask
  (``volumes/cip-copd-ct64/wholeLung-64.nrrd``): INT8 >= FP32 - 0.005;
- mean per-slice Dice on the held-out seg2d test block: INT8 >= FP32 - 0.005;

and rebuilds the bundle with :func:`sdk.bundle.write_bundle` (every file kept and re-hashed, plus
``files.lungs_int8``: role "lungs", precision "int8") and a ``lungs_int8`` manifest block
(passed, the Dice numbers, the criteria, the command). A file that fails the gate is still
written, with ``passed: false``: ``lungs_precision="auto"`` never runs it. Which U-Net runs is
decided at run time by :mod:`sdk.lungs.int8`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import BundleError
from ..lungs.int8 import FILES_KEY, INT8_FILE, MANIFEST_KEY

COMMAND = "python -m sdk.calibration.lungs"
#: the gate: INT8 Dice may be at most this much below the FP32 U-Net's (one-sided)
MAX_CIP_DICE_DROP = 0.005
MAX_SEG2D_DICE_DROP = 0.005
CALIB_N = 96
CALIB_SEED = 0
CIP_SERIES = ("dicom", "cip-ct64")
CIP_MASK = ("volumes", "cip-copd-ct64", "wholeLung-64.nrrd")


# --- build -------------------------------------------------------------------------------------------
def calibration_slices(seg2d_dir: Path, n: int = CALIB_N, seed: int = CALIB_SEED) -> Tuple[np.ndarray, Dict[str, Any]]:
    """``n`` prepared (N, 1, 128, 128) seg2d slices drawn from the train block only, and their description."""
    from ..lungs.data import load_seg2d, split_blocks
    from ..lungs.unet2d import prepare_slices
    from ..train.seg import SegTrainConfig

    cfg = SegTrainConfig()
    nums, imgs, _ = load_seg2d(str(seg2d_dir))
    train = split_blocks(nums, cfg.val_block, cfg.test_block)["train"]
    pick = np.sort(np.random.default_rng(seed).choice(train, size=min(n, train.size), replace=False))
    x = prepare_slices(imgs[pick].astype(np.float32) / 255.0)
    desc = {"data": "seg2d", "split": "train", "n": int(pick.size), "seed": int(seed), "train_block_size": int(train.size),
            "excluded_blocks": {"val": list(cfg.val_block), "test": list(cfg.test_block)},
            "file_numbers": [int(v) for v in nums[pick]]}
    return x, desc


def build_int8(fp32: Path, out: Path, x_calib: np.ndarray, work: Path) -> Path:
    """Static QDQ INT8 of ``fp32`` (MinMax, per-channel) with sdk.calibration.quantize's steps."""
    from .quantize import calibrate_ranges, prepare, quantize

    prepped, _ = prepare(fp32, work / "lungs_prep.onnx")
    ranges = calibrate_ranges(prepped, x_calib, "minmax", work / "lungs_ranges.json")
    return quantize(prepped, out, "minmax", [], ranges,
                    metadata={"model": "unet2d_lung", "calibration_data": "seg2d train block", "calibration_n": len(x_calib)})


# --- gate --------------------------------------------------------------------------------------------
def evaluate_gate(fp32: Path, int8: Path, data_root: Path, threads: int = 2) -> Dict[str, Any]:
    """The Dice numbers of both U-Nets (see the module docstring) and whether INT8 passes."""
    from ..io import load_series
    from ..runtime.ort import OrtSession
    from ..lungs import segment
    from ..lungs.data import load_seg2d, split_blocks
    from ..lungs.evaluate import dice
    from ..lungs.nrrd import read_nrrd
    from ..lungs.unet2d import segment_slices_2d
    from ..train.seg import SegTrainConfig

    sessions = {"fp32": OrtSession(fp32, device="cpu", threads=threads, precision="fp32"),
                "int8": OrtSession(int8, device="cpu", threads=threads, precision="int8")}
    cip = load_series(data_root.joinpath(*CIP_SERIES))
    ref = read_nrrd(data_root.joinpath(*CIP_MASK)).data > 0
    masks = {p: segment(cip, "hybrid", session=s).mask for p, s in sessions.items()}
    cip_d = {p: dice(m, ref) for p, m in masks.items()}
    cfg = SegTrainConfig()
    nums, imgs, refm = load_seg2d(str(data_root / "seg2d"))
    idx = split_blocks(nums, cfg.val_block, cfg.test_block)["test"]
    grey, refm = imgs[idx].astype(np.float32) / 255.0, refm[idx].astype(bool)
    s2d = {p: float(np.mean([dice(a, b) for a, b in zip(segment_slices_2d(grey, s), refm)])) for p, s in sessions.items()}
    cip_ok = cip_d["int8"] >= cip_d["fp32"] - MAX_CIP_DICE_DROP
    s2d_ok = s2d["int8"] >= s2d["fp32"] - MAX_SEG2D_DICE_DROP
    return {
        "passed": bool(cip_ok and s2d_ok),
        "dice": {
            "cip_ct64": {"fp32": round(cip_d["fp32"], 5), "int8": round(cip_d["int8"], 5),
                         "delta": round(cip_d["int8"] - cip_d["fp32"], 5), "passed": bool(cip_ok),
                         "int8_vs_fp32_mask": round(dice(masks["int8"], masks["fp32"]), 5)},
            "seg2d_test_mean": {"fp32": round(s2d["fp32"], 5), "int8": round(s2d["int8"], 5),
                                "delta": round(s2d["int8"] - s2d["fp32"], 5), "passed": bool(s2d_ok), "n": int(idx.size)},
        },
        "criteria": {"cip_ct64": f"3D Dice of the hybrid segmenter vs the manual mask (wholeLung-64.nrrd): int8 >= fp32 - {MAX_CIP_DICE_DROP}",
                     "seg2d_test_mean": f"mean per-slice Dice on the held-out seg2d test block (numbers >= {cfg.test_block[0]}): "
                                        f"int8 >= fp32 - {MAX_SEG2D_DICE_DROP}",
                     "max_cip_dice_drop": MAX_CIP_DICE_DROP, "max_seg2d_dice_drop": MAX_SEG2D_DICE_DROP},
    }


# --- bundle ------------------------------------------------------------------------------------------
def add_to_bundle(bundle_dir: Path, int8_path: Path, block: Dict[str, Any]) -> Any:
    """Rebuild ``bundle_dir`` (:func:`sdk.bundle.write_bundle`): every file kept, plus or replacing
    ``lungs_int8`` (role "lungs", precision "int8"), and the manifest block ``lungs_int8``."""
    import shutil

    from ..bundle import load_bundle, write_bundle

    old = load_bundle(bundle_dir)  # verified: a changed file is refused, never re-hashed silently
    meta = dict(old.manifest)
    meta[MANIFEST_KEY] = block
    meta.setdefault("provenance", {})["lungs_int8"] = block.get("command", COMMAND)
    with tempfile.TemporaryDirectory() as tmp:
        files: Dict[str, Tuple[str, str, str]] = {}
        for name, bf in old.files.items():
            if name == FILES_KEY:
                continue
            dst = Path(tmp) / bf.path
            shutil.copyfile(old.root / bf.path, dst)
            files[name] = (str(dst), bf.role, bf.precision)
        dst = Path(tmp) / INT8_FILE
        shutil.copyfile(int8_path, dst)
        files[FILES_KEY] = (str(dst), "lungs", "int8")
        # the lungs_int8 block was measured here, on this file (a re-run that replaces the file under
        # the same name and version is refused by write_bundle: a bundle with other models needs a new version)
        return write_bundle(bundle_dir, files, meta, overwrite=True, remeasured=[MANIFEST_KEY])


def quantize_bundle(bundle_dir: Path, data_root: Path, *, n_calib: int = CALIB_N, seed: int = CALIB_SEED,
                    threads: int = 2, command: str = "") -> Dict[str, Any]:
    """Build, gate and record the INT8 lung U-Net of ``bundle_dir``; returns the manifest block."""
    from ..bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    lungs = {f.precision or "fp32": bundle.root / f.path for f in bundle.role("lungs")}
    if "fp32" not in lungs:
        raise BundleError(f"{bundle.root}: no FP32 lung U-Net (role 'lungs') to quantise")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        x, calib = calibration_slices(data_root / "seg2d", n_calib, seed)
        int8 = build_int8(lungs["fp32"], work / INT8_FILE, x, work)
        block = evaluate_gate(lungs["fp32"], int8, data_root, threads)
        block.update(file=INT8_FILE, fp32_file=lungs["fp32"].name, command=command or COMMAND,
                     quantization={"format": "QDQ static", "weights": "QInt8 per-channel (symmetric)",
                                   "activations": "QUInt8 (asymmetric)", "ranges": "MinMax",
                                   "code": "sdk.calibration.quantize (prepare, calibrate_ranges, quantize)"},
                     calibration=calib)
        add_to_bundle(bundle.root, int8, block)
    return block


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sdk.calibration.lungs``: see the module docstring."""
    from ..bundle import DEFAULT_BUNDLE_DIR
    from ..paths import shared_data_root

    ap = argparse.ArgumentParser(prog=COMMAND,
                                 description="INT8 lung U-Net into a bundle, calibrated on seg2d train slices, Dice-gated")
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE_DIR), help="bundle folder holding lungs_fp32.onnx (rebuilt in place)")
    ap.add_argument("--data", default=str(shared_data_root()), help="shared data root (seg2d/, dicom/cip-ct64, volumes/)")
    ap.add_argument("--n-calib", type=int, default=CALIB_N)
    ap.add_argument("--seed", type=int, default=CALIB_SEED)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    cmd = COMMAND + " " + " ".join(shlex.quote(v) for v in (argv if argv is not None else sys.argv[1:]))
    block = quantize_bundle(Path(a.bundle), Path(a.data), n_calib=a.n_calib, seed=a.seed, threads=a.threads, command=cmd.strip())
    print(json.dumps({k: block[k] for k in ("passed", "dice", "criteria", "file")}, indent=1))
    return 0 if block["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
