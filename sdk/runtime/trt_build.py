"""TensorRT engine building (TensorRT 10 and 11) with Polygraphy's loaders, an engine cache and a
timing cache.

    from sdk.runtime.trt_build import BuildConfig, build_engine     # also exported as sdk.export.tensorrt
    report = build_engine(BuildConfig(onnx="sdk/bundles/default/classifier_fp16.onnx", precision="fp16",
                                      batch=(1, 8, 32), timing_cache="runs/deploy/trt.cache"))

Precision comes from the ONNX:
- TensorRT 11 removed ``BuilderFlag.FP16/INT8`` and the INT8 calibrator: networks are *strongly
  typed*, so fp16 needs the FP16 ONNX (``export_fp16``) and int8 the Q/DQ ONNX
  (``sdk.calibration``); fp32 uses the FP32 ONNX.
- TensorRT 10 still has the flags (checked with ``hasattr``): the network is weakly typed and
  fp16 sets FP16, int8 sets INT8 + FP16 (layers without Q/DQ may then run FP16) on the same files.

Engines are keyed by ONNX sha256, GPU name, compute capability, TensorRT version, precision and
batch profile (:class:`sdk.runtime.engine_cache.EngineKey`), written with a ``.json`` sidecar
under a file lock. The timing cache file is loaded when it exists and updated after each build
(Polygraphy locks it), so a second build of the same network is "warm".

tensorrt and polygraphy are imported inside the functions that need them; everything else here
(argument parsing, profiles, keys, precision plans) is pure Python and tested without TensorRT.
It lives in :mod:`sdk.runtime` because the runtime builds an engine on first use
(``TensorRTBackend`` -> :class:`CachedEngine`); ``sdk.export.tensorrt`` re-exports it for the
export side, so the dependency runs one way (export -> runtime). This module has NOT run against a real TensorRT here: TensorRT cannot be installed in this
workplace (docs/deployment.md).
"""
from __future__ import annotations

import logging
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .._lazy import require
from ..errors import ConfigError, EngineBuildError, RuntimeUnavailableError, whole_number
from ..hashing import sha256_file
from .engine_cache import PRECISIONS, EngineCache, EngineKey

log = logging.getLogger("sdk.export")

PathLike = Union[str, os.PathLike]
Shape = Tuple[Optional[int], ...]
DEFAULT_BATCH: Tuple[int, int, int] = (1, 8, 32)
DEFAULT_WORKSPACE_MB = 2048
#: builder workspace bounds (MB) of ``BuildConfig.workspace_mb`` / ``--workspace``: 1 TiB is past any
#: GPU's memory (the value caps TensorRT's scratch pool, so a larger one is a typo, not a plan)
MIN_WORKSPACE_MB, MAX_WORKSPACE_MB = 16, 1 << 20
MAX_BATCH = 4096


# --- pure logic ---------------------------------------------------------------------------------
def parse_batch(text: Union[str, Sequence[int], None]) -> Tuple[int, int, int]:
    """``"1,8,32"`` -> (1, 8, 32); ``"8"`` -> (8, 8, 8). Requires 1 <= min <= opt <= max."""
    if text is None or text == "":
        return DEFAULT_BATCH
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"--batch must be MIN,OPT,MAX integers (e.g. 1,8,32), got {text!r}") from None
    else:
        vals = _batch_ints(text)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ConfigError(f"--batch needs 1 or 3 integers (MIN,OPT,MAX), got {len(vals)}: {text!r}")
    lo, opt, hi = vals
    if not (1 <= lo <= opt <= hi <= MAX_BATCH):
        raise ConfigError(f"--batch must satisfy 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}, got {lo},{opt},{hi}")
    return lo, opt, hi


def _batch_ints(value: Any) -> List[int]:
    """The integers of a non-text ``batch`` (one int, or a sequence of ints); ConfigError for
    anything else (1.5 was truncated to 1, a bare int was a TypeError)."""
    items = [value] if isinstance(value, numbers.Integral) else value
    try:
        items = list(items)
    except TypeError:
        items = [None]
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"--batch must be MIN,OPT,MAX integers (e.g. 1,8,32), got {value!r}")
    return [int(v) for v in items]


