"""3D lung U-Net (128^3) distilled from the hybrid segmenter: data prep, training, export.

    python -m sdk.train.seg3d prep   [--data ../shared/data] [--out .cache/device/unet3d]
    python -m sdk.train.seg3d train  [--data-dir DIR] [--out runs/seg3d] [--seconds 1800] [--device auto]
    python -m sdk.train.seg3d export --ckpt runs/seg3d/unet3d_lung.pt --out runs/seg3d [--bundle sdk/bundles/default]
    python -m sdk.train.seg3d bundle --onnx-dir DIR [--bundle sdk/bundles/default]   # re-add after a merge
    python -m sdk.train.seg3d evaluate --onnx-dir runs/seg3d [--out eval.json]
    ctsdk train seg3d ...            # = the train step (options from Seg3DTrainConfig)

**prep** loads every series of ``shared/data/dicom`` (:func:`sdk.io.load_series`), runs the
hybrid segmenter (:func:`sdk.lungs.segment`, ``method="hybrid"``) for the teacher mask, and
resamples HU and mask to the 128^3 isotropic cube with the resample kernel's own arithmetic (the
CPU harness of ``kernels/resample.cu``; the NumPy reference when no C++ compiler exists) and the
arguments :data:`sdk.lungs.unet3d.RESAMPLE` (area rule, isotropic fit, window (-1000, 400) to
[0, 1], outside = -1024 HU). The mask is resampled as float (outside = 0) and thresholded at 0.5.
Stored per sample (``<name>.npz``, compressed): ``x`` uint8 = round(255 * windowed), ``y`` packed
bits of the teacher mask, and for cip-ct64 ``manual`` = the resampled manual mask.

Which series:
- chest series (eligibility's lung fraction >= 5 %): teacher mask = hybrid;
- non-chest series whose teacher mask is empty (totalseg-j2k, an abdomen slab): negative sample;
- non-chest series with a non-empty teacher mask (the head CT): excluded - the teacher is not
  trusted outside the chest;
- single slices / 2-slice folders / unreadable folders: excluded (not volumes).

Split: ``test`` = cip-ct64 (manual mask; ``volumes/cip-copd-ct64/ct-64.nrrd`` is the same volume,
checked voxel for voxel, so it is not added twice), ``val`` = covid-ct-md/normal-normal001 (teacher
agreement on an unseen series), ``train`` = the rest. Train series are also stored as geometric
variants made through the same kernel arithmetic (upper / lower 60 % of the slices, central 80 %
in-plane field of view), which moves and scales the lungs inside the cube the way other scan ranges
and reconstruction FOVs do.

**train** is :mod:`sdk.train.seg3d_kit` (torch + NumPy only, also shipped as the device kit's
``train_gpu.py``): Dice + BCE, AdamW, cosine learning rate over a wall-clock budget, random affine
(scale 0.85-1.15, rotation +-10 deg, shift +-8 %), left-right flip, intensity jitter and random crops
(CPU), best checkpoint by validation Dice.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import ConfigError, CtsdkError
from ..paths import shared_data_root
from . import common

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = shared_data_root()
#: relative to the working directory (the repository root in the docs), like every runs/ default
DEFAULT_KIT = Path(".cache/device/unet3d")
KIT_SCRIPT = Path(__file__).resolve().parent / "seg3d_kit.py"
TEST_SERIES = "cip-ct64"
VAL_SERIES = "covid-ct-md/normal-normal001"
#: chest series: eligibility's lung-like fraction of the body at least this
CHEST_LUNG_FRACTION = 0.05
#: train-time geometric variants: (name, z fraction kept (lo, hi) of the slices, in-plane fraction kept)
VARIANTS: Tuple[Tuple[str, Tuple[float, float], float], ...] = (
    ("full", (0.0, 1.0), 1.0),
    ("upper", (0.4, 1.0), 1.0),
    ("lower", (0.0, 0.6), 1.0),
    ("fov80", (0.0, 1.0), 0.8),
)


# --- data prep -----------------------------------------------------------------------------------
def _resampler() -> Tuple[Any, str]:
    """The resample kernel's arithmetic: the CPU harness (g++), else the NumPy reference."""
    from ..errors import KernelError

    try:
        from ..kernels.harness import CpuHarness

        h = CpuHarness()
        return h.resample, "cpu-harness (kernels/ctsdk_common.cuh via g++)"
    except KernelError as exc:
        from ..volume.resample import resample_volume

        warnings.warn(f"CPU kernel harness unavailable ({exc}); using the NumPy reference")
        return resample_volume, "numpy reference (sdk.volume.resample.resample_volume)"


