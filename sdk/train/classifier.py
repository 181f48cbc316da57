"""Train the 2D slice classifier (``ctsdk train classifier``).

    from sdk.train.classifier import ClassifierTrainConfig, train_classifier
    summary = train_classifier(ClassifierTrainConfig(model="effnet_lite0_mgap"))

Pipeline: images index -> patient-grouped splits (``sdk.train.data.assign_splits``; written to
``<out_dir>/splits.csv``) -> lung masks for every image with the 2D lung U-Net, once (cached in
``<masks_dir>/masks.npz``) -> seeded training with OpenCV/NumPy augmentation, focal loss
(gamma 1.5, paper 001) or cross-entropy, balanced class weights, AdamW + cosine schedule, frozen
early stages (sized for a 2-core CPU), validation AUC each epoch with early stopping -> the
operating threshold chosen on val (Youden) -> metrics on the held-out test split with bootstrap
CIs -> ``p_covid`` for every image of the index.

Outputs in ``<out_dir>/<model>/``: ``best.pt`` (``{"model", "cfg", "state_dict", "threshold",
"train_config", "epoch", "val_auc"}``), ``config.json``, ``metrics.json``, ``predictions.csv``
(path,label,source,split,patient,p_covid; removed when ``predict_all`` is off, so it never belongs
to an earlier run), ``READY``. The per-epoch lines go to stderr (redirect them to keep a log).
The config, the split and the lung-mask source are checked before anything is written, so a run
that fails on them leaves no folder behind; ``ctsdk train classifier`` also refuses a run folder
that holds an earlier run (:func:`earlier_run_files`) unless ``--overwrite``.

This module imports torch only inside functions, so the config dataclass is importable (and the
CLI options can be generated) on a core install.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..errors import ConfigError
from ..paths import shared_data_root
from . import common
from . import data as D

__all__ = [
    "ClassifierTrainConfig",
    "train_classifier",
    "build_mask_cache",
    "predict_images",
    "evaluate_covid_ct_md",
    "compare_runs",
    "default_data_root",
    "earlier_run_files",
    "split_rows",
]

log = logging.getLogger("sdk.train.classifier")
_REPO = Path(__file__).resolve().parents[2]


#: ``$CTSDK_SHARED_DATA`` or ``<repo>/../shared/data``: :func:`sdk.paths.shared_data_root` under the name
#: the trainers' configs use
default_data_root = shared_data_root


@dataclass
class ClassifierTrainConfig:
    """Everything a classifier training run depends on (saved as ``config.json`` beside the weights).

    Paths may be "" for their defaults: ``data_root`` -> ``$CTSDK_SHARED_DATA`` or
    ``../shared/data``; ``index_csv`` -> ``<data_root>/images_index.csv``; ``masks_dir`` ->
    ``<out_dir>/masks``; ``splits_csv`` "" -> computed and written to ``<out_dir>/splits.csv``.

    Sizing for a shared 2-core CPU: ``threads=1`` (measured ~3x faster than 2 threads when the
    cores are oversubscribed - OpenMP barriers stall), ``freeze_stages=3`` (stem and stages 0-2,
    the 112/56/28-pixel layers that dominate CPU time, stay ImageNet), ``samples_per_epoch``
    images drawn per epoch, ``max_minutes`` caps the training loop (stops before an epoch that
    would overrun it; 0 = no cap). ``limit`` keeps that many images per split (smoke tests).
    """

    model: str = "effnet_lite0_mgap"
    data_root: str = ""
    index_csv: str = ""
    splits_csv: str = ""
    out_dir: str = "runs/classifier"
    masks_dir: str = ""
    seg_onnx: str = "runs/seg/unet2d_lung.onnx"
    input_size: int = 224
    epochs: int = 6
    samples_per_epoch: int = 1024
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    freeze_stages: int = 3
    loss: str = "focal"
    focal_gamma: float = 1.5
    class_weighting: str = "balanced"
    patience: int = 2
    drop_rate: float = 0.2
    pretrained: bool = True
    seed: int = 0
    threads: int = 1
    max_minutes: float = 18.0
    limit: int = 0
    predict_all: bool = True
    n_boot: int = 1000
    progress: bool = True

    def validate(self) -> None:
        """ConfigError naming the field (and its ``ctsdk train classifier`` option), the value and what
        is allowed - run by :func:`train_classifier` before anything is read and by ``ctsdk train
        classifier`` (``--print-config`` too)."""
        from ..metrics import MAX_BOOTSTRAP
        from ..models import list_models

        clf = [m for m in list_models() if "unet" not in m]
        if self.model not in clf:
            raise ConfigError(f"unknown classifier {self.model!r}; valid: {', '.join(clf)}")
        common.check_choice(self, "loss", ("focal", "ce"))
        common.check_choice(self, "class_weighting", ("balanced", "none"))
        common.check_multiple(self, "input_size", 32, minimum=64, why="the backbone's five stride-2 stages")
        common.check_counts(self, ("epochs", "batch_size", "patience"))
        common.check_counts(self, ("samples_per_epoch", "limit", "freeze_stages"), minimum=0)
        common.check_counts(self, ("n_boot",), minimum=0, maximum=MAX_BOOTSTRAP)
        common.check_run_basics(self)
        common.check_numbers(self, ("lr",), minimum=0, min_open=True)
        common.check_numbers(self, ("weight_decay", "focal_gamma", "max_minutes"), minimum=0)
        common.check_numbers(self, ("drop_rate",), minimum=0, maximum=1, max_open=True)

    # resolved paths ---------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.data_root) if self.data_root else default_data_root()

    @property
    def index(self) -> Path:
        return Path(self.index_csv) if self.index_csv else self.root / "images_index.csv"

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.model

    @property
    def mask_dir(self) -> Path:
        return Path(self.masks_dir) if self.masks_dir else Path(self.out_dir) / "masks"


#: files of ``<out_dir>/<model>/`` that mark an earlier run (``ctsdk train classifier`` refuses to
#: write over them unless --overwrite; README: output folders are checked before the work starts)
RUN_MARKERS: Tuple[str, ...] = ("best.pt", "metrics.json")


def earlier_run_files(cfg: ClassifierTrainConfig) -> List[Path]:
    """The :data:`RUN_MARKERS` files already in the run folder ``cfg.run_dir`` (empty: a fresh run)."""
    return [cfg.run_dir / name for name in RUN_MARKERS if (cfg.run_dir / name).exists()]


# --- data -----------------------------------------------------------------------------------------
def split_rows(cfg: ClassifierTrainConfig) -> Tuple[List[Dict[str, str]], bool]:
    """The split assignment, nothing written: ``(rows, computed)`` - read from ``cfg.splits_csv``
    (``computed`` False) or computed by :func:`sdk.train.data.assign_splits` (``computed`` True:
    the caller writes it to ``<out_dir>/splits.csv``)."""
    if cfg.splits_csv:
        rows = D.read_splits_csv(cfg.splits_csv)
        D.check_no_leakage(rows)
        return rows, False
    return D.assign_splits(D.read_images_index(cfg.index), seed=0), True


def load_split_rows(cfg: ClassifierTrainConfig) -> List[Dict[str, str]]:
    """The split assignment: read ``cfg.splits_csv`` or compute it and write ``<out_dir>/splits.csv``."""
    rows, computed = split_rows(cfg)
    if computed:
        D.write_splits_csv(rows, Path(cfg.out_dir) / "splits.csv")
    return rows


def _cached_mask_paths(cache_dir: Path) -> Set[str]:
    """The image paths ``<cache_dir>/masks.npz`` holds (reads only its ``paths`` array)."""
    p = D.mask_cache_path(cache_dir)
    if not p.is_file():
        D.load_mask_cache(cache_dir)  # raises the ConfigError that says how to build it
    with np.load(p) as z:
        return {str(k) for k in z["paths"]}


def check_mask_source(rows: Sequence[Dict[str, str]], cache_dir: Path, seg_onnx: str) -> None:
    """ConfigError, before anything is written, when :func:`build_mask_cache` could not produce a
    mask for every row: ``seg_onnx`` names no file, or (``seg_onnx=""``) the cache lacks images."""
    if seg_onnx:
        if not Path(seg_onnx).is_file():
            raise ConfigError(f"{seg_onnx}: lung U-Net ONNX not found; train it with `ctsdk train seg` or pass --seg-onnx")
        return
    cached = _cached_mask_paths(cache_dir)
    missing = [r["path"] for r in rows if r["path"] not in cached]
    if missing:
        raise ConfigError(f"{D.mask_cache_path(cache_dir)}: no lung mask for {len(missing)} image(s), e.g. {missing[0]}; "
                          "pass --seg-onnx to segment them")


def build_mask_cache(rows: Sequence[Dict[str, str]], data_root: Path, cache_dir: Path, seg_onnx: str,
                     show_progress: bool = True) -> Dict[str, np.ndarray]:
    """Lung masks (uint8, native size) for every image of ``rows``, from the 2D lung U-Net; cached once.

    Reuses ``<cache_dir>/masks.npz`` when it was made by the same ONNX file (sha256 recorded):
    only the images it lacks are segmented and added (each image is segmented on its own, so a
    mask does not depend on which others were segmented with it); a cache of another ONNX is
    replaced by the masks of ``rows``. ``seg_onnx=""`` uses the cache as it is (every image must be
    in it).
    """
    import hashlib

    if not seg_onnx:  # cache only (e.g. masks made elsewhere): every image must be in it
        cached = D.load_mask_cache(cache_dir)
        missing = [r["path"] for r in rows if r["path"] not in cached]
        if missing:
            raise ConfigError(f"{D.mask_cache_path(cache_dir)}: no lung mask for {len(missing)} image(s), e.g. {missing[0]}; "
                              "pass --seg-onnx to segment them")
        return cached
    onnx = Path(seg_onnx)
    if not onnx.is_file():
        raise ConfigError(f"{onnx}: lung U-Net ONNX not found; train it with `ctsdk train seg` or pass --seg-onnx")
    digest = hashlib.sha256(onnx.read_bytes()).hexdigest()
    p = D.mask_cache_path(cache_dir)
    masks: Dict[str, np.ndarray] = {}
    if p.is_file():
        with np.load(p) as z:
            same = "meta_seg_sha256" in z.files and str(z["meta_seg_sha256"]) == digest
        if same:
            masks = D.load_mask_cache(cache_dir)
            if all(r["path"] in masks for r in rows):
                return masks
    from ..lungs import segment_slices_2d
    from ..lungs.unet2d import open_session

    todo = [r for r in rows if r["path"] not in masks]
    session = open_session(onnx, threads=1)
    t0 = time.perf_counter()
    for r in common.progress(todo, desc="lung masks", enabled=show_progress):
        grey = D.load_grey(data_root / r["path"])
        masks[r["path"]] = segment_slices_2d(grey[None], session)[0]
    D.save_mask_cache(masks, cache_dir, meta={"seg_sha256": digest, "seg_onnx": str(onnx),
                                              "seconds": f"{time.perf_counter() - t0:.1f}"})
    return masks


class _ImageSet:
    """Images + masks in memory (uint8) with their labels; batches as (N, 3, S, S) float32."""

    def __init__(self, rows: Sequence[Dict[str, str]], data_root: Path, masks: Dict[str, np.ndarray], size: int):
        self.rows = list(rows)
        self.size = size
        self.grey: List[np.ndarray] = []
        self.mask: List[np.ndarray] = []
        for r in self.rows:
            g = D.load_grey(data_root / r["path"])
            m = masks.get(r["path"])
            if m is None:
                raise ConfigError(f"{r['path']}: no lung mask in the cache; rebuild it (delete masks.npz)")
            if m.shape != g.shape:
                raise ConfigError(f"{r['path']}: cached mask {m.shape} does not match the image {g.shape}; rebuild the cache")
            self.grey.append(np.round(g * 255.0).astype(np.uint8))
            self.mask.append(m.astype(np.uint8))
        self.y = np.array([D.binary_label(r["label"]) for r in self.rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: Sequence[int], augment: Optional[D.Augment] = None, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        out = np.empty((len(idx), 3, self.size, self.size), np.float32)
        for j, i in enumerate(idx):
            g = self.grey[i].astype(np.float32) / 255.0
            if augment is None:
                out[j] = D.eval_input(g, self.mask[i], self.size)
            else:
                out[j] = augment(g, self.mask[i], self.size, rng)
        return out


# --- model helpers --------------------------------------------------------------------------------
def _predict(model: Any, ds: _ImageSet, batch_size: int = 64, desc: str = "", show: bool = False) -> np.ndarray:
    """p_covid for every image of ``ds`` (eval transform, no test-time augmentation)."""
    import torch

    model.eval()
    out = np.empty(len(ds), np.float64)
    starts = list(range(0, len(ds), batch_size))
    with torch.inference_mode():
        for s in common.progress(starts, desc=desc, enabled=show):
            idx = list(range(s, min(s + batch_size, len(ds))))
            x = torch.from_numpy(ds.batch(idx))
            _, probs, _ = model(x)
            out[s:s + len(idx)] = probs[:, 1].double().numpy()
    return out


def predict_images(model: Any, rows: Sequence[Dict[str, str]], data_root: Path, masks: Dict[str, np.ndarray],
                   size: int, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
    """p_covid for ``rows`` (loads images, eval transform)."""
    return _predict(model, _ImageSet(rows, data_root, masks, size), batch_size, "predict", show_progress)


def _subset(rows: Sequence[Dict[str, str]], split: str, limit: int, seed: int) -> List[Dict[str, str]]:
    sel = [r for r in rows if r["split"] == split]
    if limit and len(sel) > limit:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(len(sel), size=limit, replace=False).tolist())
        sel = [sel[i] for i in keep]
    return sel


def _versions() -> Dict[str, str]:
    import platform

    import torch

    import sdk

    return {"ctsdk": sdk.__version__, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}


# --- training -------------------------------------------------------------------------------------
def train_classifier(cfg: ClassifierTrainConfig, *, overwrite: bool = False) -> Dict[str, Any]:
    """Train, select on val AUC, evaluate on test, predict every image. Returns the summary dict
    (also written as ``metrics.json``). A run folder holding an earlier run
    (:func:`earlier_run_files`) is refused unless ``overwrite``."""
    cfg.validate()   # every value first: nothing is imported, read or written for a config that cannot train
    from .._lazy import require

    torch = require("torch", "training the slice classifier")
    from ..models import create_model

    common.refuse_earlier_run(earlier_run_files(cfg), overwrite)
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    common.seed_everything(cfg.seed)
    # checks first (config, split, classes, mask source): a run that fails on them writes nothing
    rows, split_computed = split_rows(cfg)
    train_rows = _subset(rows, "train", cfg.limit, cfg.seed)
    val_rows = _subset(rows, "val", cfg.limit, cfg.seed)
    test_rows = _subset(rows, "test", cfg.limit, cfg.seed)
    for name, part in (("train", train_rows), ("val", val_rows)):
        if len({D.binary_label(r["label"]) for r in part}) < 2:
            raise ConfigError(f"the {name} split ({len(part)} images) needs both classes; raise --limit or check the "
                              "index / --splits-csv (nothing was written)")
    # --limit: masks only for the images this run reads (the limited splits; predict_all predicts those)
    used_rows = rows if not cfg.limit else train_rows + val_rows + test_rows
    check_mask_source(used_rows, cfg.mask_dir, cfg.seg_onnx)

    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    (run / "READY").unlink(missing_ok=True)
    if not cfg.predict_all:  # an earlier run's predictions must not pass for this run's
        (run / "predictions.csv").unlink(missing_ok=True)
    common.save_config(cfg, run / "config.json", extra=_versions())
    if split_computed:
        D.write_splits_csv(rows, Path(cfg.out_dir) / "splits.csv")
    masks = build_mask_cache(used_rows, cfg.root, cfg.mask_dir, cfg.seg_onnx, cfg.progress)
    t_data = time.perf_counter()
    tr = _ImageSet(train_rows, cfg.root, masks, cfg.input_size)
    va = _ImageSet(val_rows, cfg.root, masks, cfg.input_size)

    model = create_model(cfg.model, pretrained=cfg.pretrained, drop_rate=cfg.drop_rate, input_size=cfg.input_size)
    if cfg.freeze_stages:
        model.freeze_stages(cfg.freeze_stages)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_epoch = min(len(tr), cfg.samples_per_epoch) if cfg.samples_per_epoch > 0 else len(tr)
    steps_per_epoch = int(np.ceil(n_epoch / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    warm = max(1, steps_per_epoch // 4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm))))
    cw = torch.from_numpy(common.class_weights(tr.y, 2, cfg.class_weighting))
    gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
    aug = D.Augment()
    stopper = common.EarlyStopping(patience=cfg.patience, mode="max")
    history: List[Dict[str, float]] = []
    best_state: Optional[Dict[str, Any]] = None
    epoch_times: List[float] = []
    for epoch in range(cfg.epochs):
        t_ep = time.perf_counter()
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(len(tr))[:n_epoch]
        losses: List[float] = []
        bar = common.progress(range(steps_per_epoch), desc=f"{cfg.model} epoch {epoch + 1}/{cfg.epochs}", enabled=cfg.progress)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(idx) == 0:
                break
            x = torch.from_numpy(tr.batch(idx, aug, rng))
            y = torch.from_numpy(tr.y[idx])
            logits, _, _ = model(x)
            loss = common.focal_loss(logits, y, gamma=gamma, weight=cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        p_val = _predict(model, va, desc="val", show=False)
        val_auc = common.roc_auc(va.y, p_val)
        epoch_times.append(time.perf_counter() - t_ep)
        improved = stopper.step(val_auc)
        rec = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_auc": val_auc,
               "seconds": round(epoch_times[-1], 1), "lr": float(sched.get_last_lr()[0])}
        history.append(rec)
        log.info("epoch %s", rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)  # stdout stays one JSON object with --json
        if improved:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if stopper.should_stop:
            break
        elapsed = (time.perf_counter() - t_data) / 60.0
        if cfg.max_minutes and elapsed + np.mean(epoch_times) / 60.0 > cfg.max_minutes:
            print(json.dumps({"stopped": "max_minutes", "elapsed_min": round(elapsed, 2)}), file=sys.stderr, flush=True)
            break
    t_train = time.perf_counter()
    assert best_state is not None  # at least one epoch ran
    model.load_state_dict(best_state)
    model.eval()

    p_val = _predict(model, va)
    threshold = common.youden_threshold(va.y, p_val)
    te = _ImageSet(test_rows, cfg.root, masks, cfg.input_size)
    p_test = _predict(model, te, desc="test", show=cfg.progress)
    metrics: Dict[str, Any] = {
        "model": cfg.model,
        "pooling": model.cfg.pooling,
        "threshold": threshold,
        "threshold_rule": "Youden J on the val split",
        "val": common.binary_report(va.y, p_val, threshold, cfg.n_boot, cfg.seed),
        "test": common.binary_report(te.y, p_test, threshold, cfg.n_boot, cfg.seed),
        "test_by_source": {},
        "best_epoch": stopper.best_step + 1,
        "epochs_run": len(history),
        "history": history,
        "sizes": {"train": len(tr), "val": len(va), "test": len(te)},
        "seconds": {"data_and_masks": round(t_data - t_start, 1), "train": round(t_train - t_data, 1),
                    "per_epoch_mean": round(float(np.mean(epoch_times)), 1)},
    }
    sources = np.array([r["source"] for r in test_rows])
    for src in sorted(set(sources.tolist())):
        sel = sources == src
        metrics["test_by_source"][src] = common.binary_report(te.y[sel], p_test[sel], threshold, cfg.n_boot, cfg.seed)

    ckpt = {"model": cfg.model, "cfg": model.cfg.to_dict(), "state_dict": model.state_dict(), "threshold": threshold,
            "train_config": asdict(cfg), "epoch": stopper.best_step + 1, "val_auc": stopper.best}
    torch.save(ckpt, run / "best.pt")

    if cfg.predict_all:
        p_all = predict_images(model, used_rows, cfg.root, masks, cfg.input_size, show_progress=cfg.progress)
        write_predictions(used_rows, p_all, run / "predictions.csv")
    metrics["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (run / "READY").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
    return metrics


def write_predictions(rows: Sequence[Dict[str, str]], p: np.ndarray, path: Path) -> Path:
    """``path,label,source,split,patient,p_covid`` (path relative to the data root)."""
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "source", "split", "patient", "p_covid"])
        for r, pc in zip(rows, p):
            w.writerow([r["path"], r["label"], r["source"], r["split"], r["patient"], f"{pc:.6f}"])
    return Path(path)


# --- domain-gap check on real HU slices ----------------------------------------------------------
def evaluate_covid_ct_md(checkpoint: str, data_root: Optional[str] = None, lung_method: str = "auto",
                         seg_onnx: Optional[str] = None, n_boot: int = 1000) -> Dict[str, Any]:
    """Slice-level AUC on real HU slices: COVID-CT-MD covid-P001 slices labelled infected (row 0 of
    ``Slice-level-labels-updated-1.npy``) vs every lung-bearing slice of normal-normal001.

    Inputs are made exactly as at triage: ``sdk.io.load_series`` -> ``sdk.lungs.segment`` ->
    ``sdk.volume.resample.classifier_inputs`` (lung window, 224). Slices count as lung-bearing
    when their lung mask covers >= 1 % of the slice. Also reports P001 infected vs P001
    non-infected lung slices.
    """
    import torch

    from ..io import load_series
    from ..lungs import segment
    from ..models.classifier import load_checkpoint
    from ..volume.resample import classifier_inputs

    root = Path(data_root) if data_root else default_data_root()
    base = root / "dicom" / "covid-ct-md"
    labels_file = base / "labels" / "Slice-level-labels-updated-1.npy"
    if not labels_file.is_file():
        raise ConfigError(f"{labels_file}: COVID-CT-MD slice labels not found")
    model = load_checkpoint(checkpoint)
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    threshold = float(ck.get("threshold", 0.5))
    size = model.cfg.input_size
    window = tuple(model.cfg.window)
    out: Dict[str, Any] = {"checkpoint": str(checkpoint), "threshold": threshold, "lung_method": lung_method}
    scores: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for name in ("covid-P001", "normal-normal001"):
        vol = load_series(base / name)
        kw: Dict[str, Any] = {"method": lung_method}
        if seg_onnx:
            kw["onnx_path"] = seg_onnx
        seg = segment(vol, **kw)
        mask = np.asarray(seg.mask)
        frac = mask.reshape(mask.shape[0], -1).mean(axis=1)
        idx = np.flatnonzero(frac >= 0.01)
        x = classifier_inputs(vol.hu, mask.astype(np.uint8), idx, size=size, window=window)
        p = np.empty(len(idx))
        with torch.inference_mode():
            for s in range(0, len(idx), 32):
                p[s:s + 32] = model(torch.from_numpy(x[s:s + 32]))[1][:, 1].double().numpy()
        scores[name] = (idx, p)
        out[name] = {"n_slices": int(vol.hu.shape[0]), "lung_slices": int(len(idx)), "lung_method": getattr(seg, "method", lung_method),
                     "mean_p_covid": float(p.mean()) if len(p) else float("nan")}
    from ..labels import align_slice_labels
    from .real_slices import LABEL_ORDER

    lab = align_slice_labels(np.load(labels_file)[0], out["covid-P001"]["n_slices"], LABEL_ORDER)
    idx_c, p_c = scores["covid-P001"]
    inf = lab[idx_c] == 1
    idx_n, p_n = scores["normal-normal001"]
    y = np.r_[np.ones(int(inf.sum())), np.zeros(len(p_n))].astype(np.int64)
    s = np.r_[p_c[inf], p_n]
    out["infected_vs_normal"] = common.binary_report(y, s, threshold, n_boot)
    y2 = inf.astype(np.int64)
    out["p001_infected_vs_clear"] = common.binary_report(y2, p_c, threshold, n_boot)
    out["p001_labelled_infected_slices"] = int((lab == 1).sum())
    out["slice_label_order"] = LABEL_ORDER
    return out


def compare_runs(run_a: str, run_b: str, n_boot: int = 2000, seed: int = 0) -> Dict[str, Any]:
    """Paired comparison of two runs on the same images: for val and test, AUC, and sensitivity /
    specificity at each run's own val-chosen threshold, as ``a - b`` with paired bootstrap CIs."""
    out: Dict[str, Any] = {"a": str(run_a), "b": str(run_b)}
    runs = []
    for r in (Path(run_a), Path(run_b)):
        m = json.loads((r / "metrics.json").read_text())
        with (r / "predictions.csv").open() as fh:
            pred = {row["path"]: row for row in csv.DictReader(fh)}
        runs.append((m, pred))
    (ma, pa), (mb, pb) = runs
    # predictions.csv holds p_covid to 6 decimals: compare against the threshold rounded alike
    ta, tb = round(float(ma["threshold"]), 6), round(float(mb["threshold"]), 6)
    for split in ("val", "test"):
        paths = [p for p, r in pa.items() if r["split"] == split and p in pb]
        y = np.array([D.binary_label(pa[p]["label"]) for p in paths])
        sa = np.array([float(pa[p]["p_covid"]) for p in paths])
        sb = np.array([float(pb[p]["p_covid"]) for p in paths])
        se = lambda t: (lambda yy, ss: common.sens_spec(yy, ss, t)[0])  # noqa: E731
        sp = lambda t: (lambda yy, ss: common.sens_spec(yy, ss, t)[1])  # noqa: E731
        out[split] = {"n": int(len(paths)), "auc": common.paired_bootstrap_diff(y, sa, sb, common.roc_auc, n_boot, seed)}
        # sensitivity / specificity at each run's own threshold: the same resampled images for both
        rng = np.random.default_rng(seed)
        dse, dsp = [], []
        for _ in range(n_boot):
            idx = rng.integers(0, len(y), len(y))
            dse.append(se(ta)(y[idx], sa[idx]) - se(tb)(y[idx], sb[idx]))
            dsp.append(sp(ta)(y[idx], sa[idx]) - sp(tb)(y[idx], sb[idx]))
        for name, fa, fb, dv in (("sensitivity", se(ta), se(tb), dse), ("specificity", sp(ta), sp(tb), dsp)):
            dv = np.asarray([d for d in dv if np.isfinite(d)])
            out[split][name] = {"a": fa(y, sa), "b": fb(y, sb), "diff": fa(y, sa) - fb(y, sb),
                                "ci95": tuple(float(v) for v in np.percentile(dv, [2.5, 97.5])),
                                "p_le_0": float((dv <= 0).mean())}
        out[split]["auc"].update({"a": common.roc_auc(y, sa), "b": common.roc_auc(y, sb)})
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``python -m sdk.train.classifier covid-ct-md CHECKPOINT [--out JSON]``: the domain-gap check.

    (Training itself is ``ctsdk train classifier``.)
    """
    import argparse

    ap = argparse.ArgumentParser(prog="python -m sdk.train.classifier")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("covid-ct-md", help="slice-level AUC on the COVID-CT-MD HU series (domain-gap check)")
    c.add_argument("checkpoint")
    c.add_argument("--data-root", default=None)
    c.add_argument("--lung-method", default="auto")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--n-boot", type=int, default=1000)
    c.add_argument("--out", default=None, help="JSON file (default: covid_ct_md.json beside the checkpoint)")
    k = sub.add_parser("compare", help="paired bootstrap of two runs' predictions (e.g. mask-GAP vs GAP)")
    k.add_argument("run_a", help="run folder with metrics.json + predictions.csv")
    k.add_argument("run_b")
    k.add_argument("--n-boot", type=int, default=2000)
    k.add_argument("--out", default=None, help="JSON file (default: <parent>/compare_<a>_vs_<b>.json)")
    a = ap.parse_args(argv)
    if a.cmd == "compare":
        res = compare_runs(a.run_a, a.run_b, n_boot=a.n_boot)
        ra, rb = Path(a.run_a), Path(a.run_b)
        out = Path(a.out) if a.out else ra.parent / f"compare_{ra.name}_vs_{rb.name}.json"
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res, indent=1))
        return res
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    res = evaluate_covid_ct_md(a.checkpoint, a.data_root, a.lung_method, n_boot=a.n_boot)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent / "covid_ct_md.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("infected_vs_normal", "p001_infected_vs_clear")}, indent=1))
    return res


if __name__ == "__main__":  # pragma: no cover
    main()
