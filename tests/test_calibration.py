"""INT8 calibration: metrics against brute-force references, split/sampling rules, QDQ graphs that
keep the head FP32, and the calibrate() report checked against an independent recomputation."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest

from sdk.calibration.dataset import Row, SimplePreprocessor, composition, load_rows, stratified_sample
from sdk.calibration.metrics import binary_summary, roc_auc
from conftest import shared_path


# --- metrics ------------------------------------------------------------------------------------
def _auc_bruteforce(y, s):
    pos = [v for v, t in zip(s, y) if t]
    neg = [v for v, t in zip(s, y) if not t]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_pairwise_definition(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)          # many ties
    assert roc_auc(y, s) == pytest.approx(_auc_bruteforce(y, s), abs=1e-12)
    assert roc_auc(y, y) == 1.0 and roc_auc(y, -y) == 0.0
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


def test_binary_summary_counts():
    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.9, 0.4, 0.6, 0.2, 0.7])
    s = binary_summary(y, p)
    assert s["sensitivity"] == pytest.approx(2 / 3) and s["specificity"] == pytest.approx(1 / 2)
    assert s["accuracy"] == pytest.approx(3 / 5) and s["n_pos"] == 3 and s["n_neg"] == 2


# --- splits and sampling ------------------------------------------------------------------------
def _rows(n_per=(40, 20, 10, 5)):
    out = []
    for (src, lab), k in zip([("a", "covid"), ("a", "non-covid"), ("b", "covid"), ("b", "normal")], n_per):
        out += [Row(f"{src}/{lab}/{i}.jpg", "", lab, src, "train", f"{src}{i}") for i in range(k)]
    return out


def test_stratified_sample_is_proportional_and_deterministic():
    rows = _rows()
    pick = stratified_sample(rows, 30, seed=3)
    assert len(pick) == 30 and len({r.path for r in pick}) == 30
    comp = composition(pick)
    total = len(rows)
    for key, k in composition(rows).items():
        assert abs(comp.get(key, 0) - 30 * k / total) <= 1.0, (key, comp)
    assert [r.path for r in stratified_sample(rows, 30, seed=3)] == [r.path for r in pick]
    assert [r.path for r in stratified_sample(rows, 30, seed=4)] != [r.path for r in pick]
    assert len(stratified_sample(rows, 500)) == len(rows)
    assert set(composition(stratified_sample(rows, 4))) == set(composition(rows))  # every stratum present


def test_load_rows_split_rules(tmp_path):
    img = tmp_path / "index.csv"
    with open(img, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source", "split", "patient"])
        w.writerow(["u/1.jpg", "covid", "ucsd", "test", "p1"])
        w.writerow(["u/2.jpg", "covid", "ucsd", "train", "p2"])
        for i in range(40):
            w.writerow([f"s/{i}.jpg", "covid", "soares", "", f"pat{i // 4}"])
    rows, how = load_rows(img)
    by = {r.path: r for r in rows}
    assert by["u/1.jpg"].split == "test" and by["u/2.jpg"].split == "train"     # official split kept
    for pat in {r.patient for r in rows if r.source == "soares"}:
        assert len({r.split for r in rows if r.patient == pat}) == 1           # no patient straddles
    assert {r.split for r in rows} <= {"train", "val", "test"} and "sha256" in how
    assert by["u/1.jpg"].abs_path == str((tmp_path / "u/1.jpg").resolve()) and by["u/1.jpg"].y == 1
    splits = tmp_path / "splits.csv"
    splits.write_text("path,split\nu/1.jpg,train\ns/0.jpg,test\n")
    rows2, how2 = load_rows(img, splits)
    assert {r.path: r.split for r in rows2} == {"u/1.jpg": "train", "s/0.jpg": "test"}  # others skipped
    assert str(splits) in how2


# --- quantisation -------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


def _tiny_classifier():
    import torch.nn as nn
    import torch.nn.functional as F

    class TinyMaskGap(nn.Module):
        """Conv backbone + lung-mask-weighted GAP head (conventions rules 1-5), 64 px input."""

        def __init__(self):
            super().__init__()
            self.cfg = {"classes": ["non_covid", "covid"], "input_size": 64}
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(), nn.Conv2d(16, 16, 3, 1, 1, groups=16),
                nn.ReLU6(), nn.Conv2d(16, 32, 1), nn.ReLU6(), nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU6(),
                nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU6(), nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU6())
            g = torch.exp(-torch.tensor([[2.0, 1, 2], [1, 0, 1], [2, 1, 2]]) / 2)
            self.register_buffer("g", (g / g.sum()).view(1, 1, 3, 3))
            self.fc = nn.Linear(64, 2)

        def forward(self, x):
            f = self.features((x - 0.5) / 0.5)
            w = F.conv2d(F.adaptive_avg_pool2d(x[:, 1:2], f.shape[-2:]), self.g, padding=1)
            s = w.sum(dim=(2, 3), keepdim=True)
            hw = f.shape[-2] * f.shape[-1]
            w = torch.where(s < 1e-6, torch.full_like(w, 1.0 / hw), w / s.clamp_min(1e-6))
            logits = self.fc((f * w).sum(dim=(2, 3)))
            cam = torch.einsum("kc,nchw->nkhw", self.fc.weight, f * w) * hw
            return {"logits": logits, "probs": logits.softmax(1), "cam": cam}

    torch.manual_seed(0)
    return TinyMaskGap().eval()


@pytest.fixture(scope="module")
def image_csv(tmp_path_factory):
    """A small real images CSV (train + test rows) from ../shared/data/images_index.csv."""
    index = shared_path("images_index.csv")
    with open(index, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["source"] == "ucsd-covid-ct" and r["split"] in ("train", "test")]
    rng = np.random.default_rng(0)
    keep = [rows[i] for i in sorted(rng.choice(len(rows), 48, replace=False))]
    out = tmp_path_factory.mktemp("cal") / "images.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label", "source", "split", "patient"])
        w.writeheader()
        for r in keep:
            w.writerow({**{k: r[k] for k in ("label", "source", "split", "patient")},
                        "path": str((index.parent / r["path"]).resolve())})
    return out


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory, image_csv):
    from sdk.export.onnx import export_onnx

    rows, _ = load_rows(image_csv)
    x = SimplePreprocessor(64)(rows[:8])
    out = tmp_path_factory.mktemp("cal") / "tiny_fp32.onnx"
    export_onnx(_tiny_classifier(), out, input_size=64, metadata={"classes": ["non_covid", "covid"]},
                parity_inputs=x, parity_source="test")
    return out


def test_qdq_quantisation_keeps_head_fp32(fp32_model, image_csv, tmp_path):
    import onnx

    from sdk.calibration.quantize import calibrate_ranges, predict, prepare, quantize
    from sdk.runtime import OrtSession

    rows, _ = load_rows(image_csv)
    x = SimplePreprocessor(64)(rows[:24])
    prepped, head = prepare(fp32_model, tmp_path / "prepped.onnx")
    ranges = calibrate_ranges(prepped, x[:16], "minmax", tmp_path / "ranges.json")
    out = quantize(prepped, tmp_path / "int8.onnx", "minmax", head, ranges)
    m = onnx.load(str(out))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    producer = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type in ("Softmax", "ReduceSum", "Einsum", "Gemm", "Where"):
            assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in n.input), n.name
    # per-channel weights: a DequantizeLinear with a vector scale feeds a Conv
    inits = {t.name: tuple(t.dims) for t in m.graph.initializer}
    assert any(n.op_type == "DequantizeLinear" and len(inits.get(n.input[1], ())) == 1 and inits[n.input[1]][0] > 1
               for n in m.graph.node)
    a, b = predict(fp32_model, x), predict(out, x)
    assert np.max(np.abs(a["probs"] - b["probs"])) < 0.15
    with OrtSession(out) as s:
        assert s.info.precision == "int8"


def test_bias_correction_uses_ort_weight_quantiser(fp32_model, image_csv, tmp_path):
    """weight_bias_shift replicates ORT's per-channel QInt8 weights exactly, its shift equals the
    brute-force mean output change of a 1x1 conv, and quantize(bias_shift=...) corrects only the
    quantised convolutions."""
    import onnx
    from onnx import numpy_helper

    from sdk.calibration.quantize import (backbone_convs, calibrate_ranges, conv_input_means, prepare, quantize,
                                          weight_bias_shift)

    rows, _ = load_rows(image_csv)
    x = SimplePreprocessor(64)(rows[:16])
    prepped, head = prepare(fp32_model, tmp_path / "prepped.onnx")
    convs = backbone_convs(prepped, head)
    shifts = weight_bias_shift(prepped, x, convs)
    assert set(shifts) == set(convs)
    src = onnx.load(str(prepped))
    nodes = {n.name: n for n in src.graph.node}
    w32 = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    # brute force for the 1x1 conv: mean over pixels of (Q(W) - W) x == shift
    pw = next(c for c in convs if w32[nodes[c].input[1]].shape[2:] == (1, 1))
    ranges = calibrate_ranges(prepped, x, "minmax", tmp_path / "ranges.json")
    keep = [convs[0]]                                        # stem stays FP32 here
    out = quantize(prepped, tmp_path / "bc.onnx", "minmax", list(head) + keep, ranges, bias_shift=shifts)
    q = onnx.load(str(out))
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    qn = {n.name: n for n in q.graph.node}
    producer = {o: n for n in q.graph.node for o in n.output}
    dq = producer[qn[pw].input[1]]
    assert dq.op_type == "DequantizeLinear"
    wq = qi[dq.input[0]].astype(np.float64) * qi[dq.input[1]].reshape(-1, 1, 1, 1)
    w = w32[nodes[pw].input[1]].astype(np.float64)
    mu = conv_input_means(prepped, x, [pw])[pw]
    assert np.allclose((wq - w)[:, :, 0, 0] @ mu, shifts[pw], atol=1e-6)
    # corrected bias (int32 * scale) on quantised convs; the excluded stem keeps its own bias
    dqb = producer[qn[pw].input[2]]
    b = qi[dqb.input[0]].astype(np.float64) * qi[dqb.input[1]]
    step = float(np.max(qi[dqb.input[1]]))
    assert np.allclose(b, w32[nodes[pw].input[2]] - shifts[pw], atol=step)
    assert np.array_equal(qi[qn[keep[0]].input[2]], w32[nodes[keep[0]].input[2]])
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta.get("ctsdk.bias_correction") == "weights"


def test_calibrate_report_matches_independent_evaluation(fp32_model, image_csv, tmp_path):
    from sdk.calibration.quantize import calibrate, predict

    report_path = tmp_path / "report.json"
    from sdk.calibration.quantize import CalibrationOptions

    opts = CalibrationOptions(n=16, splits_csv=None, method="minmax,percentile", bench=False, preprocess=SimplePreprocessor(64),
                              sensitivity_steps=1, progress=False, report_path=report_path)
    rep = calibrate(fp32_model, image_csv, tmp_path / "tiny_int8.onnx", opts)
    assert report_path.is_file() and (tmp_path / "tiny_int8.onnx").is_file()
    assert rep.calibration["n"] == 16 and set(rep.calibration["composition"]) <= {"ucsd-covid-ct/covid", "ucsd-covid-ct/non-covid"}
    assert set(rep.methods) == {"minmax", "percentile"}   # entropy: same code path, ~100x slower (ORT's KL search)
    # recompute FP32 and INT8 metrics from the test rows ourselves
    rows, _ = load_rows(image_csv)
    test = [r for r in rows if r.split == "test"]
    x = SimplePreprocessor(64)(test)
    y = np.array([r.y for r in test])
    p32 = predict(fp32_model, x)["probs"][:, 1]
    p8 = predict(tmp_path / "tiny_int8.onnx", x)["probs"][:, 1]
    assert rep.test["n"] == len(test)
    assert rep.fp32["auc"] == pytest.approx(_auc_bruteforce(y, p32), abs=1e-9)
    assert rep.chosen["auc"] == pytest.approx(_auc_bruteforce(y, p8), abs=1e-9)
    assert rep.chosen["auc_delta"] == pytest.approx(rep.chosen["auc"] - rep.fp32["auc"], abs=1e-12)
    assert rep.chosen["top1_agreement"] == pytest.approx(np.mean((p32 >= 0.5) == (p8 >= 0.5)), abs=1e-9)
    assert rep.passed == (-rep.chosen["auc_delta"] <= 0.01 and rep.chosen["top1_agreement"] >= 0.99)
    # the most faithful method is kept (agreement first); sensitivity steps may only improve on it
    assert rep.chosen["top1_agreement"] >= max(c["top1_agreement"] for c in rep.methods.values()) - 1e-12


def test_calibrate_cli_json(fp32_model, image_csv, tmp_path):
    import json
    import subprocess
    import sys

    ctsdk = Path(sys.executable).with_name("ctsdk")
    if not ctsdk.exists():
        pytest.skip(f"{ctsdk} not installed (pip install -e .)")
    out = tmp_path / "cli_int8.onnx"
    r = subprocess.run([str(ctsdk), "calibrate", "--onnx", str(fp32_model), "--images", str(image_csv), "--out", str(out),
                        "--n", "8", "--method", "minmax", "--splits", "none", "--no-bench", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 1), r.stderr          # 1 = written but below the accuracy bar
    assert r.stdout.strip(), r.stderr[-3000:]
    d = json.loads(r.stdout)                          # stdout is exactly one JSON object
    assert d["int8_onnx"] == str(out) and out.is_file() and d["calibration"]["n"] == 8
    assert r.returncode == (0 if d["passed"] else 1)
    bad = subprocess.run([str(ctsdk), "calibrate", "--onnx", str(fp32_model), "--images", str(image_csv), "--out",
                          str(out), "--method", "kl", "--splits", "none"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--method must be one of" in bad.stderr


def test_calibrate_cli_bias_correction_flags(fp32_model, image_csv, tmp_path):
    """--bias-correction and --percentile reach CalibrationOptions and the report (in-process CLI)."""
    import json

    from click.testing import CliRunner

    from sdk.cli.calibrate_cmd import calibrate as cmd

    out = tmp_path / "bc_int8.onnx"
    r = CliRunner().invoke(cmd, ["--onnx", str(fp32_model), "--images", str(image_csv), "--out", str(out), "--n", "8",
                                 "--method", "percentile", "--percentile", "99.99", "--bias-correction", "--splits", "none",
                                 "--no-bench", "--json"])
    assert r.exit_code in (0, 1), r.output
    d = json.loads(r.stdout)
    assert d["calibration"]["bias_correction"] is True and d["calibration"]["percentile"] == 99.99
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta.get("ctsdk.bias_correction") == "weights"


def test_runtime_hints_from_report(tmp_path):
    import json

    from sdk.calibration import runtime_hints

    rep = {"passed": True, "speed": {"threads": 2, "batch1": {"speedup": 1.4}, "batch32": {"speedup": 1.9}}}
    assert runtime_hints(rep) == {"calibration_passed": True, "int8_speedup": 1.4}
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"passed": False, "speed": {}}))
    assert runtime_hints(p) == {"calibration_passed": False, "int8_speedup": None}
