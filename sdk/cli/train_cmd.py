"""``ctsdk train seg|classifier|aggregator`` - training commands (need ``ctsdk[train]``).

Each subcommand's options are generated from its config dataclass's fields
(``sdk.train.seg.SegTrainConfig``, ``sdk.train.classifier.ClassifierTrainConfig``,
``sdk.train.aggregator.AggTrainConfig``): a field ``max_minutes`` becomes ``--max-minutes``, a bool
field ``progress`` becomes ``--progress/--no-progress``, a ``Tuple[int, int]`` takes two values, a
``List[str]`` may be repeated. ``--config FILE.json`` loads a config (e.g. a run's saved
``config.json``); options given on the command line override it. ``--print-config`` prints the
resolved config and exits. The config modules are imported only when a subcommand is used, and the
heavy packages only when training starts: without torch, ``seg`` / ``classifier`` exit 2 with
"... pip install 'ctsdk[train]'".
"""
from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import click

from ..errors import MissingDependencyError
from ._common import emit, handle_errors, json_option

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


def require_train_deps(packages: Sequence[str], feature: str) -> None:
    """Raise MissingDependencyError (exit 2, "pip install 'ctsdk[train]'") for a missing package."""
    from .._lazy import require

    for pkg in packages:
        require(pkg, feature)


def _field_option(f: "dataclasses.Field[Any]", hint: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One click option for a dataclass field (default None = "not given", so --config can fill it)."""
    name = "--" + f.name.replace("_", "-")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
    shown = f"[default: {default!r}]" if default not in ("", None, []) else ""
    dest = f.name
    if hint is bool:
        return click.option(f"{name}/--no-{f.name.replace('_', '-')}", dest, default=None, help=f"{shown}")
    if origin in (list, List):
        inner = args[0] if args else str
        return click.option(name, dest, type=inner, multiple=True, help=f"(repeatable) {shown}")
    if origin in (tuple, Tuple):
        if args and args[-1] is not Ellipsis:
            return click.option(name, dest, type=tuple(args), default=None, help=f"({len(args)} values) {shown}")
        inner = args[0] if args else str
        return click.option(name, dest, type=inner, multiple=True, help=f"(repeatable) {shown}")
    if hint in (int, float, str):
        return click.option(name, dest, type=hint, default=None, help=shown)
    return click.option(name, dest, type=str, default=None, help=f"(JSON) {shown}")


def resolve_config(cls: type, config_file: Optional[str], given: Dict[str, Any]) -> Any:
    """Dataclass defaults <- ``config_file`` (JSON) <- explicitly given options."""
    from ..train.common import config_from_dict, load_config

    values: Dict[str, Any] = {}
    if config_file:
        values.update(load_config(config_file))
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
    return config_from_dict(cls, values)


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
    def command(config_file: Optional[str], print_config: bool, as_json: bool, **given: Any) -> None:
        cfg = resolve_config(cls, config_file, given)
        if print_config:
            from ..tables import json_safe

            emit(json_safe(cfg), as_json, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
            return
        require_train_deps(needs, f"ctsdk train {name}")
        train = getattr(mod, fn_name)
        result = train(cfg)
        emit(result if isinstance(result, dict) else {"result": result}, as_json, _human)

    for f in reversed(fields):
        command = _field_option(f, hints[f.name])(command)
    command = click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                           help="JSON config (e.g. a saved config.json); command-line options override it.")(command)
    command = click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")(command)
    command = json_option(command)
    return click.command(name=name, help=f"{help_text}\n\nOptions mirror {module}.{cls_name}.")(command)


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


@click.group(cls=TrainGroup, name="train")
def train() -> None:
    """Train the lung segmenter, slice classifier or aggregator (needs ctsdk[train])."""


__all__ = ["train", "make_subcommand", "resolve_config", "require_train_deps", "SUBCOMMANDS"]
