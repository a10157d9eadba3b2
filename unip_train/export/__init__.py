"""``unip-export``: fine-tuned models for deployment outside PyTorch (ONNX)."""
