"""Fine-tune the slice classifier on what the runtime renders: HU re-rendered 2D images + real HU
slices, with leave-one-series-out (LOSO) evaluation on the real series.

    python -m sdk.train.finetune validate-hu              # grey->HU estimate vs real DICOM (docs/training.md)
    python -m sdk.train.finetune prepare                  # caches under runs/hu/ (images + real series)
    python -m sdk.train.finetune loso                     # one fine-tune per held-out real series
    python -m sdk.train.finetune final                    # all data -> runs/hu/final/best.pt

Data (all cached under ``runs/hu/``, git-ignored):

- **images**: every 8-bit image of ``docs/data/splits.csv`` whose grey->HU map can be estimated
  (``sdk.train.hu_estimate``), mapped to HU, letterboxed with air and resized to 224 with the
  runtime's rule (``images_hu.npz``: HU int16, masks uint8, labels, splits, sources).
- **real**: the three COVID-CT-MD series, selected slices as at triage
  (``sdk.train.real_slices``; ``real_series.npz``).

Training (sized for a shared 2-core CPU): the network starts from the shipped bundle's FP32
classifier (BN folded into the convolutions, so every BN is an identity kept in eval mode); the
stem and stages 0-3 are frozen and their outputs are computed once per augmented variant (window
/ level jitter, flip, small rotation / scale) and cached (float16); only stages 4-6, the head
convolution and the classifier head are trained, on those features. The runtime window stays
(-1350, 150); the jitter perturbs the window each rendering uses, around it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import ConfigError
from ..tables import json_safe
from ..volume.resample import LUNG_WINDOW  # the runtime's classifier window (one owner)
from . import common
from . import data as D
from . import hu_estimate as H
from . import real_slices as R

__all__ = ["build_hu_bundle", "fold_bundle", "export_checkpoint", "FinetuneConfig", "prepare_images", "prepare_real", "validate_hu", "train_fold", "run_loso", "load_bundle_weights"]

_REPO = Path(__file__).resolve().parents[2]


@dataclass
class FinetuneConfig:
    """One fine-tune run (saved beside its checkpoint)."""

    data_root: str = ""
    splits_csv: str = "docs/data/splits.csv"
    work_dir: str = "runs/hu"
    bundle: str = ""                 # initial weights: this bundle's classifier_fp32.onnx ("" = shipped)
    size: int = 224
    freeze_stages: int = 7           # stem + all 7 stages frozen: conv_head + head are trained
    image_variants: int = 1          # augmented renderings per training image (cached features)
    variants: int = 3                # augmented renderings per real slice
    real_weight: float = 4.0         # sampling weight of a real slice relative to an image
    epochs: int = 6
    samples_per_epoch: int = 0       # 0 = one pass over the training samples
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    focal_gamma: float = 1.5
    window_jitter_level: float = 100.0   # HU, uniform +-
    window_jitter_width: float = 0.15    # fraction of the width, uniform +-
    seed: int = 0
    threads: int = 2
    n_boot: int = 2000

    @property
    def root(self) -> Path:
        from .classifier import default_data_root

        return Path(self.data_root) if self.data_root else default_data_root()


# --- data ----------------------------------------------------------------------------------------
def prepare_images(cfg: FinetuneConfig, masks_dir: Path, progress: bool = True) -> Dict[str, Any]:
    """Estimate every image's grey->HU map, drop the ones that fail, cache the HU renderings."""
    rows = D.read_splits_csv(cfg.splits_csv)
    masks = D.load_mask_cache(masks_dir)
    hu, mk, keep, est = [], [], [], []
    dropped: Dict[str, Dict[str, int]] = {}
    for r in common.progress(rows, desc="grey->HU", enabled=progress):
        g = D.load_grey(cfg.root / r["path"])
        e = H.estimate_hu_map(g, masks[r["path"]])
        if not e.ok:
            reason = "implausible window width" if "width" in e.reason else e.reason.split(" (")[0].split(" <")[0]
            per = dropped.setdefault(r["source"], {})
            per[reason] = per.get(reason, 0) + 1
            continue
        h, m = H.render_hu_image(g, masks[r["path"]], e, cfg.size)
        hu.append(np.clip(np.round(h), -2048, 3071).astype(np.int16))
        mk.append(m)
        keep.append(r)
        est.append((e.slope, e.intercept, e.g_air is not None))
    out = Path(cfg.work_dir) / "images_hu.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, hu=np.stack(hu), mask=np.stack(mk),
                        y=np.array([D.binary_label(r["label"]) for r in keep]),
                        path=np.array([r["path"] for r in keep]), split=np.array([r["split"] for r in keep]),
                        source=np.array([r["source"] for r in keep]), label=np.array([r["label"] for r in keep]),
                        slope=np.array([e[0] for e in est]), intercept=np.array([e[1] for e in est]),
                        air=np.array([e[2] for e in est]))
    per_source: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        per_source.setdefault(r["source"], {"images": 0, "kept": 0})["images"] += 1
    for r in keep:
        per_source[r["source"]]["kept"] += 1
    for s, d in per_source.items():
        d["dropped"] = d["images"] - d["kept"]
        d["dropped_by_reason"] = dropped.get(s, {})
    summary = {"images": len(rows), "kept": len(keep), "per_source": per_source,
               "window_width_median": float(np.median([e[0] for e in est])),
               "air_anchor_used": float(np.mean([e[2] for e in est]))}
    (Path(cfg.work_dir) / "images_hu.json").write_text(json.dumps(summary, indent=2) + "\n")
    # path,split of the estimable images: `ctsdk calibrate --splits` keeps only these
    import csv

    with (Path(cfg.work_dir) / "images_hu_splits.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "split"])
        w.writerows([r["path"], r["split"]] for r in keep)
    return summary


def prepare_real(cfg: FinetuneConfig) -> Dict[str, Any]:
    """Cache the COVID-CT-MD series' selected slices (``real_series.npz``)."""
    series = [R.load_real_series(s, cfg.size) for s in R.covid_ct_md_specs(cfg.root)]
    R.save_real_series(series, Path(cfg.work_dir) / "real_series.npz")
    return {s.name: {"label": s.label, "selected": int(len(s.index)), "positive": int(s.y.sum()),
                     "infected": int(s.infected.sum())} for s in series}


def validate_hu(data_root: Path, lungs_onnx: Path, *, every: int = 6, n_windows: int = 4, seed: int = 0) -> Dict[str, Any]:
    """The grey->HU estimate on real DICOM slices rendered to 8-bit with random lung windows.

    Series: the three COVID-CT-MD series and lung-pet-ct-dx A0002 (every ``every``-th slice whose
    HU lung mask covers > 3 % of it). The lung mask used by the estimate is the 2D U-Net's on the
    rendered 8-bit image, as for the training images.
    """
    from ..io import load_series
    from ..lungs import segment, segment_slices_2d
    from ..lungs.unet2d import open_session

    sess = open_session(lungs_onnx, threads=1)
    base = Path(data_root) / "dicom"
    slices = []
    for name in ("covid-ct-md/covid-P001", "covid-ct-md/cap-cap001", "covid-ct-md/normal-normal001",
                 "lung-pet-ct-dx/A0002-s2-8mm-B70f"):
        v = load_series(base / name)
        m = np.asarray(segment(v).mask)
        frac = m.reshape(len(m), -1).mean(axis=1)
        for i in np.flatnonzero(frac > 0.03)[::every]:
            slices.append((name, np.asarray(v.hu[i], np.float32)))

    res = H.validate_on_dicom([(n, h, None) for n, h in slices], n_windows=n_windows, seed=seed,
                              mask_fn=lambda g: segment_slices_2d(g[None], sess)[0])
    res["n_slices"] = len(slices)
    res["series"] = sorted({n for n, _ in slices})
    return res


# --- model ---------------------------------------------------------------------------------------
def load_bundle_weights(model: Any, onnx_path: Path) -> Dict[str, int]:
    """Load a classifier ONNX exported by ``sdk.export`` (BN folded into the convolutions) into a
    ``SliceClassifier``: each conv gets the folded weight, its BN becomes the identity with the
    folded bias (running mean 0, var 1 - eps, weight 1)."""
    import onnx
    import torch
    from onnx import numpy_helper

    init = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(onnx_path)).graph.initializer}
    sd = model.state_dict()
    loaded = 0
    bn_of: Dict[str, str] = {}
    # conv -> bn pairing in EfficientNetLite: conv_stem/bn1, conv_head/bn2, blocks.*.conv_dw/bn1 or bn2...
    from ..models.efficientnet_lite import DepthwiseSeparable, InvertedResidual

    bb = model.backbone
    bn_of["backbone.conv_stem"] = "backbone.bn1"
    bn_of["backbone.conv_head"] = "backbone.bn2"
    for si, stage in enumerate(bb.blocks):
        for bi, blk in enumerate(stage):
            p = f"backbone.blocks.{si}.{bi}"
            names = [n for n, _ in blk.named_children()]
            convs = [n for n in names if n.startswith("conv")]
            bns = [n for n in names if n.startswith("bn")]
            if isinstance(blk, (DepthwiseSeparable, InvertedResidual)):
                for c, b in zip(convs, bns):
                    bn_of[f"{p}.{c}"] = f"{p}.{b}"
    new = {}
    for conv, bn in bn_of.items():
        w = init.get(f"inner.{conv}.weight")
        b = init.get(f"inner.{conv}.weight_bias")
        if w is None or b is None:
            raise ConfigError(f"{onnx_path}: no folded weights for {conv}; not a ctsdk classifier export")
        if tuple(w.shape) != tuple(sd[f"{conv}.weight"].shape):
            raise ConfigError(f"{onnx_path}: {conv} weight shape {w.shape} != model {tuple(sd[conv + '.weight'].shape)}")
        eps = dict(model.named_modules())[bn].eps
        new[f"{conv}.weight"] = torch.from_numpy(np.array(w))
        new[f"{bn}.weight"] = torch.ones(len(b))
        new[f"{bn}.bias"] = torch.from_numpy(np.array(b))
        new[f"{bn}.running_mean"] = torch.zeros(len(b))
        new[f"{bn}.running_var"] = torch.full((len(b),), 1.0 - eps)
        loaded += 1
    for k in ("head.fc.weight", "head.fc.bias"):
        new[k] = torch.from_numpy(np.array(init[f"inner.{k}"]))
    model.load_state_dict(new, strict=False)
    return {"convs": loaded, "tensors": len(new)}


