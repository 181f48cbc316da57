"""Train the 2D lung U-Net on seg2d (``/work/shared/data/seg2d``) and export it to ONNX.

    python -m sdk.train.seg --out runs/seg            # ~5-9 min on 2 CPU cores
    python -m sdk.train.seg --target infection --out runs/infection   # a lesion U-Net (not shipped)
    python -m sdk.calibration.lungs --bundle sdk/bundles/default   # INT8 U-Net + Dice gate

Data: 404 slices (256^2, min-max + CLAHE by the source) with manual lung masks of COVID-19
lungs. Consecutive file numbers are consecutive slices of one volume, so the split is by
contiguous number blocks: ``val`` = numbers in [0, 260), ``test`` = numbers >= 1320 (held out,
nothing is tuned on it), ``train`` = the rest.

Augmentation (NumPy/OpenCV) makes the net work on lung-windowed HU slices and 8-bit screenshots:
random window / contrast / gamma, re-preparation with or without CLAHE, flips, small affine
(rotation, scale, shift, with black borders), blur and Gaussian noise. Loss: Dice + BCE. Early
stopping on validation Dice. ``--target infection`` trains the same net on seg2d's COVID-19
infection masks instead (files ``unet2d_infection.*``; measured on real HU slices and not shipped:
docs/training.md, *A lesion U-Net*). Outputs in ``out``: ``unet2d_lung.pt`` (best state dict),
``unet2d_lung.onnx`` (opset 17, dynamic batch, parity-checked vs eager), ``config.json``,
``metrics.json``. The data is read and split before anything is written. Progress (one JSON line
per epoch, the stopping reason, a progress bar) goes to stderr; :func:`train_seg` prints nothing on
stdout (``ctsdk train seg`` prints the summary there, one format; ``python -m sdk.train.seg`` one
JSON object). ``ctsdk train seg`` refuses an ``out_dir`` holding an earlier run
(:func:`earlier_run_files`) unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ..errors import ConfigError, CtsdkError
from ..paths import shared_data_root
from ..lungs.unet2d import CLAHE_SIZE, INPUT_NAME, NET_SIZE, OUTPUT_NAME, prepare_slice
from . import common

DEFAULT_DATA = shared_data_root() / "seg2d"


@dataclass
class SegTrainConfig:
    """Everything that decides a training run (saved as config.json beside the weights)."""

    data_dir: str = str(DEFAULT_DATA)
    out_dir: str = "runs/seg"  # relative to the working directory, like every runs/ default
    target: str = "lung"       # "lung" (lung masks) or "infection" (COVID-19 lesion masks of seg2d)
    size: int = NET_SIZE
    base: int = 16
    levels: int = 4
    val_block: Tuple[int, int] = (0, 260)       # file numbers [lo, hi)
    test_block: Tuple[int, int] = (1320, 10000)
    epochs: int = 80
    patience: int = 12
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_minutes: float = 9.0
    threads: int = 2
    seed: int = 0
    p_reclahe: float = 0.5
    opset: int = 17
    notes: List[str] = field(default_factory=list)

    def validate(self) -> None:
        """ConfigError naming the field (and its ``ctsdk train seg`` option), the value and what is
        allowed - run by :func:`train_seg` before torch is imported or a slice read, and by ``ctsdk
        train seg`` (``--print-config`` too). Before it, ``--lr -1`` failed in AdamW and ``--size 33``
        in the U-Net's first batch, after the run folder was written."""
        common.check_choice(self, "target", sorted(TARGETS))
        common.check_counts(self, ("base", "epochs", "patience", "batch_size"))
        common.check_counts(self, ("levels",), minimum=2, maximum=MAX_LEVELS)
        side = 2 ** (int(self.levels) - 1)
        common.check_multiple(self, "size", side, minimum=side, maximum=MAX_SIZE,
                              why=f"its {int(self.levels)} U-Net levels divide it by {side}")
        common.check_run_basics(self)
        common.check_counts(self, ("opset",), minimum=OPSETS[0], maximum=OPSETS[1],
                            what="opsets of torch.onnx.export's TorchScript exporter")
        common.check_numbers(self, ("lr", "max_minutes"), minimum=0, min_open=True)
        common.check_numbers(self, ("weight_decay",), minimum=0)
        common.check_numbers(self, ("p_reclahe",), minimum=0, maximum=1)
        for name in ("val_block", "test_block"):
            _check_block(self, name)


