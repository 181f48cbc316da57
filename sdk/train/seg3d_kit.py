#!/usr/bin/env python3
"""Self-contained trainer of ctsdk's 3D lung U-Net (128^3) - needs only torch + NumPy + the npz files.

This file is ``sdk/train/seg3d_kit.py``; ``python -m sdk.train.seg3d prep`` copies it as
``train_gpu.py`` beside the data (``manifest.json`` + ``*.npz``), so it runs on a machine without
ctsdk:

    python train_gpu.py --out /tmp/unet3d_out --seconds 150            # device auto (CUDA if present)

Writes ``<out>/unet3d_lung.pt`` (the best state dict by validation Dice, float32, key-for-key
``sdk.models.unet.unet3d_lung``) and ``<out>/train_log.json`` (config, device, versions, history).
``--seconds`` is the wall-clock budget of the whole script (start to last file written).

Data (written by ``python -m sdk.train.seg3d prep``): ``x`` uint8 = round(255 * windowed HU) of the
128^3 isotropic cube, ``y`` packed bits of the teacher (hybrid) mask, ``manual`` (cip-ct64 only)
the manual mask; ``manifest.json`` gives the split of every file.

Training: Dice + BCE; AdamW; learning rate warm-up then cosine over the time budget; augmentation
on the device - random affine (scale 0.85-1.15, axial rotation +-10 deg, shift +-8 %), left-right
flip, intensity jitter (gain 0.9-1.1, offset +-0.04, Gaussian noise, 1/255 dither) and, with
``--crop`` < 128, random crops at the cube's own scale (the CPU default; BatchNorm statistics are
then re-estimated on whole training cubes before each validation). bf16 autocast on CUDA.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # --seconds counts from here (before torch is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

CUBE = 128


# --- model: identical to sdk.models.unet.UNet(dims=3) (same module names -> same state dict) ------
class _DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
        )


class UNet3D(nn.Module):
    def __init__(self, base: int = 8, levels: int = 4) -> None:
        super().__init__()
        self.dims, self.levels, self.base = 3, levels, base
        ch = [base * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList([_DoubleConv(1 if i == 0 else ch[i - 1], ch[i]) for i in range(levels)])
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList([nn.ConvTranspose3d(ch[i + 1], ch[i], 2, stride=2) for i in range(levels - 1)])
        self.dec = nn.ModuleList([_DoubleConv(2 * ch[i], ch[i]) for i in range(levels - 1)])
        self.head = nn.Conv3d(ch[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.levels - 1:
                skips.append(x)
                x = self.pool(x)
        for i in reversed(range(self.levels - 1)):
            x = self.up[i](x)
            x = self.dec[i](torch.cat([skips[i], x], dim=1))
        return self.head(x)


@dataclass
class KitConfig:
    data_dir: str = str(Path(__file__).resolve().parent)
    out_dir: str = "unet3d_out"
    seconds: float = 150.0
    device: str = "auto"
    batch_size: int = 0          # 0 = 4 on CUDA, 2 on CPU
    crop: int = 0                # 0 = 128 on CUDA, 64 on CPU
    lr: float = 3e-3
    base: int = 8
    levels: int = 4
    threads: int = 2
    seed: int = 0
    eval_every: float = 0.0      # 0 = 20 s on CUDA, 300 s on CPU
    max_steps: int = 0           # 0 = no limit (time-boxed)
    init: str = ""               # start from this state dict (e.g. a previous run's unet3d_lung.pt)


# --- data ---------------------------------------------------------------------------------------
def unpack(bits: np.ndarray) -> np.ndarray:
    return np.unpackbits(bits, count=CUBE ** 3).reshape(CUBE, CUBE, CUBE).astype(bool)


def load_data(data_dir: Path) -> Dict[str, List[Dict[str, Any]]]:
    """{split: [{"name", "x" uint8 (1,128,128,128), "y" bool, "manual" bool or None}]} from manifest.json."""
    man = json.loads((data_dir / "manifest.json").read_text())
    out: Dict[str, List[Dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for s in man["samples"]:
        z = np.load(data_dir / s["file"])
        out[s["split"]].append({
            "name": f"{s['series']}:{s['variant']}", "variant": s["variant"], "x": z["x"][None],
            "y": unpack(z["y"])[None], "manual": unpack(z["manual"])[None] if "manual" in z.files else None})
    if not out["train"]:
        raise SystemExit(f"{data_dir}/manifest.json lists no train samples")
    return out


# --- augmentation (on the device) ----------------------------------------------------------------
def random_affine(n: int, crop: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 3, 4) affine_grid thetas: crop window, scale, axial rotation, shift, left-right flip.

    affine_grid's last axis is (x, y, z) = (W, H, D); output coords are normalised over ``crop``
    voxels, so ``crop / 128`` keeps the cube's voxel size (align_corners=False)."""
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    scale = torch.exp((u(n) * 2 - 1) * math.log(1.15))
    ang = (u(n) * 2 - 1) * math.radians(10.0)
    c, s = torch.cos(ang), torch.sin(ang)
    a = torch.zeros(n, 3, 3)
    a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1], a[:, 2, 2] = c, -s, s, c, 1.0
    a = a * (crop / CUBE) / scale[:, None, None]
    flip = torch.where(u(n) < 0.5, -1.0, 1.0)
    a[:, :, 0] *= flip[:, None]
    room = 1.0 - crop / CUBE
    shift = (u(n, 3) * 2 - 1) * (room + 0.08)
    return torch.cat([a, shift[:, :, None]], dim=2).to(device)


