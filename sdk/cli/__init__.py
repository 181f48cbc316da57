"""The ``ctsdk`` command line.

Every command lives in its own module (``sdk/cli/<name>.py``) and is imported only when invoked,
so ``ctsdk --help`` stays fast on a core install. Each command: parses arguments, calls one API
function, prints ``to_dict()`` as one JSON object on stdout with ``--json``, logs to stderr, and
exits 2 with one line on stderr for any CtsdkError.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

import click

from .. import __version__

# command name -> (module, attribute, one-line help shown by `ctsdk --help`)
COMMANDS: Dict[str, Tuple[str, str, str]] = {
    "inspect": ("sdk.cli.inspect_cmd", "inspect", "List the series in a DICOM source and describe the chosen one."),
    "triage": ("sdk.cli.triage_cmd", "triage", "Triage one CT series: label, probabilities, slice scores, timings."),
    "train": ("sdk.cli.train_cmd", "train", "Train the 2D/3D lung segmenter, slice classifier or aggregator (needs ctsdk[train])."),
    "export": ("sdk.cli.export_cmd", "export", "Export a checkpoint to ONNX (FP32/FP16) with a parity check (needs ctsdk[train])."),
    "calibrate": ("sdk.cli.calibrate_cmd", "calibrate", "INT8 QDQ calibration on real slices, with an accuracy report."),
    "build-engine": ("sdk.cli.build_engine_cmd", "build_engine", "Build a TensorRT engine on this GPU (needs ctsdk[gpu])."),
    "evaluate": ("sdk.cli.evaluate_cmd", "evaluate", "Evaluate a bundle on labelled images or series: AUC, sens/spec, CIs, ROC."),
    "bench": ("sdk.cli.bench_cmd", "bench", "Per-stage latency of every usable runtime against a naive baseline."),
    "listen": ("sdk.cli.listen_cmd", "listen", "DICOM C-STORE listener that triages each complete series."),
    "triage-batch": ("sdk.cli.batch_cmd", "triage_batch", "Triage every series under an archive folder into JSONL."),
    "info": ("sdk.cli.info_cmd", "info", "What this machine and bundle give ctsdk, and what sdk.Triage() would run here."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted(n for n, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        spec = COMMANDS.get(name)
        if spec is None:
            return None
        module, attr, _ = spec
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][2]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


import importlib.util  # noqa: E402  (used by LazyGroup)


EPILOG = """\b
Examples:
  ctsdk info --no-open
  ctsdk inspect ../shared/data/dicom/covid-ct-md/covid-P001
  ctsdk triage ../shared/data/dicom/covid-ct-md/covid-P001 --json
  ctsdk triage-batch ../shared/data/dicom --out /tmp/ctsdk-batch.jsonl --overwrite
  ctsdk COMMAND --help

\b
Exit codes: 0 success; 1 the command ran but missed its bar (its --help says when); 2 bad
arguments, input, configuration, a missing package or an output that cannot be written (one
line "ctsdk: error: ..." on stderr; with --json also {"error": {...}} on stdout); 130 interrupted."""


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="ctsdk")
@click.option("-v", "--verbose", count=True, help="More logging on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """ctsdk - chest-CT triage SDK (research use only, not for diagnosis)."""
    from ._common import setup_logging

    setup_logging(verbose)


def usage_error_line(exc: click.ClickException) -> str:
    """``ctsdk: error: <click's message> (see 'ctsdk CMD --help')``: one line, as the README promises."""
    msg = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    return f"ctsdk: error: {msg}" + (f" (see '{ctx.command_path} --help')" if ctx is not None else "")


def main(argv: Optional[List[str]] = None) -> None:
    """The console script. Click's own usage errors (an unknown option, a path that does not
    exist, a bad choice) are one ``ctsdk: error: ...`` line on stderr naming the command's help,
    exit code 2, like every other error (:func:`usage_error_line`); with ``--json`` on the command
    line they are also one ``{"error": {...}}`` object on stdout. ``ctsdk`` alone prints the help."""
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = cli.main(args=args, prog_name="ctsdk", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # `ctsdk` / `ctsdk train` alone: the help
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if "--json" in args:
            click.echo(json.dumps({"error": {"type": type(exc).__name__, "message": exc.format_message(),
                                             "exit_code": exc.exit_code}}))
        click.echo(usage_error_line(exc), err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("ctsdk: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:  # stdout closed early (`ctsdk ... | head`): quiet, as click's standalone mode
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's recipe: no flush error at exit
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
