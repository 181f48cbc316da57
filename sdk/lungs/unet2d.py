"""Learned 2D lung segmentation with ONNX Runtime (torch-free).

The network (``sdk.models.unet.unet2d_lung``) was trained on seg2d slices that were min-max
normalised per slice and CLAHE-enhanced (clip limit 7) by their source. Every input - an 8-bit
screenshot, a lung-windowed HU slice - therefore goes through the same preparation first
(:func:`prepare_slices`): per-slice min-max to 8 bit, CLAHE (clip 7, 8x8 tiles) at 256^2, area
resize to the network size (128^2). The logits are resized back bilinearly to the input size,
thresholded at 0 (p = 0.5), and each slice's holes are filled.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from ..errors import BundleError, ConfigError
from ..preprocessing import SEGMENTER_SIZE

#: network input side (pixels; owned by sdk.preprocessing) and the size the CLAHE preparation runs at
NET_SIZE = SEGMENTER_SIZE
CLAHE_SIZE = 256
CLAHE_CLIP = 7.0
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: default model: the lung U-Net shipped in the default bundle (trained by ``python -m sdk.train.seg``,
#: which writes ``runs/seg/unet2d_lung.onnx``; the bundle's copy is that file, sha256-checked by
#: :func:`sdk.bundle.load_bundle`)
DEFAULT_ONNX = Path(__file__).resolve().parents[1] / "bundles" / "default" / "lungs_fp32.onnx"

SessionLike = Any  # an sdk.runtime Session, an ONNX path, or None (the default model)


def _cv2() -> Any:
    import cv2

    return cv2


def minmax_u8(img: np.ndarray) -> np.ndarray:
    """Per-image min-max to uint8 (0..255); a constant image becomes zeros."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    if hi - lo < 1e-6:
        return np.zeros(img.shape, np.uint8)
    return np.round((img - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def prepare_slice(grey: np.ndarray, size: int = NET_SIZE, clahe: bool = True) -> np.ndarray:
    """One (H, W) image -> (size, size) float32 in [0, 1] as the network expects.

    Args:
        grey: (H, W) image of any intensity range (grey in [0, 1], 8-bit, windowed HU).
        size: network side in pixels.
        clahe: apply CLAHE (clip 7, 8x8 tiles) at 256^2 after the min-max step (the seg2d
            source's preparation). Inference always uses True.
    """
    cv2 = _cv2()
    g = np.asarray(grey, dtype=np.float32)
    if g.ndim != 2:
        raise ConfigError(f"prepare_slice expects a 2-D (H, W) image, got shape {g.shape}")
    if g.shape != (CLAHE_SIZE, CLAHE_SIZE):
        interp = cv2.INTER_AREA if min(g.shape) > CLAHE_SIZE else cv2.INTER_LINEAR
        g = cv2.resize(g, (CLAHE_SIZE, CLAHE_SIZE), interpolation=interp)
    u8 = minmax_u8(g)
    if clahe:
        u8 = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(8, 8)).apply(u8)
    out = u8.astype(np.float32) / 255.0
    if size != CLAHE_SIZE:
        out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA if size < CLAHE_SIZE else cv2.INTER_LINEAR)
    return out


def prepare_slices(grey: np.ndarray, size: int = NET_SIZE, clahe: bool = True) -> np.ndarray:
    """(N, H, W) images -> (N, 1, size, size) float32 network input (see :func:`prepare_slice`)."""
    grey = np.asarray(grey)
    if grey.ndim != 3:
        raise ConfigError(f"prepare_slices expects (N, H, W) images, got shape {grey.shape}")
    out = np.empty((grey.shape[0], 1, size, size), np.float32)
    for i in range(grey.shape[0]):
        out[i, 0] = prepare_slice(grey[i], size, clahe)
    return out


#: slices per U-Net call: the same logits as larger batches, and ORT's arena for the 128^2
#: activations stays small (peak RSS, docs/benchmarks/cpu.md). 4: with two CPU lanes the network
#: time on covid-P001 is 236 -> 227 ms against 8 (2: 222 ms), one lane 255 -> 261 ms (noise)
NET_BATCH = 4


def open_session(onnx_path: Optional[Union[str, os.PathLike]] = None, threads: Optional[int] = 0,
                 precision: str = "fp32", lanes: Optional[int] = None) -> Any:
    """CPU :class:`sdk.runtime.ort.OrtSession` for the 2D lung U-Net (``onnx_path`` or the bundle's
    FP32 file; ``precision`` names the file's precision, "int8" for ``lungs_int8.onnx``). The one
    opener of lung U-Net sessions: the Triage facade, evaluation and training all call it.
    ``lanes`` > 1: batches run side by side, each on ``threads`` or the cores / lanes intra-op
    threads (:func:`sdk.runtime.ort.cpu_lanes`)."""
    path = Path(onnx_path) if onnx_path is not None else DEFAULT_ONNX
    if not path.is_file():
        raise BundleError(
            f"2D lung U-Net model not found: {path} (train it with `python -m sdk.train.seg` or pass onnx_path=...)"
        )
    from ..runtime.ort import OrtSession

    return OrtSession(path, device="cpu", threads=threads or None, precision=precision, lanes=lanes)


