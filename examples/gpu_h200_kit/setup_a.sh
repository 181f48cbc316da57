#!/bin/bash
# call A: unpack the carried onnxruntime-gpu (sm_90 cubins only) into .cache/device/site and check
# that a Conv really runs on the CUDA provider. Carry: .cache/device/ort .cache/device/bin
source .cache/device/bin/env.sh
verify ort
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || { echo "KIT STOP: no nvidia-smi / GPU"; exit 3; }
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)
[ "$cc" = "9.0" ] || echo "WARNING: compute capability $cc: the carried CUDA provider keeps only sm_90 cubins (H100/H200); expect a failure below"
rm -rf "$D/site" && mkdir -p "$D/site"
t0=$SECONDS
tar -xJf "$D/ort/ortgpu90.tar.xz" -C "$D/site" || { echo "KIT STOP: the onnxruntime-gpu archive did not unpack"; exit 3; }
echo "unpacked onnxruntime-gpu in $((SECONDS - t0)) s: $(du -sh "$D/site" | cut -f1)"
timeout 120 python3 "$D/bin/ort_probe.py"; rc=$?
echo "ort_probe rc $rc (0 = CUDAExecutionProvider granted and matches the CPU)"
exit $rc
