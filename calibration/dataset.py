"""Calibration and evaluation slices: split assignment, stratified sampling, preprocessing.

The calibration set comes from the TRAIN split only (default 256 slices, stratified by source and
class); the accuracy delta is measured on the TEST split. Splits come from the classifier's own
split file (columns ``path`` and ``split``; ``"auto"``: ``runs/classifier/splits.csv`` under the
current working directory, where ``ctsdk train classifier`` writes it with its default
``--out-dir``), so calibration never sees a test image. Without one, the dataset's official split
is used where one exists (UCSD train/val/test) and a deterministic hash of the patient id (or
path) elsewhere (70 / 15 / 15), so one patient never straddles splits - but that is NOT the
classifier's split: its test and calibration images may be the classifier's training images, and
``"auto"`` says so (:func:`resolve_splits` returns the warning).

Preprocessing equals training's evaluation transform (``sdk.train.data.eval_input``: letterbox
to S x S, lung mask from the classifier's cache ``runs/classifier/masks/masks.npz`` or the same
2D lung U-Net), see :class:`TrainingPreprocessor`.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..labels import is_positive
from ..tables import read_csv_rows
from ..volume.resample import LUNG_WINDOW  # the runtime's classifier window (one owner)
from ..errors import ConfigError

log = logging.getLogger("sdk.calibration")

#: ``--splits auto``: where ``ctsdk train classifier`` writes its split with its default
#: ``--out-dir runs/classifier`` - relative to the current working directory, as that default is
#: (``sdk.train.classifier.ClassifierTrainConfig.out_dir``; tests/test_training_cli_guards.py keeps them equal)
DEFAULT_SPLITS = Path("runs") / "classifier" / "splits.csv"
#: the lung-mask cache ``ctsdk train classifier`` writes with its default ``--out-dir`` (under the
#: working directory, like :data:`DEFAULT_SPLITS`); ``ctsdk calibrate --masks-dir`` names another
DEFAULT_MASKS = Path("runs") / "classifier" / "masks"
#: how the rows are split when no split file is used
HASH_SPLIT = "official split where present, else sha256(patient or path) 70/15/15"


@dataclass
class Row:
    path: str           # as written in the CSV (relative to the CSV's folder)
    abs_path: str
    label: str
    source: str
    split: str          # train | val | test
    patient: str = ""

    @property
    def y(self) -> int:
        return is_positive(self.label)


def _hash_split(key: str) -> str:
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 70 else ("val" if h < 85 else "test")


@dataclass(frozen=True)
class SplitChoice:
    """Which split file a ``splits_csv`` value means (:func:`resolve_splits`).

    Attributes:
        path: the split file to read; None = the images CSV's own split column (hash split where
            it has none).
        how: where the split comes from, for reports ("classifier split file PATH", ...).
        warning: one line, non-empty when ``"auto"`` found no split file and fell back to the
            hash split (test / calibration images may then be the classifier's training images).
    """

    path: Optional[Path]
    how: str
    warning: str = ""


def resolve_splits(splits_csv: Optional[Any]) -> SplitChoice:
    """``splits_csv`` -> :class:`SplitChoice`: a path is used as given (ConfigError when missing),
    None / "" = the images CSV's split column, ``"auto"`` = :data:`DEFAULT_SPLITS` under the current
    working directory when it is a file, else the hash split with a warning naming ``--splits PATH``."""
    if splits_csv == "auto":
        found = Path.cwd() / DEFAULT_SPLITS
        if found.is_file():
            return SplitChoice(found, f"classifier split file {found} (--splits auto)")
        return SplitChoice(None, f"{HASH_SPLIT} (--splits auto: no {found})", (
            f"--splits auto: no classifier split file {found} (ctsdk train classifier writes "
            f"OUT_DIR/splits.csv, default --out-dir runs/classifier under the working directory); using the "
            f"images CSV's split column and a sha256(patient or path) 70/15/15 split instead, so the test and "
            f"calibration images may overlap the classifier's training images and the accuracy check can "
            f"pass falsely: pass --splits PATH with the splits.csv of the run that trained this classifier "
            f"(docs/data/splits.csv for the shipped one)"))
    if not splits_csv:
        return SplitChoice(None, HASH_SPLIT)
    split_file = Path(splits_csv)
    if not split_file.is_file():
        raise ConfigError(f"{split_file}: splits CSV not found (--splits: the splits.csv a ctsdk train classifier "
                          "run wrote to its --out-dir, or docs/data/splits.csv)")
    return SplitChoice(split_file, f"classifier split file {split_file}")


def load_rows(images_csv: os.PathLike, splits_csv: Optional[Any] = None) -> Tuple[List[Row], str]:
    """All rows of an images CSV (``path,label,source,split,patient``) with a train/val/test split.

    ``splits_csv``: a ``path,split`` file (rows not in it are dropped), ``"auto"`` for
    ``runs/classifier/splits.csv`` under the working directory when it exists (else the hash split,
    with a logged warning: see :func:`resolve_splits`), or None for the CSV's own split column
    (hash split where it is empty). Returns ``(rows, how)`` where ``how`` says where the split came from.
    """
    csv_path = Path(images_csv)
    raw = read_csv_rows(csv_path, ("path", "label"), "images CSV (format of ../shared/data/images_index.csv: path,label,source,split,patient)")
    choice = resolve_splits(splits_csv)
    if choice.warning:
        log.warning("%s", choice.warning)
    split_file = choice.path
    given: Dict[str, str] = {}
    how = choice.how
    if split_file is not None:
        with open(split_file, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("path", "split") if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"{split_file}: not a splits CSV: missing column(s) {missing} (it needs path and split, "
                                  "as in the splits.csv a ctsdk train classifier run writes, or docs/data/splits.csv)")
            for r in reader:
                given[r["path"]] = r["split"]
    rows = []
    for r in raw:
        src = r.get("source", "")
        if given:
            split = given.get(r["path"], "")
            if not split:
                continue  # not part of the classifier's data: neither calibrate nor evaluate on it
        elif r.get("split", "") in ("train", "val", "test"):
            split = r["split"]
        else:
            split = _hash_split(f"{src}/{r.get('patient') or r['path']}")
        rows.append(Row(r["path"], str((csv_path.parent / r["path"]).resolve()), r["label"], src, split, r.get("patient", "")))
    return rows, how


def stratified_sample(rows: Sequence[Row], n: int, seed: int = 0) -> List[Row]:
    """``n`` rows stratified by (source, label), proportional allocation (largest remainder),
    at least one per stratum when ``n`` allows; deterministic for a seed."""
    if n <= 0:
        raise ConfigError(f"--n must be positive, got {n}")
    strata: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        strata.setdefault((r.source, r.label), []).append(r)
    keys = sorted(strata)
    total = sum(len(strata[k]) for k in keys)
    if total <= n:
        return [r for k in keys for r in strata[k]]
    exact = {k: n * len(strata[k]) / total for k in keys}
    alloc = {k: min(len(strata[k]), max(1 if n >= len(keys) else 0, int(exact[k]))) for k in keys}
    rest = n - sum(alloc.values())
    for k in sorted(keys, key=lambda k: exact[k] - int(exact[k]), reverse=True):
        if rest <= 0:
            break
        if alloc[k] < len(strata[k]):
            alloc[k] += 1
            rest -= 1
    while sum(alloc.values()) > n:  # the at-least-one rule overshot: trim the biggest strata
        k = max(keys, key=lambda k: alloc[k])
        alloc[k] -= 1
    rng = np.random.default_rng(seed)
    out: List[Row] = []
    for k in keys:
        idx = rng.choice(len(strata[k]), size=alloc[k], replace=False)
        out.extend(strata[k][i] for i in sorted(idx))
    return out


def composition(rows: Sequence[Row]) -> Dict[str, int]:
    """Counts per ``source/label``."""
    out: Dict[str, int] = {}
    for r in rows:
        key = f"{r.source}/{r.label}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


# --- preprocessing ------------------------------------------------------------------------------
Preprocessor = Callable[[Sequence[Row]], np.ndarray]


@dataclass
class TrainingPreprocessor:
    """Training's evaluation transform (``sdk.train.data``): ``load_grey`` (8-bit / 255) at native
    size, the lung mask from the classifier's cache (``<mask_dir>/masks.npz``, keyed by the CSV
    path) or - for images not in it - the same 2D lung U-Net the cache was built with, then
    ``eval_input`` (letterbox to S x S, channels grey / mask / grey x mask).

    ``mask_sources`` counts where each mask came from (reported).
    """

    size: int = 224
    mask_dir: Optional[Path] = None    # None: DEFAULT_MASKS
    mask_sources: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._cache: Optional[Dict[str, np.ndarray]] = None
        self._seg: Any = None

    def _masks(self) -> Dict[str, np.ndarray]:
        if self._cache is None:
            from ..train import data as D

            try:
                self._cache = D.load_mask_cache(Path(self.mask_dir or DEFAULT_MASKS))
            except ConfigError as exc:
                log.warning("%s; segmenting calibration images with the lung U-Net instead (--masks-dir names the "
                            "classifier run's OUT_DIR/masks)", exc)
                self._cache = {}
        return self._cache

    def _segment(self, grey: np.ndarray) -> np.ndarray:
        from ..lungs import unet2d

        if self._seg is None:
            if not Path(unet2d.DEFAULT_ONNX).is_file():
                from ..export.samples import grey_lung_mask

                self._seg = grey_lung_mask
            else:
                sess = unet2d.open_session(unet2d.DEFAULT_ONNX)
                self._seg = lambda g, _s=sess: unet2d.segment_slices_2d(g[None], _s)[0]
        return self._seg(grey)

    def _grey_and_mask(self, r: Row, cache: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray, str]:
        """The row's grey image and lung mask (the cached mask when it fits, else segmented), and
        where the mask came from ("cache" | "unet2d" | "otsu")."""
        from ..train import data as D

        g = D.load_grey(r.abs_path)
        m = cache.get(r.path)
        if m is not None and m.shape == g.shape:
            return g, m, "cache"
        m = self._segment(g)
        return g, m, "otsu" if getattr(self._seg, "__name__", "") == "grey_lung_mask" else "unet2d"

    def __call__(self, rows: Sequence[Row]) -> np.ndarray:
        from ..train import data as D

        out = np.zeros((len(rows), 3, self.size, self.size), np.float32)
        cache = self._masks()
        for i, r in enumerate(rows):
            g, m, key = self._grey_and_mask(r, cache)
            self.mask_sources[key] = self.mask_sources.get(key, 0) + 1
            out[i] = D.eval_input(g, m, self.size)
        return out


@dataclass
class SimplePreprocessor:
    """Fallback without ``sdk.train`` (a runtime-only install): grey resized (not letterboxed)
    to S x S and the rough Otsu lung mask. Only for smoke runs; real calibration uses
    :class:`TrainingPreprocessor`."""

    size: int = 224
    mask_sources: Dict[str, int] = field(default_factory=dict)

    def __call__(self, rows: Sequence[Row]) -> np.ndarray:
        from ..export.samples import grey_lung_mask, load_grey, three_channel

        self.mask_sources["otsu"] = self.mask_sources.get("otsu", 0) + len(rows)
        out = np.zeros((len(rows), 3, self.size, self.size), np.float32)
        for i, r in enumerate(rows):
            g = load_grey(r.abs_path, self.size)
            out[i] = three_channel(g, grey_lung_mask(g))
        return out


@dataclass
class HuRenderPreprocessor(TrainingPreprocessor):
    """What the HU-trained classifier sees: each 8-bit image's grey->HU map is estimated from its
    anatomy (``sdk.train.hu_estimate``), the image is re-rendered in HU and windowed by the
    runtime's rule (lung window, 224). Images whose map cannot be estimated fall back to
    :class:`TrainingPreprocessor`'s transform and are counted in ``mask_sources``
    (``hu_estimate_failed``); pass a CSV of estimable images to avoid them."""

    window: Tuple[float, float] = LUNG_WINDOW

    def __call__(self, rows: Sequence[Row]) -> np.ndarray:
        from ..train import data as D
        from ..train import hu_estimate as H
        from ..train.real_slices import render_inputs

        out = np.zeros((len(rows), 3, self.size, self.size), np.float32)
        cache = self._masks()
        for i, r in enumerate(rows):
            g, m, _ = self._grey_and_mask(r, cache)
            est = H.estimate_hu_map(g, m)
            if not est.ok:
                self.mask_sources["hu_estimate_failed"] = self.mask_sources.get("hu_estimate_failed", 0) + 1
                out[i] = D.eval_input(g, m, self.size)
                continue
            self.mask_sources["hu_rendered"] = self.mask_sources.get("hu_rendered", 0) + 1
            hu, mk = H.render_hu_image(g, m, est, self.size)
            out[i] = render_inputs(hu[None], mk[None], self.window)[0]
        return out


def preprocessor(size: int = 224, mask_dir: Optional[os.PathLike] = None) -> Preprocessor:
    """Training's preprocessing (:class:`TrainingPreprocessor`) when ``sdk.train.data`` imports,
    else :class:`SimplePreprocessor` (with a warning)."""
    try:
        from ..train import data as _  # noqa: F401
    except ImportError as exc:
        log.warning("sdk.train.data unavailable (%s): calibration uses the simple resize + Otsu-mask preprocessing", exc)
        return SimplePreprocessor(size)
    return TrainingPreprocessor(size, Path(mask_dir) if mask_dir else DEFAULT_MASKS)


def preprocess_batched(pre: Preprocessor, rows: Sequence[Row], batch: int = 64, progress: bool = True) -> np.ndarray:
    """Apply ``pre`` in chunks with a progress bar on stderr."""
    from tqdm import tqdm

    parts = []
    for i in tqdm(range(0, len(rows), batch), desc="preprocess", unit="batch", disable=not progress, leave=False):
        parts.append(pre(rows[i:i + batch]))
    return np.concatenate(parts) if parts else np.zeros((0, 3, 224, 224), np.float32)


__all__ = ["DEFAULT_SPLITS", "HuRenderPreprocessor", "SimplePreprocessor", "SplitChoice", "TrainingPreprocessor", "Row", "composition",
           "load_rows", "preprocess_batched", "preprocessor", "resolve_splits", "stratified_sample"]
