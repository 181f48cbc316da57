"""What a bundle manifest claims, checked against the files it lists (one owner).

:mod:`sdk.bundle` proves that every listed file is the one hashed at build time. This module
checks that the manifest's *claims about* those files hold:

- :func:`model_problems` - each ONNX file's ``ctsdk.*`` metadata and graph input against the
  manifest's ``preprocessing`` / ``inputs`` / ``classes`` and its ``files`` entry (precision, the
  file it was derived from). Called by :func:`sdk.bundle.write_bundle` (refuses to build),
  :func:`sdk.bundle.verify_bundle` / ``python -m sdk.bundle verify``, and by :class:`sdk.Triage`
  through :func:`check_session` on the classifier and lung U-Net sessions it opens anyway (no file
  is read twice; microseconds).
- :func:`verdict_problems` - pass verdicts (``int8.passed``, ``lungs_int8.passed``) for a
  precision whose file the bundle does not hold.
- :func:`threshold_problem` - a bundle with an aggregator and no ``thresholds.series``
  (:attr:`sdk.bundle.Bundle.threshold` would fall back to 0.5).
- :func:`check_rebuild` - a bundle built from a previous manifest (a meta with ``files``) whose
  model files changed: the blocks of :data:`MEASURED_ON` describe the old files, and the name and
  version of the shipped bundle (or of the bundle being overwritten) belong to other files.
- :func:`load_warnings` - what :class:`sdk.bundle.Bundle` ignores or falls back on at load time.

Out of scope: binding each metric to the hashes of the files it was measured on (a manifest
edited by hand after the build can still state any number; ``python -m sdk.bundle verify`` checks
only the consistency above). Recording ``measured_on: {file: sha256}`` inside each block would
close that gap.

This module imports nothing from :mod:`sdk.bundle` (which imports it).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import BundleError, ConfigError
from .preprocessing import Preprocessing

#: manifest block (and ``files`` key) of the INT8 lung U-Net and its Dice gate
LUNGS_INT8_KEY = "lungs_int8"
#: manifest block of the classifier's INT8 calibration verdict
INT8_KEY = "int8"
#: manifest block written by ``--keep-stale-metadata``: blocks carried over from files that changed
STALE_KEY = "stale_metadata"
#: roles whose missing precision means "fp32" (as :class:`sdk.bundle.Bundle` reads them)
_FP32_BY_DEFAULT = ("lungs", "classifier", "classifier_features", "classifier_head")
#: roles whose content defines the bundle's decisions: replacing one needs a new name or version
IDENTITY_ROLES = ("lungs", "classifier", "aggregator", "other")

#: Manifest blocks measured on (or derived from) the files of each role:precision. When a build
#: from a previous manifest replaces the content of a key's files (sha256 differs), the blocks
#: listed for it describe files the new bundle no longer holds. The lung U-Net's masks feed the
#: classifier (mask channel, mask-weighted pooling) and its slice probabilities feed the
#: aggregator, so thresholds and metrics sit downstream of all three. Derived files
#: (classifier_features / classifier_head) are checked against their source's sha256 instead
#: (:func:`model_problems`); role "other" (the 3D lung U-Net) has no entry: its blocks
#: (preprocessing.lungs3d, metrics.lungs3d) stay the builder's responsibility.
MEASURED_ON: Mapping[str, Tuple[str, ...]] = {
    "classifier:fp32": ("thresholds.slice", "thresholds.series", "metrics", "image_render", "slice_score",
                        INT8_KEY, "classifier_features"),
    "classifier:fp16": ("classifier_features",),
    "classifier:int8": (INT8_KEY,),
    "aggregator": ("thresholds.series", "metrics"),
    "lungs:fp32": ("thresholds.slice", "thresholds.series", "metrics", LUNGS_INT8_KEY),
    "lungs:int8": (LUNGS_INT8_KEY,),
}

Entries = Mapping[str, Mapping[str, Any]]   # manifest-style {name: {path, sha256, role, precision}}


# --- small helpers -----------------------------------------------------------------------------------
def bundle_label(manifest: Mapping[str, Any]) -> str:
    """``bundle <name> <version>`` for messages."""
    return f"bundle {manifest.get('name', '?')} {manifest.get('version', '?')}"


def get_key(manifest: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``a.b.c`` in the manifest, or None when any part is absent."""
    node: Any = manifest
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def precision_of(role: str, precision: str) -> str:
    """A file's precision as the runtime reads it ("" means fp32 for model roles)."""
    return precision or ("fp32" if role in _FP32_BY_DEFAULT else "")


