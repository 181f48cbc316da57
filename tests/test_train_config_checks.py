"""Every training config checks its values - ``validate()`` of ``SegTrainConfig``,
``Seg3DTrainConfig``, ``AggTrainConfig`` and ``ClassifierTrainConfig`` - before anything runs:

- ``ctsdk train <sub> --print-config`` refuses a value training cannot use (exit 2, one
  ``ctsdk: error:`` line naming the field, its option, the value and what is allowed); it printed
  the invalid config with exit 0;
- ``ctsdk train <sub>``, the Python trainers (``train_seg`` ...) and the ``python -m sdk.train.*``
  mains refuse it before torch is asked for, a file is read or the output folder is made. Before,
  ``--lr -1`` / ``--size 33`` / ``--crop 50`` failed in AdamW or the U-Net after the run folder was
  written, ``--eta 0`` / ``--n-bootstrap -5`` / ``--seconds -5`` / ``--p-reclahe 5`` trained (exit 0),
  and the seg / seg3d mains printed a traceback for a ConfigError.

No training runs here: every case stops in ``validate()`` (the data paths do not exist).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from sdk.cli.train_cmd import SUBCOMMANDS
from sdk.errors import ConfigError
from conftest import ctsdk_error as _error, ctsdk_in_process as _ctsdk


def _config_class(sub: str) -> type:
    module, cls_name = SUBCOMMANDS[sub][:2]
    return getattr(importlib.import_module(module), cls_name)


#: (subcommand, options, the words of its one error line)
BAD: List[Tuple[str, Tuple[str, ...], str]] = [
    ("seg", ("--epochs", "-1"), "SegTrainConfig: epochs must be a whole number >= 1 (--epochs), got -1 (int)"),
    ("seg", ("--batch-size", "0"), "batch_size must be a whole number >= 1 (--batch-size), got 0 (int)"),
    ("seg", ("--lr", "-1"), "lr must be a finite number > 0 (--lr), got -1.0 (float)"),
    ("seg", ("--size", "33"), "size must be a multiple of 8 (--size; its 4 U-Net levels divide it by 8), got 33"),
    ("seg", ("--p-reclahe", "1.5"), "p_reclahe must be a finite number >= 0 and <= 1 (--p-reclahe), got 1.5"),
    ("seg", ("--val-block", "260", "0"), "val_block must be two whole numbers LO HI with 0 <= LO < HI (--val-block"),
    ("seg", ("--opset", "0"), "opset must be a whole number >= 7 and <= 20 (--opset;"),
    ("seg", ("--size", "40960"), "size must be a whole number >= 8 and <= 1024 (--size;"),
    ("aggregator", ("--bags-per-class", "1000000000"), "bags_per_class must be a whole number >= 1 and <= 100000"),
    ("aggregator", ("--max-slices", "1000000000"), "max_slices must be a whole number >= 12 and <= 2000"),
    ("seg3d", ("--lr", "0"), "Seg3DTrainConfig: lr must be a finite number > 0 (--lr), got 0.0 (float)"),
    ("seg3d", ("--batch-size", "-3"), "batch_size must be a whole number >= 0 (--batch-size; 0: 4 on CUDA, 2 on CPU), "
                                      "got -3 (int)"),
    ("seg3d", ("--crop", "50"), "crop must be a multiple of 8 (--crop; its 4 U-Net levels divide it by 8; "
                                "0 = automatic), got 50"),
    ("seg3d", ("--seconds", "-5"), "seconds must be a finite number > 0 (--seconds), got -5.0 (float)"),
    ("seg3d", ("--threads", "0"), "threads must be a whole number >= 1 and <= 1024 (--threads), got 0 (int)"),
    ("seg3d", ("--device", "tpu"), "device must be auto, cuda, cuda:N or cpu (--device), got 'tpu'"),
    ("aggregator", ("--eta", "0"), "AggTrainConfig: eta must be a finite number > 0 and <= 1 (--eta; XGBoost's "
                                   "learning rate), got 0.0 (float)"),
    ("aggregator", ("--n-bootstrap", "-5"), "n_bootstrap must be a whole number >= 0 and <= 100000 (--n-bootstrap), "
                                            "got -5 (int)"),
    ("aggregator", ("--n-bootstrap", "1000000000"), "n_bootstrap must be a whole number >= 0 and <= 100000"),
    ("aggregator", ("--max-slices", "5"), "max_slices must be a whole number >= 12 and <= 2000 (--max-slices; "
                                          "at least min_slices), got 5 (int)"),
    ("aggregator", ("--seed", "-1"), "seed must be a whole number >= 0 and <= 4294967295 (--seed), got -1 (int)"),
    ("classifier", ("--lr", "-1"), "ClassifierTrainConfig: lr must be a finite number > 0 (--lr), got -1.0 (float)"),
    ("classifier", ("--drop-rate", "1"), "drop_rate must be a finite number >= 0 and < 1 (--drop-rate), got 1.0"),
    ("classifier", ("--n-boot", "1000000000"), "n_boot must be a whole number >= 0 and <= 100000 (--n-boot)"),
]


@pytest.mark.parametrize("sub, args, says", BAD, ids=lambda v: str(v)[:40])
def test_print_config_refuses_a_value_training_cannot_use(sub: str, args: Tuple[str, ...], says: str) -> None:
    # was: exit 0, the invalid value in the printed config
    assert says in _error("train", sub, *args, "--print-config")


def _run_args(sub: str, tmp_path: Path) -> List[Any]:
    """Output and data options of ``ctsdk train SUB`` pointing into tmp_path (no data there)."""
    if sub == "aggregator":
        return ["--out", tmp_path / "out" / "aggregator.json", "--predictions", tmp_path / "none.csv"]
    data = "--data-root" if sub == "classifier" else "--data-dir"
    return ["--out-dir", tmp_path / "out", data, tmp_path / "nodata"]


@pytest.mark.parametrize("sub, args, says", [
    ("seg", ("--lr", "-1"), "lr must be a finite number > 0 (--lr)"),          # was: data read, then AdamW's ValueError
    ("seg", ("--size", "33"), "size must be a multiple of 8"),                   # was: RuntimeError in the first batch
    ("seg3d", ("--crop", "50"), "crop must be a multiple of 8"),                 # was: cubes loaded, then RuntimeError
    ("aggregator", ("--eta", "0"), "eta must be a finite number > 0 and <= 1"),  # was: a constant model, exit 0
    ("classifier", ("--lr", "-1"), "lr must be a finite number > 0 (--lr)"),
], ids=lambda v: str(v)[:30])
def test_train_refuses_a_bad_value_before_any_work(tmp_path: Path, sub: str, args: Tuple[str, ...], says: str) -> None:
    line = _error("train", sub, *args, *_run_args(sub, tmp_path))
    assert says in line and "nodata" not in line and "none.csv" not in line  # the value, not the missing data
    assert sorted(p.name for p in tmp_path.iterdir()) == []


#: (module, config class, trainer, bad field values, the words of the ConfigError)
API_BAD = [
    ("sdk.train.seg", "SegTrainConfig", "train_seg", {"lr": math.nan}, "lr must be a finite number > 0 (--lr), got nan"),
    ("sdk.train.seg", "SegTrainConfig", "train_seg", {"epochs": 2.5}, "epochs must be a whole number >= 1 (--epochs), "
                                                                      "got 2.5 (float)"),
    ("sdk.train.seg", "SegTrainConfig", "train_seg", {"levels": 1}, "levels must be a whole number >= 2 and <= 8"),
    ("sdk.train.seg3d", "Seg3DTrainConfig", "train_seg3d", {"device": "tpu"}, "device must be auto, cuda, cuda:N or cpu"),
    ("sdk.train.seg3d", "Seg3DTrainConfig", "train_seg3d", {"levels": 8}, "levels 8 (--levels) divide the input by 128, "
                                                                         "which the automatic crop 64 (CPU) cannot take"),
    ("sdk.train.seg3d", "Seg3DTrainConfig", "train_seg3d", {"eval_every": math.inf}, "eval_every must be a finite number"),
    ("sdk.train.aggregator", "AggTrainConfig", "train_aggregator", {"covid_fraction_min": 2.0},
     "covid_fraction_min must be a finite number >= 0 and <= 1 (--covid-fraction-min), got 2.0"),
    ("sdk.train.aggregator", "AggTrainConfig", "train_aggregator", {"series_role": "test"},
     "series_role must be one of ['train', 'eval'] (--series-role), got 'test'"),
    ("sdk.train.classifier", "ClassifierTrainConfig", "train_classifier", {"threads": 0},
     "threads must be a whole number >= 1 and <= 1024 (--threads), got 0"),
]


def _api_paths(module: str, tmp_path: Path) -> Dict[str, str]:
    if module.endswith("aggregator"):
        return {"out": str(tmp_path / "out" / "aggregator.json"), "predictions": str(tmp_path / "none.csv")}
    data = "data_root" if module.endswith("classifier") else "data_dir"
    return {"out_dir": str(tmp_path / "out"), data: str(tmp_path / "nodata")}


@pytest.mark.parametrize("module, cls_name, fn_name, bad, says", API_BAD, ids=lambda v: str(v)[:30])
def test_python_trainers_check_the_config_before_reading_data(tmp_path: Path, module: str, cls_name: str,
                                                              fn_name: str, bad: Dict[str, Any], says: str) -> None:
    # was: the data (missing here) was read first, or the run trained / failed in torch, XGBoost or NumPy
    mod = importlib.import_module(module)
    cfg = getattr(mod, cls_name)(**_api_paths(module, tmp_path), **bad)
    with pytest.raises(ConfigError) as err:
        getattr(mod, fn_name)(cfg)
    assert says in str(err.value) and f"{cls_name}: " in str(err.value)
    with pytest.raises(ConfigError) as again:
        cfg.validate()
    assert str(again.value) == str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_python_m_mains_report_a_bad_value_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # was (seg, seg3d): the ConfigError's traceback (seg3d: about the missing cubes, not the value)
    from sdk.train import aggregator, seg, seg3d

    with pytest.raises(SystemExit) as done:
        seg.main(["--epochs", "0", "--out", str(tmp_path / "s"), "--data", str(tmp_path / "nodata")])
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "ctsdk: error: SegTrainConfig: epochs must be a whole number >= 1 (--epochs), got 0 (int)"]
    with pytest.raises(SystemExit) as done:
        seg3d.main(["train", "--lr", "-1", "--out-dir", str(tmp_path / "s3"), "--data-dir", str(tmp_path / "nodata")])
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "ctsdk: error: Seg3DTrainConfig: lr must be a finite number > 0 (--lr), got -1.0 (float)"]
    assert aggregator.main(["--eta", "nan", "--out", str(tmp_path / "a" / "a.json"),
                            "--predictions", str(tmp_path / "none.csv")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "ctsdk: error: AggTrainConfig: eta must be a finite number > 0 and <= 1 (--eta; XGBoost's learning rate), "
        "got nan (float)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_bad_value_in_a_config_file_is_refused_and_an_option_can_correct_it(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"epochs": 0, "lr": 0.01}))
    assert "epochs must be a whole number >= 1 (--epochs), got 0" in _error("train", "seg", "--config", cfg,
                                                                            "--print-config")
    code, out, err = _ctsdk("train", "seg", "--config", cfg, "--epochs", "3", "--print-config", "--json")
    assert code == 0 and not err.strip(), err
    assert (json.loads(out)["epochs"], json.loads(out)["lr"]) == (3, 0.01)


@pytest.mark.parametrize("sub, args, shown", [
    ("seg", (), {}),
    ("seg", ("--size", "64", "--levels", "3", "--lr", "0.01", "--p-reclahe", "0", "--val-block", "0", "5"),
     {"size": 64, "levels": 3, "lr": 0.01, "p_reclahe": 0.0, "val_block": [0, 5]}),
    ("seg3d", (), {}),
    ("seg3d", ("--crop", "96", "--batch-size", "0", "--device", "cuda:1", "--eval-every", "0"),
     {"crop": 96, "batch_size": 0, "device": "cuda:1", "eval_every": 0.0}),
    ("aggregator", (), {}),
    ("aggregator", ("--eta", "1", "--max-depth", "0", "--n-bootstrap", "100000", "--min-slices", "5", "--max-slices", "5"),
     {"eta": 1.0, "max_depth": 0, "n_bootstrap": 100000, "min_slices": 5, "max_slices": 5}),
    ("classifier", (), {}),
    ("classifier", ("--input-size", "64", "--max-minutes", "0", "--limit", "0", "--drop-rate", "0"),
     {"input_size": 64, "max_minutes": 0.0, "limit": 0, "drop_rate": 0.0}),
], ids=lambda v: str(v)[:30])
def test_a_valid_config_still_prints(sub: str, args: Tuple[str, ...], shown: Dict[str, Any]) -> None:
    from sdk.tables import json_safe

    code, out, err = _ctsdk("train", sub, *args, "--print-config", "--json")
    assert code == 0 and not err.strip(), err
    cls = _config_class(sub)
    assert json.loads(out) == {**json_safe(cls()), **shown}


@pytest.mark.parametrize("sub", list(SUBCOMMANDS))
def test_every_training_config_has_a_validate_its_defaults_pass(sub: str) -> None:
    cls = _config_class(sub)
    assert callable(getattr(cls, "validate", None)), cls
    cls().validate()
    assert dataclasses.is_dataclass(cls)
