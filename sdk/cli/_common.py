"""Shared CLI plumbing: logging to stderr, --json output, errors -> one stderr line and exit 2,
and the pre-flight checks of output locations.

Exit codes every command keeps: 0 success; 1 the command ran but its result misses its bar (named
in the command's help: a failed accuracy/parity gate, a batch where no series got a result); 2 a
usage, configuration, input or file-system error (one line ``ctsdk: error: ...`` on stderr, and
with ``--json`` also one ``{"error": {...}}`` object on stdout); 130 interrupted.
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import click

from ..errors import ConfigError, CtsdkError, ResultWriteError

log = logging.getLogger("sdk")

#: click ``Context.meta`` key: set once a command printed its result (so an error raised after it
#: adds no second JSON object on stdout)
_EMITTED = "ctsdk.emitted"


def setup_logging(verbose: int = 0) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("sdk")
    root.handlers[:] = [handler]
    root.setLevel(level)


json_option = click.option("--json", "as_json", is_flag=True,
                           help='Print one JSON object on stdout (logs stay on stderr); on an error '
                                '{"error": {"type", "message", "exit_code"}}.')


def emit(payload: Dict[str, Any], as_json: bool, human: Callable[[Dict[str, Any]], str]) -> None:
    """Print the result: one JSON object with --json, else the human rendering."""
    if as_json:
        click.echo(json.dumps(payload, default=_json_default))
    else:
        click.echo(human(payload))
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[_EMITTED] = True


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def warn(message: str) -> None:
    """One line on stderr (``ctsdk: warning: ...``), whatever the log level."""
    click.echo(f"ctsdk: warning: {one_line(message)}", err=True)


def one_line(text: str) -> str:
    """``text`` with its lines joined (the CLI promises one line on stderr per error)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def os_error_text(exc: OSError) -> str:
    """``PATH: reason`` for a file-system error, Python's text (``[Errno 98] ...``) for a socket/TLS one."""
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    if names:
        return f"{' -> '.join(names)}: {exc.strerror or str(exc)}"
    return str(exc) or type(exc).__name__


def _json_requested(kwargs: Dict[str, Any]) -> bool:
    if "as_json" in kwargs:
        return bool(kwargs["as_json"])
    ctx = click.get_current_context(silent=True)  # commands without the option (a stub taking any args)
    return bool(ctx is not None and "--json" in (ctx.args or []))


def _fail(exc: BaseException, message: str, code: int, as_json: bool) -> None:
    line = one_line(message)
    ctx = click.get_current_context(silent=True)
    if as_json and not (ctx is not None and ctx.meta.get(_EMITTED)):
        err: Dict[str, Any] = {"type": type(exc).__name__, "message": line, "exit_code": code}
        path = getattr(exc, "path", None) or getattr(exc, "filename", None)
        if path is not None:
            err["path"] = str(path)
        try:
            click.echo(json.dumps({"error": err}, default=_json_default))
        except OSError:  # stdout itself is gone (a closed pipe): the stderr line still says why
            pass
    click.echo(f"ctsdk: error: {line}" if code != 130 else f"ctsdk: {line}", err=True)
    log.debug("traceback of the error above", exc_info=exc)  # ctsdk -vv: the traceback too
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: a CtsdkError or an OSError (a file, folder, socket or TLS problem) becomes one
    line on stderr and exit code 2 - never a traceback; with ``--json`` also one
    ``{"error": {"type", "message", "exit_code"[, "path"]}}`` object on stdout (unless the command
    already printed its result). Any other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = _json_requested(kwargs)
        try:
            return fn(*args, **kwargs)
        except CtsdkError as exc:
            _fail(exc, str(exc), int(getattr(exc, "exit_code", 2)), as_json)
        except OSError as exc:
            _fail(exc, os_error_text(exc), 2, as_json)
        except KeyboardInterrupt as exc:
            _fail(exc, "interrupted", 130, as_json)

    return wrapper