def model_key(role: str, precision: str) -> str:
    """``role:precision`` (``aggregator`` alone): the keys of :data:`MEASURED_ON`."""
    p = precision_of(role, precision)
    return f"{role}:{p}" if p else role


def _by_key(entries: Entries) -> Dict[str, Dict[str, str]]:
    """{role:precision: {sha256: file path}}."""
    out: Dict[str, Dict[str, str]] = {}
    for e in entries.values():
        if not isinstance(e, Mapping):
            continue
        key = model_key(str(e.get("role", "other")), str(e.get("precision", "")))
        out.setdefault(key, {})[str(e.get("sha256", "")).lower()] = str(e.get("path", ""))
    return out


def changed_models(old: Entries, new: Entries) -> Dict[str, str]:
    """{role:precision: "old -> new"} for the keys both file lists hold with different content
    (a precision only one side has is an addition or a removal, not a change)."""
    a, b = _by_key(old), _by_key(new)
    out = {}
    for key in sorted(set(a) & set(b)):
        if set(a[key]) != set(b[key]):
            out[key] = (f"{', '.join(sorted(a[key].values()))} {', '.join(s[:8] for s in sorted(a[key]))} -> "
                        f"{', '.join(s[:8] for s in sorted(b[key]))}")
    return out


def _has_file(entries: Entries, role: str, precision: str) -> bool:
    return any(str(e.get("role")) == role and precision_of(role, str(e.get("precision", ""))) == precision
               for e in entries.values())


# --- manifest-only checks ------------------------------------------------------------------------------
def _verdict_gaps(manifest: Mapping[str, Any], entries: Entries) -> List[str]:
    """The verdict blocks that say passed for a precision whose file the bundle does not list."""
    out = []
    for block, role, prec in ((INT8_KEY, "classifier", "int8"), (LUNGS_INT8_KEY, "lungs", "int8")):
        passed = get_key(manifest, f"{block}.passed")
        if passed not in (None, False) and not _has_file(entries, role, prec):
            out.append(f"{bundle_label(manifest)}: manifest key {block}.passed is {json.dumps(passed)} but the bundle lists no "
                       f"role-{role!r} file of precision {prec!r} (the verdict was measured on a file it does not hold)")
    return out


def verdict_problems(manifest: Mapping[str, Any], entries: Entries) -> List[str]:
    """Pass verdicts (``int8.passed``, ``lungs_int8.passed``) for a precision whose file the bundle
    does not list: refused by the build and by verify."""
    return [f"{gap}; remove the block or add the file it was measured on" for gap in _verdict_gaps(manifest, entries)]


def threshold_problem(manifest: Mapping[str, Any], entries: Entries) -> Optional[str]:
    """A bundle with an aggregator needs ``thresholds.series`` (a number in [0, 1])."""
    if not any(str(e.get("role")) == "aggregator" for e in entries.values()):
        return None
    value = get_key(manifest, "thresholds.series")
    if value is None:
        return (f"{bundle_label(manifest)}: manifest key thresholds.series is missing: the series decision would fall back "
                f"to 0.5, an operating point nobody measured; put the aggregator's threshold (e.g. its Youden point on "
                f"validation bags, printed by `python -m sdk.train.aggregator`) in the meta's thresholds.series")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        return f"{bundle_label(manifest)}: manifest key thresholds.series = {value!r} is not a number in [0, 1]"
    return None


