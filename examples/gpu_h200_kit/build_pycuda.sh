#!/bin/bash
# run from the repo root on the GPU machine: builds pycuda from the carried sdist into .cache/device/pycuda_site
source .cache/device/bin/env.sh
set -e
cd /tmp && rm -rf pycuda-2026.1 && tar xzf $D/whl/pycuda-2026.1.tar.gz && cd pycuda-2026.1
python3 configure.py --cuda-root=/usr/local/cuda
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target $D/pycuda_site .
echo PYCUDA_BUILD_DONE
