"""Training data for the slice classifier: the images index, patient-grouped splits, lung-mask cache,
and OpenCV/NumPy augmentation. Torch-free (the evaluation transform is imported by ``sdk.evaluate``).

Data: ``images_index.csv`` under the shared data root (columns ``path,label,source,split,patient``,
``path`` relative to the data root; see ``shared/data/images/README.md``).

Binary labels: ``covid`` -> 1; ``non-covid`` and ``normal`` -> 0 (class ``non_covid``).

Splits (:func:`assign_splits`; our split replaces ``split``, the dataset's own value is kept in
``source_split``):

- ``ucsd-covid-ct``: the official patient-level train/val/test lists, unchanged.
- ``mosmed-midslices``: one slice per study; studies split 60/20/20 stratified by CT-k (seeded).
- ``sarscov2-ctscan-soares``: no patient id. Files are numbered per class in acquisition order, so
  contiguous file-number blocks approximate patients: per class, the sorted numbers are cut into
  10 equal-count blocks; the lowest 8 blocks go to train, the top 2 to val. A patient can still straddle the one boundary per class, so
  Soares is kept OUT of the test split (the held-out test is UCSD test + MosMed test only).

Preprocessing (train and eval share :func:`warp_to_input`): the 8-bit image becomes grey in [0, 1]
and is **letterboxed** into ``S x S``: scaled so its longer side is ``S`` (aspect kept, the whole
field of view kept - no lung is cut), centred, padded with 0. The lung mask (cached at the image's
native size) follows with nearest-neighbour sampling. The three channels are grey, mask,
grey * mask (docs/conventions.md). Augmentation composes random scale/crop, rotation, translation
and horizontal flip into the same single affine warp, and jitters window/level, gamma and noise
(the training images are screenshots with unknown windows; the product sees HU slices in the
(-1350, 150) lung window).
"""
from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import ConfigError
from ..labels import is_positive

__all__ = [
    "CLASSES",
    "SPLIT_COLUMNS",
    "binary_label",
    "read_images_index",
    "assign_splits",
    "write_splits_csv",
    "read_splits_csv",
    "check_no_leakage",
    "group_id",
    "load_grey",
    "letterbox_matrix",
    "warp_to_input",
    "stack_channels",
    "eval_input",
    "Augment",
    "mask_cache_path",
    "save_mask_cache",
    "load_mask_cache",
]

PathLike = Union[str, Path]
CLASSES: Tuple[str, str] = ("non_covid", "covid")
INDEX_COLUMNS = ("path", "label", "source", "split", "patient")
SPLIT_COLUMNS = ("path", "label", "source", "split", "patient", "source_split", "group")
SPLITS = ("train", "val", "test")


# --- index and labels -----------------------------------------------------------------------------
def binary_label(label: str) -> int:
    """``covid`` -> 1; ``non-covid`` / ``normal`` -> 0; anything else raises ConfigError - the label
    words are :mod:`sdk.labels`' (one owner for training, calibration and evaluation)."""
    return is_positive(label)


def read_images_index(csv_path: PathLike) -> List[Dict[str, str]]:
    """Rows of an images CSV (images_index.csv or a splits CSV) as dicts; checks the columns."""
    p = Path(csv_path)
    if not p.is_file():
        raise ConfigError(f"{p}: images CSV not found (expected shared/data/images_index.csv or runs/classifier/splits.csv)")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in INDEX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{p}: missing column(s) {missing}; an images CSV has {', '.join(INDEX_COLUMNS)}")
        rows = [dict(r) for r in reader]
    if not rows:
        raise ConfigError(f"{p}: no rows")
    return rows


def group_id(row: Mapping[str, str]) -> str:
    """The leakage group of an image: the patient/study id, else a derived one.

    UCSD images without a patient id are grouped by their source paper (file-name prefix before
    ``-p<page>-<fig>``); Soares images by their ``soares_block`` (set by :func:`assign_splits`);
    anything else is its own group.
    """
    if row.get("group"):
        return row["group"]
    if row.get("patient"):
        return f"{row['source']}:{row['patient']}"
    name = Path(row["path"]).name
    if row["source"] == "ucsd-covid-ct":
        return "ucsd-covid-ct:paper:" + re.sub(r"-p\d+-\d+.*$", "", Path(name).stem)
    if row.get("soares_block"):
        return f"{row['source']}:block:{row['soares_block']}"
    return f"{row['source']}:image:{row['path']}"