def _bn_eval(model: Any) -> None:
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _render(hu: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator], cfg: FinetuneConfig) -> np.ndarray:
    """(n, S, S) HU + masks -> (n, 3, S, S) inputs; with ``rng``: window jitter + flip + small
    rotation/scale per slice (air fill), else the runtime rendering."""
    import cv2

    if rng is None:
        return R.render_inputs(hu, mask, LUNG_WINDOW)
    out = np.empty((len(hu), 3, hu.shape[1], hu.shape[2]), np.float32)
    s = hu.shape[1]
    c = (s - 1) / 2.0
    for i in range(len(hu)):
        lo, hi = LUNG_WINDOW
        w = (hi - lo) * (1 + rng.uniform(-cfg.window_jitter_width, cfg.window_jitter_width))
        lvl = (lo + hi) / 2 + rng.uniform(-cfg.window_jitter_level, cfg.window_jitter_level)
        a = rng.uniform(-8, 8)
        sc = rng.uniform(0.9, 1.1)
        m = cv2.getRotationMatrix2D((c, c), a, sc)
        m[:, 2] += rng.uniform(-0.04, 0.04, 2) * s
        h = cv2.warpAffine(hu[i].astype(np.float32), m, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=-1000.0)
        k = cv2.warpAffine(mask[i].astype(np.uint8), m, (s, s), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if rng.random() < 0.5:
            h, k = h[:, ::-1], k[:, ::-1]
        out[i] = R.render_inputs(h[None], k[None], (lvl - w / 2, lvl + w / 2))[0]
    return out


def _frozen_features(model: Any, x: np.ndarray, n_frozen: int) -> np.ndarray:
    """Stem + the first ``n_frozen`` stages of ``model`` on inputs ``x`` -> float16 features."""
    import torch

    with torch.inference_mode():
        t = (torch.from_numpy(x) - model.mean) / model.std
        bb = model.backbone
        f = bb.forward_stem(t)
        for i in range(n_frozen):
            f = bb.blocks[i](f)
        return f.numpy().astype(np.float16)


def _trainable_forward(model: Any, f: Any, mask: Any, n_frozen: int) -> Any:
    """The rest of the network from cached features: stages ``n_frozen``.., head conv, head."""
    import torch.nn.functional as F

    bb = model.backbone
    for i in range(n_frozen, len(bb.blocks)):
        f = bb.blocks[i](f)
    f = F.relu6(bb.bn2(bb.conv_head(f)))
    return model.forward_head(f, mask)


def cache_features(model: Any, hu: np.ndarray, mask: np.ndarray, cfg: FinetuneConfig, variant: Optional[int],
                   desc: str = "", progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """One rendering of every slice through the frozen layers: augmented variant ``variant``
    (seeded by ``cfg.seed`` and the variant) or, with ``variant=None``, the runtime rendering.

    Returns (features (n, C, h, w) float16, pooling masks (n, S, S) uint8)."""
    rng = None if variant is None else np.random.default_rng([cfg.seed, variant])
    fv, mv = [], []
    for s in common.progress(range(0, len(hu), 64), desc=desc, enabled=progress):
        x = _render(hu[s:s + 64], mask[s:s + 64], rng, cfg)
        fv.append(_frozen_features(model, x, cfg.freeze_stages))
        mv.append(x[:, 1].astype(np.uint8))
    return np.concatenate(fv), np.concatenate(mv)


def predict(model: Any, hu: np.ndarray, mask: np.ndarray, batch: int = 64) -> np.ndarray:
    """P(covid) with the runtime rendering (no augmentation), full forward."""
    import torch

    model.eval()
    out = np.empty(len(hu))
    with torch.inference_mode():
        for s in range(0, len(hu), batch):
            x = torch.from_numpy(_render(hu[s:s + batch], mask[s:s + batch], None, FinetuneConfig()))
            out[s:s + batch] = model(x)[1][:, 1].double().numpy()
    return out


# --- feature caches ------------------------------------------------------------------------------
@dataclass
class Pool:
    """Samples of one kind (images or real slices) with their cached frozen features."""

    y: np.ndarray                 # (n,)
    group: np.ndarray             # (n,) split name (images) or series name (real)
    feats_aug: np.ndarray         # (V, a, C, h, w) float16 - augmented renderings of samples aug_idx
    masks_aug: np.ndarray         # (V, a, S, S) uint8
    aug_idx: np.ndarray           # (a,) which samples have augmented features
    feats_eval: np.ndarray        # (k, C, h, w) float16 - runtime rendering of samples eval_idx
    masks_eval: np.ndarray        # (k, S, S) uint8
    eval_idx: np.ndarray          # (k,) which samples have eval features


def _base_model(cfg: FinetuneConfig) -> Any:
    from ..bundle import load_bundle
    from ..models import create_model

    model = create_model("effnet_lite0_mgap", pretrained=False, drop_rate=0.2, input_size=cfg.size)
    b = load_bundle(cfg.bundle or None)
    load_bundle_weights(model, b.classifier_paths()["fp32"])
    model.freeze_stages(cfg.freeze_stages)
    return model


def build_pools(cfg: FinetuneConfig, progress: bool = True) -> Tuple[Pool, Pool, Dict[str, Any]]:
    """Load (or compute and cache) the frozen-layer features of every image and real slice."""
    import torch

    work = Path(cfg.work_dir)
    img = np.load(work / "images_hu.npz")
    real = R.load_real_series_cache(work / "real_series.npz")
    r_hu = np.concatenate([s.hu for s in real])
    r_mask = np.concatenate([s.mask for s in real])
    r_y = np.concatenate([s.y for s in real])
    r_group = np.concatenate([[s.name] * len(s.y) for s in real])
    i_hu = img["hu"].astype(np.float32)
    i_train = np.flatnonzero(img["split"] == "train")  # augmented renderings
    i_eval = np.flatnonzero(img["split"] != "train")     # val + test: the runtime rendering only
    fdir = work / f"features_f{cfg.freeze_stages}_s{cfg.seed}"
    fdir.mkdir(parents=True, exist_ok=True)
    model = None
    pieces = [(f"i_aug{v}", i_hu[i_train], img["mask"][i_train], v) for v in range(cfg.image_variants)]
    pieces += [(f"r_aug{v}", r_hu, r_mask, v) for v in range(cfg.variants)]
    pieces += [("i_eval", i_hu[i_eval], img["mask"][i_eval], None), ("r_eval", r_hu, r_mask, None)]
    f: Dict[str, np.ndarray] = {}
    for name, hu, mk, v in pieces:           # each piece cached on its own: a stopped run resumes
        path = fdir / f"{name}.npz"
        if not path.is_file():
            if model is None:
                torch.set_num_threads(cfg.threads)
                model = _base_model(cfg).eval()
            fe, me = cache_features(model, hu, mk, cfg, v, name, progress)
            np.savez(path, f=fe, m=me)
        with np.load(path) as z:
            f[name], f[name + "_m"] = z["f"], z["m"]
    i_y = img["y"].astype(np.int64)
    images = Pool(i_y, img["split"], np.stack([f[f"i_aug{v}"] for v in range(cfg.image_variants)]),
                  np.stack([f[f"i_aug{v}_m"] for v in range(cfg.image_variants)]), i_train,
                  f["i_eval"], f["i_eval_m"], i_eval)
    reals = Pool(r_y.astype(np.int64), r_group, np.stack([f[f"r_aug{v}"] for v in range(cfg.variants)]),
                 np.stack([f[f"r_aug{v}_m"] for v in range(cfg.variants)]), np.arange(len(r_y)),
                 f["r_eval"], f["r_eval_m"], np.arange(len(r_y)))
    meta = {"image_source": img["source"], "real_infected": np.concatenate([s.infected for s in real]),
            "real_index": np.concatenate([s.index for s in real]), "real_names": [s.name for s in real]}
    return images, reals, meta


def _head_predict(model: Any, feats: np.ndarray, masks: np.ndarray, cfg: FinetuneConfig, batch: int = 128) -> np.ndarray:
    import torch

    model.eval()
    out = np.empty(len(feats))
    with torch.inference_mode():
        for s in range(0, len(feats), batch):
            f = torch.from_numpy(feats[s:s + batch].astype(np.float32))
            m = torch.from_numpy(masks[s:s + batch].astype(np.float32))[:, None]
            out[s:s + batch] = _trainable_forward(model, f, m, cfg.freeze_stages)[1][:, 1].double().numpy()
    return out


def train_fold(cfg: FinetuneConfig, images: Pool, reals: Pool, held_out: Optional[str], out_dir: Path,
               progress: bool = True) -> Dict[str, Any]:
    """Fine-tune on the train-split images + every real series except ``held_out``; save
    ``best.pt`` (``sdk.models.classifier.load_checkpoint`` format) and ``fold.json``."""
    import torch

    torch.set_num_threads(cfg.threads)
    common.seed_everything(cfg.seed)
    t0 = time.perf_counter()
    model = _base_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    i_tr = np.arange(len(images.aug_idx))            # rows of the images' augmented features (train split)
    r_tr = np.flatnonzero(reals.group != held_out) if held_out else np.arange(len(reals.y))
    # sample list: (pool 0 = images / 1 = real, row in that pool's augmented features) with weights
    idx = np.r_[i_tr, r_tr]
    kind = np.r_[np.zeros(len(i_tr), np.int64), np.ones(len(r_tr), np.int64)]
    y_all = np.r_[images.y[images.aug_idx], reals.y[r_tr]]
    w = np.where(kind == 1, cfg.real_weight, 1.0)
    # balance the classes within each kind, then weight the kinds by their size x real_weight
    for k in (0, 1):
        n_k = (kind == k).sum()
        for c in (0, 1):
            sel = (kind == k) & (y_all == c)
            if sel.any():
                w[sel] *= n_k / (2.0 * sel.sum())
    w = w / w.sum()
    n_epoch = min(len(i_tr) + len(r_tr), cfg.samples_per_epoch) if cfg.samples_per_epoch else len(i_tr) + len(r_tr)
    steps = int(np.ceil(n_epoch / cfg.batch_size))
    total = steps * cfg.epochs
    warm = max(1, steps // 4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm))))
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        _bn_eval(model)
        rng = np.random.default_rng([cfg.seed, epoch, 7])
        pick = rng.choice(len(idx), size=n_epoch, replace=True, p=w)
        losses = []
        for st in common.progress(range(steps), desc=f"{held_out or 'all'} epoch {epoch + 1}/{cfg.epochs}", enabled=progress):
            b = pick[st * cfg.batch_size:(st + 1) * cfg.batch_size]
            v = np.where(kind[b] == 0, rng.integers(0, cfg.image_variants, len(b)), rng.integers(0, cfg.variants, len(b)))
            f = np.empty((len(b),) + images.feats_aug.shape[2:], np.float32)
            m = np.empty((len(b), 1) + images.masks_aug.shape[2:], np.float32)
            for j, (s, vv) in enumerate(zip(b, v)):
                pool = images if kind[s] == 0 else reals
                f[j] = pool.feats_aug[vv, idx[s]]
                m[j, 0] = pool.masks_aug[vv, idx[s]]
            logits, _, _ = _trainable_forward(model, torch.from_numpy(f), torch.from_numpy(m), cfg.freeze_stages)
            loss = common.focal_loss(logits, torch.from_numpy(y_all[b]), gamma=cfg.focal_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps({"fold": held_out or "all", **history[-1]}), file=sys.stderr, flush=True)
    model.eval()
    p_img = np.full(len(images.y), np.nan)
    p_img[images.eval_idx] = _head_predict(model, images.feats_eval, images.masks_eval, cfg)
    p_real = _head_predict(model, reals.feats_eval, reals.masks_eval, cfg)
    va = images.group == "val"
    threshold = common.youden_threshold(images.y[va], p_img[va])
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = {"model": "effnet_lite0_mgap", "cfg": model.cfg.to_dict(), "state_dict": model.state_dict(), "threshold": threshold,
            "train_config": {**asdict(cfg), "held_out": held_out}, "epoch": cfg.epochs, "val_auc": common.roc_auc(images.y[va], p_img[va])}
    torch.save(ckpt, out_dir / "best.pt")
    np.savez(out_dir / "predictions.npz", p_img=p_img, p_real=p_real)
    res = {"held_out": held_out, "threshold": threshold, "history": history, "seconds": round(time.perf_counter() - t0, 1),
           "train_images": int(len(i_tr)), "train_real_slices": int(len(r_tr)) if cfg.real_weight > 0 else 0,
           "val_auc": common.roc_auc(images.y[va], p_img[va]),
           "test_auc": common.roc_auc(images.y[images.group == "test"], p_img[images.group == "test"])}
    if held_out:
        h = reals.group == held_out
        res["held_out_slices"] = int(h.sum())
        res["held_out_mean_p"] = float(p_real[h].mean())
        if len(set(reals.y[h].tolist())) == 2:
            res["held_out_within_auc"] = common.roc_auc(reals.y[h], p_real[h])
    (out_dir / "fold.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def run_loso(cfg: FinetuneConfig, progress: bool = True) -> Dict[str, Any]:
    """One fine-tune per real series left out; pooled held-out slice AUC with bootstrap CIs."""
    images, reals, meta = build_pools(cfg, progress)
    names = list(meta["real_names"])
    held_p = np.full(len(reals.y), np.nan)
    folds = {}
    for name in names:
        res = train_fold(cfg, images, reals, name, Path(cfg.work_dir) / "loso" / name, progress)
        p = np.load(Path(cfg.work_dir) / "loso" / name / "predictions.npz")["p_real"]
        h = reals.group == name
        held_p[h] = p[h]
        folds[name] = res
    return summarise_loso(cfg, reals, meta, held_p, folds)


def summarise_loso(cfg: FinetuneConfig, reals: Pool, meta: Dict[str, Any], held_p: np.ndarray,
                   folds: Dict[str, Any]) -> Dict[str, Any]:
    thr = float(np.mean([f["threshold"] for f in folds.values()]))
    out: Dict[str, Any] = {"config": asdict(cfg), "folds": folds, "threshold_mean": thr}
    out["pooled"] = common.binary_report(reals.y, held_p, thr, cfg.n_boot, cfg.seed)
    per = {}
    for name in meta["real_names"]:
        h = reals.group == name
        d = {"slices": int(h.sum()), "positive": int(reals.y[h].sum()), "mean_p": float(held_p[h].mean())}
        if len(set(reals.y[h].tolist())) == 2:
            d["within_series"] = common.binary_report(reals.y[h], held_p[h], thr, cfg.n_boot, cfg.seed)
        # this series' slices against the other held-out series' (positives + negatives of the others)
        other = ~h
        pos = (reals.y == 1)
        sel = h | (other & pos) if reals.y[h].sum() == 0 else h | (other & ~pos)
        if len(set(reals.y[sel].tolist())) == 2:
            d["vs_other_series"] = common.binary_report(reals.y[sel], held_p[sel], thr, cfg.n_boot, cfg.seed)
        per[name] = d
    out["per_series"] = per
    np.savez(Path(cfg.work_dir) / "loso" / "held_out_predictions.npz", p=held_p, y=reals.y, group=reals.group,
             index=meta["real_index"], infected=meta["real_infected"])
    (Path(cfg.work_dir) / "loso" / "loso.json").write_text(json.dumps(json_safe(out), indent=2) + "\n")
    return out


def export_checkpoint(checkpoint: Path, out: Path, parity: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """``best.pt`` -> FP32 ONNX with ``sdk.export``'s parity check (on real HU slices when given)."""
    from ..export.onnx import classifier_metadata, export_onnx
    from ..models.classifier import load_checkpoint

    model = load_checkpoint(checkpoint).eval()
    meta = classifier_metadata(model, name="effnet_lite0_mgap", size=model.cfg.input_size)
    meta["checkpoint"] = str(checkpoint)
    rep = export_onnx(model, out, input_size=model.cfg.input_size, metadata=meta, parity_inputs=parity,
                      parity_source="COVID-CT-MD selected slices (runtime rendering)" if parity is not None else "",
                      n_parity=16)
    if not (rep.parity and rep.parity.passed):
        raise ConfigError(f"{out}: ONNX parity check failed: {rep.parity}")
    return rep.to_dict()


def fold_bundle(checkpoint: Path, out_dir: Path, name: str, parity: Optional[np.ndarray] = None, base: Optional[str] = None) -> Path:
    """A bundle that differs from ``base`` (default: the shipped one) only in its FP32 classifier
    (and its slice threshold): the model of one leave-one-series-out fold, for
    ``ctsdk evaluate --series`` rows that name it. FP16 / INT8 files are left out."""
    import torch

    from ..bundle import load_bundle, write_bundle

    b = load_bundle(base)
    onnx_path = Path(checkpoint).with_name("classifier_fp32.onnx")
    export_checkpoint(Path(checkpoint), onnx_path, parity)
    # the base classifier's files and what is derived from them (the GPU path's features / head
    # graphs) stay out; the fold's own slice threshold is re-measured, the rest (series threshold,
    # metrics, slice_score, ...) is the base's and recorded as such in the manifest's stale_metadata
    derived = ("classifier", "classifier_features", "classifier_head")
    files = {k: (str(b.root / f.path), f.role, f.precision) for k, f in b.files.items() if f.role not in derived}
    files["classifier_fp32"] = (str(onnx_path), "classifier", "fp32")
    meta = json.loads(json.dumps(b.manifest))
    meta["name"] = name
    meta["description"] = f"leave-one-series-out fold model ({checkpoint}); evaluation only, not for use"
    thr = float(torch.load(checkpoint, map_location="cpu", weights_only=False)["threshold"])
    meta.setdefault("thresholds", {})["slice"] = thr
    meta.pop("int8", None)
    meta.pop("classifier_features", None)
    write_bundle(out_dir, files, meta, overwrite=True, remeasured=["thresholds.slice"], keep_stale_metadata=True)
    return out_dir


def build_hu_bundle(out: Path, export_dir: Path, checkpoint: Path, card: Path, metrics: Optional[Path] = None,
                    version: Optional[str] = None, base: Optional[str] = None) -> Path:
    """The shipped bundle (``base``) with the HU-trained classifier files of ``export_dir``
    (``classifier_fp32/fp16/int8.onnx`` + ``calibration_report.json``), its slice threshold,
    ``image_render: hu``, the INT8 verdict, ``metrics`` (JSON) and ``card`` as MODEL_CARD.md -
    assembled with :func:`sdk.bundle.write_bundle` (sha256 of every file in the manifest).

    The blocks re-measured here (``thresholds.slice``, ``image_render``, ``int8`` with a report,
    ``metrics`` when given) are declared as such; the others that describe the base classifier
    (the aggregator's ``thresholds.series``, ``slice_score``, ``metrics`` without ``metrics``) are
    carried over recorded in the manifest's ``stale_metadata``. The base's classifier_features /
    classifier_head files (derived from the base classifier) are not copied: they are re-derived
    from the new classifier (``python -m sdk.export.features``). ``version`` None: the base's when
    the classifier files are the base's, else ``<base version>+hu.<sha256[:8]>`` (a bundle with
    other models never takes the base's name and version). ``card`` relative and not found here:
    looked up in the source checkout (:func:`sdk.bundle.find_model_card`)."""
    import shutil
    import tempfile

    import torch

    from ..bundle import find_model_card, load_bundle, sha256_file, write_bundle
    from ..export.features import FEATURES_ROLE, HEAD_ROLE, add_features_to_bundle

    card = find_model_card(card)
    b = load_bundle(base)
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    new = {prec: Path(export_dir) / f"classifier_{prec}.onnx" for prec in ("fp32", "fp16", "int8")}
    new = {prec: p for prec, p in new.items() if p.is_file()}
    if "fp32" not in new:
        raise ConfigError(f"{export_dir}: no classifier_fp32.onnx to build the bundle from (run the export step first)")
    if version is None:
        shas = {prec: sha256_file(p) for prec, p in new.items()}
        same = set(shas.values()) <= {f.sha256 for f in b.role("classifier")}
        version = b.version if same else f"{b.version}+hu.{shas['fp32'][:8]}"
    meta = json.loads(json.dumps(b.manifest))
    meta["version"] = version
    meta["description"] = ("Chest-CT series triage, non_covid vs covid: 2D lung U-Net, EfficientNet-Lite0 with lung-mask-weighted "
                           "GAP trained on HU re-renderings of the 2D images (grey->HU estimated per image), XGBoost over 20 slice "
                           "groups. Research use only - not for diagnosis.")
    meta["image_render"] = "hu"
    meta.setdefault("thresholds", {})["slice"] = float(ck["threshold"])
    meta["thresholds"]["slice_rule"] = "Youden J on the val split (HU re-rendered images)"
    for d in meta.get("training_data", []):
        if d["name"] in ("ucsd-covid-ct", "sarscov2-ctscan-soares", "mosmed-midslices") and "HU re-rendered" not in d["use"]:
            d["use"] += "; HU re-rendered (grey->HU estimated from anatomy; images it cannot estimate dropped)"
        if d["name"] == "covid-ct-md sample series":
            d["use"] = "evaluation only (the shipped classifier never saw them)"
    meta.setdefault("provenance", {})["classifier"] = (f"{Path(checkpoint).parent} (python -m sdk.train.finetune final "
                                                       "--real-weight 0: from the 0.1.0 classifier, conv_head + head fine-tuned "
                                                       "on HU re-rendered images)")
    meta.pop("classifier_features", None)   # re-derived below from the new classifier
    remeasured = ["thresholds.slice", "image_render"]
    report = Path(export_dir) / "calibration_report.json"
    meta.pop("int8", None)
    if "int8" in new and report.is_file():
        cal = json.loads(report.read_text())
        sp = cal.get("speed", {})
        meta["provenance"]["int8"] = f"{export_dir} (ctsdk calibrate --render hu)"
        meta["int8"] = {"passed": cal["passed"], "method": cal["chosen"]["method"], "auc_delta": cal["chosen"]["auc_delta"],
                        "top1_agreement": cal["chosen"]["top1_agreement"],
                        "extra_excluded_layers": cal["chosen"].get("extra_excluded", 0), "criteria": cal["criteria"],
                        "speedup": sp.get("batch32", {}).get("speedup"), "speedup_batch1": sp.get("batch1", {}).get("speedup"),
                        "note": f"{report}: ctsdk calibrate --render hu (HU re-rendered images)"}
        remeasured.append("int8")
    if metrics is not None:
        meta["metrics"] = json.loads(Path(metrics).read_text())
        remeasured.append("metrics")
    with tempfile.TemporaryDirectory(prefix="ctsdk-bundle-") as tmp:   # sources must live outside ``out``
        staging = Path(tmp)
        files = {}
        for k, f in b.files.items():
            if f.role in ("classifier", "card", FEATURES_ROLE, HEAD_ROLE):
                continue
            shutil.copyfile(b.root / f.path, staging / f.path)
            files[k] = (str(staging / f.path), f.role, f.precision)
        for prec, src in new.items():
            files[f"classifier_{prec}"] = (str(src), "classifier", prec)
        shutil.copyfile(card, staging / "MODEL_CARD.md")
        files["model_card"] = (str(staging / "MODEL_CARD.md"), "card", "")
        write_bundle(out, files, meta, overwrite=True, remeasured=remeasured, keep_stale_metadata=True)
    add_features_to_bundle(out, [p for p in ("fp32", "fp16") if p in new])
    return Path(out)


def bundle_metrics(eval_json: Path, base_metrics: Dict[str, Any], work_dir: Path) -> Dict[str, Any]:
    """The manifest's ``metrics`` from ``ctsdk evaluate --series ... --images ... --json`` output,
    the paired comparison and the LOSO summary (``runs/hu``), keeping the lung U-Net's numbers."""
    ev = json.loads(Path(eval_json).read_text())
    s, i = ev["series"], ev["images"]
    keys = ("n", "n_pos", "n_neg", "threshold", "auc", "sensitivity", "specificity", "accuracy", "confusion", "ci95")

    def slim(m: Dict[str, Any]) -> Dict[str, Any]:
        return {k: m[k] for k in keys if k in m}

    cmd = ("ctsdk evaluate --series runs/hu/series_all.csv --images docs/data/splits.csv --split test "
           "--data-root ../shared/data --out runs/hu/eval_new --json")
    loso = json.loads((Path(work_dir) / "loso" / "loso.json").read_text())
    return {
        "test_images_slice_level": {"command": cmd, "render": i["input"].get("render"), "excluded": len(i["excluded"]),
                                    "overall": slim(i["overall"]), "per_source": {k: slim(v) for k, v in i["per_source"].items()}},
        "covid_ct_md_series": {"command": cmd, "excluded": s["excluded"],
                               "cases": [{k: c[k] for k in ("path", "label", "predicted", "p_covid", "mean_slice_p_covid", "n_slices")}
                                         for c in s["cases"]],
                               "slice_level": {k: slim(v) for k, v in s["slice_level"].items() if isinstance(v, dict) and "auc" in v},
                               "note": "no series was seen in training: held-out for all three"},
        "real_slices_paired_vs_0_1_0": json.loads((Path(work_dir) / "paired_new_vs_old.json").read_text()),
        "loso_trained_with_real_slices_not_shipped": {"command": "python -m sdk.train.finetune loso", "pooled_auc": loso["pooled"]["auc"],
                                                       "pooled_auc_ci95": loso["pooled"]["auc_ci95"]},
        "lung_unet_seg2d_test_dice_mean": base_metrics.get("lung_unet_seg2d_test_dice_mean"),
        "aggregator_simulated_bags": {"note": "0.1.0 numbers, measured with the 0.1.0 classifier's scores; not re-measured",
                                      **{k: v for k, v in (base_metrics.get("aggregator_simulated_bags") or {}).items() if k != "note"}},
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m sdk.train.finetune")
    ap.add_argument("cmd", choices=["validate-hu", "prepare", "features", "loso", "final", "baseline", "fold-bundles", "bundle",
                                    "compare-real"])
    ap.add_argument("--out", default="", help="bundle: output folder (e.g. sdk/bundles/default)")
    ap.add_argument("--eval-json", default="", help="bundle: `ctsdk evaluate --series ... --images ... --json` output "
                    "(the manifest's metrics are made from it, runs/hu/paired_new_vs_old.json and runs/hu/loso/loso.json)")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--work-dir", default="runs/hu")
    ap.add_argument("--epochs", type=int, default=FinetuneConfig.epochs)
    ap.add_argument("--variants", type=int, default=FinetuneConfig.variants)
    ap.add_argument("--real-weight", type=float, default=FinetuneConfig.real_weight)
    ap.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    ap.add_argument("--samples-per-epoch", type=int, default=FinetuneConfig.samples_per_epoch)
    ap.add_argument("--freeze-stages", type=int, default=FinetuneConfig.freeze_stages)
    ap.add_argument("--threads", type=int, default=FinetuneConfig.threads)
    ap.add_argument("--masks-dir", default="runs/masks")
    ap.add_argument("--bundle", default="", help="initial weights (and the frozen layers): this bundle's FP32 classifier; "
                    "default the shipped one. The 0.2.0 classifier was trained from 0.1.0 (git c3af4ec:sdk/bundles/default)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cfg = FinetuneConfig(data_root=a.data_root, work_dir=a.work_dir, epochs=a.epochs, variants=a.variants,
                         real_weight=a.real_weight, lr=a.lr, threads=a.threads,
                         samples_per_epoch=a.samples_per_epoch, freeze_stages=a.freeze_stages, bundle=a.bundle)
    prog = not a.no_progress
    if a.cmd == "validate-hu":
        from ..bundle import load_bundle

        res = validate_hu(cfg.root, load_bundle(None).lungs_path)
        (Path(cfg.work_dir) / "validate_hu.json").write_text(json.dumps(res, indent=2) + "\n")
        res = {k: v for k, v in res.items() if k != "cases"}
    elif a.cmd == "prepare":
        if not D.mask_cache_path(a.masks_dir).is_file():   # lung masks of every image, from the bundle's U-Net
            from ..bundle import load_bundle
            from .classifier import build_mask_cache

            build_mask_cache(D.read_splits_csv(cfg.splits_csv), cfg.root, Path(a.masks_dir), str(load_bundle(None).lungs_path), prog)
        res = {"images": prepare_images(cfg, Path(a.masks_dir), prog), "real": prepare_real(cfg)}
    elif a.cmd == "features":
        build_pools(cfg, prog)
        res = {"ok": True}
    elif a.cmd == "loso":
        res = run_loso(cfg, prog)
        res = {k: res[k] for k in ("pooled", "per_series", "threshold_mean")}
    elif a.cmd == "final":
        images, reals, _ = build_pools(cfg, prog)
        res = train_fold(cfg, images, reals, None, Path(cfg.work_dir) / "final", prog)
    elif a.cmd == "compare-real":  # the final model vs the shipped 0.1.0 weights, paired, on the real slices
        images, reals, _ = build_pools(cfg, prog)
        p_old = _head_predict(_base_model(cfg), reals.feats_eval, reals.masks_eval, cfg)
        p_new = np.load(Path(cfg.work_dir) / "final" / "predictions.npz")["p_real"]
        y, g = reals.y, reals.group
        res = {}
        for name, sel in (("all 425 selected slices", np.ones(len(y), bool)), ("P001 infected vs P001 clear", g == "covid-P001"),
                          ("P001 infected vs normal001", (y == 1) | (g == "normal-normal001")),
                          ("P001 infected vs cap001", (y == 1) | (g == "cap-cap001"))):
            r = common.paired_bootstrap_diff(y[sel], p_new[sel], p_old[sel], common.roc_auc, 2000, 0)
            r.update({"new": common.roc_auc(y[sel], p_new[sel]), "old": common.roc_auc(y[sel], p_old[sel])})
            res[name] = r
        (Path(cfg.work_dir) / "paired_new_vs_old.json").write_text(json.dumps(json_safe(res), indent=2))
    elif a.cmd == "bundle":
        if not a.out:
            raise ConfigError("bundle needs --out FOLDER")
        metrics = None
        if a.eval_json:
            from ..bundle import load_bundle

            metrics = Path(cfg.work_dir) / "bundle_metrics.json"
            metrics.write_text(json.dumps(bundle_metrics(Path(a.eval_json), load_bundle(None).manifest.get("metrics", {}),
                                                         Path(cfg.work_dir)), indent=1))
        out = build_hu_bundle(Path(a.out), Path(cfg.work_dir) / "export", Path(cfg.work_dir) / "final" / "best.pt",
                              Path("docs/model_card.md"), metrics)
        res = {"bundle": str(out)}
    elif a.cmd == "fold-bundles":
        real = R.load_real_series_cache(Path(cfg.work_dir) / "real_series.npz")
        parity = R.render_inputs(real[0].hu[::8], real[0].mask[::8], LUNG_WINDOW)
        rows = ["path,label,slice_labels,slice_labels_row,slice_labels_order,bundle"]
        for spec in R.covid_ct_md_specs(cfg.root):
            out = fold_bundle(Path(cfg.work_dir) / "loso" / spec.name / "best.pt", Path(cfg.work_dir) / "bundles" / spec.name,
                              f"ctsdk-loso-without-{spec.name}", parity)
            lab = f"{spec.labels_file.resolve()},{spec.labels_row},{R.LABEL_ORDER}" if spec.labels_file else ",,"
            rows.append(f"{spec.path.resolve()},{spec.label},{lab},{out.resolve()}")
        csv_path = Path(cfg.work_dir) / "loso_series.csv"
        csv_path.write_text("\n".join(rows) + "\n")
        res = {"series_csv": str(csv_path)}
    else:  # baseline: the shipped weights, no training, on the same caches
        images, reals, meta = build_pools(cfg, prog)
        model = _base_model(cfg)
        p = _head_predict(model, reals.feats_eval, reals.masks_eval, cfg)
        pi = np.full(len(images.y), np.nan)
        pi[images.eval_idx] = _head_predict(model, images.feats_eval, images.masks_eval, cfg)
        te = images.group == "test"
        res = {"real_all": common.binary_report(reals.y, p, 0.528, cfg.n_boot, cfg.seed),
               "image_test_hu_rendered": common.binary_report(images.y[te], pi[te], 0.528, cfg.n_boot, cfg.seed)}
        (Path(cfg.work_dir) / "baseline.json").write_text(json.dumps(json_safe(res), indent=2) + "\n")
    print(json.dumps(json_safe(res), indent=1))
    return res


if __name__ == "__main__":  # pragma: no cover
    main()
