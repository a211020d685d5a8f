"""Random-weight GGUF files with the shapes of a real MoE model, for speed measurements that the bundled tiny models
cannot make (at n_embd 256 a GPU's launch overheads hide the kernels: issue 9's CUDA overhead check).

    python tools/synth_moe_gguf.py TEMPLATE.gguf OUT.gguf --shape qwen1.5-moe-a2.7b[:8] [--mix Q4_K_M]

TEMPLATE is a file that moeq2gguf converted from a bundled model of the same architecture, with the options the
output should have (plain, --smooth per-expert, --expert-hadamard), or its skeleton (skeleton(): the same without
weights, `--skeleton TEMPLATE OUT` writes one): OUT keeps its metadata (tokenizer, the
patched-runtime keys) and its tensor names, with the hyperparameters and every tensor's shape of SHAPE and
LAYERS blocks (each block has the tensors of the template's block 0). Types follow llama-quantize's rules for
--mix at the new shapes (moeq2gguf.plan.mixes). Each quantized tensor's rows are drawn from a pool of 64 Gaussian rows
(std 1/sqrt(row length)) that ggml's own quantizer encoded (moeq2gguf.formats.ggml_ref: the libggml-base of
LLAMA_CPP_LIB_PATH, else llama-cpp-python's), so every block is a valid block of its type; norms are 1, biases and
routers Gaussian, the Hadamard block what the converter would write. The same --seed gives every tensor name the
same data in every file, so two templates that differ by a feature give two files that differ by that feature only.
Smoothing is made exact: r_e = 1/s_e with s_e 1 or 2 per expert and 256-column block, and the gate/up expert
weights carry s_e in their blocks' fp16 scales (doubling is exact in fp16, subnormals included, and halving in float32,
and q8 activation quantization is invariant under it), so a smoothed file computes the plain file's logits. On a
GPU that matters for speed: the expert matmuls' cost depends on how many tokens each expert gets, and with
smoothing that changed the function, the routing of the random model would change with it. The vocabulary stays
the template's (2048 tokens for the bundled models), so the output matmul is smaller than the real model's: a speed
ratio then weighs the expert layers more, which overstates a per-expert overhead slightly. The output is written to OUT.part and renamed when complete.

Needs numpy and gguf-py (and gguf's own dependency PyYAML) only, so that it runs on a GPU machine without the
converter's dependencies (tools/check_cuda_fusion.py check --synth).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import light_import  # noqa: E402

Q = gguf.GGMLQuantizationType
POOL_ROWS = 64


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int            # dense FFN width (Mixtral: the experts' width too)
    n_ff_exp: int        # expert width
    n_ff_shexp: int      # shared expert width (0: none)
    n_expert: int
    n_expert_used: int
    n_layer: int


SHAPES = {
    # the config.json of each model on the Hugging Face hub
    "qwen1.5-moe-a2.7b": Shape(n_embd=2048, n_head=16, n_head_kv=16, head_dim=128, n_ff=5632, n_ff_exp=1408,
                               n_ff_shexp=5632, n_expert=60, n_expert_used=4, n_layer=24),
    "mixtral-8x7b": Shape(n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_ff=14336, n_ff_exp=14336,
                          n_ff_shexp=0, n_expert=8, n_expert_used=2, n_layer=32),
}


def parse_shape(spec: str) -> Shape:
    """"NAME" or "NAME:LAYERS", NAME a key of SHAPES: that model's shape, with LAYERS blocks if given."""
    name, _, layers = spec.partition(":")
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose one of {', '.join(sorted(SHAPES))}")
    return dataclasses.replace(SHAPES[name], n_layer=int(layers)) if layers else SHAPES[name]


# moeq2gguf.transforms.expert_hadamard.MAX_BLOCK (restated: that module imports torch)
HADAMARD_MAX_BLOCK = 512


def hadamard_block(n_ff_exp: int) -> int:
    """The converter's default block: the largest power of two dividing the expert width, at most 512
    (expert_hadamard.py)."""
    return min(n_ff_exp & -n_ff_exp, HADAMARD_MAX_BLOCK)


# byte offsets of the fp16 fields that scale a block's values (d, and the min where there is one): multiplying
# them by a power of two multiplies the block's dequantized values by it, exactly (ggml's block structs)
SCALE_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q2_K: (80, 82),
                Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}
SMOOTH_GROUP = 256   # columns that share one smoothing factor: a K-quant super-block, a whole number of any block
EXPERT_INPUT_ROLES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_gate_up_exps.weight")