#: what each training target reads from seg2d's index (its mask column)
TARGETS: Dict[str, str] = {"lung": "lung_mask", "infection": "infection_mask"}
#: most U-Net levels: 8 halves a 128-pixel input to 1 pixel (and keeps 2 ** (levels - 1) computable)
MAX_LEVELS = 8
#: largest training side: seg2d's slices are 512 x 512, so a larger side only up-samples them, and a
#: typo (--size 40960) would ask for GBs per batch before the first step
MAX_SIZE = 1024
#: opsets :func:`export_onnx` can write: torch.onnx.export(dynamo=False), the TorchScript exporter
#: (torch.onnx._constants ONNX_MIN_OPSET .. ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.x)
OPSETS: Tuple[int, int] = (7, 20)
#: files of ``out_dir`` that mark an earlier run (``ctsdk train seg`` refuses them unless --overwrite)
RUN_MARKERS: Tuple[str, ...] = ("unet2d_lung.pt", "unet2d_lung.onnx", "metrics.json")


def _check_block(cfg: SegTrainConfig, name: str) -> None:
    """ConfigError unless field ``name`` is a file-number range (LO, HI): whole numbers, 0 <= LO < HI."""
    value = getattr(cfg, name)
    pair = isinstance(value, (tuple, list)) and len(value) == 2
    whole = pair and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    if not (whole and 0 <= value[0] < value[1]):
        option = "--" + name.replace("_", "-")
        raise ConfigError(f"{type(cfg).__name__}: {name} must be two whole numbers LO HI with 0 <= LO < HI "
                          f"({option}; file numbers, HI excluded), got {value!r}")


def model_stem(cfg: SegTrainConfig) -> str:
    """File stem of the run's weights: ``unet2d_lung`` or ``unet2d_infection``."""
    return f"unet2d_{cfg.target}"


def earlier_run_files(cfg: SegTrainConfig) -> List[Path]:
    """The files of an earlier run already in ``cfg.out_dir`` (empty: a fresh run)."""
    names = [n.replace("unet2d_lung", model_stem(cfg)) for n in RUN_MARKERS]
    return [Path(cfg.out_dir) / name for name in names if (Path(cfg.out_dir) / name).exists()]


def _progress(record: Any) -> None:
    """One progress line on stderr (a dict as one JSON line): stdout is left to the summary."""
    print(record if isinstance(record, str) else json.dumps(record), file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------------
# the seg2d reader and its block split live with the segmenter (sdk.lungs.data), which evaluates on them too
from ..lungs.data import load_seg2d, split_blocks  # noqa: E402,F401


def augment(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: SegTrainConfig) -> Tuple[np.ndarray, np.ndarray]:
    """Random intensity + geometry augmentation; returns the network input (S, S) and mask (S, S)."""
    import cv2

    g = img.astype(np.float32) / 255.0
    m = mask.astype(np.float32)
    # geometry: flips, rotation, scale, shift (black border like a screenshot / small FOV)
    if rng.random() < 0.5:
        g, m = g[:, ::-1], m[:, ::-1]
    if rng.random() < 0.1:
        g, m = g[::-1], m[::-1]
    if rng.random() < 0.8:
        ang = rng.uniform(-12, 12)
        sc = math.exp(rng.uniform(math.log(0.7), math.log(1.25)))
        c = CLAHE_SIZE / 2.0
        a = cv2.getRotationMatrix2D((c, c), ang, sc)
        a[:, 2] += rng.uniform(-0.08, 0.08, 2) * CLAHE_SIZE
        g = cv2.warpAffine(np.ascontiguousarray(g), a, (CLAHE_SIZE, CLAHE_SIZE), flags=cv2.INTER_LINEAR, borderValue=0.0)
        m = cv2.warpAffine(np.ascontiguousarray(m), a, (CLAHE_SIZE, CLAHE_SIZE), flags=cv2.INTER_LINEAR, borderValue=0.0)
    # intensity: window (contrast), gamma, blur, noise
    if rng.random() < 0.8:
        lo, hi = rng.uniform(0.0, 0.3), rng.uniform(0.55, 1.0)
        g = np.clip((g - lo) / (hi - lo), 0, 1)
    if rng.random() < 0.7:
        g = g ** math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    if rng.random() < 0.3:
        g = cv2.GaussianBlur(np.ascontiguousarray(g), (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.4:
        g = g + rng.normal(0, rng.uniform(0.005, 0.05), g.shape).astype(np.float32)
    # re-prepare as at inference: min-max + CLAHE (p_reclahe) or min-max only
    x = prepare_slice(np.ascontiguousarray(g), cfg.size, clahe=bool(rng.random() < cfg.p_reclahe))
    mm = cv2.resize(np.ascontiguousarray(m), (cfg.size, cfg.size), interpolation=cv2.INTER_AREA)
    return x, (mm > 0.5).astype(np.float32)


def prepare_eval(img: np.ndarray, size: int) -> np.ndarray:
    """Evaluation input: the inference preparation (min-max + CLAHE) of the unchanged image."""
    return prepare_slice(img.astype(np.float32) / 255.0, size, clahe=True)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)


# --- training --------------------------------------------------------------------------------------
def _loss(torch: Any, logits: Any, target: Any) -> Any:
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    den = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    soft_dice = 1 - ((2 * inter + 1) / (den + 1)).mean()
    return bce + soft_dice


def _predict(torch: Any, model: Any, x: np.ndarray, batch: int = 32) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i : i + batch])).numpy()[:, 0])
    return np.concatenate(out)