def profile_shapes(inputs: Sequence[Tuple[str, Shape]], batch: Tuple[int, int, int]) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]:
    """Optimisation-profile (min, opt, max) shapes: the batch axis (dim 0) from ``batch``, every
    other axis must be static. ``inputs`` are (name, shape) with None / -1 / str for dynamic."""
    out = {}
    for name, shape in inputs:
        if not shape:
            raise ConfigError(f"input {name!r} is a scalar; an optimisation profile needs a batch axis")
        rest = []
        for i, d in enumerate(shape[1:], start=1):
            if not isinstance(d, int) or d <= 0:
                raise ConfigError(f"input {name!r} has a dynamic axis {i} ({d!r}); only the batch axis may be dynamic - re-export with a fixed input size")
            rest.append(int(d))
        b0 = shape[0]
        if isinstance(b0, int) and b0 > 0 and (batch[0] != b0 or batch[2] != b0):
            raise ConfigError(f"input {name!r} has a fixed batch {b0}; --batch {','.join(map(str, batch))} needs an ONNX exported with a dynamic batch")
        out[name] = tuple((b, *rest) for b in batch)  # type: ignore[assignment]
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class PrecisionPlan:
    """How the builder gets the requested precision on this TensorRT."""

    precision: str
    strongly_typed: bool
    fp16_flag: bool
    int8_flag: bool
    onnx_must_be: str        # what the ONNX itself must already carry: "fp32" | "fp16" | "int8" | "any"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def precision_plan(precision: str, has_precision_flags: bool) -> PrecisionPlan:
    """TensorRT 11 (no ``BuilderFlag.FP16``): strongly typed, precision from the ONNX.
    TensorRT 10: weakly typed with the FP16 / INT8 flags (the ONNX may be FP32 for fp16)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if not has_precision_flags:
        return PrecisionPlan(precision, True, False, False, precision)
    if precision == "fp32":
        return PrecisionPlan("fp32", False, False, False, "fp32")
    if precision == "fp16":
        return PrecisionPlan("fp16", False, True, False, "any")
    return PrecisionPlan("int8", False, True, True, "int8")


def onnx_precision(onnx_path: PathLike) -> Dict[str, Any]:
    """What an ONNX computes in: counts Q/DQ nodes and float initializer types.

    ``kind`` is "int8" when it has QuantizeLinear/DequantizeLinear, "fp16" when most float
    weights are float16, else "fp32". Needs the onnx package (None values without it)."""
    try:
        onnx = require("onnx", "reading the ONNX precision")
    except Exception:
        return {"kind": None, "qdq_nodes": None, "fp16_initializers": None, "fp32_initializers": None}
    m = onnx.load(str(onnx_path), load_external_data=False)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in m.graph.node)
    f16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    f32 = sum(t.data_type == onnx.TensorProto.FLOAT for t in m.graph.initializer)
    kind = "int8" if qdq else ("fp16" if f16 > f32 else "fp32")
    return {"kind": kind, "qdq_nodes": qdq, "fp16_initializers": f16, "fp32_initializers": f32}


def check_onnx_for_plan(onnx_path: PathLike, plan: PrecisionPlan, kind: Optional[str]) -> List[str]:
    """Raise ConfigError when a strongly typed build would silently get the wrong precision;
    return warnings for weakly typed builds."""
    if kind is None or plan.onnx_must_be == "any" or kind == plan.onnx_must_be:
        return []
    hint = {"fp16": "ctsdk export --fp16", "int8": "ctsdk calibrate", "fp32": "ctsdk export"}[plan.onnx_must_be]
    msg = f"{onnx_path} is a {kind} graph but --precision {plan.precision} needs a {plan.onnx_must_be} ONNX ({hint})"
    if plan.strongly_typed:
        raise ConfigError(msg + "; TensorRT 11 builds strongly typed networks, so precision comes from the ONNX")
    return [msg + "; building anyway with TensorRT 10 builder flags"]


def resolve_model(model: str, precision: str, bundle_dir: Optional[PathLike] = None) -> Path:
    """``--model`` as an ONNX path, or a model NAME looked up as ``<bundle_dir>/<NAME>_<precision>.onnx``
    (default: the packaged default bundle, the one ``sdk.Triage()`` runs)."""
    p = Path(model)
    if p.suffix == ".onnx" or p.exists():
        if not p.is_file():
            raise ConfigError(f"{p}: ONNX file not found")
        return p
    if bundle_dir:
        root = Path(bundle_dir)
    else:
        from ..bundle import DEFAULT_BUNDLE_DIR

        root = DEFAULT_BUNDLE_DIR
    cand = root / f"{model}_{precision}.onnx"
    if cand.is_file():
        return cand
    have = sorted(x.name for x in root.glob("*.onnx")) if root.is_dir() else []
    raise ConfigError(f"no {precision} ONNX for model {model!r}: {cand} not found (have {have or 'nothing'} in {root}); "
                      "pass an ONNX path or export/calibrate first")


def bundle_of(onnx: PathLike) -> Any:
    """The ctsdk bundle (:class:`sdk.bundle.Bundle`, verified) whose manifest lists the file
    ``onnx``, or None for a file outside any bundle.

    Raises:
        BundleError: the folder is a bundle but one of its files changed (the runtime would refuse
            it too; the message names the file).
    """
    from ..bundle import MANIFEST, load_bundle

    path = Path(onnx).resolve()
    if not (path.parent / MANIFEST).is_file():
        return None
    bundle = load_bundle(path.parent)
    listed = {(bundle.root / bf.path).resolve() for bf in bundle.files.values()}
    return bundle if path in listed else None


def engine_key(onnx_path: PathLike, precision: str, batch: Tuple[int, int, int], gpu_name: str,
               compute_capability: str, trt_version: str, onnx_sha256: Optional[str] = None) -> EngineKey:
    return EngineKey(onnx_sha256=onnx_sha256 or sha256_file(onnx_path), gpu_name=gpu_name,
                     compute_capability=compute_capability, trt_version=trt_version, precision=precision,
                     batch=tuple(batch))  # type: ignore[arg-type]


@dataclass(frozen=True)
class BuildConfig:
    """Arguments of one engine build (``ctsdk build-engine``)."""

    onnx: PathLike
    precision: str = "fp16"
    batch: Tuple[int, int, int] = DEFAULT_BATCH
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    timing_cache: Optional[PathLike] = None
    out: Optional[PathLike] = None
    cache_dir: Optional[PathLike] = None
    force: bool = False
    measure_warm: bool = False

    def __post_init__(self) -> None:
        """Every value is checked here, at construction - ``ctsdk build-engine``, :class:`CachedEngine`
        and Python callers alike, before TensorRT is imported or a file is read."""
        if not isinstance(self.onnx, (str, os.PathLike)) or not str(self.onnx).strip():
            raise ConfigError(f"onnx must be the path of an ONNX file, got {self.onnx!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        parse_batch(self.batch)
        workspace = whole_number("workspace_mb (--workspace)", self.workspace_mb, minimum=MIN_WORKSPACE_MB,
                                 maximum=MAX_WORKSPACE_MB, allow_none=False, what="TensorRT builder workspace in MB")
        object.__setattr__(self, "workspace_mb", workspace)  # a whole float (2048.0) is kept as the int it means

    def engine_cache(self) -> EngineCache:
        """``cache_dir``; else, for a file of a ctsdk bundle, that bundle's
        :meth:`sdk.bundle.Bundle.engine_cache_dir` - where ``sdk.Triage`` looks, so an engine built by
        ``ctsdk build-engine`` is the one the runtime loads; else ``$CTSDK_ENGINE_CACHE``, else
        ``engines/`` beside the ONNX when that folder is writable, else ``~/.cache/ctsdk/engines``."""
        if self.cache_dir:
            return EngineCache(self.cache_dir)
        bundle = bundle_of(self.onnx)
        if bundle is not None:
            return EngineCache(bundle.engine_cache_dir())
        if os.environ.get("CTSDK_ENGINE_CACHE"):
            return EngineCache(os.environ["CTSDK_ENGINE_CACHE"])
        beside = Path(self.onnx).parent
        if os.access(beside, os.W_OK):
            return EngineCache(beside / "engines")
        return EngineCache(Path.home() / ".cache" / "ctsdk" / "engines")


@dataclass
class BuildReport:
    engine: str
    key: Dict[str, Any]
    cached: bool
    build_s: Optional[float]
    warm_build_s: Optional[float]
    timing_cache: Optional[str]
    timing_cache_state: str          # "none" | "cold" | "warm"
    plan: Dict[str, Any]
    onnx: Dict[str, Any]
    size_bytes: int
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --- TensorRT (lazy) ----------------------------------------------------------------------------
def _trt_and_polygraphy() -> Tuple[Any, Any]:
    from .trt import import_tensorrt

    trt = import_tensorrt("ctsdk build-engine")
    pg = require("polygraphy.backend.trt", "ctsdk build-engine (Polygraphy loaders)")
    return trt, pg


def _network_inputs(network: Any) -> List[Tuple[str, Shape]]:
    out = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        out.append((t.name, tuple(int(d) if int(d) >= 0 else None for d in t.shape)))
    return out


def _build_bytes(trt: Any, pg: Any, onnx_path: Path, plan: PrecisionPlan, batch: Tuple[int, int, int],
                 workspace_mb: int, timing_cache: Optional[Path]) -> Tuple[bytes, float]:
    """One build with Polygraphy's loaders. Returns (serialized engine, seconds)."""
    network_loader = pg.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True if plan.strongly_typed else None)
    builder, network, parser = network_loader()  # parse once to read the input shapes for the profile
    profile = pg.Profile()
    for name, (lo, opt, hi) in profile_shapes(_network_inputs(network), batch).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    config = pg.CreateConfig(
        fp16=True if plan.fp16_flag else None,
        int8=True if plan.int8_flag else None,
        profiles=[profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_mb) << 20},
        load_timing_cache=str(timing_cache) if timing_cache is not None and timing_cache.is_file() else None,
    )
    t0 = time.perf_counter()
    data = pg.EngineBytesFromNetwork((builder, network, parser), config=config,
                                     save_timing_cache=str(timing_cache) if timing_cache is not None else None)()
    secs = time.perf_counter() - t0
    if data is None:
        raise EngineBuildError(f"{onnx_path}: TensorRT returned no engine (run with -vv for the builder log)")
    return bytes(data), secs


