"""Checks that the carried onnxruntime-gpu (sm_90-only fatbin) really runs conv kernels on the GPU."""
import time, numpy as np, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
print("ort", ort.__version__, ort.__file__, ort.get_available_providers(), flush=True)
rng = np.random.default_rng(0)
w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
g = helper.make_graph(
    [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
    "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 64, 64])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 9
b = m.SerializeToString()
x = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
cpu = ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
s = ort.InferenceSession(b, providers=["CUDAExecutionProvider"])
print("granted", s.get_providers(), flush=True)
y = s.run(None, {"x": x})[0]
t = time.perf_counter(); [s.run(None, {"x": x}) for _ in range(20)]; dt = (time.perf_counter() - t) / 20
print("max|cuda-cpu|", float(np.abs(y - cpu).max()), "ms/run", round(dt * 1e3, 3), flush=True)
assert s.get_providers()[0] == "CUDAExecutionProvider" and np.abs(y - cpu).max() < 1e-3
print("ORT-GPU OK")
