"""Model bundles: a folder of ONNX models, the XGBoost aggregator, a model card and a manifest.

Layout (the default bundle ships inside the package at ``sdk/bundles/default``)::

    manifest.json        name, version, created, classes, inputs, preprocessing, thresholds,
                         training data + licences, metrics, files {name: {path, sha256, bytes,
                         role, precision}}
    lungs_fp32.onnx      2D lung U-Net            (role "lungs", precision "fp32")
    lungs_int8.onnx      INT8 QDQ of the same     (role "lungs", precision "int8"; manifest block
                         "lungs_int8": its Dice gate, `python -m sdk.calibration.lungs`)
    classifier_fp32.onnx slice classifier         (role "classifier", precision "fp32")
    classifier_int8.onnx INT8 QDQ of the same     (role "classifier", precision "int8")
    classifier_fp16.onnx FP16 (optional)          (role "classifier", precision "fp16")
    aggregator.json      XGBoost patient model    (role "aggregator")
    MODEL_CARD.md        data, licences, metrics, intended use, limits (role "card")

:func:`load_bundle` verifies the sha256 of every listed file and refuses a missing or changed
file with a :class:`~sdk.errors.BundleError` naming the file and both hashes. TensorRT engines are
never shipped: they are built on the target and cached under :meth:`Bundle.engine_cache_dir`.

Assemble a bundle with :func:`write_bundle` or from the shell::

    python -m sdk.bundle build --out sdk/bundles/default --meta bundle_meta.json \\
        --file lungs=runs/seg/unet2d_lung.onnx:lungs:fp32 ... --card MODEL_CARD.md
    python -m sdk.bundle verify sdk/bundles/default

The build (and ``verify``) also checks what the manifest *claims* about the files
(:mod:`sdk.bundle_check`): ONNX metadata / graph inputs against ``preprocessing`` / ``inputs`` /
``classes``, no pass verdict without its INT8 file, ``thresholds.series`` present; a build from a
previous manifest whose model files changed refuses to carry the blocks measured on the old files
(``--remeasured BLOCK`` / ``--keep-stale-metadata``) or to keep the shipped bundle's name and version.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import bundle_check as check
from .bundle_check import LUNGS_INT8_KEY
from .hashing import sha256_file  # noqa: F401 - part of this module's API
from .errors import BundleError, ConfigError
from .preprocessing import Preprocessing

PathLike = Union[str, Path]
log = logging.getLogger("sdk.bundle")

FORMAT = "ctsdk-bundle/1"
MANIFEST = "manifest.json"
MAX_BUNDLE_BYTES = 40 * 1024 * 1024
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "bundles" / "default"
ROLES = ("lungs", "classifier", "classifier_features", "classifier_head", "aggregator", "card", "report", "other")
PRECISIONS = ("fp32", "fp16", "int8", "")

__all__ = [
    "Bundle",
    "BundleFile",
    "load_bundle",
    "write_bundle",
    "refresh_card",
    "verify_bundle",
    "find_model_card",
    "sha256_file",
    "DEFAULT_BUNDLE_DIR",
    "LUNGS_INT8_KEY",
]


def lungs_int8_gate_passed(manifest: Mapping[str, Any]) -> bool:
    """True only when the manifest's ``lungs_int8`` block says ``"passed": true`` (a bool)."""
    block = manifest.get(LUNGS_INT8_KEY)
    return isinstance(block, Mapping) and block.get("passed") is True


@dataclass(frozen=True)
class BundleFile:
    """One file listed in the manifest."""

    name: str
    path: str          # relative to the bundle root, POSIX separators
    sha256: str
    bytes: int
    role: str
    precision: str = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "role": self.role, "precision": self.precision}