def _stable_rng(seed: int, key: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")
    return np.random.default_rng(h)


def assign_splits(rows: Sequence[Mapping[str, str]], *, seed: int = 0,
                  mosmed_fractions: Tuple[float, float, float] = (0.6, 0.2, 0.2),
                  soares_train_fraction: float = 0.8, soares_blocks: int = 10) -> List[Dict[str, str]]:
    """Assign our train/val/test split to every row (see the module docstring for the rules).

    Returns new rows with columns ``SPLIT_COLUMNS`` (``split`` = ours, ``source_split`` = the
    dataset's own), in the input order. Deterministic for a given ``seed``.
    """
    if abs(sum(mosmed_fractions) - 1.0) > 1e-9:
        raise ConfigError(f"mosmed_fractions must sum to 1, got {mosmed_fractions}")
    out: List[Dict[str, str]] = []
    # MosMed: stratified by CT-k, one study per row
    mos: Dict[str, List[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r["source"] == "mosmed-midslices":
            mos[r["split"]].append(i)
    mos_split: Dict[int, str] = {}
    for cat, idx in sorted(mos.items()):
        rng = _stable_rng(seed, f"mosmed:{cat}")
        perm = [idx[j] for j in rng.permutation(len(idx))]
        n_tr = int(round(mosmed_fractions[0] * len(perm)))
        n_va = int(round(mosmed_fractions[1] * len(perm)))
        if len(perm) >= 3:  # every category in every split when possible
            n_tr, n_va = max(1, min(n_tr, len(perm) - 2)), max(1, n_va)
        for j, i in enumerate(perm):
            mos_split[i] = "train" if j < n_tr else "val" if j < n_tr + n_va else "test"
    # Soares: contiguous file-number blocks per class
    soa: Dict[str, List[Tuple[int, int]]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r["source"] == "sarscov2-ctscan-soares":
            m = re.search(r"_(\d+)\.\w+$", r["path"])
            if not m:
                raise ConfigError(f"{r['path']}: Soares file name without a number; cannot place it in a block")
            soa[r["label"]].append((int(m.group(1)), i))
    soa_split: Dict[int, Tuple[str, int]] = {}
    for label, items in soa.items():
        items.sort()
        n = len(items)
        train_blocks = int(round(soares_train_fraction * soares_blocks))
        for rank, (_, i) in enumerate(items):
            block = min(soares_blocks - 1, rank * soares_blocks // max(n, 1))
            soa_split[i] = ("train" if block < train_blocks else "val", block)
    for i, r in enumerate(rows):
        src = r["source"]
        row = {c: r.get(c, "") for c in INDEX_COLUMNS}
        row["source_split"] = r.get("split", "")
        if src == "ucsd-covid-ct":
            if r["split"] not in SPLITS:
                raise ConfigError(f"{r['path']}: UCSD row without an official split ({r['split']!r})")
            row["split"] = r["split"]
        elif src == "mosmed-midslices":
            row["split"] = mos_split[i]
        elif src == "sarscov2-ctscan-soares":
            split, block = soa_split[i]
            row["split"] = split
            row["soares_block"] = f"{r['label']}-{block:02d}"
        else:
            rng = _stable_rng(seed, f"other:{group_id(row)}")
            u = rng.random()
            row["split"] = "train" if u < 0.6 else "val" if u < 0.8 else "test"
        row["group"] = group_id(row)
        out.append(row)
    check_no_leakage(out)
    return out


def check_no_leakage(rows: Iterable[Mapping[str, str]]) -> Dict[str, int]:
    """Raise ConfigError when one leakage group (:func:`group_id`) sits in two splits.

    Returns the number of groups per split.
    """
    where: Dict[str, set] = defaultdict(set)
    for r in rows:
        where[group_id(r)].add(r["split"])
    bad = {g: sorted(s) for g, s in where.items() if len(s) > 1}
    if bad:
        first = list(bad.items())[:5]
        raise ConfigError(f"patient leakage: {len(bad)} patient/study group(s) in more than one split, e.g. {first}")
    counts: Dict[str, int] = defaultdict(int)
    for s in where.values():
        counts[next(iter(s))] += 1
    return dict(counts)


def write_splits_csv(rows: Sequence[Mapping[str, str]], path: PathLike) -> Path:
    """Write ``SPLIT_COLUMNS`` (``path`` relative to the data root, as in images_index.csv)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(SPLIT_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in SPLIT_COLUMNS})
    return p


#: where a valid splits CSV comes from (the error messages of :func:`read_splits_csv` name it)
SPLITS_CSV_SOURCES = ("the splits.csv a ctsdk train classifier run wrote to its --out-dir (run it without "
                      "--splits-csv to compute one), or docs/data/splits.csv (the shipped classifier's split)")


def read_splits_csv(path: PathLike) -> List[Dict[str, str]]:
    """Read a splits CSV written by :func:`write_splits_csv`: every column of ``SPLIT_COLUMNS``
    (``split`` = ours, ``source_split`` = the dataset's own, ``group`` = the leakage group).
    ConfigError names the missing columns and where a valid file comes from."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: splits CSV not found; use {SPLITS_CSV_SOURCES}")
    with p.open(newline="") as fh:
        header = csv.DictReader(fh).fieldnames or []
    missing = [c for c in SPLIT_COLUMNS if c not in header]
    if missing:
        raise ConfigError(f"{p}: not a splits CSV: missing column(s) {missing}; a splits CSV has the columns "
                          f"{','.join(SPLIT_COLUMNS)}: use {SPLITS_CSV_SOURCES}")
    return read_images_index(p)


# --- images ---------------------------------------------------------------------------------------
def load_grey(path: PathLike) -> np.ndarray:
    """Read an image file as float32 grey in [0, 1] (8-bit -> /255, 16-bit -> /65535)."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ConfigError(f"{path}: cannot read image (missing or not an image OpenCV can decode)")
    if img.ndim == 3:
        img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return (img.astype(np.float32) / scale).clip(0.0, 1.0)


def letterbox_matrix(h: int, w: int, size: int) -> np.ndarray:
    """2x3 affine (source pixel -> destination pixel, pixel centres at integers) that scales the
    longer side of an ``h x w`` image to ``size`` and centres it in ``size x size``."""
    s = size / float(max(h, w))
    # continuous coordinates: u_dst = s * u_src + t, with pixel centres at index + 0.5
    tx = (size - s * w) / 2.0
    ty = (size - s * h) / 2.0
    return np.array([[s, 0.0, tx + 0.5 * s - 0.5], [0.0, s, ty + 0.5 * s - 0.5]], dtype=np.float64)


def warp_to_input(grey: np.ndarray, mask: np.ndarray, size: int, matrix: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Warp ``grey`` (bilinear) and ``mask`` (nearest) into ``size x size`` with ``matrix``
    (default: :func:`letterbox_matrix`); outside the image both are 0."""
    import cv2

    if grey.shape != mask.shape:
        raise ConfigError(f"grey {grey.shape} and mask {mask.shape} must have the same shape")
    m = letterbox_matrix(*grey.shape, size) if matrix is None else matrix
    g = cv2.warpAffine(grey.astype(np.float32), m, (size, size), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    k = cv2.warpAffine(mask.astype(np.uint8), m, (size, size), flags=cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return g.clip(0.0, 1.0), (k > 0).astype(np.float32)


def stack_channels(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(3, S, S)`` float32: grey, mask, grey * mask (paper 001, docs/conventions.md)."""
    g = grey.astype(np.float32)
    m = mask.astype(np.float32)
    return np.stack([g, m, g * m], axis=0)


def eval_input(grey: np.ndarray, mask: np.ndarray, size: int = 224) -> np.ndarray:
    """The evaluation transform of an 8-bit training-style image: letterbox + 3 channels.

    ``grey`` float in [0, 1] and ``mask`` (0/1) at the image's native size -> ``(3, size, size)``.
    """
    g, m = warp_to_input(grey, mask, size)
    return stack_channels(g, m)


@dataclass(frozen=True)
class Augment:
    """Random geometric + intensity augmentation, applied as ONE affine warp then intensity jitter.

    Geometry (about the letterboxed image's centre): scale ``U(scale)`` (> 1 zooms in = random
    crop), rotation ``U(-rotate_deg, rotate_deg)``, translation ``U(-translate, translate)`` x size,
    horizontal flip with ``p_flip``. Intensity (on grey only, before the mask product): window /
    level jitter ``g' = clip((g - lo) / (hi - lo))`` with ``lo ~ U(level_lo)``, ``hi ~ U(level_hi)``,
    gamma ``g'' = g' ** U(gamma)``, Gaussian noise ``sigma ~ U(0, noise)``.
    """

    scale: Tuple[float, float] = (0.85, 1.2)
    rotate_deg: float = 10.0
    translate: float = 0.06
    p_flip: float = 0.5
    level_lo: Tuple[float, float] = (-0.12, 0.15)
    level_hi: Tuple[float, float] = (0.8, 1.12)
    gamma: Tuple[float, float] = (0.7, 1.45)
    noise: float = 0.02

    def matrix(self, h: int, w: int, size: int, rng: np.random.Generator) -> np.ndarray:
        """The 2x3 source -> destination matrix: letterbox, then the random similarity about the centre."""
        base = np.vstack([letterbox_matrix(h, w, size), [0.0, 0.0, 1.0]])
        c = (size - 1) / 2.0
        s = rng.uniform(*self.scale)
        a = math.radians(rng.uniform(-self.rotate_deg, self.rotate_deg))
        flip = -1.0 if rng.random() < self.p_flip else 1.0
        tx, ty = rng.uniform(-self.translate, self.translate, size=2) * size
        rot = np.array([[s * math.cos(a) * flip, -s * math.sin(a), 0.0],
                        [s * math.sin(a) * flip, s * math.cos(a), 0.0],
                        [0.0, 0.0, 1.0]])
        to_c = np.array([[1.0, 0.0, -c], [0.0, 1.0, -c], [0.0, 0.0, 1.0]])
        back = np.array([[1.0, 0.0, c + tx], [0.0, 1.0, c + ty], [0.0, 0.0, 1.0]])
        return (back @ rot @ to_c @ base)[:2]

    def intensity(self, grey: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo = rng.uniform(*self.level_lo)
        hi = rng.uniform(*self.level_hi)
        g = np.clip((grey - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
        g = g ** rng.uniform(*self.gamma)
        if self.noise > 0:
            g = g + rng.normal(0.0, rng.uniform(0.0, self.noise), size=g.shape)
        return np.clip(g, 0.0, 1.0).astype(np.float32)

    def __call__(self, grey: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """Native-size ``grey`` [0, 1] + ``mask`` -> augmented ``(3, size, size)`` float32 input."""
        m = self.matrix(grey.shape[0], grey.shape[1], size, rng)
        g = self.intensity(grey, rng)
        gw, mw = warp_to_input(g, mask, size, m)
        return stack_channels(gw, mw)


# --- lung-mask cache ------------------------------------------------------------------------------
def mask_cache_path(cache_dir: PathLike) -> Path:
    """``<cache_dir>/masks.npz``: one uint8 mask per image at its native size, keyed by index."""
    return Path(cache_dir) / "masks.npz"


def save_mask_cache(masks: Mapping[str, np.ndarray], cache_dir: PathLike, meta: Optional[Mapping[str, str]] = None) -> Path:
    """Save ``{path: mask}``; the npz holds ``paths`` (the keys, in order) and ``m00000...`` arrays."""
    p = mask_cache_path(cache_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    keys = list(masks)
    arrays = {f"m{i:05d}": (np.asarray(masks[k]) > 0).astype(np.uint8) for i, k in enumerate(keys)}
    extra = {f"meta_{k}": np.array(str(v)) for k, v in (meta or {}).items()}
    tmp = p.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, paths=np.array(keys), **arrays, **extra)
    tmp.replace(p)
    return p


def load_mask_cache(cache_dir: PathLike) -> Dict[str, np.ndarray]:
    """Load ``{path: uint8 mask}`` saved by :func:`save_mask_cache` (``path`` as in the index)."""
    p = mask_cache_path(cache_dir)
    if not p.is_file():
        raise ConfigError(f"{p}: lung-mask cache not found; build it with `ctsdk train classifier` "
                          "(it segments every image with the lung U-Net once)")
    with np.load(p) as z:
        keys = [str(k) for k in z["paths"]]
        return {k: z[f"m{i:05d}"] for i, k in enumerate(keys)}
