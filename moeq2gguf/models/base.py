"""The adapter interface every MoE family implements, and the ModelSpec it produces.

An adapter maps one Hugging Face family (config.json keys, on-disk tensor names in both the
per-expert and the fused expert layouts) onto llama.cpp's GGUF architecture: metadata keys and
tensor names. It does no math beyond reshapes (stacking experts, splitting fused gate/up,
llama's q/k permutation). Everything downstream reads the ModelSpec, never config.json.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import gguf
import torch

from moeq2gguf.errors import CheckpointError, Moeq2ggufError
from moeq2gguf.io.checkpoint import IGNORED_SUFFIXES, CheckpointReader

T = gguf.MODEL_TENSOR
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Routing:
    """How the router's logits become expert weights, as llama.cpp will execute them.

    scoring: softmax (over all experts, then top-k), sigmoid (per expert, then top-k), or
    softmax_topk (top-k on the raw logits, then softmax over the k chosen: GPT-OSS).
    selection_bias: a per-expert bias (GGUF exp_probs_b) added to the scores for choosing the
    experts only; the weights use the unbiased scores (DeepSeek-V3's e_score_correction_bias).
    n_groups / n_groups_used: experts split into n_groups equal groups, each scored by the sum of
    its two best (biased) scores, and only the best n_groups_used groups compete (DeepSeek-V3).
    router_bias: the router linear has a bias (GPT-OSS)."""
    scoring: str = "softmax"          # softmax | sigmoid | softmax_topk
    renormalize: bool = False         # renormalise the top-k weights to sum to 1
    scale: float = 1.0                # routed_scaling_factor
    selection_bias: bool = False
    n_groups: int = 1
    n_groups_used: int = 1
    router_bias: bool = False


@dataclass(frozen=True)
class MLA:
    """DeepSeek-V2/V3 multi-head latent attention sizes (llama.cpp deepseek2). q_lora_rank 0 means
    the "lite" layout: one q projection instead of q_a -> norm -> q_b."""
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet sizes (Qwen3.5 / Qwen3-Next linear-attention layers; llama.cpp's ssm.* keys). Value heads are
    tiled over key heads in GGUF order: value head h reads key head h % n_k_heads."""
    n_k_heads: int
    n_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.n_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.n_v_heads * self.head_v_dim


@dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension as llama.cpp reads it (rope.scaling.*). log_mul is DeepSeek-V2's
    mscale_all_dim (written times 0.1, llama.cpp's own convention for deepseek2)."""
    kind: str                          # yarn
    factor: float
    original_context_length: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    log_mul: float = 0.0


@dataclass(frozen=True)
class ModelSpec:
    family: str
    hf_architecture: str
    gguf_arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    n_experts: int
    n_experts_used: int
    expert_width: int
    routing: Routing
    shared_expert_width: int = 0
    shared_expert_gated: bool = False
    dense_width: int = 0
    attention_bias: bool = False
    tie_embeddings: bool = False
    moe_layers: tuple[int, ...] = ()
    # Added for the families beyond Mixtral/Qwen2-MoE; the defaults describe those two.
    n_shared_experts: int = 0          # shared experts fused into one FFN of shared_expert_width
    qk_norm: str = ""                  # "" | head (RMSNorm per head: Qwen3-MoE) | full (over the whole projection: OLMoE)
                                       # | l2 (Llama-4: weightless RMSNorm per head after RoPE, RoPE layers only)
    mla: MLA | None = None             # DeepSeek-V2/V3 latent attention; n_kv_heads/head_dim then describe the expanded heads
    rope_dim: int = 0                  # rotated dimensions per head when not head_dim (MLA: qk_rope_head_dim)
    rope_scaling: RopeScaling | None = None
    sliding_window: int = 0            # GPT-OSS: window of the layers in swa_layers
    swa_layers: tuple[int, ...] = ()
    attention_sinks: bool = False      # GPT-OSS: a learned per-head logit in every softmax
    attention_out_bias: bool = False
    expert_activation: str = "silu"    # silu (SwiGLU) | swiglu_oai (GPT-OSS: clamped, (up + 1) * gate * sigmoid(alpha * gate))
    expert_bias: bool = False          # routed experts' gate/up/down carry biases (GPT-OSS)
    swiglu_alpha: float = 0.0
    swiglu_limit: float = 0.0
    # Llama-4: routed experts read x * (their routing weight) and their outputs are summed unweighted; layers in
    # nope_layers have no RoPE (and llama.cpp's temperature tuning of q); rope_freq_factors: llama3 RoPE scaling
    # (GGUF rope_freqs: each frequency divided by its factor); attention_chunk: chunked attention of the RoPE layers
    expert_weight_on_input: bool = False
    nope_layers: tuple[int, ...] = ()
    rope_freq_factors: tuple[float, ...] | None = None
    attention_chunk: int = 0
    attn_output_gate: bool = False     # Qwen3.5: q_proj also gives a per-head gate; attention output * sigmoid(gate)
    linear_attention: LinearAttention | None = None   # Qwen3.5: Gated DeltaNet in the layers of linear_layers
    linear_layers: tuple[int, ...] = ()
    # the patched llama.cpp's expert Hadamard (transforms/expert_hadamard.py): each expert's intermediate activation
    # is rotated blockwise by this power-of-two order before the down projection; 0: off (stock llama.cpp)
    expert_hadamard_block: int = 0

    @property
    def dense_layers(self) -> tuple[int, ...]:
        """Layers with a plain (dense) FFN instead of experts (DeepSeek's first_k_dense_replace)."""
        return tuple(i for i in range(self.n_layers) if i not in self.moe_layers)

    def __post_init__(self) -> None:
        if self.n_experts <= 0 or not 0 < self.n_experts_used <= self.n_experts:
            raise Moeq2ggufError(
                f"expert counts {self.n_experts_used} of {self.n_experts} are invalid; config.json must give "
                "a positive expert count and 0 < experts per token <= experts")


@dataclass
class TensorSource:
    """One GGUF tensor and how to produce it from the checkpoint (float32, torch order)."""
    name: str
    shape: tuple[int, ...]
    role: str                        # embedding | output | attention | router | expert | shared | dense | norm | bias | conv
    load: Callable[[], torch.Tensor]
    layer: int | None = None
    inputs: tuple[str, ...] = ()     # the checkpoint tensors it is made from
    # A tensor the checkpoint already holds in a GGML block format (GPT-OSS MXFP4 experts): load()
    # still gives its exact float values, load_raw() the GGML blocks as uint8 [..., row bytes], so
    # a writer can keep the original format instead of re-encoding.
    raw_qtype: gguf.GGMLQuantizationType | None = None
    load_raw: Callable[[], torch.Tensor] | None = None


def rope_halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from [x0..x(d/2-1), y0..] to [x0, y0, x1, y1, ...]."""
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())


def config_value(config: dict, *keys: str, default=None, required: bool = True):
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    if default is not None or not required:
        return default
    raise CheckpointError(f"config.json lacks '{keys[0]}', which this architecture needs; the checkpoint's config is incomplete")


def rope_theta_of(config: dict, default: float = 10000.0) -> float:
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params.get("rope_type", "default") not in ("default", None):
        raise Moeq2ggufError(f"rope type {params['rope_type']!r} is not supported yet; only default RoPE is")
    return float(params.get("rope_theta", config.get("rope_theta", default)))


def rope_parameters_of(config: dict, default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """rope_theta and YaRN scaling, for families whose llama.cpp graph applies YaRN (DeepSeek-V2/V3,
    GPT-OSS). Other scaling types are refused, as rope_theta_of does."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", config.get("rope_theta", default_theta)))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise Moeq2ggufError(f"rope type {kind!r} is not supported yet; only default RoPE and YaRN are")
    if params.get("truncate") is False:
        # GPT-OSS: llama.cpp always rounds the YaRN correction range to whole dimensions. Measured on a
        # tiny GPT-OSS with the released rope settings: logits off by 3e-3 (relative) at 64 tokens,
        # 0.16 at 400 tokens (97% same argmax); llama.cpp's own converter writes the same file.
        log.warning("rope truncate=false: llama.cpp rounds the YaRN correction range to whole dimensions, the "
                    "reference does not, so some rotary frequencies differ and logits drift with position")
    return theta, RopeScaling(
        kind="yarn", factor=float(params["factor"]),
        original_context_length=int(params.get("original_max_position_embeddings") or config.get("max_position_embeddings")),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        log_mul=float(params.get("mscale_all_dim") or 0.0))