# --- option types: what click's own types let through --------------------------------------------
class FiniteFloat(click.FloatRange):
    """click's FloatRange (bounds optional) that also refuses ``nan`` and ``inf``: click parses both
    as floats and NaN passes every range check (``nan < 0`` is False)."""

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None, *, min_open: bool = False,
                 max_open: bool = False) -> None:
        super().__init__(min, max, min_open=min_open, max_open=max_open)
        if min is None and max is None:
            self.name = "float"  # metavar FLOAT, as type=float shows

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Threads(click.ParamType):
    """``--threads``: a whole number from 1 to :data:`sdk.triage.MAX_THREADS` (ONNX Runtime starts
    every thread when a session opens; read lazily, so ``--help`` does not import NumPy)."""

    name = "integer"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        from ..triage import MAX_THREADS

        return click.IntRange(1, MAX_THREADS).convert(click.INT.convert(value, param, ctx), param, ctx)


THREADS = Threads()


def check_triage_fn(spec: Optional[str], option: str = "--triage-fn") -> None:
    """ConfigError (exit 2, before any series is read or a socket opened) unless ``spec`` is None or
    names an importable callable as ``module:function`` (the triage function or its factory); without
    this check every series would fail alike, one error line each."""
    if not spec:
        return
    from ..integration.listener import load_triage_factory

    load_triage_factory(spec)  # ConfigError: not module:function, or it cannot be imported
    module, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if not callable(obj):
        raise ConfigError(f"{option} {spec!r}: {type(obj).__name__} object is not callable; name a triage function "
                          "or factory, e.g. sdk.integration.triage_fns:inventory (checked before starting: nothing was run)")


def check_not_input(path: Optional[str], option: str, inputs: Dict[str, Optional[str]]) -> None:
    """ConfigError unless output ``path`` (an ``option`` value) is a file other than every input
    (``{option: path}``): writing it would replace the input being read."""
    if path is None:
        return
    out = Path(path)
    for other, value in inputs.items():
        if value is None:
            continue
        same = out.resolve() == Path(value).resolve()
        if not same and out.exists() and Path(value).exists():
            try:
                same = os.path.samefile(out, value)
            except OSError:
                same = False
        if same:
            raise ConfigError(f"{option} {path} is also {other}: writing it would replace that input; give another "
                              f"file for {option} (checked before starting: nothing was run)")


def _check_not_empty(path: str, option: str, what: str) -> None:
    if not str(path).strip():
        raise ConfigError(f"{option} {path!r}: an empty path; give {what} (checked before starting: nothing was run)")


# --- output locations, checked before the long work starts ---------------------------------------
def _probe_dir(folder: Path) -> Optional[str]:
    """None when ``folder`` exists or can be created and a file can be written in it, else the
    reason. Leaves nothing behind: folders it had to create are removed again."""
    missing: List[Path] = []
    p = folder
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    created: List[Path] = []
    try:
        for m in reversed(missing):
            m.mkdir()
            created.append(m)
        fd, tmp = tempfile.mkstemp(prefix=".ctsdk-write-check-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
        return None
    except OSError as exc:
        return os_error_text(exc)
    finally:
        for m in reversed(created):
            try:
                m.rmdir()
            except OSError:
                pass


def check_output_dir(path: Optional[str], option: str) -> None:
    """Raise ResultWriteError (exit 2) unless folder ``path`` (an ``option`` value) can be created
    and written. Call it before loading models or reading series, so a run that could not save its
    results never starts."""
    if path is None:
        return
    _check_not_empty(path, option, "a folder ('.' for the working directory)")
    folder = Path(path)
    reason = f"{folder} is a file, not a folder" if folder.is_file() else _probe_dir(folder)
    if reason:
        raise ResultWriteError(f"{option} {path}: cannot write there ({reason}); give a folder you can create "
                               "and write to (checked before starting: nothing was run)")


def check_output_file(path: Optional[str], option: str) -> None:
    """As :func:`check_output_dir` for an output file: its folder must be writable, and an existing
    file must be a writable file (its content is not touched here)."""
    if path is None:
        return
    _check_not_empty(path, option, "a file name")
    f = Path(path)
    if f.is_dir():
        reason: Optional[str] = f"{f} is a folder; give a file name"
    else:
        reason = _probe_dir(f.parent if str(f.parent) else Path("."))
        if reason is None and f.exists():
            try:
                with open(f, "ab"):  # append mode, nothing written: the content stays as it is
                    pass
            except OSError as exc:
                reason = os_error_text(exc)
    if reason:
        raise ResultWriteError(f"{option} {path}: cannot write there ({reason}); give a file in a folder you can "
                               "write to (checked before starting: nothing was run)")
