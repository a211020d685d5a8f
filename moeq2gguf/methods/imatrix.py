"""imatrix: llama.cpp's importance-weighted quantizer on per-expert mean x^2, collected on the float model as
llama-imatrix collects it (the output projection left out, as llama-imatrix does without --process-output)."""
from moeq2gguf.methods.base import Method, register, round_to_nearest
from moeq2gguf.quant.tensor_quant import imatrix_importance


class Imatrix(Method):
    name = "imatrix"
    summary = "llama.cpp's importance-weighted quantizer on our statistics"
    calibrates_head = False

    def quantize(self, w, qtype, stats, input_name, gptq):
        return round_to_nearest(w, qtype, imatrix_importance(stats, input_name), method="imatrix")


register(Imatrix())
