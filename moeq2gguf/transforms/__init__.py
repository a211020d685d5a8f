"""Exact transforms of the model applied to the tensor sources before quantization (rotation)."""
