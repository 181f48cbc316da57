"""Lung U-Net cost, FP32 vs INT8: process CPU ms for 75 slices, 1 thread, batch 8, median of 5 alternating.

    .venv/bin/python examples/lungs_net_cpu.py   # the default bundle's lungs_fp32.onnx / lungs_int8.onnx
                                                 # (lungs_int8.onnx: python -m sdk.calibration.lungs)
"""
import time, numpy as np
from sdk.runtime.ort import OrtSession
from sdk.lungs.unet2d import DEFAULT_ONNX
x=np.random.default_rng(0).random((75,1,128,128),dtype=np.float32)
S={"fp32":OrtSession(DEFAULT_ONNX,threads=1,precision="fp32"),"int8":OrtSession(DEFAULT_ONNX.with_name("lungs_int8.onnx"),threads=1,precision="int8")}
for s in S.values(): s.infer_batched(x,batch=8)
res={k:[] for k in S}
for r in range(5):
    for k,s in S.items():
        c=time.process_time(); s.infer_batched(x,batch=8,prefetch=False); res[k].append((time.process_time()-c)*1e3)
print({k:round(float(np.median(v))) for k,v in res.items()}, "ms CPU, 75 slices, 1 thread")
