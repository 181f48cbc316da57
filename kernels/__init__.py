"""CUDA kernels (resample, mask weights, masked GAP), their bindings and CPU harness (installed as sdk.kernels)."""
