"""INT8 calibration: calibration sets from real slices, QDQ quantisation, accuracy reports
(installed as sdk.calibration).

    from sdk.calibration import CalibrationOptions, calibrate
    report = calibrate("classifier_fp32.onnx", "images_index.csv", "classifier_int8.onnx",
                       CalibrationOptions(n=256, method="all"))

onnxruntime.quantization and onnx are imported on first use.
"""
from __future__ import annotations

from sdk._lazy import lazy_exports

_LAZY = {
    "calibrate": ".quantize", "CalibrationOptions": ".quantize", "CalibrationReport": ".quantize", "quantize": ".quantize", "prepare": ".quantize",
    "benchmark": ".quantize", "sensitivity": ".quantize", "METHODS": ".quantize", "runtime_hints": ".quantize",
    "calibrate_ranges": ".quantize", "weight_bias_shift": ".quantize", "apply_bias_shift": ".quantize",
    "load_rows": ".dataset", "stratified_sample": ".dataset", "preprocessor": ".dataset", "Row": ".dataset",
    "HuRenderPreprocessor": ".dataset",
    "roc_auc": ".metrics", "binary_summary": ".metrics",
}
__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
