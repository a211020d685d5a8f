"""Expert Hadamard (docs/METHODS.md section 8): rotate each routed expert's intermediate activation.

The patched llama.cpp (runtime_patches/) multiplies every expert's intermediate activation
h = act(x W_gate^T) * (x W_up^T), a row of n_ff, by H = diag(H_b, ..., H_b) before the down projection:
H_b is the orthonormal Walsh-Hadamard matrix of order b in Sylvester's order (llama.cpp's ggml_gen_hadamard,
executed as a fast Walsh-Hadamard transform), b a power of two dividing n_ff. H is symmetric and orthogonal
(H H = I), so writing ffn_down_exps_e as W_e H (each row w -> w H, i.e. the columns mixed blockwise) keeps
every output exact in float: (W_e H)(H h) = W_e h. The rotation spreads the outlier channels that SiLU * up
creates over their block, which no offline fold reaches, so the down projections quantize better.

Block size: llama.cpp's transform needs a power of two, so b is the largest power of two dividing n_ff, at
most MAX_BLOCK = 512 (Qwen1.5-MoE's 1408 gets 11 blocks of 128, Mixtral's 14336 28 blocks of 512). The cap is
where llama.cpp's CUDA and Metal kernels stop running the transform in place: above it they multiply by the
dense b x b matrix (an H200, a Mixtral-8x7B-shaped file, b = 2048: prompt 0.89x the plain file's, where
smoothing alone ran at 1.02x; with b = 512, 0.985x: BENCHMARKS.md). hadamard_block(n_ff, max_block=None) gives
the uncapped block.

The file announces it with `<arch>.expert_hadamard_block = b` and carries `ffn_exps_hadamard`, the F32
matrix H_b: stock llama.cpp has no use for that tensor and refuses the file ("wrong number of tensors"),
so a rotated file can never run unrotated.
"""
from __future__ import annotations

import dataclasses
import logging

import gguf
import torch

from moeq2gguf.errors import Moeq2ggufError
from moeq2gguf.models.base import ModelSpec, TensorSource
from moeq2gguf.nn.hadamard import apply_blocks, hadamard_matrix  # noqa: F401  (re-exported: the transform's math)

log = logging.getLogger(__name__)

MARKER = "ffn_exps_hadamard"           # GGUF tensor: H_b, [b, b] F32
KEY = "{arch}.expert_hadamard_block"   # GGUF uint32: b
MAX_BLOCK = 512                        # the largest b that llama.cpp's GPU kernels transform in place
DOWN = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_DOWN_EXP].removeprefix("blk.{bid}.")   # ffn_down_exps


def hadamard_block(n_ff: int, max_block: int | None = MAX_BLOCK) -> int:
    """The largest power of two dividing n_ff, at most max_block (a power of two; None: no cap)."""
    if max_block is not None and (max_block < 2 or max_block & (max_block - 1)):
        raise Moeq2ggufError(f"expert Hadamard block cap {max_block} is not a power of two >= 2; give e.g. 512")
    block = n_ff & -n_ff
    if max_block is not None:
        block = min(block, max_block)
    if block < 2:
        raise Moeq2ggufError(f"expert width {n_ff} is odd: no power-of-two Hadamard block divides it; "
                             "convert without --expert-hadamard")
    return block


def expert_hadamard_sources(sources: list[TensorSource], spec: ModelSpec, block: int) -> list[TensorSource]:
    """ffn_down_exps_e -> W_e H for every MoE layer, plus the marker tensor H_b at the end."""
    if spec.expert_width % block:
        raise Moeq2ggufError(f"expert Hadamard block {block} does not divide the expert width {spec.expert_width}")
    out, n_rotated = [], 0
    for s in sources:
        parts = s.name.split(".")
        if parts[0] == "blk" and ".".join(parts[2:]) == f"{DOWN}.weight":
            assert s.shape[-1] % block == 0, f"{s.name} {s.shape}: block {block} does not divide its input width"

            def load(s: TensorSource = s) -> torch.Tensor:
                return apply_blocks(s.load().reshape(s.shape), block)
            # new values: raw GGML blocks the checkpoint held (MXFP4) no longer describe them
            out.append(dataclasses.replace(s, load=load, raw_qtype=None, load_raw=None))
            n_rotated += 1
        else:
            out.append(s)
    if n_rotated == 0:
        raise Moeq2ggufError(f"--expert-hadamard: the {spec.gguf_arch} file has no {DOWN} tensors to rotate")
    out.append(TensorSource(MARKER, (block, block), "norm", lambda: hadamard_matrix(block).to(torch.float32)))
    log.info("expert Hadamard: %d ffn_down_exps tensors times diag(H_%d) (%d blocks of the expert width %d)",
             n_rotated, block, spec.expert_width // block, spec.expert_width)
    return out


def add_metadata(writer: gguf.GGUFWriter, arch: str, block: int) -> None:
    writer.add_uint32(KEY.format(arch=arch), block)
