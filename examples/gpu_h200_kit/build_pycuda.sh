#!/bin/bash
# started by setup_c.sh on the GPU machine (repo root): builds pycuda from the carried sdist into
# .cache/device/pycuda_site; its log ends with PYCUDA_BUILD_DONE or PYCUDA_BUILD_FAILED (run_d.sh waits for either)
source .cache/device/bin/env.sh
trap '[ -n "${ok:-}" ] || echo PYCUDA_BUILD_FAILED' EXIT
set -e
cd /tmp && rm -rf pycuda-2026.1 && tar xzf $D/pycuda/pycuda-2026.1.tar.gz && cd pycuda-2026.1
python3 configure.py --cuda-root=/usr/local/cuda
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target $D/pycuda_site .
ok=1; echo PYCUDA_BUILD_DONE
