#!/usr/bin/env bash
# One short GPU-machine session for the runtime work of issue 13: the gpu-marked tests of the ORT
# CUDA session and the kernels (CuPy and pycuda; includes the pycuda clean-exit check), then the
# one-command GPU report. Each step's exit status is printed; a failing step does not stop the next.
#
#   PYTHONPATH=/opt/ortgpu:/opt/ctsdk LD_LIBRARY_PATH=... REPO=/path/to/checkout OUT=/tmp/gpu-out \
#       bash examples/gpu_check.sh
#
# REPO: the checkout (for the tests); ctsdk itself is imported from PYTHONPATH (an installed copy).
set -u
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
OUT=${OUT:-/tmp/gpu-out}
ROUNDS=${ROUNDS:-5}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
cd /tmp || exit 1
"$PY" -c "import sdk, onnxruntime as o; print('sdk from', sdk.__file__); print('onnxruntime', o.__version__, o.__file__, o.get_available_providers())"
timeout 300 "$PY" -m pytest -c "$REPO/pyproject.toml" --rootdir "$REPO" --import-mode=importlib -p no:cacheprovider \
    -m gpu -rs -q "$REPO/tests/test_runtime.py" "$REPO/tests/test_kernels_gpu.py" 2>&1 | tee "$OUT/pytest_gpu.txt"
echo "pytest -m gpu: exit ${PIPESTATUS[0]}"
timeout 480 "$PY" -m sdk.bench.gpu_report --out "$OUT/report" --rounds "$ROUNDS" 2>&1 | tee "$OUT/gpu_report.txt"
echo "gpu_report: exit ${PIPESTATUS[0]} (0 also means no abort at interpreter exit)"
ls -la "$OUT/report"
