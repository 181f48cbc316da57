"""INT8 experiment (issue 15, session 6; tried, not shipped): quantisation-aware distillation of the
classifier's QDQ graph.

The QDQ ONNX file (the session-5 baseline: first 12 convs FP32, bias correction, Percentile 99.99,
``examples/int8_lsq_refit.py baseline``) is executed by a small torch interpreter that keeps its
semantics: per-tensor U8 activations and per-channel S8 weights with the file's own scales, INT32
biases with scale x_s * w_s, rounding through a straight-through estimator. The float weights behind
every quantised conv (initialised from the FP32 model; they round to exactly the file's INT8 values)
and the INT32 biases are trained so the student's logit difference matches the FP32 teacher's on
train-split slices only. Only initializers change; ONNX Runtime judges the result on val and test.
``simcheck`` compares the interpreter with ONNX Runtime tensor by tensor (U8 codes of every
QuantizeLinear output). Result in docs/benchmarks/int8.md.

    .venv/bin/python examples/int8_lsq_refit.py prepare     # calib / val / test slices (runs/int8x/)
    .venv/bin/python examples/int8_lsq_refit.py baseline    # runs/int8x/work/first12.onnx
    .venv/bin/python examples/int8_qat_distil.py prepare    # 1400 train-split slices, ~20 s
    .venv/bin/python examples/int8_qat_distil.py simcheck
    .venv/bin/python examples/int8_qat_distil.py train --epochs 3 --lr 1e-6   # ~4 min on 2 cores

Files go to runs/int8x/ (gitignored). Needs torch (the ``train`` extra).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from int8_lsq_refit import _cmp, _session  # same folder: the session-5 experiment

from sdk.paths import shared_data_root

WORK = Path("runs/int8x")
FP32 = "sdk/bundles/default/classifier_fp32.onnx"
BASELINE = WORK / "work" / "first12.onnx"


def rste(x):
    return x + (torch.round(x) - x).detach()


class QdqGraph(torch.nn.Module):
    def __init__(self, qdq: onnx.ModelProto, fp32: onnx.ModelProto, train_fp32: bool = True):
        super().__init__()
        self.model = qdq
        I = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
        F32 = {i.name: numpy_helper.to_array(i) for i in fp32.graph.initializer}
        self.const = {}
        self.latent = torch.nn.ParameterDict()
        self.wq = {}      # dq output name -> (param key, scale tensor, zp, qmin, qmax, kind)
        self.keymap = {}
        for n in qdq.graph.node:
            if n.op_type == "DequantizeLinear" and n.input[0] in I and I[n.input[0]].dtype in (np.int8, np.int32):
                q = I[n.input[0]]
                s = I[n.input[1]].astype(np.float32)
                zp = I[n.input[2]].astype(np.float32) if len(n.input) > 2 else np.zeros_like(s)
                assert np.all(zp == 0)
                deq = (q.astype(np.float64) * s.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)
                init = deq
                if q.dtype == np.int8:
                    src = n.input[0].replace("_quantized", "")
                    if src in F32 and F32[src].shape == q.shape:
                        w = F32[src]
                        qq = np.clip(np.round(w / s.reshape((-1,) + (1,) * (q.ndim - 1))), -128, 127)
                        agree = float((qq == q).mean())
                        if agree > 0.999:
                            init = w.astype(np.float32)
                        else:
                            print("weight init from DQ (FP32 rounds differently):", src, agree, file=sys.stderr)
                key = n.input[0].replace(".", "_")
                self.latent[key] = torch.nn.Parameter(torch.from_numpy(init.copy()))
                kind = "w" if q.dtype == np.int8 else "b"
                lim = (-128, 127) if kind == "w" else (-(2 ** 31), 2 ** 31 - 1)
                self.wq[n.output[0]] = (key, torch.from_numpy(s.reshape((-1,) + (1,) * (q.ndim - 1))), lim, kind)
                self.keymap[key] = n.input[0]
        used_dq = {k for k in self.wq}
        for name, arr in I.items():
            if arr.dtype == np.float32 and arr.ndim >= 1 and arr.size > 8 and train_fp32 and not name.endswith("_scale"):
                key = "f_" + name.replace(".", "_")
                self.latent[key] = torch.nn.Parameter(torch.from_numpy(arr.copy()))
                self.keymap[key] = name
                self.const[name] = ("param", key)
            else:
                self.const[name] = torch.from_numpy(np.array(arr))
        self.used_dq = used_dq

    def value(self, name, env):
        if name in env:
            return env[name]
        c = self.const[name]
        if isinstance(c, tuple):
            return self.latent[c[1]]
        return c

    def forward(self, image):
        env = {"image": image}
        for n in self.model.graph.node:
            op = n.op_type
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if op == "DequantizeLinear" and n.output[0] in self.wq:
                key, s, (lo, hi), kind = self.wq[n.output[0]]
                w = self.latent[key]
                q = torch.clamp(rste(w / s), lo, hi)
                env[n.output[0]] = q * s
                continue
            ins = [self.value(x, env) if x else None for x in n.input]
            if op == "QuantizeLinear":
                x, s, zp = ins
                env[n.output[0]] = torch.clamp(rste(x / s) + zp.float(), 0, 255)
            elif op == "DequantizeLinear":
                q, s, zp = ins
                env[n.output[0]] = (q - zp.float()) * s
            elif op == "Conv":
                p = attrs.get("pads", [0, 0, 0, 0])   # [top, left, bottom, right]
                x = ins[0]
                if p[0] == p[2] and p[1] == p[3]:
                    pad = (p[0], p[1])
                else:
                    x, pad = F.pad(x, (p[1], p[3], p[0], p[2])), (0, 0)
                env[n.output[0]] = F.conv2d(x, ins[1], ins[2] if len(ins) > 2 else None, attrs.get("strides", [1, 1]),
                                            pad, attrs.get("dilations", [1, 1]), attrs.get("group", 1))
            elif op == "Clip":
                env[n.output[0]] = torch.clamp(ins[0], ins[1] if len(ins) > 1 else None, ins[2] if len(ins) > 2 else None)
            elif op == "Add":
                env[n.output[0]] = ins[0] + ins[1]
            elif op == "Sub":
                env[n.output[0]] = ins[0] - ins[1]
            elif op == "Mul":
                env[n.output[0]] = ins[0] * ins[1]
            elif op == "Div":
                env[n.output[0]] = ins[0] / ins[1]
            elif op == "Slice":
                x, starts, ends = ins[0], ins[1].tolist(), ins[2].tolist()
                axes = ins[3].tolist() if len(ins) > 3 else list(range(len(starts)))
                steps = ins[4].tolist() if len(ins) > 4 else [1] * len(starts)
                idx = [slice(None)] * x.dim()
                for a, s0, e0, st in zip(axes, starts, ends, steps):
                    idx[a] = slice(s0, min(e0, x.shape[a]), st)
                env[n.output[0]] = x[tuple(idx)]
            elif op == "AveragePool":
                assert attrs.get("pads", [0, 0, 0, 0]) == [0, 0, 0, 0]
                env[n.output[0]] = F.avg_pool2d(ins[0], attrs["kernel_shape"], attrs["strides"])
            elif op == "ReduceSum":
                env[n.output[0]] = ins[0].sum(dim=tuple(ins[1].tolist()), keepdim=bool(attrs.get("keepdims", 1)))
            elif op == "Shape":
                env[n.output[0]] = tuple(ins[0].shape)
            elif op == "Expand":
                env[n.output[0]] = ins[0].expand(ins[1])
            elif op == "Less":
                env[n.output[0]] = ins[0] < ins[1]
            elif op == "Where":
                env[n.output[0]] = torch.where(ins[0], ins[1], ins[2])
            elif op == "Einsum":
                env[n.output[0]] = torch.einsum(attrs["equation"].decode(), *ins)
            elif op == "Gemm":
                a, b, c = ins
                assert attrs.get("transB") == 1 and not attrs.get("transA")
                env[n.output[0]] = a @ b.t() + c
            elif op == "Softmax":
                env[n.output[0]] = torch.softmax(ins[0], dim=attrs.get("axis", -1))
            else:
                raise NotImplementedError(op)
        self.last_env = env if getattr(self, "keep_env", False) else None
        return env["logits"]

    def export(self) -> onnx.ModelProto:
        m = copy.deepcopy(self.model)
        by_name = {i.name: i for i in m.graph.initializer}
        with torch.no_grad():
            for out, (key, s, (lo, hi), kind) in self.wq.items():
                w = self.latent[key].detach()
                q = torch.clamp(torch.round(w / s), lo, hi).numpy()
                name = self.keymap[key]
                dt = np.int8 if kind == "w" else np.int32
                by_name[name].CopyFrom(numpy_helper.from_array(q.astype(dt), name))
            for key, name in self.keymap.items():
                if key.startswith("f_"):
                    by_name[name].CopyFrom(numpy_helper.from_array(self.latent[key].detach().numpy().astype(np.float32), name))
        return m


def ort_logits(model, x, bs=32):
    """Logits of an ONNX file or ModelProto under ONNX Runtime (CPU, 2 threads), ``bs`` slices a call."""
    s = _session(onnx.load(model) if isinstance(model, (str, Path)) else model)
    return np.concatenate([s.run(["logits"], {"image": x[i:i + bs].astype(np.float32)})[0] for i in range(0, len(x), bs)])


def cmp(lq, lf):
    """Flips / mean / max |dp| of p(covid), from logits (int8_lsq_refit's comparison)."""
    return _cmp(*(torch.softmax(torch.from_numpy(lg), 1).numpy()[:, 1] for lg in (lq, lf)))


def prepare_train(n: int = 1400, seed: int = 1, out: str = "train.npz") -> None:
    """HU-rendered classifier inputs of ``n`` stratified train-split images (estimable ones), float16."""
    from sdk.calibration.dataset import HuRenderPreprocessor, load_rows, stratified_sample

    rows, _ = load_rows(shared_data_root() / "images_index.csv", "docs/data/splits.csv")
    pre = HuRenderPreprocessor()
    xs, keep = [], []
    for i, r in enumerate(stratified_sample([r for r in rows if r.split == "train"], n, seed)):
        failed = pre.mask_sources.get("hu_estimate_failed", 0)
        x = pre([r])
        if pre.mask_sources.get("hu_estimate_failed", 0) == failed:
            xs.append(x[0].astype(np.float16)), keep.append(r.path)
        if i % 200 == 0:
            print(f"prepare {i}/{n}", file=sys.stderr, flush=True)
    np.savez(WORK / out, x=np.stack(xs), path=np.array(keep))
    print("train", len(xs), "of", n)


def simcheck(qdq_path: Path, n: int = 4) -> None:
    """U8 codes of every QuantizeLinear output: interpreter vs ONNX Runtime, on ``n`` val slices."""
    import onnxruntime as ort
    from onnx import helper

    qdq, fp32 = onnx.load(qdq_path), onnx.load(FP32)
    x = np.load(WORK / "val.npz")["x"][:n].astype(np.float32)
    names = [nd.output[0] for nd in qdq.graph.node if nd.op_type == "QuantizeLinear"]
    m = copy.deepcopy(qdq)
    for name in names:
        m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    so = ort.SessionOptions()
    so.log_severity_level, so.intra_op_num_threads = 3, 1
    ref = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(names, {"image": x})
    g = QdqGraph(qdq, fp32, train_fp32=False)
    g.keep_env = True
    with torch.no_grad():
        g(torch.from_numpy(x))
    for name, r in zip(names, ref):
        d = np.abs(g.last_env[name].numpy() - r.astype(np.float32))
        print(f"{name:40s} codes differing {float((d > 0).mean()):.4f}  max {d.max():.0f}  mean {d.mean():.4f}")


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Distillation inputs near the data: left-right flip, window jitter on the grey channel
    (g -> clip(a*g + b), a in [0.9, 1.1], b in [-0.04, 0.04]) and an in-plane shift of up to 8 px
    (zero fill = air / no lung); channel 2 is grey x mask again."""
    x = x.astype(np.float32).copy()
    for k in range(len(x)):
        if rng.random() < 0.5:
            x[k] = x[k, :, :, ::-1]
        g = np.clip(x[k, 0] * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04), 0.0, 1.0)
        x[k, 0] = g
        dy, dx = (int(v) for v in rng.integers(-8, 9, 2))
        x[k] = np.roll(x[k], (dy, dx), axis=(1, 2))
        if dy > 0:
            x[k, :, :dy] = 0
        elif dy < 0:
            x[k, :, dy:] = 0
        if dx > 0:
            x[k, :, :, :dx] = 0
        elif dx < 0:
            x[k, :, :, dx:] = 0
        x[k, 2] = x[k, 0] * x[k, 1]
    return x


def train(a: argparse.Namespace) -> None:
    """Distil: the FP32 teacher labels every (augmented) batch on the fly; the epoch with the best
    val agreement (flips, then mean |dp|) is kept; test is computed for that one only."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    qdq, fp32 = onnx.load(a.qdq), onnx.load(FP32)
    tr = np.load(WORK / a.data)["x"]
    va = np.load(WORK / "val.npz")["x"]
    lf_va = ort_logits(FP32, va)
    teacher = _session(fp32)
    print(f"train slices {len(tr)}; start: val", cmp(ort_logits(qdq, va), lf_va), flush=True)
    g = QdqGraph(qdq, fp32, train_fp32=a.train_fp32)
    if a.biases_only:   # a few thousand per-channel numbers instead of every weight: less to overfit
        keep = {key for key, _, _, kind in g.wq.values() if kind == "b"}
        for key, p in g.latent.items():
            p.requires_grad_(key in keep)
    opt = torch.optim.Adam([p for p in g.latent.parameters() if p.requires_grad], lr=a.lr)
    n, best = len(tr), None
    step, total_steps = 0, a.epochs * (n // a.bs)
    for ep in range(a.epochs):
        perm = rng.permutation(n)
        t0, tot = time.time(), 0.0
        for i in range(0, n - a.bs + 1, a.bs):
            x = tr[perm[i:i + a.bs]]
            x = augment(x, rng) if a.augment else x.astype(np.float32)
            lt = teacher.run(["logits"], {"image": x})[0]
            lg = g(torch.from_numpy(x))
            ds, dt = lg[:, 1] - lg[:, 0], torch.from_numpy(lt[:, 1] - lt[:, 0])
            if a.loss == "prob":   # |dp| is what the bar counts: slices near 0.5 weigh most
                loss = F.mse_loss(torch.sigmoid(ds), torch.sigmoid(dt)) * 100.0
            else:
                loss = F.mse_loss(ds, dt)
            opt.zero_grad()
            loss.backward()
            for group in opt.param_groups:   # cosine decay over all steps
                group["lr"] = a.lr * 0.5 * (1 + np.cos(np.pi * step / total_steps))
            opt.step()
            step += 1
            tot += float(loss.detach()) * len(x)
            if (i // a.bs) % 20 == 0:
                print(f"epoch {ep} {i}/{n} loss {float(loss.detach()):.5f} {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        m = g.export()
        v = cmp(ort_logits(m, va), lf_va)
        print(f"epoch {ep}: train mse (interpreter) {tot / n:.5f}, val (ORT)", v, f"{time.time() - t0:.0f} s", flush=True)
        onnx.save(m, str(a.out).replace(".onnx", f"_ep{ep}.onnx"))
        if best is None or (v["flips"], v["mean"]) < (best[1]["flips"], best[1]["mean"]):
            best = (ep, v, m)
    ep, v, m = best
    onnx.save(m, a.out)
    te = np.load(WORK / "test.npz")["x"]
    print(f"kept epoch {ep} (val {v}); test (ORT)", cmp(ort_logits(m, te), ort_logits(FP32, te)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["prepare", "simcheck", "train"])
    ap.add_argument("--qdq", type=Path, default=BASELINE)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--train-fp32", action="store_true", help="also train the FP32 convs and the head (unstable at 3e-6)")
    ap.add_argument("--out", type=Path, default=WORK / "work" / "qat.onnx")
    ap.add_argument("--data", default="train.npz", help="train-split slices under runs/int8x/ (prepare writes train.npz)")
    ap.add_argument("--loss", choices=["logit", "prob"], default="logit", help="MSE of the logit difference, or of p(covid)")
    ap.add_argument("--biases-only", action="store_true", help="train only the quantised convs' INT32 biases")
    ap.add_argument("--augment", action="store_true", help="flip / window jitter / shift each batch; the teacher labels it")
    a = ap.parse_args()
    if a.step == "prepare":
        prepare_train()
    elif a.step == "simcheck":
        simcheck(a.qdq)
    else:
        train(a)


if __name__ == "__main__":
    main()
