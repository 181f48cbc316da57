"""``ctsdk train seg|classifier|seg3d|aggregator`` - training commands (need ``ctsdk[train]``).

Each subcommand's options are generated from its config dataclass's fields
(``sdk.train.seg.SegTrainConfig``, ``sdk.train.classifier.ClassifierTrainConfig``,
``sdk.train.seg3d.Seg3DTrainConfig``, ``sdk.train.aggregator.AggTrainConfig``): a field
``max_minutes`` becomes ``--max-minutes``, a bool field ``progress`` becomes
``--progress/--no-progress``, a ``Tuple[int, int]`` takes two values, a ``List[str]`` may be repeated.
``--config FILE.json`` loads a config (e.g. a run's saved ``config.json``); options given on the
command line override it. The resolved config is checked by its ``validate()`` (a value training
cannot use exits 2, one line on stderr); ``--print-config`` prints it and exits. The config modules
are imported only when a subcommand is used, and the heavy packages only when training starts:
without torch, ``seg`` / ``classifier`` exit 2 with "... pip install 'ctsdk[train]'".

Before any work the output location is checked: it must be writable, and it must not hold an
earlier run's outputs (each trainer module's ``earlier_run_files(cfg)``: the classifier's
``OUT_DIR/<model>/best.pt`` or ``metrics.json``, ...) unless ``--overwrite`` - the contract of
``python -m sdk.bundle build``.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import click

from ..errors import ConfigError, MissingDependencyError
from ._common import FiniteFloat, check_output_dir, check_output_file, emit, handle_errors, json_option

# subcommand -> (module, config class, train function, packages needed to train, help)
SUBCOMMANDS: Dict[str, Tuple[str, str, str, Tuple[str, ...], str]] = {
    "seg": ("sdk.train.seg", "SegTrainConfig", "train_seg", ("torch",),
            "Train the 2D lung U-Net on shared/data/seg2d and export it to ONNX."),
    "classifier": ("sdk.train.classifier", "ClassifierTrainConfig", "train_classifier", ("torch",),
                   "Train the slice classifier (mask-weighted GAP) on shared/data/images_index.csv."),
    "seg3d": ("sdk.train.seg3d", "Seg3DTrainConfig", "train_seg3d", ("torch",),
              "Train the 3D lung U-Net (128^3) on the cubes of `python -m sdk.train.seg3d prep`."),
    "aggregator": ("sdk.train.aggregator", "AggTrainConfig", "train_aggregator", ("xgboost",),
                   "Train the XGBoost patient decision from slice scores (predictions.csv / series)."),
}


#: one line of help per config field (every generated option has one; tests/test_cli_errors.py
#: checks that each field of each config class is listed): shared texts, then per subcommand
FIELD_HELP: Dict[str, str] = {
    "out_dir": "Run folder: weights, ONNX, config.json and metrics are written here.",
    "seed": "Random seed (data order, augmentation, initialisation).",
    "threads": "CPU threads for torch.",
    "lr": "Learning rate.",
    "weight_decay": "Weight decay of the optimiser.",
    "batch_size": "Images per training batch.",
    "epochs": "Maximum training epochs.",
    "patience": "Early stopping: epochs without a validation improvement before training stops.",
    "base": "Channels of the U-Net's first level (doubling per level).",
    "levels": "U-Net levels (resolutions).",
}
FIELD_HELP_BY_COMMAND: Dict[str, Dict[str, str]] = {
    "seg": {
        "data_dir": "Folder of the 2D lung training slices and masks (shared data seg2d).",
        "target": ("What to segment: lung (the lung U-Net, seg2d lung masks) or infection (a lesion U-Net, seg2d's "
                   "COVID-19 infection masks; files unet2d_infection.*)."),
        "size": "Network input side in pixels (slices are resized to SIZE x SIZE).",
        "val_block": "File-number range LO HI (HI excluded) of the validation slices.",
        "test_block": "File-number range LO HI (HI excluded) of the test slices.",
        "max_minutes": "Time budget of the training loop in minutes; training stops after the epoch that passes it.",
        "p_reclahe": "Probability that an augmented slice is re-prepared with CLAHE (else min-max only), as at inference.",
        "opset": "ONNX opset of the exported model.",
        "notes": "Free-text note saved in config.json.",
    },
    "classifier": {
        "model": "Classifier architecture from sdk.models (e.g. effnet_lite0_mgap, resnet50_mgap).",
        "data_root": "Folder the image paths are relative to ('' = $CTSDK_SHARED_DATA or ../shared/data).",
        "index_csv": "Images CSV path,label,source,split,patient ('' = DATA_ROOT/images_index.csv).",
        "splits_csv": ("Splits CSV with the columns path,label,source,split,patient,source_split,group that fixes the "
                       "split: the OUT_DIR/splits.csv an earlier ctsdk train classifier run wrote, or docs/data/splits.csv "
                       "('' = computed and written to OUT_DIR/splits.csv)."),
        "out_dir": ("Runs folder: the run is written to OUT_DIR/<model> (best.pt, metrics.json, predictions.csv; an "
                    "earlier run there is refused without --overwrite), the split to OUT_DIR/splits.csv."),
        "masks_dir": "Lung-mask cache folder ('' = OUT_DIR/masks).",
        "seg_onnx": "2D lung U-Net ONNX that builds the mask cache ('' = use the cache only).",
        "input_size": "Input side in pixels (a multiple of 32, >= 64).",
        "samples_per_epoch": "Images drawn per epoch (0 = the whole train split).",
        "freeze_stages": "Backbone stages kept at their ImageNet weights (the stem and stages 0 to N-1).",
        "loss": "Training loss: focal or ce (cross-entropy).",
        "focal_gamma": "Focusing parameter gamma of the focal loss.",
        "class_weighting": "Loss weights per class: balanced (n / (K * n_k)) or none.",
        "drop_rate": "Dropout rate before the classifier head.",
        "pretrained": "Start from ImageNet weights (--no-pretrained: random initialisation).",
        "max_minutes": "Cap of the training loop in minutes; stops before an epoch that would overrun it (0 = no cap).",
        "limit": "Keep at most this many images per split (0 = all; for smoke tests); only their lung masks are computed.",
        "predict_all": "After training, write predictions.csv for every image (the aggregator's input).",
        "n_boot": "Bootstrap resamples for the confidence intervals of the val/test metrics.",
        "progress": "Progress bars on stderr.",
    },
    "seg3d": {
        "data_dir": "Folder of the 128^3 training cubes (written by `python -m sdk.train.seg3d prep`).",
        "seconds": "Wall-clock budget of the whole run in seconds.",
        "device": "auto (CUDA when available, else CPU), cuda or cpu.",
        "batch_size": "Cubes per training batch (0 = 4 on CUDA, 2 on CPU).",
        "crop": "Training crop side in voxels (0 = 128 on CUDA, the whole cube; 64 on CPU).",
        "eval_every": "Seconds between validations (0 = 20 on CUDA, 300 on CPU).",
        "init": "Start from this state dict, e.g. a previous run's unet3d_lung.pt ('' = random initialisation).",
    },
    "aggregator": {
        "predictions": "Classifier predictions.csv whose slice scores make the training bags ('' = none).",
        "series": "CSV path,label of real series scored with --bundle ('' = none).",
        "series_role": "train: add --series to the training set; eval: report them only.",
        "bundle": "Bundle that scores --series ('' = the default bundle).",
        "out": "Aggregator JSON to write.",
        "bag_splits": "Comma-separated splits the training bags are drawn from.",
        "val_splits": "Splits of the early-stopping and threshold bags ('' = none).",
        "test_splits": "Splits of the report-only bags ('' = none).",
        "bags_per_class": "Training bags per class (val/test: a quarter of this).",
        "min_slices": "Fewest slices in a synthetic bag.",
        "max_slices": "Most slices in a synthetic bag.",
        "covid_fraction_min": "Share of COVID slices in a covid bag ~ U(this, 1).",
        "n_groups": "Ordered slice groups whose mean probabilities are the features (paper 001: 20).",
        "num_boost_round": "Most XGBoost boosting rounds.",
        "max_depth": "XGBoost tree depth.",
        "eta": "XGBoost learning rate.",
        "early_stopping_rounds": "Stop when the validation loss did not improve for this many rounds.",
        "n_bootstrap": "Bootstrap resamples for the confidence intervals.",
        "seed": "Random seed (bag sampling, XGBoost, bootstrap).",
    },
}

#: the "Examples:" epilog of each subcommand (run from the repository root)
EXAMPLES: Dict[str, str] = {
    "seg": """  ctsdk train seg --print-config
  ctsdk train seg --epochs 1 --max-minutes 2 --out-dir /tmp/ctsdk-seg --overwrite""",
    "classifier": """  ctsdk train classifier --print-config
  ctsdk train classifier --epochs 1 --limit 64 --out-dir /tmp/ctsdk-classifier --overwrite
  ctsdk train classifier --config RUN_CONFIG_JSON --epochs 2 --out-dir /tmp/ctsdk-classifier-2
  ctsdk train classifier --splits-csv docs/data/splits.csv --epochs 1 --limit 64 --out-dir /tmp/ctsdk-classifier-3
  (RUN_CONFIG_JSON: the config.json of an earlier run; --overwrite replaces an earlier run in the
  same folder, without it that folder is refused)""",
    "seg3d": """  ctsdk train seg3d --print-config
  ctsdk train seg3d --data-dir CUBES_DIR --seconds 600 --out-dir /tmp/ctsdk-seg3d
  (CUBES_DIR: the output of `python -m sdk.train.seg3d prep`)""",
    "aggregator": """  ctsdk train aggregator --print-config
  ctsdk train aggregator --predictions PREDICTIONS_CSV --out /tmp/ctsdk-aggregator.json
  (PREDICTIONS_CSV: predictions.csv of `ctsdk train classifier`)""",
}

_TRAIN_EXIT = ("\b\nExit codes: 0 trained (or config printed); 2 bad options or config, a missing package\n"
               "(ctsdk[train]), an output folder that cannot be written or that holds an earlier run\n"
               "(pass --overwrite to replace it); one line on stderr. These are checked before anything\n"
               "is written.")


def field_help(command: str, name: str) -> str:
    """The help line of config field ``name`` of ``ctsdk train <command>`` ('' when none is written)."""
    return FIELD_HELP_BY_COMMAND.get(command, {}).get(name) or FIELD_HELP.get(name, "")


def require_train_deps(packages: Sequence[str], feature: str) -> None:
    """Raise MissingDependencyError (exit 2, "pip install 'ctsdk[train]'") for a missing package."""
    from .._lazy import require

    for pkg in packages:
        require(pkg, feature)


def _click_type(hint: Any) -> Any:
    """click's type for a config value of type ``hint``: a float must be finite, as a ``--config``
    file's value must (:func:`_typed`); click's own float takes ``nan`` and ``inf``."""
    return FiniteFloat() if hint is float else hint


def _field_option(f: "dataclasses.Field[Any]", hint: Any, text: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One click option for a dataclass field (default None = "not given", so --config can fill it);
    ``text``: its one-line help, followed by the field's default."""
    name = "--" + f.name.replace("_", "-")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
    shown = f"[default: {default!r}]" if default not in ("", None, []) else ""
    shown = f"{text} {shown}".strip()
    dest = f.name
    if hint is bool:
        return click.option(f"{name}/--no-{f.name.replace('_', '-')}", dest, default=None, help=f"{shown}")
    if origin in (list, List):
        inner = args[0] if args else str
        return click.option(name, dest, type=_click_type(inner), multiple=True, help=f"(repeatable) {shown}")
    if origin in (tuple, Tuple):
        if args and args[-1] is not Ellipsis:
            return click.option(name, dest, type=tuple(_click_type(a) for a in args), default=None,
                                help=f"({len(args)} values) {shown}")
        inner = args[0] if args else str
        return click.option(name, dest, type=_click_type(inner), multiple=True, help=f"(repeatable) {shown}")
    if hint in (int, float, str):
        return click.option(name, dest, type=_click_type(hint), default=None, help=shown)
    return click.option(name, dest, type=str, default=None, help=f"(JSON) {shown}")


