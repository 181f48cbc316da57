#!/bin/bash
# call B: start the 3D U-Net training (GPU, background), install the wheels, start the pycuda build (background)
source .cache/device/bin/env.sh
mkdir -p $D/unet3d_out
[ -n "${TRAIN_UNET:-}" ] && setsid nohup python3 $D/unet3d/train_gpu.py --data $D/unet3d --out $D/unet3d_out --seconds ${UNET_SECONDS:-170} > $D/unet3d_train.log 2>&1 < /dev/null &
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $D/sitepkgs $D/whl/*.whl 2>&1 | grep -v WARNING | tail -3
setsid nohup bash $D/bin/build_pycuda.sh > $D/pycuda_build.log 2>&1 < /dev/null &
python3 -c "import pydicom, pylibjpeg, gdcm, xgboost, onnxruntime, highdicom, pynetdicom; print('imports ok: ort', onnxruntime.__version__, onnxruntime.get_available_providers())"
sleep 20; echo '--- unet3d log'; tail -5 $D/unet3d_train.log; echo '--- pycuda log'; tail -3 $D/pycuda_build.log
