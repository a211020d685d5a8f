"""moequant: GPTQ with affinity-weighted per-expert Hessians (MoEQuant's AGQ: each token's contribution to an
expert's Hessian weighted by the routing weight the runtime multiplies that expert's output by) and coverage of
rare experts (fewer tokens than inputs: blended with the layer's pooled Hessian); on the rotated model by default
(docs/METHODS.md)."""
from moeq2gguf.methods.base import register
from moeq2gguf.methods.gptq import GPTQ


class MoEQuant(GPTQ):
    name = "moequant"
    summary = "GPTQ with affinity-weighted Hessians, rare experts covered, rotated by default"
    affinity = True
    blend_rare = True
    # lowest mean KLD of {gptq, moequant} x {none, rotate, smooth, rotate+smooth} on the bundled models
    # (BENCHMARKS.md, "moequant's default recipe")
    rotates_by_default = True


register(MoEQuant())
