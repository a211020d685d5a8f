"""Passes over the model, layer by layer with one layer's weights resident: the layer loop (layers.py), the one
float calibration pass that every statistics consumer plugs into (calibration.py), and the sequential
quantization pass that streams the output's bytes in file order (quantize.py)."""