@dataclass(frozen=True)
class Bundle:
    """A verified model bundle (see the module docstring). Plain data; sessions are built elsewhere."""

    root: Path
    manifest: Dict[str, Any]
    files: Dict[str, BundleFile] = field(default_factory=dict)
    verified: bool = True

    # --- identity --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.root.name))

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", "0"))

    @property
    def classes(self) -> List[str]:
        return list(self.manifest["classes"])

    @property
    def positive_class(self) -> str:
        """The class whose probability the operating thresholds apply to ("covid")."""
        return str(self.manifest.get("positive_class", self.classes[-1]))

    @property
    def is_default(self) -> bool:
        return self.root.resolve() == DEFAULT_BUNDLE_DIR.resolve()

    # --- preprocessing and decisions ----------------------------------------------------------
    @property
    def preprocessing(self) -> Preprocessing:
        """The models' preprocessing, typed (:class:`sdk.preprocessing.Preprocessing`): the one
        object every stage, kernel and renderer reads windows, sizes and mean/std from."""
        return Preprocessing.from_manifest(self.manifest, where=str(self.root / MANIFEST))

    @property
    def classifier_preprocessing(self) -> Dict[str, Any]:
        typed = self.preprocessing   # BundleError for a malformed section, before it is read here
        return {"window": list(typed.classifier_window), "size": typed.classifier_size,
                **(check.get_key(self.manifest, "preprocessing.classifier") or {})}

    @property
    def window(self) -> Tuple[float, float]:
        return self.preprocessing.classifier_window

    @property
    def input_size(self) -> int:
        return self.preprocessing.classifier_size

    @property
    def lungs_preprocessing(self) -> Dict[str, Any]:
        Preprocessing.from_manifest(self.manifest, where=str(self.root / MANIFEST))  # BundleError if malformed
        return dict(check.get_key(self.manifest, "preprocessing.lungs") or {})

    @property
    def threshold(self) -> float:
        """Series-level operating threshold on P(positive class) from the aggregator; 0.5 when
        the manifest has no ``thresholds.series`` (the build refuses that; :attr:`warnings` says so)."""
        return manifest_number(self.manifest, "thresholds.series", self.root / MANIFEST, default=0.5)

    @property
    def slice_threshold(self) -> float:
        """Slice-level operating threshold on the classifier's P(positive class)."""
        return manifest_number(self.manifest, "thresholds.slice", self.root / MANIFEST, default=0.5)

    @property
    def slice_score_model(self) -> Any:
        """The per-slice evidence score (:class:`sdk.slice_score.SliceScoreModel`) from the
        manifest's ``slice_score`` block; None when the bundle has none."""
        from .slice_score import SliceScoreModel

        return SliceScoreModel.from_manifest(self.manifest.get("slice_score"), where=str(self.root / MANIFEST))

    @property
    def calibration_passed(self) -> bool:
        """The INT8 classifier passed its calibration bar: manifest ``int8.passed`` is true and the
        bundle lists a role-"classifier" file of precision "int8" (a verdict about a file the bundle
        does not hold, or one recorded in ``stale_metadata``, is ignored; :attr:`warnings` says so)."""
        return ("int8" in self.classifier_paths() and check.get_key(self.manifest, "int8.passed") is True
                and not check.is_stale(self.manifest, "int8"))

    @property
    def warnings(self) -> List[str]:
        """What this bundle falls back on or ignores at load time (a missing ``thresholds.series``,
        a pass verdict without its file, blocks carried over as stale); :class:`sdk.Triage` adds them
        to ``runtime_reasons`` and to every result's ``warnings``. Empty for the shipped bundle."""
        return check.load_warnings(self.manifest, self._entries())

    def _entries(self) -> Dict[str, Dict[str, Any]]:
        return {k: f.to_dict() for k, f in self.files.items()}

    # --- files -----------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Absolute path of the manifest entry ``name``."""
        if name not in self.files:
            raise BundleError(f"{self.root / MANIFEST}: no file named {name!r}; listed: {', '.join(sorted(self.files))}")
        return self.root / self.files[name].path

    def role(self, role: str) -> List[BundleFile]:
        return [f for f in self.files.values() if f.role == role]

    def classifier_paths(self) -> Dict[str, str]:
        """{precision: ONNX path} of the slice classifier (the runtime picks one)."""
        return {f.precision or "fp32": str(self.root / f.path) for f in self.role("classifier")}

    def features_paths(self) -> Dict[str, Tuple[str, str]]:
        """{precision: (features ONNX path, head .npz path)} of the classifier's features variant
        (``python -m sdk.export.features``); only precisions that have both files."""
        feats = {f.precision or "fp32": str(self.root / f.path) for f in self.role("classifier_features")}
        heads = {f.precision or "fp32": str(self.root / f.path) for f in self.role("classifier_head")}
        return {p: (feats[p], heads[p]) for p in feats if p in heads}

    @property
    def lungs_path(self) -> Optional[Path]:
        """The FP32 2D lung U-Net (the role-"lungs" file without a precision or with "fp32")."""
        paths = self.lungs_paths()
        return paths.get("fp32") or next(iter(paths.values()), None)

    def lungs_paths(self) -> Dict[str, Path]:
        """{precision: path} of the 2D lung U-Net files (role "lungs"; no precision = "fp32")."""
        return {f.precision or "fp32": self.root / f.path for f in self.role("lungs")}

    @property
    def lungs_int8_passed(self) -> bool:
        """The INT8 lung U-Net passed its Dice gate (manifest ``lungs_int8.passed`` is true and
        the bundle lists a role-"lungs" file of precision "int8"); see :mod:`sdk.lungs.int8`."""
        return ("int8" in self.lungs_paths() and lungs_int8_gate_passed(self.manifest)
                and not check.is_stale(self.manifest, LUNGS_INT8_KEY))

    @property
    def aggregator_path(self) -> Optional[Path]:
        files = self.role("aggregator")
        return self.root / files[0].path if files else None

    @property
    def card_path(self) -> Optional[Path]:
        files = self.role("card")
        return self.root / files[0].path if files else None

    def load_aggregator(self) -> Any:
        """The :class:`sdk.aggregate.Aggregator` (imports xgboost)."""
        from .aggregate import Aggregator

        p = self.aggregator_path
        if p is None:
            raise BundleError(f"{self.root / MANIFEST}: bundle has no aggregator (role 'aggregator')")
        agg = Aggregator.load(p)
        if agg.classes != self.classes:
            raise BundleError(f"{p}: aggregator classes {agg.classes} differ from the manifest's {self.classes}")
        return agg

    def engine_cache_dir(self) -> Path:
        """Where TensorRT engines for this bundle are cached (never shipped).

        ``$CTSDK_ENGINE_CACHE/<name>-<version>`` if set; beside the bundle
        (``<bundle>.engines/``) for a user bundle in a writable folder; else
        ``~/.cache/ctsdk/engines/<name>-<version>`` (the packaged default bundle). Engine file
        names inside carry the deployment cache key (GPU, compute capability, TensorRT version,
        precision, ONNX sha256).
        """
        tag = f"{self.name}-{self.version}"
        env = os.environ.get("CTSDK_ENGINE_CACHE")
        if env:
            return Path(env) / tag
        if not self.is_default and os.access(self.root.parent, os.W_OK):
            return self.root.parent / f"{self.root.name}.engines"
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ctsdk" / "engines" / tag

    def summary(self) -> Dict[str, Any]:
        """JSON-safe description (name, version, classes, thresholds, files)."""
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.root),
            "classes": self.classes,
            "thresholds": {"series": self.threshold, "slice": self.slice_threshold},
            "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
            "verified": self.verified,
        }


