"""rtn: llama.cpp's round-to-nearest, tensor by tensor; no calibration (byte-identical to llama-quantize)."""
from moeq2gguf.methods.base import Method, register, round_to_nearest


class RoundToNearest(Method):
    name = "rtn"
    summary = "llama.cpp's round-to-nearest"
    calibrated = False

    def quantize(self, w, qtype, stats, input_name, gptq):
        return round_to_nearest(w, qtype)


register(RoundToNearest())