def build_engine(cfg: BuildConfig) -> BuildReport:
    """Build (or fetch from the cache) a TensorRT engine for ``cfg``.

    Raises MissingDependencyError ("install ctsdk[gpu] (TensorRT)") without TensorRT,
    RuntimeUnavailableError without a GPU, ConfigError for an ONNX of the wrong precision on
    TensorRT 11, EngineBuildError when TensorRT fails.
    """
    trt, pg = _trt_and_polygraphy()
    from .gpu import gpu_info

    gpu = gpu_info()
    if gpu is None:
        raise RuntimeUnavailableError("ctsdk build-engine: no NVIDIA GPU visible; engines must be built on the target GPU")
    onnx_path = Path(cfg.onnx)
    if not onnx_path.is_file():
        raise ConfigError(f"{onnx_path}: ONNX file not found")
    batch = parse_batch(cfg.batch)
    plan = precision_plan(cfg.precision, hasattr(trt.BuilderFlag, "FP16"))
    info = onnx_precision(onnx_path)
    warnings = check_onnx_for_plan(onnx_path, plan, info["kind"])
    key = engine_key(onnx_path, cfg.precision, batch, gpu.name, gpu.compute_capability, str(trt.__version__))
    cache = cfg.engine_cache()
    stem = onnx_path.stem
    tc = Path(cfg.timing_cache) if cfg.timing_cache else None
    with cache.lock(key, stem) as cache_path:
        hit = cache.get(key, stem)
        if hit is not None and not cfg.force:
            target = Path(cfg.out) if cfg.out else hit
            if target != hit:
                target.write_bytes(hit.read_bytes())
                from .engine_cache import write_sidecar

                write_sidecar(target, key, {"source": str(onnx_path)})
            return BuildReport(str(target), key.to_dict(), True, None, None, str(tc) if tc else None,
                               "none" if tc is None else ("warm" if tc.is_file() else "cold"), plan.to_dict(), info,
                               target.stat().st_size, warnings)
        state = "none" if tc is None else ("warm" if tc.is_file() else "cold")
        # a cold build takes minutes and shows nothing else; sdk.Triage lands here on first use
        log.warning("building the TensorRT %s engine of %s for %s (batch %s, timing cache %s): minutes, once; "
                    "cached in %s (`ctsdk build-engine --model %s` builds it ahead of time)",
                    cfg.precision, onnx_path.name, gpu.name, ",".join(map(str, batch)), state, cache.root, onnx_path)
        try:
            data, secs = _build_bytes(trt, pg, onnx_path, plan, batch, cfg.workspace_mb, tc)
            warm_s = None
            if cfg.measure_warm and tc is not None:
                _, warm_s = _build_bytes(trt, pg, onnx_path, plan, batch, cfg.workspace_mb, tc)
        except (ConfigError, EngineBuildError):
            raise
        except Exception as exc:
            raise EngineBuildError(f"{onnx_path}: TensorRT {trt.__version__} build ({cfg.precision}) failed: {exc}") from exc
        extra = {"source": str(onnx_path), "build_s": round(secs, 3), "plan": plan.to_dict()}
        path = cache.put(key, data, stem, extra=extra, locked=True)
        if cfg.out:
            from .engine_cache import write_sidecar

            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_bytes(data)
            write_sidecar(cfg.out, key, extra)
            path = Path(cfg.out)
    log.info("built %s in %.1f s (timing cache %s)", path, secs, state)
    return BuildReport(str(path), key.to_dict(), False, round(secs, 3), None if warm_s is None else round(warm_s, 3),
                       str(tc) if tc else None, state, plan.to_dict(), info, path.stat().st_size, warnings)