# --- loading -----------------------------------------------------------------------------------
def _read_manifest(root: Path) -> Dict[str, Any]:
    mpath = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found (pass a folder containing {MANIFEST}; leave the bundle out - bundle=None, no --bundle - for the one shipped in the package)")
    if not mpath.is_file():
        inside = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}"))[:5]
        hint = f"; bundles in it: {', '.join(inside)}" if inside else ""
        raise BundleError(f"{mpath}: manifest not found; a bundle is a folder with {MANIFEST} (build one with "
                          f"`python -m sdk.bundle build`){hint}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise BundleError(f"{mpath}: manifest is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); restore it "
                          f"or rebuild the bundle (`python -m sdk.bundle build`)") from exc
    check_manifest(manifest, mpath)
    return manifest


#: manifest blocks the runtime reads: each, when present and not null, must be a JSON object
OBJECT_KEYS = ("thresholds", "preprocessing", "preprocessing.classifier", "preprocessing.lungs", "inputs",
               "inputs.classifier", "inputs.lungs", check.INT8_KEY, LUNGS_INT8_KEY, "slice_score")
#: manifest numbers the runtime reads: key -> (lowest, highest, lowest excluded); absent or null = its default
NUMBER_KEYS: Dict[str, Tuple[float, float, bool]] = {
    "thresholds.series": (0.0, 1.0, False),
    "thresholds.slice": (0.0, 1.0, False),
    f"{check.INT8_KEY}.speedup": (0.0, float("inf"), True),
}