def as_session(session: SessionLike) -> Any:
    """A ctsdk Session for ``session`` (an ONNX path is opened; a Session is returned as is)."""
    if isinstance(session, (str, os.PathLike)):
        return open_session(session)
    if session is None:
        return open_session()
    if not hasattr(session, "infer_batched") and callable(getattr(session, "get_inputs", None)):
        from ..runtime.base import ExternalOrtSession

        return ExternalOrtSession(session)  # an onnxruntime.InferenceSession built by the caller
    if not hasattr(session, "infer_batched"):
        raise ConfigError(
            f"session must be a ctsdk Session (sdk.runtime.ort.OrtSession), an onnxruntime.InferenceSession or an ONNX path, "
            f"not {type(session).__name__}"
        )
    return session


def predict_logits(prepared: Union[np.ndarray, Callable[[int, int], np.ndarray]], session: SessionLike,
                   batch: int = NET_BATCH, n: Optional[int] = None, timings: Optional[Dict[str, float]] = None) -> np.ndarray:
    """Run the network in batches; returns (N, S, S) logits.

    ``prepared`` is the (N, 1, S, S) input, or ``make(i0, i1)`` building the input of slices
    ``i0:i1`` (then pass ``n``): batch k+1 is prepared while batch k runs (Session.infer_batched).
    """
    out = as_session(session).infer_batched(prepared, n, batch=batch, input_name=INPUT_NAME, outputs=[OUTPUT_NAME], timings=timings)
    return out[OUTPUT_NAME][:, 0]


def logits_to_masks(logits: np.ndarray, shape: Tuple[int, int], fill_holes: bool = True) -> np.ndarray:
    """(N, S, S) logits -> (N, H, W) uint8 0/1 masks: bilinear resize, threshold 0, hole filling."""
    cv2 = _cv2()
    from scipy import ndimage as ndi

    h, w = int(shape[0]), int(shape[1])
    masks = np.empty((logits.shape[0], h, w), np.uint8)
    for i, lg in enumerate(logits):
        up = lg if lg.shape == (h, w) else cv2.resize(lg, (w, h), interpolation=cv2.INTER_LINEAR)
        m = up > 0
        if fill_holes:
            m = ndi.binary_fill_holes(m)
        masks[i] = m
    return masks


def segment_slices_2d(
    grey01: np.ndarray,
    session: SessionLike = None,
    *,
    batch: int = NET_BATCH,
    fill_holes: bool = True,
    timings: Optional[Dict[str, float]] = None,
) -> np.ndarray:
    """Lung masks for 2D images with the learned U-Net.

    Args:
        grey01: (N, H, W) float32 images in [0, 1] (8-bit images / 255, or lung-windowed HU);
            any H, W. A single (H, W) image is accepted and returns (H, W).
        session: a ctsdk Session, an ``onnxruntime.InferenceSession`` (wrapped in
            :class:`sdk.runtime.base.ExternalOrtSession`) or an ONNX path; ``None`` opens the
            default bundle's ``lungs_fp32.onnx``.
        batch: slices per network call.
        fill_holes: fill holes per slice (vessels / nodules inside the lung stay lung).
        timings: optional dict that receives ``prepare_ms``, ``net_ms`` and ``post_ms``.

    Returns:
        (N, H, W) uint8 masks, 1 = lung (both lungs), at the input resolution.
    """
    arr = np.asarray(grey01)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0:
        raise ConfigError(f"segment_slices_2d expects (N, H, W) images with N >= 1, got shape {np.asarray(grey01).shape}")
    if not np.isfinite(arr).all():
        raise ConfigError("segment_slices_2d: images contain NaN or inf; pass finite grey values in [0, 1]")
    session = as_session(session)
    t0 = time.perf_counter()
    x = prepare_slices(arr)
    t1 = time.perf_counter()
    logits = predict_logits(x, session, batch)
    t2 = time.perf_counter()
    masks = logits_to_masks(logits, arr.shape[1:], fill_holes)
    t3 = time.perf_counter()
    if timings is not None:
        timings.update(prepare_ms=(t1 - t0) * 1e3, net_ms=(t2 - t1) * 1e3, post_ms=(t3 - t2) * 1e3)
    return masks[0] if single else masks
