"""Export: torch model -> self-describing ONNX bundle, parity check, TensorRT engines."""