def augment(x: torch.Tensor, y: torch.Tensor, crop: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (B,1,128^3) float [0,1], y (B,1,128^3) float 0/1 -> augmented (B,1,crop^3) pair."""
    b = x.shape[0]
    theta = random_affine(b, crop, gen, x.device)
    grid = F.affine_grid(theta, [b, 1, crop, crop, crop], align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ya = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    r = torch.rand(b, 3, generator=gen).to(x.device)
    gain = (0.9 + 0.2 * r[:, 0]).view(b, 1, 1, 1, 1)
    off = (r[:, 1] * 0.08 - 0.04).view(b, 1, 1, 1, 1)
    sigma = (r[:, 2] * 0.02).view(b, 1, 1, 1, 1)
    noise = torch.randn(xa.shape, generator=gen).to(x.device) if x.device.type == "cpu" else \
        torch.randn(xa.shape, device=x.device)
    dither = (torch.rand(xa.shape, device=x.device) - 0.5) / 255.0
    xa = (xa * gain + off + sigma * noise + dither).clamp_(0.0, 1.0)
    return xa, ya


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, y)
    p = torch.sigmoid(logits)
    dims = tuple(range(1, p.ndim))
    inter = (p * y).sum(dims)
    den = p.sum(dims) + y.sum(dims)
    return bce + (1 - (2 * inter + 1) / (den + 1)).mean()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


# --- evaluation ---------------------------------------------------------------------------------
CL = torch.channels_last_3d  # ~2x faster conv3d on CPU (oneDNN); fine for cuDNN too


def _x(sample: Dict[str, Any], device: torch.device) -> torch.Tensor:
    return torch.from_numpy(sample["x"]).to(device).float().div_(255.0)[None].contiguous(memory_format=CL)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, samples: List[Dict[str, Any]], device: torch.device) -> None:
    """Re-estimate BatchNorm running statistics on whole cubes (cumulative average)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for s in samples:
        model(_x(s, device))
    for m, mom in zip(bns, saved):
        m.momentum = mom


@torch.no_grad()
def evaluate(model: nn.Module, samples: List[Dict[str, Any]], device: torch.device, amp: bool) -> Dict[str, Any]:
    model.eval()
    out: Dict[str, Any] = {}
    for s in samples:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            p = model(_x(s, device)).float()
        m = (p > 0).cpu().numpy()[0]
        r = {"dice_teacher": round(dice(m, s["y"]), 4), "fraction": round(float(m.mean()), 5)}
        if s["manual"] is not None:
            r["dice_manual"] = round(dice(m, s["manual"]), 4)
        out[s["name"]] = r
    model.train()
    return out


# --- training -----------------------------------------------------------------------------------
def train(cfg: KitConfig, t_start: Optional[float] = None) -> Dict[str, Any]:
    t_start = time.perf_counter() if t_start is None else t_start
    dev = torch.device("cuda" if (cfg.device == "auto" and torch.cuda.is_available()) else
                       ("cpu" if cfg.device == "auto" else cfg.device))
    cuda = dev.type == "cuda"
    batch = cfg.batch_size or (4 if cuda else 2)
    crop = cfg.crop or (CUBE if cuda else 64)
    every = cfg.eval_every or (20.0 if cuda else 300.0)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if not cuda:
        torch.set_num_threads(cfg.threads)
    else:
        torch.backends.cudnn.benchmark = True
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(Path(cfg.data_dir))
    train_set = data["train"]
    xs = torch.from_numpy(np.stack([s["x"] for s in train_set])).to(dev)           # uint8 (N,1,128^3)
    ys = torch.from_numpy(np.stack([s["y"] for s in train_set])).to(dev)           # bool
    bn_set = [s for s in train_set if s["variant"] == "full"]
    model = UNet3D(cfg.base, cfg.levels)
    if cfg.init:
        model.load_state_dict(torch.load(cfg.init, map_location="cpu", weights_only=True))
    model = model.to(dev).to(memory_format=CL)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    info = {"device": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "batch": batch, "crop": crop,
            "train_samples": len(train_set), "val": [s["name"] for s in data["val"]],
            "test": [s["name"] for s in data["test"]], "config": asdict(cfg)}
    print(json.dumps(info), flush=True)
    budget = float(cfg.seconds)
    reserve = 8.0 if cuda else 60.0 + 15.0 * len(bn_set)      # final validation + save
    t_train = time.perf_counter()
    train_budget = max(1.0, budget - (t_train - t_start) - reserve)
    history: List[Dict[str, Any]] = []
    best, best_step, step, last_eval, losses = -1.0, -1, 0, time.perf_counter(), []

    def validate(final: bool = False) -> None:
        nonlocal best, best_step
        if crop < CUBE:
            recalibrate_bn(model, bn_set, dev)
        ev_val = evaluate(model, data["val"], dev, cuda)
        ev_test = evaluate(model, data["test"], dev, cuda)
        val = float(np.mean([r["dice_teacher"] for r in ev_val.values()])) if ev_val else -float(np.mean(losses[-50:]))
        rec = {"step": step, "seconds": round(time.perf_counter() - t_start, 1), "loss": round(float(np.mean(losses[-50:])), 4),
               "lr": opt.param_groups[0]["lr"], "val_dice": round(val, 4), "val": ev_val, "test": ev_test}
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if val > best:
            best, best_step = val, step
            torch.save({k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                        for k, v in model.state_dict().items()}, out / "unet3d_lung.pt")

    model.train()
    while True:
        el = time.perf_counter() - t_train
        if el >= train_budget or (cfg.max_steps and step >= cfg.max_steps):
            break
        frac = el / train_budget
        lr = cfg.lr * (frac / 0.03 if frac < 0.03 else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(train_set), (batch,), generator=gen).to(dev)
        x = xs[idx].float().div_(255.0)
        y = ys[idx].float()
        xa, ya = augment(x, y, crop, gen)
        xa = xa.contiguous(memory_format=CL)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(xa), ya)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % (50 if cuda else 5) == 0:
            print(f"step {step} t={time.perf_counter() - t_start:.1f}s loss={np.mean(losses[-20:]):.4f} lr={lr:.2e}", flush=True)
        if time.perf_counter() - last_eval >= every:
            validate()
            last_eval = time.perf_counter()
    validate(final=True)
    log = {**info, "steps": step, "best_step": best_step, "best_val_dice": best,
           "seconds_total": round(time.perf_counter() - t_start, 1),
           "samples_per_s": round(step * batch / max(1e-9, time.perf_counter() - t_train), 2),
           "checkpoint": str(out / "unet3d_lung.pt"), "history": history}
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps({k: v for k, v in log.items() if k != "history"}), flush=True)
    return log


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description="train ctsdk's 3D lung U-Net (torch + NumPy only)")
    d = KitConfig()
    p.add_argument("--data", default=d.data_dir, help="folder with manifest.json and the npz files")
    p.add_argument("--out", default=d.out_dir)
    for f in ("seconds", "device", "batch_size", "crop", "lr", "threads", "seed", "eval_every", "max_steps", "init"):
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
    a = p.parse_args(argv)
    cfg = KitConfig(data_dir=a.data, out_dir=a.out, **{f: getattr(a, f) for f in (
        "seconds", "device", "batch_size", "crop", "lr", "threads", "seed", "eval_every", "max_steps", "init")})
    train(cfg, t_start=_T0)


if __name__ == "__main__":
    sys.exit(main())
