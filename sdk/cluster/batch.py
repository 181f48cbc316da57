"""``ctsdk triage-batch --engine ray``: an archive triaged by a Ray Data actor pool.

Flow::

    driver: discover_series(ROOT) / --manifest ─► refs (paths only; never pixel arrays)
        ─► skip keys already in --out (--resume) ─► unreadable files written at once (error lines)
        ─► ray.data.from_items(one row per series, one block per row)
        ─► map_batches(TriageActor, compute=ActorPoolStrategy(...), batch_size=1,
                       num_cpus/num_gpus per actor, max_restarts=-1, max_task_retries=N)
              every actor builds one Triage once; a Python exception on a series becomes an
              error line (never a task failure, so never retried)
        ─► iter_rows() streams results back ─► de-duplicate by key ─► JsonlWriter (same lines
              as the local engine, plus ``ray_node_id``) ─► tqdm (rate, ETA) ─► summary

Faults: an actor whose node dies is re-created on a surviving node (``max_restarts=-1``) and its
series re-run (``max_task_retries``). When Ray Data gives a task up instead (a task whose actor
became *unavailable* fails, and ``max_errored_blocks=-1`` lets the run go on), the driver re-submits
every series still without a line in a new round (``retry_rounds``). A result for a key already
written is dropped, so every series appears once. A series whose worker dies on it every time
(out of memory, a native crash) becomes one ``ClusterTaskError`` line after the last round instead
of being retried forever. Interrupt the driver and rerun with ``--resume``: keys already in the
file are not redone.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Union

import numpy as np

from ..errors import ConfigError, CtsdkError, RuntimeUnavailableError
from ..integration.batch import BatchOptions, BatchSummary, check_workers

log = logging.getLogger("sdk.cluster")

PathLike = Union[str, Path]

__all__ = ["TriageActor", "ClusterBatchSummary", "RayOptions", "run_batch_ray", "build_triage_fn", "single_thread_triage",
           "ClusterTaskError_TYPE"]

#: ``error.type`` of a series whose Ray task failed every retry (worker/node died each time).
ClusterTaskError_TYPE = "ClusterTaskError"


def build_triage_fn(spec: Optional[str], threads: Optional[int], *,
                    overlays: bool = False) -> Callable[[Sequence[Path]], Any]:
    """The triage function one actor owns: ``--triage-fn module:attr``, or a real Triage.

    The default is :class:`sdk.triage.Triage` loaded once with ``threads`` intra-op threads (the
    actor's logical CPUs, so actors sharing a node do not oversubscribe it). ``overlays`` keeps the
    heat maps and returns them for DICOM Secondary Captures (the listener needs them, a batch
    does not).
    """
    from ..integration.listener import load_triage_factory

    if spec:
        return load_triage_factory(spec)()
    from ..integration.triage_fns import TriageOutput, opacity_from_result, overlays_from_result
    from ..triage import Triage

    engine = Triage(threads=threads, heatmaps=overlays)

    def triage_files(files: Sequence[Path]) -> Any:
        result = engine.run([str(f) for f in files])
        if overlays:
            return TriageOutput(dict(result.to_dict()), overlays_from_result(result), opacity_from_result(result))
        return result.to_dict()

    return triage_files


def single_thread_triage() -> Callable[[Sequence[Path]], Any]:
    """``--triage-fn sdk.cluster.batch:single_thread_triage``: what a 1-CPU actor runs, for the local engine.

    A real :class:`sdk.triage.Triage` with one intra-op thread and no heat maps (a batch writes no
    overlays): the like-for-like local baseline of the Ray engine's default actor.
    """
    return build_triage_fn(None, 1)


single_thread_triage.is_factory = True  # type: ignore[attr-defined]


def _ref_to_json(ref: Any) -> str:
    return json.dumps(asdict(ref), separators=(",", ":"))


def _ref_from_json(text: str) -> Any:
    from ..integration.batch import SeriesRef

    d = json.loads(text)
    d["files"] = tuple(d["files"])
    return SeriesRef(**d)


class TriageActor:
    """Ray Data actor UDF: one triage engine per actor, one series per call (``batch_size=1``).

    Args:
        triage_fn: ``module:attr`` hook (None: the real :class:`sdk.triage.Triage`).
        threads: intra-op threads of the engine's ONNX Runtime sessions.
    """

    def __init__(self, triage_fn: Optional[str] = None, threads: Optional[int] = None) -> None:
        import ray

        from ..integration.batch import failing_fn

        ctx = ray.get_runtime_context()
        self.node_id: str = ctx.get_node_id()
        self.actor_id: str = ctx.get_actor_id() or ""
        self.host = socket.gethostname()
        t0 = time.perf_counter()
        try:
            self.fn = build_triage_fn(triage_fn, threads)
        except Exception as exc:  # every series this actor takes says why (same as the local engine)
            log.error("triage actor on %s could not load its engine: %s", self.host, exc)
            self.fn = failing_fn(exc)
        self.init_ms = (time.perf_counter() - t0) * 1000.0

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        from ..integration.batch import JsonlWriter, triage_one

        from ._ray import peak_rss_mb

        keys: List[str] = []
        records: List[str] = []
        cpu_s: List[float] = []
        for text in batch["ref"]:
            ref = _ref_from_json(str(text))
            c0 = _cpu_seconds()
            rec = triage_one(ref, self.fn)  # never raises: exceptions become error lines
            cpu_s.append(_cpu_seconds() - c0)
            rec["ray_node_id"] = self.node_id
            keys.append(ref.key)
            records.append(JsonlWriter.encode(rec))
        n = len(keys)
        return {
            "key": np.array(keys, dtype=object),
            "record": np.array(records, dtype=object),
            "actor_id": np.array([self.actor_id] * n, dtype=object),
            "host": np.array([self.host] * n, dtype=object),
            "peak_rss_mb": np.full(n, peak_rss_mb(), np.float64),
            "init_ms": np.full(n, self.init_ms, np.float64),
            "cpu_s": np.array(cpu_s, np.float64),
        }


def _cpu_seconds() -> float:
    """User + system CPU time of this process, every thread included (ONNX Runtime, decoders)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return float(ru.ru_utime + ru.ru_stime)


@dataclass
class ClusterBatchSummary(BatchSummary):
    """A :class:`~sdk.integration.batch.BatchSummary` plus what the cluster did."""

    engine: str = "ray"
    ray_address: Optional[str] = None
    workers: int = 0
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    nodes: Dict[str, int] = field(default_factory=dict)
    duplicates_dropped: int = 0
    task_failures: int = 0
    resubmitted: int = 0
    actor_peak_rss_mb: Dict[str, float] = field(default_factory=dict)
    actor_init_ms: Dict[str, float] = field(default_factory=dict)
    cluster: Dict[str, float] = field(default_factory=dict)
    discover_s: Optional[float] = None
    connect_s: Optional[float] = None
    first_result_s: Optional[float] = None
    cpu_s_per_eligible_series: Optional[float] = None
    last_result_s: Optional[float] = None

    def table(self) -> str:
        base = BatchSummary.table(self)
        rows: List[Any] = [("engine", f"ray ({self.ray_address or 'local'}; up to {self.workers} actors x "
                                      f"{self.cpus_per_worker:g} CPU, {self.gpus_per_worker:g} GPU)")]
        rows += [(f"series on node {nid[:12]}", n) for nid, n in sorted(self.nodes.items())]
        rows += [("duplicate results dropped", self.duplicates_dropped),
                 ("series re-submitted after a worker/node loss", self.resubmitted),
                 ("series whose task failed every retry", self.task_failures)]
        if self.actor_peak_rss_mb:
            rows.append(("peak memory per actor (MiB)",
                         f"{max(self.actor_peak_rss_mb.values()):.0f} (max of {len(self.actor_peak_rss_mb)} actors)"))
        w = max(len(r[0]) for r in rows)
        return base + "\n" + "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _configure_data_context(ray: Any, max_errored: int) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver shows one tqdm bar (rate, ETA) instead
    ctx.print_on_execution_start = False
    ctx.max_errored_blocks = max_errored  # a series that exhausts its retries becomes an error line
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _stream_results(ray: Any, refs: Sequence[Any], *, workers: int, cpus_per_worker: float, gpus_per_worker: float,
                    triage_fn: Optional[str], max_task_retries: int, tasks_in_flight: int) -> Iterator[Dict[str, Any]]:
    """Run the Ray Data pipeline over ``refs`` and yield result rows as they finish."""
    from ray.data import ActorPoolStrategy

    from ._ray import cpu_threads

    items = [{"key": r.key, "ref": _ref_to_json(r)} for r in refs]
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one series per block and task
    with warnings.catch_warnings():
        # Ray 2.60 deprecates passing max_restarts/max_task_retries as map_batches **ray_remote_args
        # (removal planned for 2.64, outside the pinned range) and has no named replacement yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        ds = ds.map_batches(
            TriageActor,
            fn_constructor_kwargs={"triage_fn": triage_fn, "threads": cpu_threads(cpus_per_worker)},
            batch_size=1,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=tasks_in_flight),
            num_cpus=cpus_per_worker,
            num_gpus=gpus_per_worker if gpus_per_worker > 0 else None,
            max_restarts=-1,  # an actor lost with its node is re-created on a surviving node
            max_task_retries=max_task_retries,  # ... and its series re-run there, a bounded number of times
        )
    yield from ds.iter_rows()


