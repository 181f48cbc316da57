"""INT8 2D lung U-Net: which lung U-Net runs (issue 15).

The file ``lungs_int8.onnx`` and its Dice gate (the manifest's ``lungs_int8`` block) are built by
:mod:`sdk.calibration.lungs` (``python -m sdk.calibration.lungs --bundle ...``; what it
quantises, on which slices, and the gate's criteria are described there). A file whose gate
failed is never picked by ``lungs_precision="auto"``.

Run-time choice (:func:`choose_lungs_precision`, used by :class:`sdk.Triage`): the lung session
follows the classifier: INT8 when the classifier runs INT8 on the CPU and the bundle's
``lungs_int8`` passed, FP32 otherwise; ``lungs_precision="fp32"|"int8"`` overrides.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Tuple

from ..bundle import LUNGS_INT8_KEY
from ..bundle import lungs_int8_gate_passed as gate_passed  # noqa: F401 - the bundle reads its manifest
from ..errors import BundleError, ConfigError

#: file name, manifest ``files`` key and manifest block of the INT8 U-Net
INT8_FILE = "lungs_int8.onnx"
FILES_KEY = MANIFEST_KEY = LUNGS_INT8_KEY
LUNGS_PRECISIONS = ("auto", "fp32", "int8")


# --- run-time choice ---------------------------------------------------------------------------------
def choose_lungs_precision(lungs_precision: str, classifier_precision: str, classifier_on_cpu: bool,
                           lungs_files: Mapping[str, Any], int8_passed: bool) -> Tuple[str, List[str]]:
    """Precision of the 2D lung U-Net and the reasons (for ``Triage.runtime_reasons``).

    Args:
        lungs_precision: "auto" | "fp32" | "int8" (``Triage(lungs_precision=...)``).
        classifier_precision: what the classifier session really runs ("fp32", "int8", ...).
        classifier_on_cpu: the classifier runs on the CPU (ORT CPU provider).
        lungs_files: {precision: path} of the bundle's role-"lungs" files.
        int8_passed: the bundle's ``lungs_int8`` gate passed (:func:`gate_passed`).

    Raises:
        ConfigError: unknown ``lungs_precision``.
        BundleError: "int8" asked but the bundle has no INT8 lung U-Net, or no FP32 one when needed.
    """
    if lungs_precision not in LUNGS_PRECISIONS:
        raise ConfigError(f"lungs_precision {lungs_precision!r} not in {LUNGS_PRECISIONS}")
    has_int8 = "int8" in lungs_files
    if lungs_precision == "int8":
        if not has_int8:
            raise BundleError(f"lungs_precision='int8' but the bundle has no INT8 lung U-Net ({INT8_FILE}); "
                              f"build it with `python -m sdk.calibration.lungs --bundle <bundle>`")
        if int8_passed:
            return "int8", ["lungs: int8 U-Net (lungs_precision='int8'; its Dice gate passed)"]
        return "int8", ["lungs: int8 U-Net although its Dice gate did NOT pass (manifest lungs_int8); "
                        "lungs_precision='int8' asked for it"]
    reasons: List[str] = []
    if lungs_precision == "fp32":
        reasons.append("lungs: fp32 U-Net (lungs_precision='fp32')")
    elif classifier_precision == "int8" and classifier_on_cpu:
        if has_int8 and int8_passed:
            return "int8", ["lungs auto -> int8: the classifier runs INT8 on the CPU and lungs_int8 passed its Dice gate"]
        why = f"the bundle has no {INT8_FILE}" if not has_int8 else "lungs_int8 did not pass its Dice gate"
        reasons.append(f"lungs auto -> fp32: the classifier runs INT8 on the CPU but {why}")
    if "fp32" not in lungs_files and "" not in lungs_files:
        raise BundleError(f"the bundle has no FP32 lung U-Net (role 'lungs'; has {sorted(lungs_files)})")
    return "fp32", reasons


def stage_name(method: str, precision: Optional[str]) -> str:
    """``runtime["stages"]["lungs"]`` on the host path: "hybrid-unet2d-ort-cpu-int8", "unet2d-ort-cpu-fp32",
    "classical-cpu", "unet3d-ort-cpu-fp32", "hybrid-unet3d-ort-cpu-fp32+classical-cpu" - the kernel path
    (:mod:`sdk.device_path`) writes the same names with its own device."""
    if method == "unet3d":  # the 3D U-Net (FP32 on the host) alone
        return "unet3d-ort-cpu-fp32"
    if method == "hybrid3d":  # the 3D U-Net (FP32 on the host) + the hybrid's classical steps
        return "hybrid-unet3d-ort-cpu-fp32+classical-cpu"
    if precision is None or method == "classical":
        return f"{method}-cpu"
    net = f"unet2d-ort-cpu-{precision}"
    return net if method == "unet2d" else f"{method}-{net}"
