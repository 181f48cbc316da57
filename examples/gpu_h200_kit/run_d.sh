#!/bin/bash
# call D: the GPU checks. Carry: .cache/device/bin .cache/device/bundle .cache/device/docs (the bundle's
# ONNX files and docs/ that hold_bundle.sh took out of the working tree for calls A-C; copied back into
# sdk/bundles/default and docs/ here; when the tree already has them, nothing is copied).
# Needs calls A-C on this (still warm) machine; stops in seconds (exit 3) when they are missing.
#
# Time: the whole script stays inside BUDGET_S (default 420 s; give the device call timeout_s 480):
#   1. environment + `ctsdk info --json` (what Triage() picks on the GPU and why)       ~30 s
#   2. the GPU report (REPORT_S, default 240 s; ~180 s with three --lungs sections)
#   3. the test suite, -n 12, with what is left (at most PYTEST_S, default 200 s; cut with SIGINT
#      so pytest still prints its summary), after waiting for call C's pycuda build
# Options (environment): ROUNDS=5, LUNGS=auto,hybrid,hybrid3d, SECTIONS=environment,kernels,ort,triage,
#   PYTEST_ARGS (default: the whole suite; e.g. "-m gpu" for the GPU tests only), SKIP_PYTEST=1.
# $OUT gets results.tar.gz (rewritten after every step, so a run cut by the tool still returns what
# it did) and run_d.log. The report's gpu.md shows one Triage section per lung method (auto, hybrid,
# hybrid3d); report/gpu_report.json holds them as "triage", "triage-hybrid", "triage-hybrid3d".
source .cache/device/bin/env.sh
if [ ! -f sdk/bundles/default/classifier_fp16.onnx ] && ls $D/bundle/*.onnx > /dev/null 2>&1; then
    cp $D/bundle/*.onnx sdk/bundles/default/ && echo "bundle: $(ls $D/bundle/*.onnx | wc -l) carried ONNX files copied into sdk/bundles/default"
fi
if [ ! -d docs ] && [ -d $D/docs ]; then  # docs/ held out for calls A-C (the suite checks its commands and links)
    cp -r $D/docs docs && echo "docs: carried docs/ copied back ($(find docs -type f | wc -l) files)"
fi
need ort wheels data bundle docs
exec > >(tee -a "$OUT/run_d.log") 2>&1
BUDGET_S=${BUDGET_S:-420}; REPORT_S=${REPORT_S:-240}; PYTEST_S=${PYTEST_S:-200}
R=/tmp/ctsdk_results; rm -rf $R; mkdir -p $R
P001=$D/data/dicom/covid-ct-md/covid-P001
pack() { tar -C $R -czf "$OUT/results.tar.gz" . && echo "[${SECONDS}s] packed $OUT/results.tar.gz ($(du -k "$OUT/results.tar.gz" | cut -f1) kB)"; }
left() { echo $((BUDGET_S - SECONDS)); }
{ date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null; echo "BUDGET_S=$BUDGET_S REPORT_S=$REPORT_S PYTEST_S=$PYTEST_S ROUNDS=${ROUNDS:-5} LUNGS=${LUNGS:-auto,hybrid,hybrid3d} PYTEST_ARGS=${PYTEST_ARGS:-}"; } > $R/kit.txt
{ nvidia-smi; python3 -c "import onnxruntime as o, cupy, numpy, torch; print('ort', o.__version__, o.__file__, o.get_available_providers(), 'cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__)"; } > $R/env.txt 2>&1
tail -2 $R/env.txt
# what ctsdk sees there and what sdk.Triage() picks on the GPU, with its reasons
timeout 60 python3 -c "from sdk.cli import main; main()" info --json > $R/info.json 2> $R/info.err; echo "[${SECONDS}s] ctsdk info rc $?"
pack

echo "=== [${SECONDS}s] GPU report (timeout $REPORT_S s)"
timeout -k 10 $REPORT_S python3 -m sdk.bench.gpu_report --out $R/report --series $P001 --rounds ${ROUNDS:-5} --backends cupy \
    --lungs ${LUNGS:-auto,hybrid,hybrid3d} --sections ${SECTIONS:-environment,kernels,ort,triage} > $R/report.log 2>&1
echo "[${SECONDS}s] report rc $? (0 = every section ran or said why not, and no abort at exit; 1 = a section failed: report/gpu.md says which; 2 = a bad option; 124 = cut by the timeout: report/gpu_report.json holds the sections done)"
tail -12 $R/report.log
pack

if [ -n "${SKIP_PYTEST:-}" ]; then echo "pytest skipped (SKIP_PYTEST)"; else
    for i in $(seq 1 30); do  # call C's build: done, failed, or out of time
        grep -qE "PYCUDA_BUILD_(DONE|FAILED)" $D/pycuda_build.log 2>/dev/null && break; [ $(left) -lt 60 ] && break; sleep 2; done
    echo "[${SECONDS}s] pycuda build: $(tail -1 $D/pycuda_build.log)"; cp $D/pycuda_build.log $R/
    python3 -c "import pycuda; print('pycuda', pycuda.VERSION)" >> $R/env.txt 2>&1
    T=$(( $(left) - 15 )); [ $T -gt $PYTEST_S ] && T=$PYTEST_S
    if [ $T -lt 30 ]; then echo "pytest skipped: $T s for it (BUDGET_S $BUDGET_S, $(left) s left, PYTEST_S $PYTEST_S)"; else
        echo "=== [${SECONDS}s] pytest (GPU machine, -n 12, ${PYTEST_ARGS:-whole suite}, timeout $T s)"
        timeout -s INT -k 20 $T python3 -m pytest -q -n 12 -p no:cacheprovider -rfEs --junitxml=$R/junit.xml ${PYTEST_ARGS:-} > $R/pytest.log 2>&1
        echo "[${SECONDS}s] pytest rc $? (124 = cut by the timeout)"
        grep -E "passed|failed|error" $R/pytest.log | tail -2; grep -E "^(FAILED|ERROR)" $R/pytest.log | cut -c1-300 | head -30
    fi
    pack
fi
ls -la "$OUT"