def _type_text(hint: Any) -> str:
    """What a config value of type ``hint`` must be, in words (for messages)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}
    if hint in names:
        return names[hint]
    if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} values ({', '.join(_type_text(a) for a in args)})"
    if origin in (tuple, Tuple, list, List):
        return f"a list (each {_type_text(args[0]) if args else 'a value'})"
    return getattr(hint, "__name__", str(hint))


_BAD = object()   # a value that does not fit its field's type (see _typed)


def _typed(value: Any, hint: Any) -> Any:
    """``value`` read from a JSON config as the field type ``hint`` takes it (a whole float for an
    int, a list for a tuple), or :data:`_BAD` - the checks click applies to the command-line option."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:   # Optional[X]: null, or an X
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            out = _typed(value, a)
            if out is not _BAD:
                return out
        return _BAD
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return int(value) if number and float(value).is_integer() else _BAD
    if hint is float:
        return value if number else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if origin in (tuple, Tuple, list, List):
        if not isinstance(value, (list, tuple)):
            return _BAD
        fixed = origin in (tuple, Tuple) and bool(args) and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            return _BAD
        kinds = args if fixed else [args[0] if args else Any] * len(value)
        items = [v if k is Any else _typed(v, k) for v, k in zip(value, kinds)]
        if any(i is _BAD for i in items):
            return _BAD
        return tuple(items) if origin in (tuple, Tuple) else items
    return value


