"""Export a trained checkpoint to serving artifacts (TorchScript, ONNX, TensorRT) with parity checks.

`model_export.manifest` is standard-library only: the service imports it to read artifacts.
"""