class CachedEngine:
    """Loader (Polygraphy style): returns the path of a cached engine for an ONNX, building it on
    first call. ``TrtSession(CachedEngine("c_fp16.onnx", precision="fp16"))``."""

    def __init__(self, onnx: PathLike, precision: str = "fp16", cache_dir: Optional[PathLike] = None,
                 batch: Tuple[int, int, int] = DEFAULT_BATCH, timing_cache: Optional[PathLike] = None,
                 workspace_mb: int = DEFAULT_WORKSPACE_MB) -> None:
        self.cfg = BuildConfig(onnx=onnx, precision=precision, batch=tuple(batch), cache_dir=cache_dir,  # type: ignore[arg-type]
                               timing_cache=timing_cache, workspace_mb=workspace_mb)

    def __call__(self) -> str:
        return build_engine(self.cfg).engine

    def __repr__(self) -> str:
        return f"CachedEngine({str(self.cfg.onnx)!r}, precision={self.cfg.precision!r}, batch={self.cfg.batch})"


EngineFromOnnx = CachedEngine

__all__ = ["BuildConfig", "BuildReport", "CachedEngine", "EngineFromOnnx", "PrecisionPlan", "build_engine", "bundle_of",
           "check_onnx_for_plan", "engine_key", "onnx_precision", "parse_batch", "precision_plan", "profile_shapes",
           "resolve_model"]