def load_warnings(manifest: Mapping[str, Any], entries: Entries) -> List[str]:
    """What a loaded bundle falls back on or ignores (:attr:`sdk.bundle.Bundle.warnings`)."""
    out = []
    has_aggregator = any(str(e.get("role")) == "aggregator" for e in entries.values())
    if has_aggregator and get_key(manifest, "thresholds.series") is None:
        out.append(f"{bundle_label(manifest)}: manifest has no thresholds.series: the series decision uses the fallback "
                   f"0.5, not a measured operating point (rebuild the bundle with thresholds.series)")
    out.extend(f"{gap}; ignored (treated as not passed)" for gap in _verdict_gaps(manifest, entries))
    stale = get_key(manifest, f"{STALE_KEY}.blocks")
    if isinstance(stale, Mapping) and stale:
        out.append(f"{bundle_label(manifest)}: manifest blocks {', '.join(sorted(stale))} were carried over from "
                   f"{get_key(manifest, STALE_KEY + '.from') or 'a previous manifest'} although the model files they were "
                   f"measured on changed ({STALE_KEY} in manifest.json; pass verdicts among them are ignored); re-measure them")
    return out


# --- rebuild from a previous manifest ------------------------------------------------------------------
def _covered(block: str, remeasured: Iterable[str]) -> bool:
    return any(block == r or block.startswith(r + ".") for r in remeasured)


def stale_blocks(meta: Mapping[str, Any], entries: Entries,
                 remeasured: Sequence[str] = ()) -> Tuple[Dict[str, List[str]], Dict[str, str]]:
    """({block: [changed role:precision keys]}, {key: "old -> new"}) for a meta that is a previous
    manifest (has ``files``): the :data:`MEASURED_ON` blocks it still holds for files whose
    content changed, less those named in ``remeasured``."""
    old = meta.get("files")
    if not isinstance(old, Mapping) or not old:
        return {}, {}
    changed = {k: v for k, v in changed_models(old, entries).items() if k.split(":")[0] not in ("card", "report")}
    out: Dict[str, List[str]] = {}
    for key in changed:
        for block in MEASURED_ON.get(key, ()):
            if get_key(meta, block) is not None and not _covered(block, remeasured):
                out.setdefault(block, []).append(key)
    return out, changed


def _identity_clash(meta: Mapping[str, Any], entries: Entries, known: Sequence[Tuple[str, Mapping[str, Any]]]) -> Optional[str]:
    for where, other in known:
        if (str(other.get("name")), str(other.get("version"))) != (str(meta.get("name")), str(meta.get("version"))):
            continue
        files = other.get("files")
        if not isinstance(files, Mapping):
            continue
        changed = {k: v for k, v in changed_models(files, entries).items() if k.split(":")[0] in IDENTITY_ROLES}
        if changed:
            return (f"{bundle_label(meta)}: that name and version are {where}'s, but the model files differ "
                    f"({'; '.join(f'{k}: {v}' for k, v in changed.items())}); a bundle with other models needs a new name "
                    f"or version - set 'name' or 'version' in the meta")
    return None


def is_stale(manifest: Mapping[str, Any], block: str) -> bool:
    """The manifest records ``block`` as carried over from replaced files (:data:`STALE_KEY`)."""
    blocks = get_key(manifest, f"{STALE_KEY}.blocks")
    return isinstance(blocks, Mapping) and block in blocks


def _source_label(meta: Mapping[str, Any], known: Sequence[Tuple[str, Mapping[str, Any]]]) -> str:
    """Which bundle the meta's ``files`` describe: a known bundle with the same files, else the
    previous manifest's build time (its name and version may have been edited since)."""
    mine = _by_key(meta.get("files") or {})
    for where, other in known:
        if isinstance(other.get("files"), Mapping) and _by_key(other["files"]) == mine:
            return f"{other.get('name', '?')} {other.get('version', '?')} ({where})"
    return f"the previous manifest built {meta.get('created', '?')}"


