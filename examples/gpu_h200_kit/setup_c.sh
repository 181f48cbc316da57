#!/bin/bash
# call C: the data (covid-P001 + the COVID-CT-MD labels) arrive; install pycuda's dependencies and
# start the pycuda build in the background (about 2 minutes; it must outlive this call: setsid).
# Carry: .cache/device/data .cache/device/pycuda .cache/device/bin   (needs calls A and B on this machine)
source .cache/device/bin/env.sh
need ort wheels; verify data pycuda
echo "data: $(ls "$D/data/dicom/covid-ct-md/covid-P001" | wc -l) files in covid-P001 (148 expected), labels: $(ls "$D/data/dicom/covid-ct-md/labels" | wc -l) files"
rm -rf "$D/pycuda_site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$D/pycuda_site" "$D"/pycuda/*.whl 2>&1 | grep -v WARNING | tail -3
setsid nohup bash "$D/bin/build_pycuda.sh" > "$D/pycuda_build.log" 2>&1 < /dev/null &
sleep 3; echo "--- pycuda build started:"; tail -2 "$D/pycuda_build.log"