@dataclass(frozen=True)
class RayOptions:
    """How :func:`run_batch_ray` uses the cluster (what the local engine does not have).

    Attributes:
        address: None: start a private Ray on this machine; ``auto``; ``HOST:PORT`` of a head.
        workers: maximum actors (each loads one Triage), 1 to
            :data:`sdk.integration.batch.MAX_WORKERS`; the pool starts with this many.
        cpus_per_worker: logical CPUs per actor (also its ONNX Runtime threads).
        gpus_per_worker: GPUs per actor (0.5: two actors share a GPU; 0: CPU only).
        max_task_retries: Ray's re-runs of a series whose actor died (node loss, crash).
        tasks_in_flight_per_actor: series queued per actor (1 balances best for multi-second series).
        retry_rounds: the driver's re-submissions of series Ray gave up on (a task that failed with
            the actor unavailable is dropped by Ray Data, not retried); after them a series becomes a
            ``ClusterTaskError`` line, so a series that kills its worker is not retried forever.
    """

    address: Optional[str] = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_task_retries: int = 3
    tasks_in_flight_per_actor: int = 1
    retry_rounds: int = 2


def run_batch_ray(
    root: Optional[PathLike],
    out: PathLike,
    options: BatchOptions = BatchOptions(),
    cluster: RayOptions = RayOptions(),
    *,
    manifest: Optional[PathLike] = None,
) -> Any:
    """Triage every series under ``root`` (or listed in ``manifest``) on a Ray cluster into ``out``.

    Writes the same JSON lines as :func:`sdk.integration.batch.run_batch` through the same
    :class:`~sdk.integration.batch.JsonlWriter` (same schema, same resume rule), plus
    ``ray_node_id`` (the node that ran the series; None for unreadable files, which the driver
    records without a round trip).

    Args:
        root: archive folder or file (exclusive with ``manifest``).
        out: JSONL path; the label PNG goes beside it.
        options: resume / overwrite / triage function (run by every actor) / progress / PNG,
            shared with the local engine (:class:`sdk.integration.batch.BatchOptions`).
        cluster: Ray address, actors and their resources, retries (:class:`RayOptions`).
        manifest: CSV with a ``path`` column (see :mod:`sdk.cluster.manifest`).

    Returns:
        A ``ClusterBatchSummary`` (``BatchSummary`` plus nodes, duplicates dropped, task failures,
        peak memory per actor).

    Raises:
        MissingDependencyError: ray is not installed ("install ctsdk[cluster]").
        ConfigError: bad arguments, ``out`` exists without --resume/--overwrite, or the cluster lacks
            the CPUs/GPUs one actor asks for.
        RuntimeUnavailableError: the cluster cannot be reached, or Ray Data failed (lines already
            written stay; rerun with --resume).
    """
    from ._ray import check_address, cluster_resources, ray_session, require_ray

    require_ray()  # first: a core install fails fast with one line
    from tqdm import tqdm

    from ..integration.batch import JsonlWriter, triage_one, error_record, label_png
    from .manifest import discover_source

    resume, triage_fn, progress, png = options.resume, options.triage_fn, options.progress, options.png
    c = cluster
    ray_address, workers, cpus_per_worker, gpus_per_worker = c.address, c.workers, c.cpus_per_worker, c.gpus_per_worker
    max_task_retries, tasks_in_flight_per_actor, retry_rounds = c.max_task_retries, c.tasks_in_flight_per_actor, c.retry_rounds
    workers = check_workers(workers)
    if not 0 < cpus_per_worker < float("inf"):   # "not 0 < x" also refuses NaN (NaN compares False)
        raise ConfigError(f"--cpus-per-worker {cpus_per_worker}: must be a finite number > 0")
    if not 0 <= gpus_per_worker < float("inf"):
        raise ConfigError(f"--gpus-per-worker {gpus_per_worker}: must be a finite number >= 0")
    if retry_rounds < 0:
        raise ConfigError(f"retry_rounds {retry_rounds}: must be >= 0")
    if max_task_retries < 0:
        raise ConfigError(f"max_task_retries {max_task_retries}: must be >= 0 (bounded, so a crashing series "
                          f"is not retried forever)")
    check_address(ray_address)
    out = options.prepare_output(out)
    t0 = time.perf_counter()
    refs, skipped_files = discover_source(root, manifest)
    discover_s = time.perf_counter() - t0
    connect_s: Optional[float] = None
    writer = JsonlWriter(out)
    written: Set[str] = writer.done_keys() if resume else set()
    todo = [r for r in refs if r.key not in written]
    skipped_resume = len(refs) - len(todo)
    work = [r for r in todo if r.error is None]
    log.info("%d series, %d already done, %d to triage on Ray", len(refs), skipped_resume, len(todo))
    processed: List[Dict[str, Any]] = []
    nodes: Counter = Counter()
    rss: Dict[str, float] = {}
    init_ms: Dict[str, float] = {}
    duplicates = 0
    failures = 0
    resubmitted = 0
    arrivals: List[float] = []
    cpu_eligible: List[float] = []
    interrupted = False
    resources: Dict[str, float] = {}

    def emit(rec: Dict[str, Any]) -> None:
        writer.write(rec)
        written.add(str(rec["key"]))
        processed.append(rec)
        bar.update(1)

    t_conn = time.perf_counter()
    # connect first: a cluster that cannot be reached fails before anything is written
    session = ray_session(ray_address) if work else contextlib.nullcontext(None)
    with session as ray:
        connect_s = (time.perf_counter() - t_conn) if work else None
        if work:  # before opening --out: a pool the cluster cannot host is refused up front
            resources = cluster_resources()
            _check_fits(resources, cpus_per_worker, gpus_per_worker)
        bar = tqdm(total=len(todo), unit="series", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                   desc="triage-batch[ray]")
        with writer:
            try:
                for ref in todo:  # unreadable files: known on the driver, no need for a round trip
                    if ref.error is not None:
                        emit({**triage_one(ref, None), "ray_node_id": None})
                if work:
                    _configure_data_context(ray, -1)
                    pending = list(work)
                    for round_no in range(retry_rounds + 1):
                        if round_no:
                            resubmitted += len(pending)
                            log.warning("%d series lost with a worker or node (Ray gave their tasks up); re-running "
                                        "them on the surviving nodes (round %d of %d)", len(pending), round_no,
                                        retry_rounds)
                        pool_now = _pool_size(cluster_resources(), workers, cpus_per_worker, gpus_per_worker)
                        rows = _stream_results(ray, pending, workers=min(pool_now, len(pending)),
                                               cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                               triage_fn=triage_fn, max_task_retries=max_task_retries,
                                               tasks_in_flight=tasks_in_flight_per_actor)
                        try:
                            for row in rows:
                                key = str(row["key"])
                                if key in written:
                                    duplicates += 1  # a retried task whose first result already arrived
                                    continue
                                rec = json.loads(str(row["record"]))
                                emit(rec)
                                arrivals.append(time.perf_counter() - t0)
                                if not rec.get("error") and rec.get("eligible"):
                                    cpu_eligible.append(float(row["cpu_s"]))
                                nodes[str(rec.get("ray_node_id"))] += 1
                                aid = str(row["actor_id"])
                                rss[aid] = max(rss.get(aid, 0.0), float(row["peak_rss_mb"]))
                                init_ms[aid] = float(row["init_ms"])
                        except (KeyboardInterrupt, CtsdkError):
                            raise
                        except Exception as exc:
                            raise RuntimeUnavailableError(
                                f"Ray Data stopped after {len(processed)} series ({type(exc).__name__}: {exc}); "
                                f"the lines written to {out} stay - rerun with --resume") from exc
                        pending = [r for r in pending if r.key not in written]
                        if not pending:
                            break
                    for ref in pending:  # every round lost it: the worker died on this series each time
                        failures += 1
                        emit({**error_record(ref, ClusterTaskError_TYPE,
                                             f"{ref.path}: the Ray task for this series failed in {retry_rounds + 1} "
                                             f"rounds of up to {max_task_retries + 1} attempts (its worker process or "
                                             f"node died each time: out of memory, a crash in a native decoder, or node "
                                             f"loss); see the Ray logs of this job"),
                              "ray_node_id": None})
            except KeyboardInterrupt:
                interrupted = True
                log.warning("interrupted: %d series written; rerun with --resume", len(processed))
            finally:
                bar.close()
    all_records = JsonlWriter.read(out)
    labels = Counter(str(r.get("label")) for r in all_records if not r.get("error"))
    errors = Counter(str(r["error"].get("type")) for r in all_records if r.get("error"))
    walls = [float(r.get("wall_ms", 0.0)) for r in processed if not r.get("error")]
    summary = ClusterBatchSummary(
        out=str(out), discovered=len(refs), processed=len(processed), skipped_resume=skipped_resume,
        skipped_non_dicom=skipped_files, labels=dict(labels), errors=dict(errors), wall_s=time.perf_counter() - t0,
        mean_series_ms=(sum(walls) / len(walls)) if walls else None, interrupted=interrupted,
        ray_address=ray_address, workers=workers, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        nodes=dict(nodes), duplicates_dropped=duplicates, task_failures=failures, resubmitted=resubmitted,
        actor_peak_rss_mb={k: round(v, 1) for k, v in rss.items()},
        actor_init_ms={k: round(v, 1) for k, v in init_ms.items()}, cluster=resources,
        discover_s=round(discover_s, 3), connect_s=None if connect_s is None else round(connect_s, 3),
        first_result_s=round(arrivals[0], 3) if arrivals else None,
        cpu_s_per_eligible_series=round(float(np.median(cpu_eligible)), 3) if cpu_eligible else None,
        last_result_s=round(arrivals[-1], 3) if arrivals else None,
    )
    if png and all_records:
        p = out.with_name(out.stem + ".labels.png")
        summary.png = str(label_png(all_records, p, f"{len(all_records)} series in {out.name} (research use only)"))
    return summary


