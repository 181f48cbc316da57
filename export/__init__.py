"""PyTorch -> ONNX export, FP16 conversion and TensorRT engine building (installed as sdk.export)."""