def _config_file_values(cls: type, config_file: str) -> Dict[str, Any]:
    """The values of a ``--config`` JSON file, each checked against its field's type; ConfigError
    (exit 2, before any work) naming the file, the key, the type it needs and the value found.
    Unknown keys are left to :func:`sdk.train.common.config_from_dict` (it lists the valid ones)."""
    from ..train.common import load_config

    raw = load_config(config_file)   # ConfigError for a missing / non-JSON / non-UTF-8 file
    hints = typing.get_type_hints(cls)
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        typed = _typed(value, hints[key]) if key in hints else value
        if typed is _BAD:
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            option = "--" + key.replace("_", "-")
            raise ConfigError(f"{config_file}: config key {key!r} must be {_type_text(hints[key])} (as {option} "
                              f"takes), got {shown}; correct it in the file or give {option} on the command line "
                              f"(checked before starting: nothing was run)")
        out[key] = typed
    return out


def resolve_config(cls: type, config_file: Optional[str], given: Dict[str, Any]) -> Any:
    """Dataclass defaults <- ``config_file`` (JSON; each value checked against its field's type)
    <- explicitly given options, then checked by the config's ``validate()`` (ConfigError naming
    the field, its option and what is allowed): ``--print-config`` never prints a config that cannot
    train, and training starts from a checked one (the trainer checks again, for Python callers)."""
    from ..train.common import config_from_dict

    values: Dict[str, Any] = {}
    if config_file:
        values.update(_config_file_values(cls, config_file))
    hints = typing.get_type_hints(cls)
    for k, v in given.items():
        if v is None or v == ():  # not given (multiple=True options give ())
            continue
        if isinstance(v, tuple) and typing.get_origin(hints[k]) in (list, List):
            v = list(v)
        values[k] = v
    for k, v in list(values.items()):  # JSON lists -> tuples where the field is a tuple
        if k in hints and typing.get_origin(hints[k]) in (tuple, Tuple) and isinstance(v, list):
            values[k] = tuple(v)
    cfg = config_from_dict(cls, values)
    cfg.validate()
    return cfg


