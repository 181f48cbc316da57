#!/bin/bash
# call B: install the carried wheels (pydicom, the pylibjpeg family, python-gdcm, imagecodecs,
# xgboost-cpu, pynetdicom, highdicom, pyjpegls, polygraphy) into .cache/device/sitepkgs.
# Carry: .cache/device/whl .cache/device/bin   (needs call A's .cache/device/site on this machine)
source .cache/device/bin/env.sh
need ort; verify whl
rm -rf "$D/sitepkgs"
t0=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$D/sitepkgs" "$D"/whl/*.whl 2>&1 | grep -v WARNING | tail -3
python3 -c "import pydicom, pylibjpeg, gdcm, imagecodecs, xgboost, onnxruntime, highdicom, pynetdicom, polygraphy; print('imports ok in', $((SECONDS - t0)), 's: ort', onnxruntime.__version__, onnxruntime.get_available_providers(), 'imagecodecs', imagecodecs.__version__)" \
    && touch "$D/sitepkgs/.installed" || { echo "KIT STOP: the wheels did not import"; exit 3; }