def check_rebuild(meta: Mapping[str, Any], entries: Entries, *, remeasured: Sequence[str] = (),
                  keep_stale: bool = False, known: Sequence[Tuple[str, Mapping[str, Any]]] = ()) -> Optional[Dict[str, Any]]:
    """Refuse what a build would carry over unchanged from files that changed; return the manifest's
    new :data:`STALE_KEY` block (None: no stale blocks).

    Args:
        meta: the manifest fields of the new bundle (a previous manifest when it has ``files``).
        entries: the new bundle's files ``{name: {path, sha256, role, precision}}``.
        remeasured: blocks of ``meta`` measured on the new files (``thresholds.series``,
            ``metrics``, ...; a parent such as ``thresholds`` covers its children).
        keep_stale: carry stale blocks over, recorded in :data:`STALE_KEY`, instead of refusing.
        known: ``(description, manifest)`` of bundles whose name and version may not be reused
            with other model files (the shipped bundle, the bundle being overwritten).

    Raises:
        ConfigError: a name + version clash, a stale block without ``keep_stale``, or a
            ``remeasured`` block the meta does not hold.
    """
    missing = [r for r in remeasured if get_key(meta, r) is None]
    if missing:
        raise ConfigError(f"{bundle_label(meta)}: --remeasured names {missing}, which the meta does not hold; give the "
                          f"values measured on the new files in the meta")
    clash = _identity_clash(meta, entries, known)
    if clash:
        raise ConfigError(clash)
    stale, changed = stale_blocks(meta, entries, remeasured)
    if stale and not keep_stale:
        listed = ", ".join(f"{b} (by {' and '.join(ks)})" for b, ks in sorted(stale.items()))
        raise ConfigError(
            f"{bundle_label(meta)}: built from a previous manifest (the meta lists 'files') whose model files changed "
            f"({'; '.join(f'{k}: {v}' for k, v in changed.items())}); these meta blocks were measured on the old files: "
            f"{listed}. For each, put the value measured "
            f"on the new files in the meta and name it with --remeasured BLOCK (write_bundle(remeasured=[...])), or "
            f"delete it from the meta, or pass --keep-stale-metadata to carry it over recorded as stale in the "
            f"manifest's {STALE_KEY!r}")
    before = meta.get(STALE_KEY) if isinstance(meta.get(STALE_KEY), Mapping) else {}
    blocks = {b: v for b, v in dict(before.get("blocks") or {}).items()
              if not _covered(b, remeasured) and get_key(meta, b) is not None}
    blocks.update({b: sorted(set(blocks.get(b, [])) | set(ks)) for b, ks in stale.items()})
    if not blocks:
        return None
    return {"from": before.get("from") or _source_label(meta, known),
            "blocks": dict(sorted(blocks.items())),
            "changed": {**dict(before.get("changed") or {}), **changed},
            "note": "carried over unchanged (--keep-stale-metadata) from a manifest whose model files changed since: "
                    "these numbers were measured on other files; re-measure them"}


# --- ONNX files ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelView:
    """What ONNX Runtime reports about one ONNX file: ``custom_metadata_map`` and graph inputs."""

    metadata: Mapping[str, str]
    inputs: Sequence[Tuple[str, Tuple[Any, ...]]]


def read_model(path: Path) -> ModelView:
    """Open ``path`` with ONNX Runtime (CPU, no graph optimisation: ~20 ms for the 13 MB
    classifier) for its metadata and inputs. Raises whatever ONNX Runtime raises."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ModelView(dict(sess.get_modelmeta().custom_metadata_map),
                     [(i.name, tuple(i.shape)) for i in sess.get_inputs()])


def _json(value: Optional[str]) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6)
    return a == b


def _manifest_value(manifest: Mapping[str, Any], key: str, default: Any) -> Tuple[Any, str]:
    """(value the runtime uses, how to show it): the manifest's, else the runtime default."""
    value = get_key(manifest, key)
    if value is None:
        return default, f"{json.dumps(_plain(default))} (key absent: the runtime default)"
    return value, json.dumps(_plain(value))


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