def check_no_earlier_run(module: Any, cfg: Any, overwrite: bool) -> None:
    """ConfigError (exit 2, before any work) when the run would replace an earlier run's outputs
    (``module.earlier_run_files(cfg)``) and ``overwrite`` is not set."""
    finder = getattr(module, "earlier_run_files", None)
    found = finder(cfg) if finder is not None and not overwrite else []
    if not found:
        return
    option, value = ("--out", cfg.out) if getattr(cfg, "out", None) else ("--out-dir", getattr(cfg, "out_dir", ""))
    folder = found[0].parent
    raise ConfigError(f"{option} {value}: {folder} holds an earlier run ({', '.join(p.name for p in found)}); pass "
                      f"--overwrite to replace it or give another {option} (checked before starting: nothing was run)")


def _human(payload: Dict[str, Any]) -> str:
    keep = {k: v for k, v in payload.items() if not isinstance(v, (list, dict))}
    lines = [f"{k}: {v}" for k, v in keep.items()]
    for key in ("val", "test"):
        if isinstance(payload.get(key), dict) and "auc" in payload[key]:
            d = payload[key]
            lines.append(f"{key}: AUC {d['auc']:.3f} sens {d['sensitivity']:.3f} spec {d['specificity']:.3f} (n={d['n']})")
    return "\n".join(lines) or "done"