def to_cube(resample: Any, arr: np.ndarray, z_mm: np.ndarray, spacing: Tuple[float, float], *, mask: bool,
            slice_thickness_mm: Optional[float] = None) -> np.ndarray:
    """HU (int16/float32) -> windowed [0, 1] float32 cube, or a 0/1 mask -> bool cube (area
    fraction >= 0.5), both with the kernel arguments of :data:`sdk.lungs.unet3d.RESAMPLE`."""
    from ..lungs.unet3d import RESAMPLE

    common = dict(out_shape=RESAMPLE["out_shape"], mode=RESAMPLE["mode"], isotropic=RESAMPLE["isotropic"],
                  pixel_spacing_mm=spacing, slice_thickness_mm=slice_thickness_mm)
    if mask:
        frac = resample(np.ascontiguousarray(arr, dtype=np.float32), z_mm, fill_hu=0.0, window=None, **common)
        return np.asarray(frac) >= 0.5
    hu = arr if arr.dtype in (np.int16, np.float32) else arr.astype(np.float32)
    return np.asarray(resample(np.ascontiguousarray(hu), z_mm, fill_hu=RESAMPLE["fill_hu"],
                               window=RESAMPLE["window"], **common), np.float32)


def quantise(cube01: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (round(255 x))."""
    return np.round(np.clip(cube01, 0.0, 1.0) * 255.0).astype(np.uint8)


def pack_mask(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, bool).ravel())


def unpack_mask(bits: np.ndarray, shape: Tuple[int, int, int] = (128, 128, 128)) -> np.ndarray:
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def find_series(dicom_root: Path) -> List[Path]:
    """Folders under ``dicom_root`` holding files directly (each a candidate series), sorted."""
    skip = (".md", ".csv", ".txt", ".xml", ".npy", ".json")
    out = []
    for d, _, names in sorted(os.walk(dicom_root)):
        p = Path(d)
        if p != dicom_root and any(Path(n).suffix.lower() not in skip for n in names):
            out.append(p)
    return sorted(out)


def _variant(hu: np.ndarray, mask: np.ndarray, z_mm: np.ndarray, zf: Tuple[float, float], xy: float):
    nz, ny, nx = hu.shape
    z0, z1 = int(round(zf[0] * nz)), max(int(round(zf[0] * nz)) + 2, int(round(zf[1] * nz)))
    cy, cx = int(round(ny * (1 - xy) / 2)), int(round(nx * (1 - xy) / 2))
    sl = (slice(z0, z1), slice(cy, ny - cy), slice(cx, nx - cx))
    return hu[sl], mask[sl], z_mm[z0:z1]


def prepare_data(data_dir: Path, out_dir: Path, variants: bool = True) -> Dict[str, Any]:
    """Write ``<out_dir>/<sample>.npz`` + ``manifest.json`` (see module docstring); returns the manifest."""
    from ..eligibility import lung_fraction
    from ..io import load_series
    from ..lungs import segment
    from ..lungs.nrrd import read_nrrd
    from ..lungs.unet3d import RESAMPLE
    from ..volume.resample import resample_volume

    out_dir.mkdir(parents=True, exist_ok=True)
    dicom = data_dir / "dicom"
    resample, resampler_name = _resampler()
    samples: List[Dict[str, Any]] = []
    series_log: List[Dict[str, Any]] = []
    seen: Dict[Tuple[str, ...], str] = {}
    check_ref: Dict[str, float] = {}
    for folder in find_series(dicom):
        name = folder.relative_to(dicom).as_posix()
        entry: Dict[str, Any] = {"series": name}
        series_log.append(entry)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vol = load_series(folder, workers=2)
        except Exception as exc:  # noqa: BLE001 - every reader error is a reason to skip, recorded
            entry.update(used=False, reason=f"does not load: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        key = tuple(sorted(vol.files))
        if key in seen:
            entry.update(used=False, reason=f"same files as {seen[key]}")
            continue
        seen[key] = name
        entry["shape"] = list(vol.shape)
        if vol.shape[0] < 16:
            entry.update(used=False, reason=f"{vol.shape[0]} slice(s): not a volume")
            continue
        frac = lung_fraction(vol.hu)
        t0 = time.perf_counter()
        seg = segment(vol, "hybrid")
        entry.update(lung_fraction=round(frac, 4), teacher_ml=round(seg.lung_volume_ml, 1),
                     teacher_s=round(time.perf_counter() - t0, 2))
        chest = frac >= CHEST_LUNG_FRACTION
        if not chest and seg.mask.any():
            entry.update(used=False, reason=f"not a chest volume (lung fraction {frac:.3f}) and the teacher "
                                            f"found {seg.lung_volume_ml:.0f} mL: teacher not trusted outside the chest")
            continue
        split = "test" if name == TEST_SERIES else "val" if name == VAL_SERIES else "train"
        entry.update(used=True, split=split, role="positive" if chest else "negative (empty teacher mask)")
        hu = np.asarray(vol.hu)
        z = np.asarray(vol.z_mm, np.float64)
        extra: Dict[str, np.ndarray] = {}
        if split == "test":
            ref = read_nrrd(data_dir / "volumes" / "cip-copd-ct64" / "wholeLung-64.nrrd").data > 0
            if ref.shape != hu.shape:
                raise ConfigError(f"manual mask shape {ref.shape} != cip-ct64 volume {hu.shape}")
            extra["manual"] = pack_mask(to_cube(resample, ref, z, vol.pixel_spacing_mm, mask=True))
            nrrd_ct = read_nrrd(data_dir / "volumes" / "cip-copd-ct64" / "ct-64.nrrd").data
            entry["volumes_nrrd_identical"] = bool(nrrd_ct.shape == hu.shape and np.array_equal(nrrd_ct, hu))
        todo = VARIANTS if (split == "train" and variants) else VARIANTS[:1]
        for vname, zf, xy in todo:
            h, m, zz = _variant(hu, seg.mask, z, zf, xy)
            cube = to_cube(resample, h, zz, vol.pixel_spacing_mm, mask=False)
            ycube = to_cube(resample, m, zz, vol.pixel_spacing_mm, mask=True)
            if not check_ref and vname == "full" and h.dtype == np.int16:
                ref_np = resample_volume(h, zz, pixel_spacing_mm=vol.pixel_spacing_mm, **RESAMPLE)
                check_ref = {"series": name, "max_abs_diff_vs_numpy": float(np.abs(ref_np - cube).max())}
            fname = f"{name.replace('/', '__')}__{vname}.npz"
            np.savez_compressed(out_dir / fname, x=quantise(cube), y=pack_mask(ycube), **extra)
            samples.append({"file": fname, "series": name, "variant": vname, "split": split,
                            "source_shape": list(h.shape), "pixel_spacing_mm": list(vol.pixel_spacing_mm),
                            "mask_fraction": round(float(ycube.mean()), 5),
                            "has_manual": "manual" in extra, "bytes": (out_dir / fname).stat().st_size})
        print(json.dumps(entry), flush=True)
    nrrd = data_dir / "volumes" / "cip-copd-ct64" / "ct-64.nrrd"
    series_log.append({"series": "volumes/cip-copd-ct64/ct-64.nrrd", "used": False,
                       "reason": "the same volume as dicom/cip-ct64 (held out as test)" if nrrd.is_file() else "absent"})
    manifest = {
        "format": "ctsdk-unet3d-data/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cube": list(RESAMPLE["out_shape"]),
        "resample": {k: (list(v) if isinstance(v, tuple) else v) for k, v in RESAMPLE.items()},
        "resampler": resampler_name,
        "resampler_check": check_ref,
        "x_encoding": "uint8 = round(255 * clip((HU - lo) / (hi - lo), 0, 1)) after area resampling",
        "y_encoding": "np.packbits of the bool cube (C order), area fraction of the teacher mask >= 0.5",
        "teacher": "sdk.lungs.segment(volume, 'hybrid') at the native grid",
        "samples": samples,
        "series": series_log,
        "total_bytes": int(sum(s["bytes"] for s in samples)),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.copyfile(KIT_SCRIPT, out_dir / "train_gpu.py")
    return manifest


# --- training (the kit) ----------------------------------------------------------------------------
@dataclass
class Seg3DTrainConfig:
    """``ctsdk train seg3d`` / ``python -m sdk.train.seg3d train`` (see sdk/train/seg3d_kit.py)."""

    data_dir: str = str(DEFAULT_KIT)
    out_dir: str = "runs/seg3d"
    seconds: float = 1800.0
    device: str = "auto"
    batch_size: int = 0          # 0 = 4 on CUDA, 2 on CPU
    crop: int = 0                # 0 = 128 on CUDA (whole cube), 64 on CPU
    lr: float = 3e-3
    base: int = 8
    levels: int = 4
    threads: int = 2
    seed: int = 0
    eval_every: float = 0.0      # seconds between validations (0 = 20 on CUDA, 300 on CPU)
    init: str = ""               # start from this state dict

    def validate(self) -> None:
        """ConfigError naming the field (and its ``ctsdk train seg3d`` option), the value and what is
        allowed - run by :func:`train_seg3d` before torch is imported or a cube read, and by ``ctsdk
        train seg3d`` (``--print-config`` too). Before it, ``--lr -1`` failed in AdamW and ``--crop 50``
        in the first step, after the cubes were loaded; ``--seconds -5`` trained for a second."""
        device = self.device
        if not isinstance(device, str) or (device not in ("auto", "cuda", "cpu") and not device.startswith("cuda:")):
            raise ConfigError(f"{type(self).__name__}: device must be auto, cuda, cuda:N or cpu (--device), "
                              f"got {device!r}")
        common.check_numbers(self, ("seconds", "lr"), minimum=0, min_open=True)
        common.check_numbers(self, ("eval_every",), minimum=0, what="0: 20 s on CUDA, 300 s on CPU")
        common.check_counts(self, ("batch_size",), minimum=0, what="0: 4 on CUDA, 2 on CPU")
        common.check_counts(self, ("base",))
        common.check_counts(self, ("levels",), minimum=2, maximum=MAX_LEVELS)
        common.check_run_basics(self)
        side = 2 ** (int(self.levels) - 1)
        if self.crop == 0:   # the kit picks AUTO_CROPS: each must pass the U-Net's poolings
            if any(c % side for c in AUTO_CROPS):
                raise ConfigError(f"{type(self).__name__}: levels {self.levels} (--levels) divide the input by "
                                  f"{side}, which the automatic crop {min(AUTO_CROPS)} (CPU) cannot take; give "
                                  f"--levels <= {MAX_LEVELS - 1} or a --crop that is a multiple of {side}")
        else:
            common.check_multiple(self, "crop", side, minimum=side, maximum=CUBE,
                                  why=f"its {int(self.levels)} U-Net levels divide it by {side}; 0 = automatic")


#: side of the training cubes (the kit's CUBE); ``crop`` takes at most this
CUBE = 128
#: the kit's crop for ``crop=0``: 64 voxels on CPU, the whole cube on CUDA
AUTO_CROPS: Tuple[int, int] = (64, CUBE)
#: most U-Net levels: 8 halves the 128-voxel cube to 1 voxel
MAX_LEVELS = 8
#: files of ``out_dir`` that mark an earlier run (``ctsdk train seg3d`` refuses them unless --overwrite)
RUN_MARKERS: Tuple[str, ...] = ("unet3d_lung.pt", "train_log.json")


def earlier_run_files(cfg: Seg3DTrainConfig) -> List[Path]:
    """The :data:`RUN_MARKERS` files already in ``cfg.out_dir`` (empty: a fresh run)."""
    return [Path(cfg.out_dir) / name for name in RUN_MARKERS if (Path(cfg.out_dir) / name).exists()]


def check_train_config(cfg: Seg3DTrainConfig) -> None:
    """ConfigError before the kit creates ``out_dir``: the cubes' manifest must exist and list
    train samples, ``init`` must name a file (the values themselves: :meth:`Seg3DTrainConfig.validate`)."""
    manifest = Path(cfg.data_dir) / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"{manifest}: not found; --data-dir must be the cubes folder written by "
                          "`python -m sdk.train.seg3d prep` (nothing was written)")
    try:
        samples = json.loads(manifest.read_text()).get("samples", [])
    except ValueError as exc:
        raise ConfigError(f"{manifest}: not JSON ({exc}); rerun `python -m sdk.train.seg3d prep`") from exc
    if not any(s.get("split") == "train" for s in samples):
        raise ConfigError(f"{manifest}: lists no train samples; rerun `python -m sdk.train.seg3d prep`")
    if cfg.init and not Path(cfg.init).is_file():
        raise ConfigError(f"--init {cfg.init}: state dict not found (e.g. a previous run's unet3d_lung.pt)")


def train_seg3d(cfg: Seg3DTrainConfig, *, overwrite: bool = False) -> Dict[str, Any]:
    """Train with the kit (CPU or CUDA); returns its JSON log. The kit's progress lines go to
    stderr (stdout is left to the caller's summary). An ``out_dir`` holding an earlier run
    (:func:`earlier_run_files`) is refused unless ``overwrite``."""
    import contextlib

    cfg.validate()   # every value first: nothing is imported, read or written for a config that cannot train
    from .._lazy import require

    require("torch", "training the 3D lung U-Net")
    from .common import refuse_earlier_run

    refuse_earlier_run(earlier_run_files(cfg), overwrite)
    check_train_config(cfg)
    from . import seg3d_kit

    with contextlib.redirect_stdout(sys.stderr):
        return seg3d_kit.train(seg3d_kit.KitConfig(**asdict(cfg)))


# --- export --------------------------------------------------------------------------------------
def load_model(ckpt: Path, base: int = 8, levels: int = 4) -> Any:
    """``unet3d_lung`` with a kit / trainer state dict."""
    import torch

    from ..models.unet import unet3d_lung

    model = unet3d_lung(base=base, levels=levels)
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("model", state) if isinstance(state, dict) and "model" in state else state)
    return model.eval()




def with_prob(net: Any) -> Any:
    """``net`` wrapped to return ``(logits, sigmoid(logits))`` - the ONNX outputs ``logits``, ``prob``."""
    import torch

    class WithProb(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x: Any) -> Any:
            logits = self.net(x)
            return logits, torch.sigmoid(logits)

    return WithProb(net).eval()


def export_model(net: Any, out_dir: Path, parity_inputs: np.ndarray, parity_source: str = "given",
                 metadata: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``lungs3d_fp32.onnx`` (torch parity <= 1e-4) and ``lungs3d_fp16.onnx`` (FP16 compute, FP32 I/O;
    parity against the FP32 graph) of a 3D U-Net; the cube side is taken from ``parity_inputs``."""
    from ..export.onnx import export_fp16, export_onnx
    from ..lungs.unet3d import INPUT_NAME, LOGITS_NAME, PROB_NAME

    side = int(parity_inputs.shape[-1])
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"model": "unet3d_lung", "input": f"{INPUT_NAME} (N,1,{side},{side},{side}) windowed [0,1]",
            "resample": "sdk.lungs.unet3d.RESAMPLE", **(metadata or {})}
    r32 = export_onnx(with_prob(net), out_dir / "lungs3d_fp32.onnx", input_size=side, input_name=INPUT_NAME,
                      output_names=[LOGITS_NAME, PROB_NAME], metadata=meta, parity_inputs=parity_inputs,
                      parity_source=parity_source)
    r16 = export_fp16(out_dir / "lungs3d_fp32.onnx", out_dir / "lungs3d_fp16.onnx", parity_inputs=parity_inputs,
                      parity_source=parity_source)
    rep = {"fp32": {"bytes": r32.size_bytes, "sha256": r32.sha256, "parity": r32.parity.to_dict()},
           "fp16": {"bytes": r16.size_bytes, "sha256": r16.sha256, "parity": r16.parity.to_dict()}}
    if not r32.parity.passed:
        raise ConfigError(f"{out_dir / 'lungs3d_fp32.onnx'}: ONNX parity against torch failed: "
                          f"{r32.parity.max_abs_diff} (limit {r32.parity.tolerance}); do not ship it")
    return rep


def export(ckpt: Path, out_dir: Path, data_dir: Path = DEFAULT_KIT, n_parity: int = 2) -> Dict[str, Any]:
    """FP32 + FP16 ONNX of a checkpoint, parity-checked on real cubes (the val / test samples)."""
    man = json.loads((data_dir / "manifest.json").read_text())
    files = [s["file"] for s in man["samples"] if s["split"] in ("val", "test")][:n_parity]
    xs = np.stack([np.load(data_dir / f)["x"].astype(np.float32) / 255.0 for f in files])[:, None]
    rep = export_model(load_model(ckpt), out_dir, xs, ",".join(files), {"checkpoint": str(ckpt)})
    (out_dir / "export.json").write_text(json.dumps(rep, indent=2) + "\n")
    return rep


def add_to_bundle(onnx_dir: Path, bundle_dir: Path, metrics: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Rebuild ``bundle_dir`` with :func:`sdk.bundle.write_bundle`: every existing file kept, plus (or
    replacing) ``lungs3d_fp32`` / ``lungs3d_fp16`` (role "other": ``Bundle.lungs_path`` keeps
    naming the 2D U-Net), and manifest sections ``inputs.lungs3d`` / ``preprocessing.lungs3d``."""
    import tempfile

    from ..bundle import load_bundle, write_bundle
    from ..lungs.unet3d import CUBE, INPUT_NAME, LOGITS_NAME, PROB_NAME, RESAMPLE, THRESHOLD

    old = load_bundle(bundle_dir)
    meta = dict(old.manifest)
    meta.setdefault("inputs", {})["lungs3d"] = {
        "name": INPUT_NAME, "shape": ["batch", 1, CUBE, CUBE, CUBE], "dtype": "float32", "range": [0, 1],
        "outputs": [LOGITS_NAME, PROB_NAME]}
    meta.setdefault("preprocessing", {})["lungs3d"] = {
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in RESAMPLE.items()},
        "threshold": THRESHOLD, "kernel": "kernels/resample.cu (ct_resample3d_*)",
        "code": "sdk.lungs.unet3d (prepare_cube, cube_geometry, cube_to_volume)"}
    meta.setdefault("provenance", {})["lungs3d"] = "sdk.train.seg3d (distilled from the hybrid segmenter)"
    if metrics:
        meta.setdefault("metrics", {})["lungs3d"] = metrics
    with tempfile.TemporaryDirectory() as tmp:
        files: Dict[str, Tuple[str, str, str]] = {}
        for name, bf in old.files.items():
            if name in ("lungs3d_fp32", "lungs3d_fp16"):
                continue
            dst = Path(tmp) / bf.path
            shutil.copyfile(old.root / bf.path, dst)
            files[name] = (str(dst), bf.role, bf.precision)
        for prec in ("fp32", "fp16"):
            dst = Path(tmp) / f"lungs3d_{prec}.onnx"
            shutil.copyfile(onnx_dir / f"lungs3d_{prec}.onnx", dst)
            files[f"lungs3d_{prec}"] = (str(dst), "other", prec)
        new = write_bundle(bundle_dir, files, meta, overwrite=True)
    return new.summary()


# --- evaluation ------------------------------------------------------------------------------------
def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


def _stats(v: List[float]) -> Dict[str, float]:
    a = np.asarray(v, np.float64)
    return {"mean": round(float(a.mean()), 4), "median": round(float(np.median(a)), 4),
            "p10": round(float(np.percentile(a, 10)), 4), "min": round(float(a.min()), 4), "n": int(a.size)}


#: seg2d held-out block: a new source volume starts where consecutive images correlate below this
SEG2D_BREAK_CORR = 0.3


def seg2d_pseudo_volumes(data_dir: Path, pixel_mm: float, step_mm: float) -> List[Tuple[Any, np.ndarray, np.ndarray]]:
    """The held-out seg2d block (numbers >= 1320, the 2D U-Net's test split) as pseudo-volumes.

    seg2d has no HU, no spacing and no volume ids: consecutive numbers are consecutive (every 4th)
    slices of one source volume, so the block is cut where consecutive images correlate below
    :data:`SEG2D_BREAK_CORR`; each run becomes a Volume with HU = grey / 255 * 1400 - 1000 (so the
    segmenter window (-1000, 400) gives back the 8-bit grey), ``pixel_mm`` in-plane and ``step_mm``
    between slices (both guesses). Returns [(volume, manual masks (n, 256, 256), numbers)]."""
    from ..volume.core import Volume
    from ..lungs.data import load_seg2d, split_blocks

    nums, imgs, masks = load_seg2d(str(data_dir / "seg2d"))
    idx = split_blocks(nums, (0, 0), (1320, 10000))["test"]
    cuts = [0] + [k + 1 for k in range(len(idx) - 1)
                  if np.corrcoef(imgs[idx[k]].ravel().astype(float), imgs[idx[k + 1]].ravel().astype(float))[0, 1] < SEG2D_BREAK_CORR]
    cuts.append(len(idx))
    out = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        run = idx[a:b]
        hu = np.round(imgs[run].astype(np.float32) / 255.0 * 1400.0 - 1000.0).astype(np.int16)
        vol = Volume(hu=hu, z_mm=np.arange(len(run)) * step_mm, pixel_spacing_mm=(pixel_mm, pixel_mm))
        out.append((vol, masks[run].astype(bool), nums[run]))
    return out


def evaluate(data_dir: Path, onnx_dir: Path, repeats: int = 3) -> Dict[str, Any]:
    """Dice of the 3D U-Net (FP32 and FP16 ONNX, ORT CPU) beside the hybrid and classical methods:
    cip-ct64 vs its manual mask, the held-out series vs the hybrid teacher, the held-out seg2d block
    (pseudo-volumes); CPU latency of the ONNX at 128^3 (2 threads) and of segment_unet3d."""
    import warnings as _w

    from ..io import load_series
    from ..lungs import segment
    from ..lungs.nrrd import read_nrrd
    from ..lungs.unet2d import segment_slices_2d
    from ..lungs.unet3d import INPUT_NAME, PROB_NAME, open_session, prepare_cube, segment_unet3d

    sess = {p: open_session(onnx_dir / f"lungs3d_{p}.onnx", threads=2) for p in ("fp32", "fp16")}
    rep: Dict[str, Any] = {"onnx_dir": str(onnx_dir), "load_avg_start": os.getloadavg()[0]}
    # 1. cip-ct64 vs the manual mask (native grid)
    dicom = data_dir / "dicom"
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        cip = load_series(dicom / "cip-ct64")
    ref = read_nrrd(data_dir / "volumes" / "cip-copd-ct64" / "wholeLung-64.nrrd").data > 0
    r: Dict[str, Any] = {"reference_ml": round(float(ref.sum() * np.prod(cip.spacing) / 1000), 1)}
    for name, fn in (("unet3d_fp32", lambda v: segment_unet3d(v, sess["fp32"])),
                     ("unet3d_fp16", lambda v: segment_unet3d(v, sess["fp16"])),
                     ("unet3d_fp32_raw", lambda v: segment_unet3d(v, sess["fp32"], postprocess=False)),
                     ("hybrid", lambda v: segment(v, "hybrid")), ("classical", lambda v: segment(v, "classical"))):
        seg = fn(cip)
        r[name] = {"dice": round(_dice(seg.mask, ref), 4), "lung_volume_ml": round(seg.lung_volume_ml, 1)}
    rep["cip_ct64_manual"] = r
    print(json.dumps({"cip_ct64_manual": r}), flush=True)
    # 2. series vs the hybrid teacher (normal001 held out; the others were trained on)
    agree: Dict[str, Any] = {}
    for name, split in ((VAL_SERIES, "val (held out)"), ("covid-ct-md/covid-P001", "train"),
                        ("covid-ct-md/cap-cap001", "train"), ("lung-pet-ct-dx", "train")):
        with _w.catch_warnings():
            _w.simplefilter("ignore")
            vol = load_series(dicom / name)
        tseg = segment(vol, "hybrid")
        teacher = tseg.mask
        e: Dict[str, Any] = {"split": split, "hybrid_ml": round(tseg.lung_volume_ml, 1)}
        for m, fn in (("unet3d_fp32", lambda v: segment_unet3d(v, sess["fp32"])),
                      ("unet3d_fp16", lambda v: segment_unet3d(v, sess["fp16"])),
                      ("classical", lambda v: segment(v, "classical"))):
            if m == "unet3d_fp16" and split == "train":
                continue
            seg = fn(vol)
            e[m] = {"dice_vs_hybrid": round(_dice(seg.mask, teacher), 4), "lung_volume_ml": round(seg.lung_volume_ml, 1)}
        agree[name] = e
        print(json.dumps({name: e}), flush=True)
    rep["vs_hybrid_teacher"] = agree
    # 3. held-out seg2d block as pseudo-volumes
    s2: Dict[str, Any] = {}
    for pixel_mm, step_mm in ((1.4, 6.0), (1.4, 3.0), (1.4, 10.0)):
        vols = seg2d_pseudo_volumes(data_dir, pixel_mm, step_mm)
        per: Dict[str, List[float]] = {"unet3d_fp32": []}
        if step_mm == 6.0:
            per.update({"hybrid": [], "classical": [], "unet2d_slices": []})
        for vol, man, _ in vols:
            preds = {"unet3d_fp32": segment_unet3d(vol, sess["fp32"]).mask}
            if step_mm == 6.0:
                preds["hybrid"] = segment(vol, "hybrid").mask
                preds["classical"] = segment(vol, "classical").mask
                preds["unet2d_slices"] = segment_slices_2d(((vol.hu + 1000.0) / 1400.0).astype(np.float32)).astype(bool)
            for k, pm in preds.items():
                per[k] += [_dice(p, m) for p, m in zip(pm, man)]
        s2[f"pixel {pixel_mm} mm, step {step_mm} mm"] = {k: _stats(v) for k, v in per.items()}
        s2["runs"] = [int(len(n)) for _, _, n in vols]
        print(json.dumps({"seg2d": s2}), flush=True)
    rep["seg2d_test_pseudo_volumes"] = s2
    # 4. latency (ORT CPU, 2 threads) at 128^3 and segment_unet3d on covid-P001
    with _w.catch_warnings():
        _w.simplefilter("ignore")
        p001 = load_series(dicom / "covid-ct-md" / "covid-P001")
    x = prepare_cube(p001)
    lat: Dict[str, Any] = {}
    for p, s in sess.items():
        s.infer({INPUT_NAME: x}, [PROB_NAME])
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s.infer({INPUT_NAME: x}, [PROB_NAME])
            ts.append((time.perf_counter() - t0) * 1e3)
        lat[f"ort_cpu_2threads_{p}_ms"] = {"median": round(float(np.median(ts)), 1), "min": round(float(np.min(ts)), 1)}
    runs = [segment_unet3d(p001, sess["fp32"]).timings_ms for _ in range(3)]
    lat["segment_unet3d_p001_fp32_ms"] = {k: round(float(np.median([t[k] for t in runs])), 1) for k in runs[0]}
    lat["load_avg_end"] = os.getloadavg()[0]
    rep["latency"] = lat
    print(json.dumps({"latency": lat}), flush=True)
    return rep


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdk.train.seg3d", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prep", help="teacher masks + 128^3 cubes + manifest + train_gpu.py")
    a.add_argument("--data", default=str(DEFAULT_DATA))
    a.add_argument("--out", default=str(DEFAULT_KIT))
    a.add_argument("--no-variants", action="store_true")
    t = sub.add_parser("train", help="train (CPU or CUDA)")
    for f, v in asdict(Seg3DTrainConfig()).items():
        t.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out-dir")
    e = sub.add_parser("export", help="FP32/FP16 ONNX (+ add to a bundle)")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--out", default="runs/seg3d")
    e.add_argument("--data-dir", default=str(DEFAULT_KIT))
    e.add_argument("--bundle", default=None, help="also add the two ONNX files to this bundle folder")
    e.add_argument("--metrics", default=None, help="JSON file stored as manifest metrics.lungs3d")
    bnd = sub.add_parser("bundle", help="add lungs3d_fp32/fp16.onnx from a folder to a bundle (after a merge)")
    bnd.add_argument("--onnx-dir", required=True)
    bnd.add_argument("--bundle", default=str(REPO / "sdk" / "bundles" / "default"))
    v = sub.add_parser("evaluate", help="Dice report + CPU latency of exported ONNX files")
    v.add_argument("--data", default=str(DEFAULT_DATA))
    v.add_argument("--onnx-dir", default="runs/seg3d")
    v.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.cmd == "bundle":
        print(json.dumps(add_to_bundle(Path(args.onnx_dir), Path(args.bundle)), indent=2))
        return
    if args.cmd == "evaluate":
        rep = evaluate(Path(args.data), Path(args.onnx_dir))
        if args.out:
            Path(args.out).write_text(json.dumps(rep, indent=2) + "\n")
        print(json.dumps(rep, indent=2))
        return
    if args.cmd == "prep":
        man = prepare_data(Path(args.data), Path(args.out), variants=not args.no_variants)
        print(json.dumps({"samples": len(man["samples"]), "total_bytes": man["total_bytes"],
                          "resampler_check": man["resampler_check"]}, indent=2))
    elif args.cmd == "train":
        cfg = Seg3DTrainConfig(**{f: getattr(args, f) for f in asdict(Seg3DTrainConfig())})
        try:
            log = train_seg3d(cfg, overwrite=args.overwrite)
        except CtsdkError as exc:
            raise SystemExit(common.main_error(exc)) from None
        print(json.dumps({k: v for k, v in log.items() if k != "history"}), flush=True)
    else:
        rep = export(Path(args.ckpt), Path(args.out), Path(args.data_dir))
        print(json.dumps(rep, indent=2))
        if args.bundle:
            metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
            print(json.dumps(add_to_bundle(Path(args.out), Path(args.bundle), metrics), indent=2))


if __name__ == "__main__":
    sys.exit(main())