Mismatch = Tuple[str, Any, str, str]   # (ONNX key, ONNX value, manifest key, manifest value as shown)


def _compare(out: List[Mismatch], onnx_key: str, onnx_value: Any, manifest: Mapping[str, Any], key: str, default: Any) -> None:
    if onnx_value is None:
        return
    value, shown = _manifest_value(manifest, key, default)
    if not _same(onnx_value, _plain(value)):
        out.append((onnx_key, onnx_value, key, shown))


def _input_mismatches(manifest: Mapping[str, Any], view: ModelView, section: str, size: int, size_key: str) -> List[Mismatch]:
    """The graph input against ``inputs.<section>`` (name, shape) and the spatial size the runtime feeds."""
    out: List[Mismatch] = []
    if not view.inputs:
        return out
    name, shape = view.inputs[0]
    want_name = get_key(manifest, f"inputs.{section}.name")
    if want_name is not None and name != want_name:
        out.append(("graph input name", name, f"inputs.{section}.name", json.dumps(want_name)))
    spatial = [d for d in shape[2:] if isinstance(d, int) and d > 0]
    if spatial and any(d != size for d in spatial):
        out.append((f"graph input {name!r} shape", list(shape), size_key, str(size)))
    want = get_key(manifest, f"inputs.{section}.shape")
    if isinstance(want, list) and len(want) == len(shape):
        if any(isinstance(w, int) and isinstance(d, int) and d > 0 and w != d for w, d in zip(want, shape)):
            out.append((f"graph input {name!r} shape", list(shape), f"inputs.{section}.shape", json.dumps(want)))
    return out


def _meta_preprocessing(view: ModelView) -> Mapping[str, Any]:
    """The file's ``ctsdk.preprocessing`` metadata as a mapping ({} when absent or not an object)."""
    meta_pre = _json(view.metadata.get("ctsdk.preprocessing"))
    return meta_pre if isinstance(meta_pre, Mapping) else {}


def _classifier_mismatches(manifest: Mapping[str, Any], view: ModelView) -> List[Mismatch]:
    pre = Preprocessing()
    typed = Preprocessing.from_manifest(manifest)
    meta_pre = _meta_preprocessing(view)
    out: List[Mismatch] = []
    _compare(out, "ctsdk.preprocessing.window_hu", meta_pre.get("window_hu"), manifest, "preprocessing.classifier.window",
             pre.classifier_window)
    _compare(out, "ctsdk.preprocessing.size", meta_pre.get("size"), manifest, "preprocessing.classifier.size", pre.classifier_size)
    _compare(out, "ctsdk.preprocessing.mean", meta_pre.get("mean"), manifest, "preprocessing.classifier.mean", pre.classifier_mean)
    _compare(out, "ctsdk.preprocessing.std", meta_pre.get("std"), manifest, "preprocessing.classifier.std", pre.classifier_std)
    classes = _json(view.metadata.get("ctsdk.classes"))
    _compare(out, "ctsdk.classes", classes, manifest, "classes", None)
    if get_key(manifest, "preprocessing.classifier.onnx_classes") is not None:
        _compare(out, "ctsdk.classes", classes, manifest, "preprocessing.classifier.onnx_classes", None)
    positive = manifest.get("positive_class")
    if isinstance(classes, list) and positive is not None and positive not in classes:
        out.append(("ctsdk.classes", classes, "positive_class", json.dumps(positive)))
    # channel layout: the two vocabularies differ ("grey" vs "grey (lung window)"), so the count is compared
    channels, want = meta_pre.get("channels"), get_key(manifest, "inputs.classifier.channels")
    if isinstance(channels, list) and isinstance(want, list) and len(channels) != len(want):
        out.append(("ctsdk.preprocessing.channels", channels, "inputs.classifier.channels", json.dumps(want)))
    out.extend(_input_mismatches(manifest, view, "classifier", typed.classifier_size,
                                 "preprocessing.classifier.size" if get_key(manifest, "preprocessing.classifier.size") is not None
                                 else "preprocessing.classifier.size (absent: the runtime default)"))
    return out