def add_rope_scaling(writer: gguf.GGUFWriter, scaling: RopeScaling | None) -> None:
    if scaling is None:
        return
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(scaling.factor)
    writer.add_rope_scaling_orig_ctx_len(scaling.original_context_length)
    writer.add_rope_scaling_yarn_beta_fast(scaling.beta_fast)
    writer.add_rope_scaling_yarn_beta_slow(scaling.beta_slow)
    if scaling.log_mul:
        writer.add_rope_scaling_yarn_log_mul(0.1 * scaling.log_mul)


class FamilyAdapter:
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    family: ClassVar[str]
    default_pre_tokenizer: ClassVar[str] = "default"
    # llama.cpp's graph for the arch loads output.weight unconditionally (no fallback to token_embd)
    requires_output: ClassVar[bool] = False

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self.config = reader.config
        self.spec = self.make_spec(self.config)

    # --- what a family implements ------------------------------------------------------------
    def make_spec(self, config: dict) -> ModelSpec:
        raise NotImplementedError

    def add_arch_metadata(self, writer: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def layer_tensors(self, bid: int) -> list[TensorSource]:
        raise NotImplementedError

    # --- shared pieces -----------------------------------------------------------------------
    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @staticmethod
    def gguf_name(tensor: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
        base = gguf.TENSOR_NAMES[tensor].format(bid=bid)
        return f"{base}.{suffix}" if suffix else base

    def add_common_metadata(self, writer: gguf.GGUFWriter) -> None:
        s = self.spec
        writer.add_context_length(s.context_length)
        writer.add_embedding_length(s.hidden_size)
        writer.add_block_count(s.n_layers)
        writer.add_head_count(s.n_heads)
        writer.add_head_count_kv(s.n_kv_heads)
        writer.add_rope_freq_base(s.rope_theta)
        writer.add_rope_dimension_count(s.rope_dim or s.head_dim)
        writer.add_layer_norm_rms_eps(s.rms_norm_eps)
        writer.add_expert_count(s.n_experts)
        writer.add_expert_used_count(s.n_experts_used)
        writer.add_vocab_size(s.vocab_size)
        if s.head_dim * s.n_heads != s.hidden_size:
            writer.add_key_length(s.head_dim)
            writer.add_value_length(s.head_dim)

    def tensor(self, hf_name: str, tensor: gguf.MODEL_TENSOR, role: str, bid: int | None = None,
               suffix: str = "weight", transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TensorSource:
        if not self.reader.has(hf_name):
            raise CheckpointError(f"tensor {hf_name} is missing from {self.reader.model_dir}; the checkpoint is incomplete")

        def load() -> torch.Tensor:
            t = self.reader.get(hf_name)
            return transform(t) if transform else t

        shape = self.reader.shape(hf_name)
        if shape and shape[0] == 1 and len(shape) == 2 and role == "router":
            shape = shape[1:]  # [1, n_embd] gates are 1-D in GGUF
        return TensorSource(self.gguf_name(tensor, bid, suffix), shape, role, load, bid, (hf_name,))

    def stacked_experts(self, bid: int, per_expert: dict[gguf.MODEL_TENSOR, str], fused_gate_up: str | None,
                        fused_down: str | None) -> list[TensorSource]:
        """Routed experts as three [E, out, in] tensors, from either on-disk layout.

        per_expert maps ffn_{gate,up,down}_exps to a name with {e} for the expert index.
        Fused layout: gate_up [E, 2*ff, in] (gate rows first) and down [E, out, ff]."""
        n_expert = self.spec.n_experts
        first = {k: v.format(e=0) for k, v in per_expert.items()}
        if all(self.reader.has(n) for n in first.values()):
            sources = []
            for kind, pattern in per_expert.items():
                names = [pattern.format(e=e) for e in range(n_expert)]
                missing = [n for n in names if not self.reader.has(n)]
                if missing:
                    raise CheckpointError(f"expert tensor {missing[0]} is missing ({len(missing)} of {n_expert} experts absent); the checkpoint is incomplete")
                shape = (n_expert, *self.reader.shape(names[0]))

                def load(names=names) -> torch.Tensor:
                    return torch.stack([self.reader.get(n) for n in names])

                sources.append(TensorSource(self.gguf_name(kind, bid), shape, "expert", load, bid, tuple(names)))
            return sources
        if fused_gate_up and self.reader.has(fused_gate_up) and fused_down and self.reader.has(fused_down):
            e, two_ff, n_in = self.reader.shape(fused_gate_up)
            ff = two_ff // 2

            def gate() -> torch.Tensor:
                return self.reader.get(fused_gate_up)[:, :ff].contiguous()

            def up() -> torch.Tensor:
                return self.reader.get(fused_gate_up)[:, ff:].contiguous()

            return [
                TensorSource(self.gguf_name(T.FFN_GATE_EXP, bid), (e, ff, n_in), "expert", gate, bid, (fused_gate_up,)),
                TensorSource(self.gguf_name(T.FFN_UP_EXP, bid), (e, ff, n_in), "expert", up, bid, (fused_gate_up,)),
                TensorSource(self.gguf_name(T.FFN_DOWN_EXP, bid), self.reader.shape(fused_down), "expert",
                             lambda: self.reader.get(fused_down), bid, (fused_down,)),
            ]
        raise CheckpointError(
            f"layer {bid} has no routed expert tensors (looked for {first[T.FFN_GATE_EXP]} and {fused_gate_up}); "
            "the checkpoint is incomplete or not of this family")

    def raw(self, name: str) -> torch.Tensor:
        """A checkpoint tensor in its stored dtype (packed formats such as MXFP4 blocks), not float32."""
        if not self.reader.has(name):
            raise CheckpointError(f"tensor {name} is missing from {self.reader.model_dir}; the checkpoint is incomplete")
        self.reader.mark_used(name)
        return self.reader.get_raw(name)

    def dense_ffn(self, bid: int, prefix: str) -> list[TensorSource]:
        """A plain SwiGLU FFN (`{prefix}.gate_proj/up_proj/down_proj`) as ffn_gate/up/down."""
        return [
            self.tensor(f"{prefix}.gate_proj.weight", T.FFN_GATE, "dense", bid),
            self.tensor(f"{prefix}.up_proj.weight", T.FFN_UP, "dense", bid),
            self.tensor(f"{prefix}.down_proj.weight", T.FFN_DOWN, "dense", bid),
        ]

    def shared_ffn(self, bid: int, prefix: str) -> list[TensorSource]:
        """Shared experts (`{prefix}.gate_proj/up_proj/down_proj`) as ffn_*_shexp."""
        return [
            self.tensor(f"{prefix}.gate_proj.weight", T.FFN_GATE_SHEXP, "shared", bid),
            self.tensor(f"{prefix}.up_proj.weight", T.FFN_UP_SHEXP, "shared", bid),
            self.tensor(f"{prefix}.down_proj.weight", T.FFN_DOWN_SHEXP, "shared", bid),
        ]

    def llama_attention(self, bid: int, *, biases: bool = False, qk_norm: bool = False,
                        permute_qk: bool = False) -> list[TensorSource]:
        """The Hugging Face llama-style attention block and both norms of layer bid:
        input_layernorm, q/k/v(/biases)/o projections, optional q/k norms, post_attention_layernorm.
        permute_qk: reorder q/k rows for llama.cpp's pairwise RoPE (archs llama, deepseek)."""
        s, p = self.spec, f"model.layers.{bid}."
        heads = {"q_proj": s.n_heads, "k_proj": s.n_kv_heads}
        out = [self.tensor(p + "input_layernorm.weight", T.ATTN_NORM, "norm", bid)]
        for proj, kind in (("q_proj", T.ATTN_Q), ("k_proj", T.ATTN_K), ("v_proj", T.ATTN_V)):
            transform = None
            if permute_qk and proj in heads:
                transform = lambda w, n=heads[proj]: rope_halves_to_pairs(w, n)  # noqa: E731
            out.append(self.tensor(p + f"self_attn.{proj}.weight", kind, "attention", bid, transform=transform))
            if biases:
                out.append(self.tensor(p + f"self_attn.{proj}.bias", kind, "bias", bid, suffix="bias"))
        out.append(self.tensor(p + "self_attn.o_proj.weight", T.ATTN_OUT, "attention", bid))
        if qk_norm:
            out.append(self.tensor(p + "self_attn.q_norm.weight", T.ATTN_Q_NORM, "norm", bid))
            out.append(self.tensor(p + "self_attn.k_norm.weight", T.ATTN_K_NORM, "norm", bid))
        out.append(self.tensor(p + "post_attention_layernorm.weight", T.FFN_NORM, "norm", bid))
        return out

    def hf_routed_experts(self, bid: int, prefix: str = "mlp", fused: bool = True) -> list[TensorSource]:
        """Router + routed experts under `prefix` with Hugging Face's usual names
        (gate.weight, experts.E.{gate,up,down}_proj.weight, or the fused experts.gate_up_proj/down_proj)."""
        p = f"model.layers.{bid}.{prefix}."
        return [
            self.tensor(p + "gate.weight", T.FFN_GATE_INP, "router", bid),
            *self.stacked_experts(
                bid,
                {T.FFN_GATE_EXP: p + "experts.{e}.gate_proj.weight",
                 T.FFN_UP_EXP: p + "experts.{e}.up_proj.weight",
                 T.FFN_DOWN_EXP: p + "experts.{e}.down_proj.weight"},
                fused_gate_up=p + "experts.gate_up_proj" if fused else None,
                fused_down=p + "experts.down_proj" if fused else None),
        ]

    def head_tensors(self) -> list[TensorSource]:
        return [self.tensor("model.embed_tokens.weight", T.TOKEN_EMBD, "embedding")]

    def tied_output(self) -> TensorSource:
        """`output` made from the embeddings, for graphs that require an output tensor even when the
        checkpoint ties it (requires_output)."""
        src = self.tensor("model.embed_tokens.weight", T.OUTPUT, "output")
        src.inputs = ()  # the embedding is accounted for by token_embd
        return src

    def tail_tensors(self) -> list[TensorSource]:
        out = [self.tensor("model.norm.weight", T.OUTPUT_NORM, "norm")]
        if self.reader.has("lm_head.weight"):
            out.append(self.tensor("lm_head.weight", T.OUTPUT, "output"))
        elif not self.spec.tie_embeddings:
            raise CheckpointError("lm_head.weight is missing and tie_word_embeddings is false; the checkpoint is incomplete")
        elif self.requires_output:
            out.append(self.tied_output())
        return out

    def all_tensors(self) -> list[TensorSource]:
        """Every GGUF tensor in file order: embeddings, layers 0..n-1, final norm and head."""
        sources = self.head_tensors()
        for bid in range(self.spec.n_layers):
            sources.extend(self.layer_tensors(bid))
        sources.extend(self.tail_tensors())
        return sources

    def ignored(self, name: str) -> bool:
        """Checkpoint tensors the GGUF deliberately leaves out (e.g. DeepSeek-V3's multi-token
        prediction layer, which llama.cpp's main graph never runs)."""
        return False

    def check_all_used(self, sources: list[TensorSource]) -> None:
        """Leftover checkpoint tensors mean the adapter misread the family: refuse rather than drop weights."""
        used = {name for s in sources for name in s.inputs}
        used |= {f"{name}_scale_inv" for name in used}   # FP8 block scales, read with their weight (io/checkpoint.py)
        if self.spec.tie_embeddings:
            used.add("lm_head.weight")
        leftover = [n for n in self.reader.names()
                    if n not in used and not n.endswith(IGNORED_SUFFIXES) and not self.ignored(n)]
        if leftover:
            raise CheckpointError(
                f"{len(leftover)} checkpoint tensors have no place in the {self.arch_name} GGUF (first: {leftover[0]}); "
                f"the checkpoint does not match the {self.family} layout this converter knows")