def _pool_size(resources: Dict[str, float], workers: int, cpus: float, gpus: float) -> int:
    """Actors to start: ``workers``, capped by what the cluster can host now (a fixed pool whose
    actors cannot all be placed would wait for resources)."""
    _check_fits(resources, cpus, gpus)
    fit = int(resources.get("CPU", 0.0) // cpus)
    if gpus > 0:
        fit = min(fit, int(resources.get("GPU", 0.0) // gpus))
    if fit < workers:
        log.warning("--workers %d: the cluster fits %d actors of %g CPU / %g GPU; starting %d", workers, fit, cpus,
                    gpus, fit)
    return max(1, min(workers, fit))


def _check_fits(resources: Dict[str, float], cpus: float, gpus: float) -> None:
    """Refuse a pool no node could host (Ray would wait for the resources forever)."""
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if have_cpu < cpus:
        raise ConfigError(f"--cpus-per-worker {cpus:g}: the Ray cluster has {have_cpu:g} logical CPUs in all; "
                          f"ask for fewer or add nodes")
    if gpus > 0 and have_gpu < gpus:
        raise ConfigError(f"--gpus-per-worker {gpus:g}: the Ray cluster has {have_gpu:g} GPUs; add GPU nodes "
                          f"(ray start --num-gpus N) or use --gpus-per-worker 0 for CPU actors")