def _lungs_mismatches(manifest: Mapping[str, Any], view: ModelView) -> List[Mismatch]:
    typed = Preprocessing.from_manifest(manifest)
    meta_pre = _meta_preprocessing(view)
    out: List[Mismatch] = []
    _compare(out, "ctsdk.preprocessing.window_hu", meta_pre.get("window_hu"), manifest, "preprocessing.lungs.window",
             typed.segmenter_window)
    size_key = next((k for k in ("preprocessing.lungs.size", "inputs.lungs.shape") if get_key(manifest, k) is not None),
                    "inputs.lungs.shape (absent: the runtime default)")
    if meta_pre.get("size") is not None and not _same(meta_pre.get("size"), typed.segmenter_size):
        out.append(("ctsdk.preprocessing.size", meta_pre.get("size"), size_key, str(typed.segmenter_size)))
    out.extend(_input_mismatches(manifest, view, "lungs", typed.segmenter_size, size_key))
    return out


def _source_problem(name: str, entry: Mapping[str, Any], view: ModelView, entries: Entries, root: Optional[Path]) -> Optional[str]:
    """A derived file (``ctsdk.source_sha256``) must come from the bundle's own source file."""
    want = str(view.metadata.get("ctsdk.source_sha256", "")).lower()
    if not want:
        return None
    role = str(entry.get("role"))
    of = view.metadata.get("ctsdk.features_of")
    if of:
        have = {Path(str(e.get("path"))).name: str(e.get("sha256")).lower() for e in entries.values()}.get(of)
        if have != want:
            held = "does not hold it" if have is None else f"holds it as sha256 {have[:12]}"
            return (f"ONNX ctsdk.features_of = {of!r} with ctsdk.source_sha256 {want[:12]}, but the bundle {held}: derived from "
                    f"another classifier; re-derive it: `python -m sdk.export.features --bundle {root or '<bundle>'}`")
        return None
    if role not in ("classifier", "lungs") or precision_of(role, str(entry.get("precision", ""))) == "fp32":
        return None
    fp32 = {str(e.get("sha256")).lower(): str(e.get("path")) for e in entries.values()
            if str(e.get("role")) == role and precision_of(role, str(e.get("precision", ""))) == "fp32"}
    if fp32 and want not in fp32:
        return (f"ONNX ctsdk.source_sha256 = {want[:12]} (the FP32 file it was converted from), but the bundle's role-{role!r} "
                f"FP32 file {', '.join(sorted(fp32.values()))} is sha256 {', '.join(s[:12] for s in sorted(fp32))}: it belongs to "
                f"another model; re-export it from this FP32 file or leave it out")
    return None


