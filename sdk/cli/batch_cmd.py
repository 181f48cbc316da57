"""``ctsdk triage-batch ROOT --out results.jsonl``: every series of an archive into JSON lines."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click

from ._common import FiniteFloat, check_not_input, check_output_file, check_triage_fn, emit, handle_errors, json_option

EXAMPLES = """\b
Examples:
  ctsdk triage-batch ../shared/data/dicom/covid-ct-md --out /tmp/ctsdk-batch.jsonl --overwrite
  ctsdk triage-batch ../shared/data/dicom --out /tmp/ctsdk-batch.jsonl --resume --workers 2
  ctsdk triage-batch ../shared/data/dicom/bad-inputs --out /tmp/ctsdk-bad.jsonl --overwrite --json
  ctsdk triage-batch --manifest SERIES_CSV --out /tmp/ctsdk-manifest.jsonl
  (SERIES_CSV: a CSV with a 'path' column of series folders or files)

\b
Exit codes:
  0    the run finished and at least one series got a result (not_eligible and indeterminate
       are results); series that failed are error lines in --out and counted in the summary
  1    series were found but none got a result (every line is an error), or, with
       --fail-on-error, at least one series failed
  2    bad arguments, --out cannot be written, or no series found (nothing to triage)
  130  interrupted (rerun with --resume)"""


@click.command("triage-batch", epilog=EXAMPLES)
@click.argument("root", type=click.Path(exists=True), required=False)
@click.option("--manifest", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV with a 'path' column (series folders or files, relative to the CSV) to triage instead of ROOT.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="JSONL file, one line per series (appended and flushed per line).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Worker processes (local) or Ray actors (--engine ray), one model each; 1 to 1024 "
                   "(checked before any series is read).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool here; ray: a Ray cluster (needs ctsdk[cluster], see sdk.cluster).")
@click.option("--ray-address", default=None, help="--engine ray: 'auto', HOST:PORT of a head node, or none for a private Ray.")
@click.option("--cpus-per-worker", type=FiniteFloat(min=0, min_open=True), default=1.0, show_default=True, help="--engine ray: logical CPUs per actor.")
@click.option("--gpus-per-worker", type=FiniteFloat(min=0), default=0.0, show_default=True, help="--engine ray: GPUs per actor.")
@click.option("--resume", is_flag=True, help="Skip series whose key is already in --out (after an interruption).")
@click.option("--overwrite", is_flag=True, help="Start --out afresh when it exists.")
@click.option("--triage-fn", default=None, help="module:function triage hook (default: sdk.triage.Triage).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@click.option("--fail-on-error", is_flag=True,
              help="Exit 1 when any series failed (default: exit 1 only when no series got a result).")
@json_option
@handle_errors
def triage_batch(root: Optional[str], manifest: Optional[str], out_path: str, workers: int, engine: str,
                 ray_address: Optional[str], cpus_per_worker: float, gpus_per_worker: float, resume: bool,
                 overwrite: bool, triage_fn: Optional[str], no_progress: bool, fail_on_error: bool, as_json: bool) -> None:
    """Triage every series under ROOT (or listed in --manifest) into JSON lines, with a summary table
    and a label PNG.

    A folder of mixed files becomes one line per series; unreadable files become error lines.
    Interrupted? Rerun with --resume: finished series are not redone. Research use only.
    """
    from ..errors import ConfigError

    if (root is None) == (manifest is None):
        raise ConfigError("give either ROOT (an archive folder) or --manifest CSV, not both and not neither")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues --out (finished series "
                          "are kept), --overwrite starts it afresh; give one of them")
    check_not_input(out_path, "--out", {"--manifest": manifest, "ROOT": root})
    check_output_file(out_path, "--out")  # before any series is read: the run must be able to save
    if engine == "local":
        check_triage_fn(triage_fn)  # (a Ray cluster imports it on its nodes)
    out_existed = Path(out_path).exists()
    from ..integration.batch import BatchOptions

    options = BatchOptions(resume=resume, overwrite=overwrite, triage_fn=triage_fn, progress=not no_progress)
    if engine == "ray":
        from ..cluster import RayOptions, run_batch_ray  # imports Ray only when called (and says what to install)

        summary = run_batch_ray(root, out_path, options, RayOptions(address=ray_address, workers=workers,
                                                                    cpus_per_worker=cpus_per_worker,
                                                                    gpus_per_worker=gpus_per_worker),
                                manifest=manifest)
    else:
        from ..integration.batch import run_batch

        discovered = None
        if manifest is not None:
            from ..cluster.manifest import discover_manifest  # ray-free

            discovered = discover_manifest(manifest)
        summary = run_batch(root or manifest, out_path, options, workers=workers, discovered=discovered)
    if summary.discovered == 0 and not summary.interrupted:
        out = Path(out_path)
        if not out_existed and out.is_file() and out.stat().st_size == 0:
            out.unlink()  # nothing to triage: leave no empty results file behind
        where = f"--manifest {manifest}" if manifest is not None else str(root)
        raise ConfigError(f"{where}: no DICOM series found ({summary.skipped_non_dicom} non-DICOM file(s) ignored): "
                          "nothing to triage; give the folder that holds the DICOM files")
    emit(summary.to_dict(), as_json, lambda d: summary.table())
    if summary.interrupted:
        click.echo("ctsdk: interrupted (rerun with --resume)", err=True)
        sys.exit(130)
    n_failed = sum(summary.errors.values())
    n_ok = sum(summary.labels.values())
    if n_failed and (n_ok == 0 or fail_on_error):
        what = "no series got a result" if n_ok == 0 else "--fail-on-error"
        click.echo(f"ctsdk: {n_failed} of {n_failed + n_ok} series failed ({what}); the error lines are in {summary.out}",
                   err=True)
        sys.exit(1)
