"""INT8 experiment (issue 15, session 5; tried, not shipped): least-squares refit of every quantised
convolution of the classifier's QDQ graph, in graph order (closed-form AdaQuant-like).

For conv i: X = its input in the INT8 graph (after the refits of convs < i), Y = its output in the FP32
graph, both on the calibration slices; [W, b] = ridge fit of Y on X (pulled toward the current weights,
lambda = alpha * mean diagonal of X'X), W rounded to ORT's per-channel symmetric INT8 grid, b refitted
with the rounded W and written as INT32 with scale x_scale * w_scale. Result in docs/benchmarks/int8.md.

    .venv/bin/python examples/int8_lsq_refit.py prepare            # HU-rendered calib / val / test slices
    .venv/bin/python examples/int8_lsq_refit.py baseline           # first 12 convs FP32 + bias correction, P99.99
    .venv/bin/python examples/int8_lsq_refit.py refit --alpha 1e-2  # ~5 min on 2 cores

Files go to runs/int8x/ (gitignored).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from pathlib import Path

import numpy as np

from sdk.paths import shared_data_root

WORK = Path("runs/int8x")
FP32 = "sdk/bundles/default/classifier_fp32.onnx"
#: the largest |INT32 bias| used, a little below 2^31 - 1
INT32_BIAS_LIMIT = 0.999 * (2 ** 31 - 1)


def prepare() -> None:
    from sdk.calibration.dataset import HuRenderPreprocessor, load_rows, stratified_sample

    rows, _ = load_rows(shared_data_root() / "images_index.csv", "docs/data/splits.csv")
    pre = HuRenderPreprocessor()
    WORK.mkdir(parents=True, exist_ok=True)

    def render(rs, name):
        xs, ys, keep = [], [], []
        for r in rs:
            failed = pre.mask_sources.get("hu_estimate_failed", 0)
            x = pre([r])
            if pre.mask_sources.get("hu_estimate_failed", 0) == failed:   # estimable images only
                xs.append(x[0]), ys.append(r.y), keep.append(r.path)
        np.savez(WORK / f"{name}.npz", x=np.stack(xs).astype(np.float32), y=np.array(ys), path=np.array(keep))
        print(name, len(xs), "of", len(rs))

    render(stratified_sample([r for r in rows if r.split == "train"], 300, 0), "calib")
    render([r for r in rows if r.split == "test"], "test")
    render([r for r in rows if r.split == "val"], "val")


def _session(model, extra=()):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = copy.deepcopy(model)
    for name in extra:
        m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = 2, 1, 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _probs(model, x):
    s = _session(model)
    return np.concatenate([s.run(["probs"], {"image": x[i:i + 32]})[0] for i in range(0, len(x), 32)])[:, 1]


def _cmp(p, pf):
    return dict(flips=int(((p >= 0.5) != (pf >= 0.5)).sum()), mean=round(float(np.abs(p - pf).mean()), 5),
                max=round(float(np.abs(p - pf).max()), 4))


def baseline() -> None:
    import onnx

    Q = importlib.import_module("sdk.calibration.quantize")
    w = WORK / "work"
    w.mkdir(parents=True, exist_ok=True)
    cal = np.load(WORK / "calib.npz")["x"][:256]
    prepped, head = Q.prepare(FP32, w / "prepped.onnx")
    convs = Q.backbone_convs(prepped, head)
    shifts = Q.weight_bias_shift(prepped, cal, convs)
    ranges = Q.calibrate_ranges(prepped, cal, "percentile", w / "ranges.json", percentile=99.99)
    path = Q.quantize(prepped, w / "first12.onnx", "percentile", list(head) + convs[:12], ranges, bias_shift=shifts)
    fp, qm = onnx.load(str(prepped)), onnx.load(str(path))
    for split in ("val", "test"):
        x = np.load(WORK / f"{split}.npz")["x"]
        print(split, _cmp(_probs(qm, x), _probs(fp, x)))


def refit(alpha: float, base: Path, out: Path, n_cal: int = 256) -> None:
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import helper, numpy_helper

    torch.set_num_threads(2)
    cal = np.load(WORK / "calib.npz")["x"][:n_cal]
    val, test = np.load(WORK / "val.npz")["x"], np.load(WORK / "test.npz")["x"]
    fp, qm = onnx.load(str(WORK / "work" / "prepped.onnx")), onnx.load(str(base))
    pf_val, pf_test = _probs(fp, val), _probs(fp, test)
    print("base val", _cmp(_probs(qm, val), pf_val), "test", _cmp(_probs(qm, test), pf_test), flush=True)
    prod = {o: n for n in qm.graph.node for o in n.output}
    init = {t.name: t for t in qm.graph.initializer}
    fp_nodes = {n.name: n for n in fp.graph.node}
    qconvs = [n for n in qm.graph.node if n.op_type == "Conv" and n.input[1] in prod
              and prod[n.input[1]].op_type == "DequantizeLinear"]

    def attr(n, k, d=None):
        return next((helper.get_attribute_value(a) for a in n.attribute if a.name == k), d)

    def arr(name):
        return numpy_helper.to_array(init[name])

    def put(name, a):
        init[name].CopyFrom(numpy_helper.from_array(a, name))

    t0 = time.time()
    for ci, c in enumerate(qconvs):
        wdq, bdq, xdq = prod[c.input[1]], prod[c.input[2]], prod[c.input[0]]
        x_scale = float(arr(xdq.input[1]))
        w_int, w_scale = arr(wdq.input[0]).astype(np.float64), arr(wdq.input[1]).astype(np.float64)
        b_cur = arr(bdq.input[0]).astype(np.float64) * arr(bdq.input[1]).astype(np.float64)
        w0 = w_int * w_scale.reshape(-1, 1, 1, 1)
        group, st, pads = attr(c, "group", 1), attr(c, "strides", [1, 1]), attr(c, "pads", [0, 0, 0, 0])
        cout, cin_g, kh, kw = w0.shape
        dw = group > 1
        yname = fp_nodes[c.name].output[0]
        sq, sf = _session(qm, [c.input[0]]), _session(fp, [yname])
        d = cin_g * kh * kw + 1
        G = torch.zeros((cout, d, d) if dw else (d, d), dtype=torch.float64)
        H = torch.zeros((cout, d) if dw else (d, cout), dtype=torch.float64)
        for i in range(0, len(cal), 32):
            X = torch.from_numpy(sq.run([c.input[0]], {"image": cal[i:i + 32]})[0])
            Y = torch.from_numpy(sf.run([yname], {"image": cal[i:i + 32]})[0]).double()
            U = F.unfold(F.pad(X, (pads[1], pads[3], pads[0], pads[2])), (kh, kw), stride=tuple(st)).double()
            N, _, L = U.shape
            Yf = Y.reshape(N, cout, L)
            if dw:
                U = torch.cat([U.reshape(N, cout, kh * kw, L), torch.ones(N, cout, 1, L, dtype=U.dtype)], 2)
                G += torch.einsum("ncil,ncjl->cij", U, U)
                H += torch.einsum("ncil,ncl->ci", U, Yf)
            else:
                Ut = torch.cat([U, torch.ones(N, 1, L, dtype=U.dtype)], 1).permute(0, 2, 1).reshape(-1, d)
                G += Ut.T @ Ut
                H += Ut.T @ Yf.permute(0, 2, 1).reshape(-1, cout)
        if dw:
            w0m = torch.from_numpy(np.concatenate([w0.reshape(cout, -1), b_cur[:, None]], 1))
            lam = alpha * torch.diagonal(G, dim1=1, dim2=2)[:, :-1].mean(1).clamp_min(1e-6) + 1e-9
            wn = w0m + torch.linalg.solve(G + lam[:, None, None] * torch.eye(d, dtype=G.dtype)[None],
                                          (H - torch.einsum("cij,cj->ci", G, w0m)).unsqueeze(-1)).squeeze(-1)
            wf = torch.where(torch.isfinite(wn), wn, w0m)[:, :-1].numpy()
        else:
            w0m = torch.from_numpy(np.concatenate([w0.reshape(cout, -1).T, b_cur[None, :]], 0))
            lam = alpha * torch.diagonal(G)[:-1].mean() + 1e-9
            wn = w0m + torch.linalg.solve(G + lam * torch.eye(d, dtype=G.dtype), H - G @ w0m)
            wf = torch.where(torch.isfinite(wn), wn, w0m)[:-1].T.numpy()
        amax = np.abs(wf).max(1)
        M = (G[:, -1, -1] if dw else G[-1, -1]).numpy()

        def bias_for(sc):
            wi = np.clip(np.round(wf / sc[:, None]), -127, 127)
            if dw:
                b = H[:, -1].numpy() / M - (G[:, -1, :-1].numpy() / M[:, None] * wi * sc[:, None]).sum(1)
            else:
                b = H[-1].numpy() / M - (wi * sc[:, None]) @ (G[-1, :-1].numpy() / M)
            return wi, np.where(np.isfinite(b), b, b_cur)

        sc = np.where(amax > 0, amax / 127.0, 1.0)
        wi, b = bias_for(sc)
        # a (near-)dead channel has a tiny weight scale: its INT32 bias (scale x_scale * w_scale) would
        # overflow, so widen that channel's weight scale until the bias fits (as ORT's quantiser does)
        need = np.abs(b) / (x_scale * INT32_BIAS_LIMIT)
        if (need > sc).any():
            sc = np.maximum(sc, need)
            wi, b = bias_for(sc)
        put(wdq.input[0], wi.reshape(cout, cin_g, kh, kw).astype(np.int8))
        put(wdq.input[1], sc.astype(np.float32))
        bs = (x_scale * sc).astype(np.float32)
        put(bdq.input[1], bs)
        put(bdq.input[0], np.round(b / bs.astype(np.float64)).astype(np.int32))
        if ci % 6 == 5 or ci == len(qconvs) - 1:
            print(ci, c.name, round(time.time() - t0), "val", _cmp(_probs(qm, val), pf_val), flush=True)
    onnx.save(qm, str(out))
    print("final val", _cmp(_probs(qm, val), pf_val), "test", _cmp(_probs(qm, test), pf_test), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prepare", "baseline", "refit"])
    ap.add_argument("--alpha", type=float, default=1e-2)
    ap.add_argument("--n-cal", type=int, default=256)
    a = ap.parse_args()
    if a.step == "prepare":
        prepare()
    elif a.step == "baseline":
        baseline()
    else:
        refit(a.alpha, WORK / "work" / "first12.onnx", WORK / "work" / f"lsq_{a.alpha}.onnx", a.n_cal)


if __name__ == "__main__":
    sys.exit(main())