def model_problems(manifest: Mapping[str, Any], name: str, entries: Entries, view: ModelView,
                   root: Optional[Path] = None) -> List[str]:
    """Everything the manifest says about file ``name`` that its ONNX metadata / graph input
    contradict, one message per problem (bundle, file, both keys and values, what to do).

    Checked where both sides are present: role "classifier" and "classifier_features": the
    window, size, mean/std, classes (and positive class), channel count and graph input against
    ``preprocessing.classifier`` / ``inputs.classifier`` / ``classes``; role "lungs": window and size
    (when recorded) and the graph input against ``preprocessing.lungs`` / ``inputs.lungs``; every
    file: ``ctsdk.precision`` against its ``files`` entry, and a derived file's
    ``ctsdk.source_sha256`` against the file it was derived from."""
    entry = entries[name]
    role = str(entry.get("role", "other"))
    where = f"{(root / str(entry.get('path'))) if root else entry.get('path')}: {bundle_label(manifest)}"
    mism: List[Mismatch] = []
    if role in ("classifier", "classifier_features"):
        mism = _classifier_mismatches(manifest, view)
    elif role == "lungs":
        mism = _lungs_mismatches(manifest, view)
    prec = view.metadata.get("ctsdk.precision")
    if prec is not None and prec != precision_of(role, str(entry.get("precision", ""))):
        mism.append(("ctsdk.precision", prec, f"files.{name}.precision", json.dumps(entry.get("precision", ""))))
    out = [f"{where}: ONNX {ok} = {json.dumps(_plain(ov))} but manifest {mk} = {mv}; the runtime feeds and reads what the "
           f"manifest says - re-export the model with the manifest's values (ctsdk export) or correct the manifest key"
           for ok, ov, mk, mv in mism]
    src = _source_problem(name, entry, view, entries, root)
    if src:
        out.append(f"{where}: {src}")
    return out


def check_model_files(root: Path, manifest: Mapping[str, Any], entries: Entries) -> Tuple[List[str], List[str]]:
    """(problems, warnings) of every ``.onnx`` file of the bundle at ``root`` (:func:`model_problems`);
    a file ONNX Runtime cannot open is a warning (its metadata is not checked)."""
    problems: List[str] = []
    warnings: List[str] = []
    for name, entry in sorted(entries.items()):
        path = root / str(entry.get("path"))
        if path.suffix != ".onnx" or str(entry.get("role")) in ("card", "report"):
            continue
        try:
            view = read_model(path)
        except Exception as exc:  # not an ONNX file ORT can open: nothing to compare
            warnings.append(f"{path}: {bundle_label(manifest)}: ONNX Runtime cannot open it ({type(exc).__name__}); its metadata "
                            f"was not checked against the manifest")
            continue
        problems.extend(model_problems(manifest, name, entries, view, root))
    return problems, warnings


def check_session(bundle: Any, session: Any, role: str = "classifier") -> None:
    """A session :class:`sdk.Triage` opened (the ``classifier``, or the 2D ``lungs`` U-Net) against
    its bundle's manifest: the session's own metadata (``OrtSession.metadata``, read by ONNX Runtime
    when it loaded the file) and input specs; nothing is read from disk. TensorRT sessions carry no
    ONNX metadata: only their inputs are compared.

    Raises:
        BundleError: naming the bundle, the file, the ONNX and manifest keys and both values.
    """
    entries = {k: f.to_dict() for k, f in bundle.files.items()}
    fname = Path(str(getattr(session, "path", "") or "")).name
    name = next((k for k, e in entries.items() if e["role"] == role and Path(e["path"]).name == fname), None)
    if name is None:   # e.g. a TensorRT engine: the bundle file of the precision it runs
        prec = str(getattr(getattr(session, "info", None), "precision", "") or "")
        name = next((k for k, e in entries.items()
                     if e["role"] == role and precision_of(role, e["precision"]) == prec), None)
    if name is None:
        return
    inputs = [(str(t.name), tuple(t.shape)) for t in getattr(session, "inputs", [])]
    problems = model_problems(bundle.manifest, name, entries, ModelView(dict(getattr(session, "metadata", None) or {}), inputs),
                              bundle.root)
    if problems:
        raise BundleError("; ".join(problems))


__all__ = ["MEASURED_ON", "ModelView", "STALE_KEY", "bundle_label", "changed_models", "check_session",
           "check_model_files", "check_rebuild", "get_key", "load_warnings", "is_stale", "model_key", "model_problems", "read_model",
           "stale_blocks", "threshold_problem", "verdict_problems"]
