"""``ctsdk listen --engine ray``: the listener's triage workers run on a Ray cluster.

The listener calls ``factory()`` once per worker thread and then ``triage_fn(paths)`` per complete
series (:class:`sdk.integration.listener.Listener`). :class:`RayDispatcher` is such a factory:
each call creates one Ray actor (one :class:`sdk.triage.Triage`, loaded once) and returns a
function that runs the series on it and blocks until the result is back. The listener's own
guarantees are untouched: it still stores before acknowledging, writes the DONE marker only after
the result, and resumes from its markers after a restart. ``--workers N`` means N actors.

Faults: the actors are created with ``max_restarts=-1`` and a bounded ``max_task_retries``, so a
node lost mid-series re-runs that series on another node; a Python exception on the actor (a bad
series) comes back as the same exception type and message and is recorded once as FAILED.

The listener's storage (``--out``) must be visible to every node at the same path.
"""
from __future__ import annotations

import builtins
import importlib
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..errors import ConfigError, RuntimeUnavailableError

log = logging.getLogger("sdk.cluster")

__all__ = ["RayDispatcher", "TriageWorker"]


class TriageWorker:
    """The actor behind one listener worker: one triage engine, one series per call."""

    def __init__(self, triage_fn: Optional[str] = None, threads: Optional[int] = None) -> None:
        import ray

        from .batch import build_triage_fn

        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()
        self._fn = build_triage_fn(triage_fn, threads, overlays=True)

    def node(self) -> str:
        return self.node_id

    def triage(self, files: List[str]) -> Dict[str, Any]:
        """Run one series; exceptions are returned (type, module, message), never raised."""
        from ..integration.triage_fns import normalise_output

        t0 = time.perf_counter()
        try:
            out = normalise_output(self._fn([Path(f) for f in files]))
        except Exception as exc:
            return {"error": {"type": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)},
                    "ray_node_id": self.node_id}
        out.result["ray_node_id"] = self.node_id
        out.result["ray_host"] = self.host
        out.result["ray_triage_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        return {"output": out, "ray_node_id": self.node_id}


def rebuild_exception(info: Dict[str, str]) -> Exception:
    """The remote exception as the same type (sdk.* or builtin) with the same message.

    The instance is made without calling the class's ``__init__`` (ctsdk errors take several
    arguments), so ``type(exc).__name__`` and ``str(exc)`` match the remote ones exactly.
    """
    module, name, message = info.get("module", ""), info.get("type", "Exception"), info.get("message", "")
    cls: Any = None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module == "sdk" or module.startswith("sdk."):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        exc = cls.__new__(cls)
        exc.args = (message,)
        return exc
    return RuntimeUnavailableError(f"{name} on the Ray cluster: {message}")


class _RemoteTriageFn:
    """``triage_fn(paths)`` of one listener worker: runs on its actor, blocks for the result."""

    def __init__(self, actor: Any, timeout_s: Optional[float]) -> None:
        self.actor = actor
        self.timeout_s = timeout_s

    def __call__(self, paths: Sequence[Path]) -> Any:
        import ray

        try:
            payload = ray.get(self.actor.triage.remote([str(p) for p in paths]), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise RuntimeUnavailableError(f"series {paths[0] if paths else '?'}: no result from the Ray cluster within "
                                          f"{self.timeout_s:g} s") from exc
        except ray.exceptions.RayError as exc:  # actor gone for good / retries exhausted
            raise RuntimeUnavailableError(f"series {Path(paths[0]).parent if paths else '?'}: the Ray actor failed "
                                          f"every retry ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
        if "error" in payload:
            raise rebuild_exception(payload["error"])
        return payload["output"]


class RayDispatcher:
    """Triage factory for :class:`~sdk.integration.listener.Listener` that runs on a Ray cluster.

    Args:
        ray_address: None: start a private Ray here; ``auto``; ``HOST:PORT`` of a head node.
        triage_fn: ``module:attr`` hook the actors run (None: the real Triage, with heat maps).
        cpus_per_worker: logical CPUs per actor (also its ONNX Runtime threads).
        gpus_per_worker: GPUs per actor (0: CPU).
        max_task_retries: re-runs of a series whose actor died (node loss); then it fails openly.
        timeout_s: longest wait for one series (None: no limit).

    Use: ``Listener(cfg, RayDispatcher("auto"))``; call :meth:`close` when the listener stops.
    """

    is_factory = True

    def __init__(self, ray_address: Optional[str] = None, *, triage_fn: Optional[str] = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, max_task_retries: int = 3,
                 timeout_s: Optional[float] = None) -> None:
        from ._ray import check_address, require_ray

        require_ray("--engine ray")
        if cpus_per_worker <= 0 or gpus_per_worker < 0 or max_task_retries < 0:
            raise ConfigError(f"RayDispatcher: cpus_per_worker {cpus_per_worker} must be > 0, gpus_per_worker "
                              f"{gpus_per_worker} >= 0, max_task_retries {max_task_retries} >= 0")
        self.ray_address = check_address(ray_address)
        self.triage_fn = triage_fn
        self.cpus_per_worker = float(cpus_per_worker)
        self.gpus_per_worker = float(gpus_per_worker)
        self.max_task_retries = int(max_task_retries)
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._started = False
        self._actors: List[Any] = []

    def _connect(self) -> Any:
        import ray

        from ._ray import cluster_resources, ray_session
        from .batch import _check_fits

        with self._lock:
            if not ray.is_initialized():
                self._session = ray_session(self.ray_address)
                self._session.__enter__()
                self._started = True
            _check_fits(cluster_resources(), self.cpus_per_worker, self.gpus_per_worker)
        return ray

    def __call__(self) -> _RemoteTriageFn:
        """One listener worker: create its actor (blocks until the engine is loaded) and return its function."""
        ray = self._connect()
        from ._ray import cpu_threads

        remote_cls = ray.remote(TriageWorker)
        options = remote_cls.options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                                     max_restarts=-1, max_task_retries=self.max_task_retries,
                                     scheduling_strategy="SPREAD")
        actor = options.remote(self.triage_fn, cpu_threads(self.cpus_per_worker))
        try:
            node = ray.get(actor.node.remote(), timeout=self.timeout_s)
        except Exception as exc:
            raise RuntimeUnavailableError(f"the triage actor could not start on the Ray cluster ({exc})") from exc
        log.info("listener worker bound to Ray actor on node %s", node)
        with self._lock:
            self._actors.append(actor)
        return _RemoteTriageFn(actor, self.timeout_s)

    def close(self) -> None:
        """Release the actors, and Ray itself when this dispatcher started it."""
        import ray

        with self._lock:
            for actor in self._actors:
                try:
                    ray.kill(actor)
                except Exception:  # already gone with its node
                    pass
            self._actors.clear()
            if self._started:
                self._session.__exit__(None, None, None)
                self._started = False
