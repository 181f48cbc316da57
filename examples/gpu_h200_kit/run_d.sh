#!/bin/bash
# call D: the GPU checks. Everything lands in $OUT (<= 8 files): results.tar.gz + the U-Net checkpoint + log.
source .cache/device/bin/env.sh
R=/tmp/ctsdk_results; rm -rf $R; mkdir -p $R
P001=$D/data/dicom/covid-ct-md/covid-P001
{ nvidia-smi; python3 -c "import onnxruntime as o, cupy, numpy, torch; print('ort', o.__version__, o.get_available_providers(), 'cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"; python3 -c "import pycuda; print('pycuda', pycuda.VERSION)"; tail -2 $D/pycuda_build.log; } > $R/env.txt 2>&1
tail -5 $R/env.txt
# what ctsdk sees there and what sdk.Triage() picks on the GPU, with its reasons
timeout 120 python3 -c "from sdk.cli import main; main()" info --json > $R/info.json 2> $R/info.err; echo "ctsdk info rc $?"
echo "=== unet3d training (only when TRAIN_UNET was set in call B)"; [ -n "${TRAIN_UNET:-}" ] && for i in $(seq 1 40); do [ -f $D/unet3d_out/train_log.json ] && break; sleep 3; done
tail -2 $D/unet3d_train.log; cp $D/unet3d_out/* $OUT/ 2>/dev/null; cp $D/unet3d_train.log $R/
for i in $(seq 1 45); do grep -q PYCUDA_BUILD_DONE $D/pycuda_build.log 2>/dev/null && break; sleep 2; done; echo "pycuda build: $(tail -1 $D/pycuda_build.log)"
echo "=== pytest (GPU machine, whole suite, -n 12)"
timeout ${PYTEST_S:-210} python3 -m pytest -q -n 12 -p no:cacheprovider -rfEs --junitxml=$R/junit.xml > $R/pytest.log 2>&1; echo "pytest rc $?"
grep -E "passed|failed" $R/pytest.log | tail -2; grep -E "^(FAILED|ERROR)" $R/pytest.log | cut -c1-300 | head -30
echo "=== GPU report"
timeout ${REPORT_S:-250} python3 -m sdk.bench.gpu_report --out $R/report --series $P001 --rounds ${ROUNDS:-5} --backends cupy --lungs auto,hybrid,hybrid3d > $R/report.log 2>&1; echo "report rc $?"; tail -25 $R/report.log
tar -C $R -czf $OUT/results.tar.gz .
ls -la $OUT
