"""`ctsdk train seg|classifier|aggregator`: options generated from the config dataclasses, --config
merging, --json, and the missing-torch error path (exit 2, "ctsdk[train]")."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from click.testing import CliRunner

from sdk.cli import cli
from sdk.cli.train_cmd import SUBCOMMANDS, require_train_deps
from sdk.errors import MissingDependencyError


def _invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_train_help_lists_the_three_subcommands():
    r = _invoke("train", "--help")
    assert r.exit_code == 0
    for name in ("seg", "classifier", "aggregator"):
        assert name in r.output


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_config_field_is_an_option(name):
    import importlib

    module, cls_name, _, needs = SUBCOMMANDS[name][:4]
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except ImportError as exc:  # only the subcommand's own optional packages (the train extra) may be missing
        if exc.name not in needs:
            raise
        pytest.skip(f"{module} needs {exc.name} (pip install ctsdk[train]): {exc}")
    r = _invoke("train", name, "--help")
    assert r.exit_code == 0, r.output
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in r.output, f.name


def test_config_file_is_overridden_by_options(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochs": 9, "lr": 0.5, "model": "effnet_lite0_gap", "_meta": {"torch": "x"}}))
    r = _invoke("train", "classifier", "--config", str(cfg), "--lr", "0.01", "--no-progress", "--print-config", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["epochs"] == 9 and d["lr"] == 0.01 and d["model"] == "effnet_lite0_gap" and d["progress"] is False
    assert d["batch_size"] == 32  # untouched default


def test_unknown_config_key_exits_2_naming_it(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"epochz": 3}))
    r = CliRunner().invoke(cli, ["train", "classifier", "--config", str(cfg), "--print-config"])
    assert r.exit_code == 2
    assert "epochz" in r.output


def test_bad_value_exits_2(tmp_path):
    r = CliRunner().invoke(cli, ["train", "classifier", "--loss", "hinge", "--data-root", str(tmp_path), "--out-dir", str(tmp_path)])
    assert r.exit_code == 2 and "loss" in r.output


def test_missing_torch_is_a_typed_error_and_exit_2(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # simulates an install without torch
    with pytest.raises(MissingDependencyError, match=r"ctsdk\[train\]"):
        require_train_deps(("torch",), "ctsdk train classifier")
    r = CliRunner().invoke(cli, ["train", "classifier", "--epochs", "1"])
    assert r.exit_code == 2
    assert "torch" in r.output and "ctsdk[train]" in r.output
