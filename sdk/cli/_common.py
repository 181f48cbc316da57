"""Shared CLI plumbing: logging to stderr, --json output, CtsdkError -> exit 2."""
from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable, Dict

import click

from ..errors import CtsdkError

log = logging.getLogger("sdk")


def setup_logging(verbose: int = 0) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sdk")
    root.handlers[:] = [handler]
    root.setLevel(level)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (logs stay on stderr).")


def emit(payload: Dict[str, Any], as_json: bool, human: Callable[[Dict[str, Any]], str]) -> None:
    """Print the result: one JSON object with --json, else the human rendering."""
    if as_json:
        click.echo(json.dumps(payload, default=_json_default))
    else:
        click.echo(human(payload))


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: any CtsdkError becomes one line on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CtsdkError as exc:
            click.echo(f"ctsdk: error: {exc}", err=True)
            sys.exit(getattr(exc, "exit_code", 2))
        except KeyboardInterrupt:
            click.echo("ctsdk: interrupted", err=True)
            sys.exit(130)

    return wrapper