def evaluate_dice(logits: np.ndarray, masks: np.ndarray) -> List[float]:
    """Per-slice Dice at the masks' resolution (bilinear logits, threshold 0, hole filling)."""
    from ..lungs.unet2d import logits_to_masks

    pred = logits_to_masks(logits, masks.shape[1:])
    return [dice(p, m) for p, m in zip(pred, masks)]


def export_onnx(model: Any, path: Path, size: int, opset: int = 17) -> float:
    """Export with a dynamic batch axis; returns max |ORT - eager| on a random batch of 3."""
    import torch

    from ..runtime.ort import OrtSession

    model.eval()
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(
        model, x[:1], str(path), opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False,
    )
    with torch.no_grad():
        ref = model(x).numpy()
    got = OrtSession(path, device="cpu").infer({INPUT_NAME: x.numpy()}, [OUTPUT_NAME])[OUTPUT_NAME]
    return float(np.abs(got - ref).max())


def train_seg(cfg: SegTrainConfig, *, overwrite: bool = False) -> Dict[str, Any]:
    """Train, early-stop on validation Dice, export ONNX, write config/metrics; returns metrics.
    ``cfg.out_dir`` holding an earlier run (:func:`earlier_run_files`) is refused unless ``overwrite``."""
    cfg.validate()   # every value first: nothing is imported, read or written for a config that cannot train
    from .._lazy import require

    torch = require("torch", "training the lung U-Net")
    from tqdm import tqdm

    from ..models.unet import unet2d_lung

    # data and split first: a run that fails on them writes nothing
    stem = model_stem(cfg)
    from .common import refuse_earlier_run

    refuse_earlier_run(earlier_run_files(cfg), overwrite)
    nums, imgs, masks = load_seg2d(cfg.data_dir, TARGETS[cfg.target])
    split = split_blocks(nums, cfg.val_block, cfg.test_block)
    empty = [k for k in ("train", "val", "test") if not len(split[k])]
    if empty:
        raise ConfigError(f"{cfg.data_dir}: no {'/'.join(empty)} slices with --val-block {list(cfg.val_block)} "
                          f"--test-block {list(cfg.test_block)} (file numbers {int(nums.min())}..{int(nums.max())}); "
                          "choose blocks inside that range (nothing was written)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)

    x_val = np.stack([prepare_eval(imgs[i], cfg.size) for i in split["val"]])[:, None]
    model = unet2d_lung(base=cfg.base, levels=cfg.levels)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.05)
    t_start = time.perf_counter()
    best, best_epoch, history = -1.0, -1, []
    tr = split["train"]
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(tr)
        losses = []
        bar = tqdm(range(0, len(order), cfg.batch_size), desc=f"epoch {epoch}", leave=False, mininterval=5)
        for b in bar:
            idx = order[b : b + cfg.batch_size]
            pairs = [augment(imgs[i], masks[i], rng, cfg) for i in idx]
            xb = torch.from_numpy(np.stack([p[0] for p in pairs])[:, None])
            yb = torch.from_numpy(np.stack([p[1] for p in pairs])[:, None])
            opt.zero_grad()
            loss = _loss(torch, model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        val_dice = float(np.mean(evaluate_dice(_predict(torch, model, x_val), masks[split["val"]])))
        elapsed = (time.perf_counter() - t_start) / 60
        history.append({"epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": float(np.mean(losses)), "val_dice": val_dice, "minutes": round(elapsed, 2)})
        _progress(history[-1])
        if val_dice > best:
            best, best_epoch = val_dice, epoch
            torch.save(model.state_dict(), out / f"{stem}.pt")
        if epoch - best_epoch >= cfg.patience:
            _progress(f"early stop at epoch {epoch} (best {best:.4f} at {best_epoch})")
            break
        if elapsed > cfg.max_minutes:
            _progress(f"time budget {cfg.max_minutes} min reached at epoch {epoch}")
            break
    train_minutes = (time.perf_counter() - t_start) / 60

    model.load_state_dict(torch.load(out / f"{stem}.pt"))
    model.eval()
    onnx_path = out / f"{stem}.onnx"
    parity = export_onnx(model, onnx_path, cfg.size, cfg.opset)
    x_test = np.stack([prepare_eval(imgs[i], cfg.size) for i in split["test"]])[:, None]
    test_d = evaluate_dice(_predict(torch, model, x_test), masks[split["test"]])
    val_d = evaluate_dice(_predict(torch, model, x_val), masks[split["val"]])
    metrics = {
        "model": stem,
        "target": cfg.target,
        "onnx": str(onnx_path),
        "input": {"name": INPUT_NAME, "shape": ["batch", 1, cfg.size, cfg.size], "prep": "min-max + CLAHE(7) @256, area to size"},
        "params": int(sum(p.numel() for p in model.parameters())),
        "split_sizes": {k: int(len(v)) for k, v in split.items()},
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_minutes": round(train_minutes, 2),
        "onnx_parity_max_abs": parity,
        "seg2d_val_dice_mean": float(np.mean(val_d)),
        "seg2d_test_dice_mean": float(np.mean(test_d)),
        "seg2d_test_dice_median": float(np.median(test_d)),
        "seg2d_test_dice_min": float(np.min(test_d)),
        "history": history,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if parity > 1e-4:
        raise ConfigError(f"ONNX parity {parity:.2e} exceeds 1e-4 for {onnx_path}; do not ship this export")
    return metrics


def main(argv: List[str] | None = None) -> None:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["quantize"]:  # moved: the INT8 U-Net is built by sdk.calibration.lungs
        raise SystemExit("the INT8 lung U-Net is built by `python -m sdk.calibration.lungs` (same options)")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default="runs/seg")
    p.add_argument("--target", choices=sorted(TARGETS), default="lung",
                   help="lung masks (the lung U-Net) or seg2d's COVID-19 infection masks")
    p.add_argument("--epochs", type=int, default=SegTrainConfig.epochs)
    p.add_argument("--base", type=int, default=SegTrainConfig.base)
    p.add_argument("--size", type=int, default=SegTrainConfig.size)
    p.add_argument("--max-minutes", type=float, default=SegTrainConfig.max_minutes)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    a = p.parse_args(argv)
    try:
        cfg = SegTrainConfig(data_dir=a.data, out_dir=a.out, target=a.target, epochs=a.epochs, base=a.base, size=a.size,
                             max_minutes=a.max_minutes, seed=a.seed)
        metrics = train_seg(cfg, overwrite=a.overwrite)
    except CtsdkError as exc:
        raise SystemExit(common.main_error(exc)) from None
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}), flush=True)


if __name__ == "__main__":
    main()