def make_subcommand(name: str) -> click.Command:
    """Build ``ctsdk train <name>`` from its config dataclass (imports the config module only)."""
    module, cls_name, fn_name, needs, help_text = SUBCOMMANDS[name]
    mod = importlib.import_module(module)
    cls = getattr(mod, cls_name)
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)

    @handle_errors
    def command(config_file: Optional[str], print_config: bool, overwrite: bool, as_json: bool, **given: Any) -> None:
        cfg = resolve_config(cls, config_file, given)
        if print_config:
            from ..tables import json_safe

            emit(json_safe(cfg), as_json, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
            return
        require_train_deps(needs, f"ctsdk train {name}")
        check_output_dir(getattr(cfg, "out_dir", None) or None, "--out-dir")  # before training: results must be savable
        check_output_file(getattr(cfg, "out", None) or None, "--out")
        check_no_earlier_run(mod, cfg, overwrite)
        train = getattr(mod, fn_name)
        result = train(cfg, overwrite=overwrite)   # the trainer refuses an earlier run too (checked above)
        emit(result if isinstance(result, dict) else {"result": result}, as_json, _human)

    for f in reversed(fields):
        command = _field_option(f, hints[f.name], field_help(name, f.name))(command)
    command = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                           help="JSON config (e.g. a saved config.json); command-line options override it.")(command)
    command = click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")(command)
    command = click.option("--overwrite", is_flag=True,
                           help="Replace an earlier run's outputs in the output folder (without it such a folder is "
                                "refused before any work).")(command)
    command = json_option(command)
    epilog = f"\b\nExamples:\n{EXAMPLES[name]}\n\n{_TRAIN_EXIT}" if name in EXAMPLES else None
    return click.command(name=name, help=f"{help_text}\n\nOptions mirror {module}.{cls_name}.", epilog=epilog)(command)


class TrainGroup(click.Group):
    """Subcommands built on first use from the config dataclasses."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name not in SUBCOMMANDS:
            return None
        try:
            return make_subcommand(name)
        except ImportError as exc:  # the config module itself needs a missing package
            return _unavailable(name, exc)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, s[4]) for n, s in SUBCOMMANDS.items()])


def _unavailable(name: str, exc: ImportError) -> click.Command:
    pkg = (getattr(exc, "name", None) or "torch").split(".")[0]

    @click.command(name=name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                   help=f"(unavailable: {exc})")
    @handle_errors
    def stub() -> None:
        raise MissingDependencyError(pkg, f"ctsdk train {name}", "train")

    return stub


@click.group(cls=TrainGroup, name="train", epilog="""\b
Examples:
  ctsdk train classifier --print-config
  ctsdk train seg --epochs 1 --max-minutes 2 --out-dir /tmp/ctsdk-seg --overwrite
  ctsdk train classifier --help""")
def train() -> None:
    """Train the 2D or 3D lung segmenter, the slice classifier or the aggregator (needs ctsdk[train])."""


__all__ = ["train", "make_subcommand", "resolve_config", "require_train_deps", "check_no_earlier_run", "SUBCOMMANDS"]