def smoothing_scales(seed: int, layer: int, n_embd: int, n_expert: int) -> np.ndarray:
    """s_e for layer: float32 [n_expert, n_embd], each 256-column group of each expert 1 or 2 (not 1/2: halving
    a subnormal fp16 scale of the weights would round)."""
    rng = np.random.default_rng([seed, layer, 0x5300])
    k = rng.integers(0, 2, (n_expert, n_embd // SMOOTH_GROUP))
    return np.repeat(np.ldexp(np.float32(1), k).astype(np.float32), SMOOTH_GROUP, axis=1)


def scale_expert_columns(blocks: np.ndarray, qtype: Q, scales: np.ndarray) -> np.ndarray:
    """Quantized rows [n_expert * rows_per_expert, row bytes] of an expert-input weight (expert-major), each column
    multiplied by scales [n_expert, n_cols] (powers of two, constant over each block): their scale fields only."""
    if qtype not in SCALE_FIELDS:
        raise SystemExit(f"exact smoothing of {qtype.name} weights is not written in tools/synth_moe_gguf.py; "
                         f"add its scale fields to SCALE_FIELDS")
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    n_expert, n_cols = scales.shape
    out = blocks.copy().reshape(n_expert, -1, n_cols // bs, ts)
    factor = scales[:, ::bs].astype(np.float16)[:, None, :]          # one per block: [n_expert, 1, blocks per row]
    for offset in SCALE_FIELDS[qtype]:
        field = out[..., offset:offset + 2].copy().view(np.float16)[..., 0]
        scaled = field * factor
        assert np.array_equal(scaled / factor, field) and np.isfinite(scaled).all(), "a doubled scale left fp16's range"
        out[..., offset:offset + 2] = scaled[..., None].view(np.uint8)
    return out.reshape(blocks.shape)


def sylvester_hadamard(b: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h / np.float32(np.sqrt(b))


def tensor_shape(name: str, s: Shape, n_vocab: int) -> tuple[int, ...]:
    """GGUF order (ne0 first) of a tensor of the template, at the shape s."""
    E, X, Fe, Fs = s.n_embd, s.n_expert, s.n_ff_exp, s.n_ff_shexp
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    role = name.split(".", 2)[2] if name.startswith("blk.") else name
    shapes = {
        "token_embd.weight": (E, n_vocab), "output.weight": (E, n_vocab), "output_norm.weight": (E,),
        "attn_norm.weight": (E,), "attn_q.weight": (E, q), "attn_k.weight": (E, kv), "attn_v.weight": (E, kv),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,), "attn_output.weight": (q, E),
        "ffn_norm.weight": (E,), "ffn_gate_inp.weight": (E, X),
        "ffn_gate_exps.weight": (E, Fe, X), "ffn_up_exps.weight": (E, Fe, X), "ffn_down_exps.weight": (Fe, E, X),
        "ffn_gate_inp_shexp.weight": (E,), "ffn_gate_shexp.weight": (E, Fs), "ffn_up_shexp.weight": (E, Fs),
        "ffn_down_shexp.weight": (Fs, E),
        "ffn_exps_smooth": (E, X), "ffn_exps_hadamard": (hadamard_block(Fe),) * 2,
    }
    if role not in shapes:
        raise SystemExit(f"{name}: no rule for this tensor's shape in tools/synth_moe_gguf.py; add one")
    return shapes[role]


def hparams(arch: str, s: Shape) -> dict[str, int]:
    """uint32 keys of the template replaced (where the template has them) by the shape's."""
    return {f"{arch}.{k}": v for k, v in {
        "embedding_length": s.n_embd, "feed_forward_length": s.n_ff, "block_count": s.n_layer,
        "attention.head_count": s.n_head, "attention.head_count_kv": s.n_head_kv,
        "attention.key_length": s.head_dim, "attention.value_length": s.head_dim, "rope.dimension_count": s.head_dim,
        "expert_count": s.n_expert, "expert_used_count": s.n_expert_used, "expert_feed_forward_length": s.n_ff_exp,
        "expert_shared_feed_forward_length": s.n_ff_shexp, "expert_hadamard_block": hadamard_block(s.n_ff_exp),
    }.items()}


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, uint32: dict[str, int] | None = None) -> list[str]:
    """Every metadata field of reader into writer, those named in uint32 with that value; returns the keys replaced."""
    uint32, replaced = uint32 or {}, []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in uint32:
            writer.add_uint32(key, uint32[key])
            replaced.append(key)
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    return replaced


def skeleton(src: Path, dst: Path) -> Path:
    """A template of a few hundred KiB: src's metadata and tensor names, each tensor a single F32 zero. synth() reads
    nothing else of a template; llama.cpp cannot load it. (What the prepared files leave on the GPU machine when their
    weights would not fit its 64 MiB transfer.)"""
    reader = gguf.GGUFReader(src)
    part = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(part, reader.fields["general.architecture"].contents())
    copy_fields(reader, writer)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    part.replace(dst)
    return dst


def tensor_data(name: str, shape: tuple[int, ...], qtype: Q, seed: int, pools: dict, smoothed: bool = False) -> np.ndarray:
    """The bytes (quantized: uint8 [rows, row bytes]) or floats of one tensor, from seed and name alone; smoothed:
    the file has ffn_exps_smooth, whose scales the expert-input weights carry."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    n_cols, n_rows = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    role = name.split(".", 2)[2] if name.startswith("blk.") else name
    if role.endswith("norm.weight"):
        data = np.ones(shape[::-1], dtype=np.float32)
    elif role == "ffn_exps_smooth":
        data = 1 / smoothing_scales(seed, int(name.split(".")[1]), shape[0], shape[1])
    elif role == "ffn_exps_hadamard":
        data = sylvester_hadamard(shape[0])
    elif qtype in (Q.F32, Q.F16):
        data = (rng.standard_normal(shape[::-1], dtype=np.float32) / np.sqrt(n_cols)).astype(np.float32)
    else:
        if (qtype, n_cols) not in pools:
            rows = np.random.default_rng([seed, int(qtype), n_cols]).standard_normal((POOL_ROWS, n_cols), dtype=np.float32)
            pools[qtype, n_cols] = light_import.module("formats.ggml_ref").quantize(rows / np.float32(np.sqrt(n_cols)), qtype)
        rows = pools[qtype, n_cols][rng.integers(0, POOL_ROWS, n_rows)]
        if smoothed and role in EXPERT_INPUT_ROLES:   # W diag(s_e): the file's gate/up columns carry s_e
            rows = scale_expert_columns(rows, qtype, smoothing_scales(seed, int(name.split(".")[1]), n_cols, shape[-1]))
        return rows
    return data.astype(np.float16) if qtype == Q.F16 else data


def synth(template: Path, out: Path, s: Shape, mix: str = "Q4_K_M", seed: int = 0) -> dict:
    """Write OUT from TEMPLATE at shape s; returns a summary (bytes, tensor count, keys replaced)."""
    mixes = light_import.module("plan.mixes")
    reader = gguf.GGUFReader(template)
    arch = reader.fields["general.architecture"].contents()
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    names0 = [t.name for t in reader.tensors]
    globals_ = [n for n in names0 if not n.startswith("blk.")]
    block0 = [n.split(".", 2)[2] for n in names0 if n.startswith("blk.0.")]
    names = [n for n in globals_ if n != "output_norm.weight" and n != "output.weight"]
    names += [f"blk.{i}.{role}" for i in range(s.n_layer) for role in block0]
    names += [n for n in ("output_norm.weight", "output.weight") if n in globals_]
    shapes = {n: tensor_shape(n, s, n_vocab) for n in names}
    qtypes = mixes.assign_types([(n, shapes[n][::-1]) for n in names], mix, n_layer=s.n_layer, n_expert=s.n_expert,
                                n_head=s.n_head, n_head_kv=s.n_head_kv)
    part = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(part, arch)
    replaced = copy_fields(reader, writer, hparams(arch, s))
    for n, q in zip(names, qtypes):
        ne = shapes[n]
        if q in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if q == Q.F32 else np.float16)
            writer.add_tensor_info(n, ne[::-1], dtype, int(np.prod(ne)) * dtype.itemsize)
        else:
            bs, ts = gguf.GGML_QUANT_SIZES[q]
            byte_shape = (*ne[::-1][:-1], ne[0] // bs * ts)
            writer.add_tensor_info(n, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    pools: dict = {}
    smoothed = "ffn_exps_smooth" in block0
    for n, q in zip(names, qtypes):
        writer.write_tensor_data(np.ascontiguousarray(tensor_data(n, shapes[n], q, seed, pools, smoothed)))
    writer.close()
    part.replace(out)
    return {"file": str(out), "bytes": out.stat().st_size, "tensors": len(names), "keys": replaced,
            "types": sorted({q.name for q in qtypes})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("template", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--skeleton", action="store_true", help="write TEMPLATE's skeleton to OUT instead")
    ap.add_argument("--shape", metavar="NAME[:LAYERS]",
                    help=f"one of {', '.join(sorted(SHAPES))}, with LAYERS blocks (default: the model's own count)")
    ap.add_argument("--mix", default="Q4_K_M")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.skeleton:
        print(skeleton(args.template, args.out))
        return 0
    if args.shape is None:
        ap.error("--shape is required (or --skeleton)")
    print(synth(args.template, args.out, parse_shape(args.shape), args.mix, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