def _kind(value: Any) -> str:
    """A JSON value's type as the manifest's author wrote it (``list``, ``string``, ``null``...)."""
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def manifest_number(manifest: Mapping[str, Any], key: str, where: PathLike, default: Optional[float] = None) -> Optional[float]:
    """The number at ``key`` (one of :data:`NUMBER_KEYS`), ``default`` when absent or null.

    Raises:
        BundleError: naming ``where``, the key and its value, when it is not a finite number in range.
    """
    value = check.get_key(manifest, key)
    if value is None:
        return default
    lo, hi, open_lo = NUMBER_KEYS[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (lo < value if open_lo else lo <= value) or not value <= hi:
        shown = json.dumps(value)[:80] if isinstance(value, (str, int, float)) else f"a {_kind(value)}"
        span = f"> {lo:g}" if hi == float("inf") else f"in ({lo:g}, {hi:g}]" if open_lo else f"in [{lo:g}, {hi:g}]"
        raise BundleError(f"{where}: manifest key {key} = {shown} is not a number {span}; correct it or rebuild "
                          f"the bundle (`python -m sdk.bundle build`)")
    return float(value)


def check_manifest(manifest: Any, where: PathLike) -> None:
    """The structure of a parsed manifest that the loader and the runtime rely on: one JSON object
    with ``name``, ``version``, ``classes`` (distinct class names) and a non-empty ``files`` object;
    the blocks of :data:`OBJECT_KEYS` objects, the numbers of :data:`NUMBER_KEYS` in range, and the
    ``preprocessing`` and ``slice_score`` blocks readable (the parsers the runtime uses).

    Raises:
        BundleError: naming ``where``, the key, what it holds and what it should hold.
    """
    from .slice_score import SliceScoreModel

    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest must be one JSON object, found a {_kind(manifest)}; restore it or rebuild "
                          f"the bundle (`python -m sdk.bundle build`)")
    for key in ("name", "version", "classes", "files"):
        if key not in manifest:
            raise BundleError(f"{where}: manifest lacks the required key {key!r}")
    classes = manifest["classes"]
    if (not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise BundleError(f"{where}: manifest key 'classes' must be a list of distinct class names (e.g. "
                          f"[\"non_covid\", \"covid\"]), found {json.dumps(classes)[:80]}")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise BundleError(f"{where}: manifest 'files' must be a non-empty object")
    for key in OBJECT_KEYS:
        value = check.get_key(manifest, key)
        if value is not None and not isinstance(value, Mapping):
            raise BundleError(f"{where}: manifest key {key} must be an object, found a {_kind(value)}; correct it or "
                              f"rebuild the bundle (`python -m sdk.bundle build`)")
    for key in NUMBER_KEYS:
        manifest_number(manifest, key, where)
    Preprocessing.from_manifest(manifest, where=str(where))
    try:
        SliceScoreModel.from_manifest(manifest.get("slice_score"), where=str(where))
    except ConfigError as exc:
        raise BundleError(str(exc)) from exc


def _parse_files(root: Path, manifest: Mapping[str, Any]) -> Dict[str, BundleFile]:
    out: Dict[str, BundleFile] = {}
    for name, spec in manifest["files"].items():
        try:
            rel = str(spec["path"])
            bf = BundleFile(name=name, path=rel, sha256=str(spec["sha256"]).lower(), bytes=int(spec["bytes"]),
                            role=str(spec.get("role", "other")), precision=str(spec.get("precision", "")))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise BundleError(f"{root / MANIFEST}: file entry {name!r} is malformed ({type(exc).__name__}: {exc}); "
                              f"need path, sha256, bytes, role") from exc
        if bf.bytes < 0:
            raise BundleError(f"{root / MANIFEST}: file entry {name!r} is malformed (bytes = {bf.bytes}); need path, "
                              f"sha256, bytes (the file's size, >= 0), role")
        try:
            target = (root / rel).resolve()
            target.exists()   # a name the file system refuses (too long) raises here, not later
        except (OSError, ValueError) as exc:
            raise BundleError(f"{root / MANIFEST}: file entry {name!r} has a path the file system refuses "
                              f"({rel[:80]!r}{'...' if len(rel) > 80 else ''}: {str(exc)[:60]})") from exc
        if root.resolve() not in target.parents:
            raise BundleError(f"{root / MANIFEST}: file entry {name!r} points outside the bundle ({rel})")
        out[name] = bf
    return out


def _verify_hashes(root: Path, files: Mapping[str, BundleFile]) -> None:
    for name, bf in sorted(files.items()):
        p = root / bf.path
        if not p.is_file():
            raise BundleError(f"{p}: bundle file {name!r} is missing (expected sha256 {bf.sha256}); reinstall or rebuild the bundle")
        actual = sha256_file(p)
        if actual != bf.sha256:
            raise BundleError(
                f"{p}: bundle file {name!r} was changed: expected sha256 {bf.sha256}, found {actual} "
                f"({p.stat().st_size} bytes, manifest says {bf.bytes}); refusing to load it - restore the file or rebuild the bundle"
            )


def _content_problems(root: Path, manifest: Mapping[str, Any],
                      entries: Mapping[str, Mapping[str, Any]]) -> Tuple[List[str], List[str]]:
    """(problems, warnings): what the manifest claims about its files that they contradict
    (:mod:`sdk.bundle_check`: ONNX metadata and inputs, pass verdicts without their file, a
    missing series threshold)."""
    problems = check.verdict_problems(manifest, entries)
    thr = check.threshold_problem(manifest, entries)
    if thr:
        problems.append(thr)
    onnx_problems, warnings = check.check_model_files(root, manifest, entries)
    stale = [w for w in check.load_warnings(manifest, entries) if check.STALE_KEY in w]
    return problems + onnx_problems, warnings + stale


def verify_bundle(root: PathLike, files: Optional[Mapping[str, BundleFile]] = None, *, models: bool = True) -> List[str]:
    """Check every listed file exists with its recorded size and sha256 and, with ``models``
    (``python -m sdk.bundle verify``), that the manifest's claims hold for them: each ONNX file's
    metadata and graph input against ``preprocessing`` / ``inputs`` / ``classes``, no pass verdict
    (``int8.passed``, ``lungs_int8.passed``) without its file, ``thresholds.series`` when the bundle
    has an aggregator. :func:`load_bundle` checks hashes only (``models=False``; ``sdk.Triage``
    checks the classifier it opens). Returns warnings (blocks recorded as stale, a file ONNX
    Runtime cannot open).

    Raises:
        BundleError: a missing or changed file, or every contradiction found (one message).
    """
    root = Path(root)
    manifest = _read_manifest(root) if (files is None or models) else {}
    if files is None:
        files = _parse_files(root, manifest)
    _verify_hashes(root, files)
    if not models:
        return []
    problems, warnings = _content_problems(root, manifest, {k: f.to_dict() for k, f in files.items()})
    if problems:
        raise BundleError(f"{root / MANIFEST}: {len(problems)} problem(s): " + " | ".join(problems))
    return warnings


def load_bundle(path: Optional[PathLike] = None, *, verify: bool = True) -> Bundle:
    """Load (and by default verify) a bundle folder; ``None`` = the default bundle in the package.

    Raises:
        BundleError: missing folder/manifest, malformed manifest, or a missing/changed file
            (the message names the file and the expected and actual sha256).
    """
    root = Path(path) if path is not None else DEFAULT_BUNDLE_DIR
    manifest = _read_manifest(root)
    files = _parse_files(root, manifest)
    if verify:
        verify_bundle(root, files, models=False)
    return Bundle(root=root.resolve(), manifest=manifest, files=files, verified=verify)


# --- writing -----------------------------------------------------------------------------------
def _check_sources(out: Path, files: Mapping[str, Tuple[PathLike, str, str]], meta: Mapping[str, Any]) -> None:
    for key in ("name", "version", "classes"):
        if key not in meta:
            raise ConfigError(f"bundle meta lacks {key!r}")
    inside = [str(src) for src, _, _ in files.values() if out.resolve() in Path(src).resolve().parents]
    if inside:
        raise ConfigError(f"{out}: bundle sources must live outside the output folder (it is emptied first): {inside}")
    names = [Path(src).name for src, _, _ in files.values()]
    dupes = sorted({n for n in names if names.count(n) > 1} | ({MANIFEST} & set(names)))
    if dupes:
        raise ConfigError(f"bundle files must have distinct names (other than {MANIFEST}); clashing: {dupes}")
    for name, (src, role, precision) in files.items():
        if not Path(src).is_file():
            raise ConfigError(f"{src}: bundle input {name!r} not found")
        if role not in ROLES:
            raise ConfigError(f"bundle file {name!r}: role {role!r} not in {ROLES}")
        if precision not in PRECISIONS:
            raise ConfigError(f"bundle file {name!r}: precision {precision!r} not in {PRECISIONS}")


def _known_identities(out: Path) -> List[Tuple[str, Mapping[str, Any]]]:
    """Bundles whose name + version may not be reused with other model files: the shipped one and
    the one at ``out`` (overwritten)."""
    known = []
    for where, root in (("the shipped bundle", DEFAULT_BUNDLE_DIR), (f"the bundle at {out}", out)):
        try:
            known.append((where, json.loads((root / MANIFEST).read_text())))
        except (OSError, ValueError):
            continue
    return known


def _check_meta(out: Path, files: Mapping[str, Tuple[PathLike, str, str]], meta: Mapping[str, Any],
                remeasured: Sequence[str], keep_stale: bool) -> Optional[Dict[str, Any]]:
    """Refuse, before ``out`` is touched, a meta whose claims do not fit the new files (missing series
    threshold, a pass verdict without its file, blocks measured on replaced files, the shipped
    bundle's name and version with other models); returns the new ``stale_metadata`` block."""
    planned = {name: {"path": Path(src).name, "sha256": sha256_file(src), "role": role, "precision": precision}
               for name, (src, role, precision) in files.items()}
    try:   # what load_bundle will require of the manifest written from this meta
        check_manifest({**meta, "files": planned}, f"{out}: bundle meta")
    except BundleError as exc:
        raise ConfigError(f"refusing to build: {exc}") from exc
    problems = check.verdict_problems(meta, planned)
    thr = check.threshold_problem(meta, planned)
    if thr:
        problems.append(thr)
    if problems:
        raise ConfigError(f"{out}: refusing to build: " + " | ".join(problems))
    return check.check_rebuild(meta, planned, remeasured=remeasured, keep_stale=keep_stale, known=_known_identities(out))


def _empty(out: Path) -> None:
    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def write_bundle(
    out_dir: PathLike,
    files: Mapping[str, Tuple[PathLike, str, str]],
    meta: Mapping[str, Any],
    *,
    overwrite: bool = False,
    max_bytes: int = MAX_BUNDLE_BYTES,
    remeasured: Sequence[str] = (),
    keep_stale_metadata: bool = False,
) -> Bundle:
    """Assemble a bundle folder: copy files, hash them, check what the meta claims about them,
    write manifest.json, verify.

    Args:
        out_dir: destination folder (created; must be empty unless ``overwrite``).
        files: ``{name: (source path, role, precision)}``; each file is copied to
            ``out_dir/<source file name>``.
        meta: manifest fields (name, version, classes, inputs, preprocessing, thresholds,
            training_data, licences, metrics, ...); ``files``, ``format``, ``total_bytes`` and
            ``created`` (build time, UTC) are set here, so a previous manifest can be passed as meta.
        max_bytes: refuse bundles larger than this (40 MB).
        remeasured: blocks of ``meta`` whose values were measured on these files (``thresholds``,
            ``metrics``, ``int8``, ...), when ``meta`` is a previous manifest whose model files changed.
        keep_stale_metadata: carry the blocks measured on replaced files over anyway, recorded in
            the manifest's ``stale_metadata`` (loaders warn about them).

    Refused (ConfigError, before ``out_dir`` is touched): a bundle with an aggregator and no
    ``thresholds.series``; ``int8.passed`` / ``lungs_int8.passed`` without the INT8 file; when
    ``meta`` is a previous manifest (it has ``files``), the blocks of
    :data:`sdk.bundle_check.MEASURED_ON` measured on files whose content changed, unless
    ``remeasured`` or ``keep_stale_metadata``; the name and version of the shipped bundle, or of the
    bundle being overwritten, with other model files. Refused (BundleError, the copied files
    removed): an ONNX file whose metadata or graph input contradicts the manifest
    (:func:`sdk.bundle_check.model_problems`).
    """
    out = Path(out_dir)
    _check_sources(out, files, meta)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: folder is not empty; pass overwrite=True (--overwrite) to replace the bundle")
    stale = _check_meta(out, files, meta, list(remeasured), keep_stale_metadata)
    if out.exists():
        _empty(out)
    out.mkdir(parents=True, exist_ok=True)
    entries: Dict[str, Dict[str, Any]] = {}
    total = 0
    for name, (src, role, precision) in files.items():
        src = Path(src)
        dst = out / src.name
        shutil.copyfile(src, dst)
        size = dst.stat().st_size
        total += size
        entries[name] = {"path": dst.name, "sha256": sha256_file(dst), "bytes": size, "role": role, "precision": precision}
    manifest = {"format": FORMAT, **{k: v for k, v in meta.items() if k not in ("files", "format", "total_bytes", check.STALE_KEY)}}
    if stale:
        manifest[check.STALE_KEY] = stale
    manifest["created"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    manifest["total_bytes"] = total
    manifest["files"] = entries
    try:
        if total > max_bytes:
            raise ConfigError(f"{out}: bundle would be {total / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit")
        problems, warnings = check.check_model_files(out, manifest, entries)
        if problems:
            raise BundleError(f"{out}: refusing to build: {len(problems)} problem(s): " + " | ".join(problems))
    except (BundleError, ConfigError):
        _empty(out)
        raise
    for w in warnings:
        log.warning("%s", w)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return load_bundle(out)


def find_model_card(card: PathLike) -> Path:
    """``card`` as given, else (a relative path such as the default ``docs/model_card.md``) the
    same path in the source checkout that holds this package, so commands work from any folder.

    Raises:
        ConfigError: neither exists.
    """
    from .paths import source_checkout

    given = Path(card)
    if given.is_file():
        return given
    checkout = source_checkout()
    tried = [str(given.resolve())]
    if not given.is_absolute() and checkout is not None:
        candidate = checkout / given
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise ConfigError(f"{card}: model card not found (looked at {' and '.join(tried)}); pass an existing card file "
                      f"(the shipped one is docs/model_card.md in the source checkout)")


def refresh_card(bundle_dir: Union[str, Path], card: Union[str, Path]) -> "Bundle":
    """Replace a bundle's model card (the file of role ``card``) with ``card`` and update its
    sha256, size and the bundle's total in manifest.json; every other entry, ``created`` included,
    stays as it is. For the card's text only (docs/model_card.md is its source): models are never
    touched here. Returns the re-loaded (verified) bundle.

    Raises:
        ConfigError: ``card`` is not a file, or the bundle has no card entry.
        BundleError: the bundle's manifest is missing or malformed (nothing is copied).
    """
    out = Path(bundle_dir)
    try:
        src = find_model_card(card)
    except ConfigError as exc:
        raise ConfigError(f"{card}: no such model card file ({exc})") from exc
    manifest = _read_manifest(out)
    _parse_files(out, manifest)   # BundleError for a malformed file entry, before anything is copied
    names = [n for n, e in manifest["files"].items() if e.get("role") == "card"]
    if len(names) != 1:
        raise ConfigError(f"{out}: expected one file of role 'card' in {MANIFEST}, found {len(names)}")
    entry = manifest["files"][names[0]]
    dst = out / entry["path"]
    shutil.copyfile(src, dst)
    old = int(entry["bytes"])
    entry["sha256"], entry["bytes"] = sha256_file(dst), dst.stat().st_size
    manifest["total_bytes"] = int(manifest.get("total_bytes", 0)) - old + entry["bytes"]
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return load_bundle(out)


# --- command line ------------------------------------------------------------------------------
def _parse_file_arg(text: str) -> Tuple[str, Tuple[str, str, str]]:
    """``name=path:role[:precision]``."""
    if "=" not in text or ":" not in text.split("=", 1)[1]:
        raise ConfigError(f"--file {text!r}: expected name=path:role[:precision]")
    name, rest = text.split("=", 1)
    parts = rest.rsplit(":", 2)
    if len(parts) == 3 and parts[2] in PRECISIONS and parts[1] in ROLES:
        path, role, precision = parts
    else:
        path, role = rest.rsplit(":", 1)
        precision = ""
    return name, (path, role, precision)


def _read_meta(path: PathLike) -> Dict[str, Any]:
    """The ``--meta`` JSON file of ``build``: one object; ConfigError naming the file otherwise."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"--meta {path}: not a readable JSON file ({type(exc).__name__}: {str(exc)[:160]}); give "
                          f"the manifest fields as one UTF-8 JSON object (a previous manifest.json will do)") from exc
    if not isinstance(meta, dict):
        raise ConfigError(f"--meta {path}: must hold one JSON object of manifest fields, found a {_kind(meta)}")
    return meta


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sdk.bundle build|verify|show ...``."""
    ap = argparse.ArgumentParser(prog="python -m sdk.bundle", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="assemble a bundle folder")
    b.add_argument("--out", required=True)
    b.add_argument("--meta", required=True, help="JSON file with the manifest fields")
    b.add_argument("--file", action="append", default=[], help="name=path:role[:precision] (repeat)")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--remeasured", action="append", default=[], metavar="BLOCK",
                   help="a block of the meta measured on these files (thresholds.series, metrics, int8, ...) when the meta "
                        "is a previous manifest whose model files changed (repeat)")
    b.add_argument("--keep-stale-metadata", action="store_true",
                   help="carry blocks measured on replaced files over anyway, recorded in the manifest's stale_metadata")
    v = sub.add_parser("verify", help="verify every sha256 of a bundle and what its manifest says about the files")
    v.add_argument("path", nargs="?")
    s = sub.add_parser("show", help="print the bundle summary as JSON")
    s.add_argument("path", nargs="?")
    c = sub.add_parser("card", help="replace the bundle's MODEL_CARD.md with CARD and re-hash it (text only)")
    c.add_argument("path", help="bundle folder (e.g. sdk/bundles/default)")
    c.add_argument("--card", default="docs/model_card.md", help="the card's source (default: docs/model_card.md)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            meta = _read_meta(args.meta)
            files = dict(_parse_file_arg(f) for f in args.file)
            bundle = write_bundle(args.out, files, meta, overwrite=args.overwrite, remeasured=args.remeasured,
                                  keep_stale_metadata=args.keep_stale_metadata)
        elif args.cmd == "card":
            bundle = refresh_card(args.path, args.card)
        elif args.cmd == "verify":
            for w in verify_bundle(args.path if args.path else DEFAULT_BUNDLE_DIR):
                print(f"ctsdk: warning: {w}", file=sys.stderr)
            bundle = dataclasses.replace(load_bundle(args.path, verify=False), verified=True)
        else:
            bundle = load_bundle(args.path)
        print(json.dumps(bundle.summary(), indent=2))
        return 0
    except (BundleError, ConfigError) as exc:
        print(f"ctsdk: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
